//! The Pusher-protocol clients, unchanged, against the real server: `tests/pusher/clients.test.mjs`
//! (pusher-js, laravel-echo and the `pusher` HTTP SDK, versions locked by its package-lock.json) run
//! by node's test runner against two real nodes joined by the machine's Redis (presence through
//! laravel-echo's `join().here/joining/leaving` included, with members on both nodes). Node.js 20.14+, npm and
//! Redis are needed; without them the test fails under `CI=true` and is skipped with a note elsewhere.

mod common;

use common::node::{prepared_node_in, run_node_tests_in};
use common::redis::TestRedis;
use common::TestServer;

/// The package folder of the suite.
const SUITE: &str = "tests/pusher";

#[test]
fn pusher_js_laravel_echo_and_the_pusher_sdk_pass_against_two_nodes() {
    let Some(node) = prepared_node_in(SUITE) else {
        return;
    };
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    let env = [
        ("PUSHER_APPS", "app-1:key-1:secret-1,app-2:key-2:secret-2"),
        ("REDIS_URL", redis.url.as_str()),
        ("REDIS_PREFIX", redis.prefix.as_str()),
    ];
    let a = TestServer::start_with(&env);
    let b = TestServer::start_with(&env);
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    run_node_tests_in(
        &node,
        SUITE,
        &["clients.test.mjs"],
        &[
            ("NODE_A", addr_a.as_str()),
            ("NODE_B", addr_b.as_str()),
            ("PUSHER_APP_ID", "app-1"),
            ("PUSHER_KEY", "key-1"),
            ("PUSHER_SECRET", "secret-1"),
            ("LARAVEL_USER", "42"),
        ],
    );
}
