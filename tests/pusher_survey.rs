//! The Pusher HTTP API's channel queries across nodes (a survey over the bus): `occupied`,
//! `subscription_count` and the `filter_by_prefix` list count the subscribers of every node, with
//! `REDIS_URL` and with `REDIS_CLUSTER`, and a node that does not answer within `SURVEY_TIMEOUT_MS`
//! is left out (the others' counts still answer, and the timeout is counted); while Redis is away a
//! node answers at once with its own counts.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::redis_cluster::TestCluster;
use common::{wait_for, TestServer};
use notification_service::pusher::sign::sign;
use serde_json::{json, Value};
use tungstenite::Message;

const APPS: &str = "app-1:key-1:secret-1";

type Socket = tungstenite::WebSocket<TcpStream>;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `GET path?query` on `server`, signed as the `pusher` SDK signs it (`query` holds no escapes).
fn signed_get(server: &TestServer, path: &str, query: &str) -> Value {
    let mut params: Vec<String> = vec![
        "auth_key=key-1".into(),
        format!("auth_timestamp={}", now()),
        "auth_version=1.0".into(),
    ];
    params.extend(query.split('&').filter(|p| !p.is_empty()).map(String::from));
    params.sort();
    let joined = params.join("&");
    let signature = sign("secret-1", &format!("GET\n{path}\n{joined}"));
    let r = server.request(
        "GET",
        &format!("{path}?{joined}&auth_signature={signature}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// What `server` says of one channel.
fn channel_info(server: &TestServer, channel: &str) -> Value {
    signed_get(server, &format!("/apps/app-1/channels/{channel}"), "")
}

/// What `server` lists for the channels starting with `prefix`.
fn channel_list(server: &TestServer, prefix: &str) -> Value {
    signed_get(
        server,
        "/apps/app-1/channels",
        &format!("filter_by_prefix={prefix}"),
    )
}

fn next_json(ws: &mut Socket) -> Value {
    loop {
        match ws.read().expect("a frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
            Message::Close(frame) => return json!({"closed": frame.map(|f| u16::from(f.code))}),
            _ => continue,
        }
    }
}

/// A Pusher-protocol client on `server`, subscribed to public channel `channel`.
fn subscriber(server: &TestServer, channel: &str) -> Socket {
    let url = format!(
        "ws://{}/app/key-1?protocol=7&client=rust&version=1",
        server.addr
    );
    let (mut ws, _) = tungstenite::client(url, server.tcp()).expect("Pusher handshake");
    assert_eq!(next_json(&mut ws)["event"], "pusher:connection_established");
    ws.send(Message::text(
        json!({"event":"pusher:subscribe","data":{"channel":channel}}).to_string(),
    ))
    .unwrap();
    let ok = next_json(&mut ws);
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    ws
}

/// Waits until `ask` gives `want` (the first answers may come before the nodes have seen each
/// other announce themselves: a node not seen yet is not asked).
fn expect(what: &str, want: Value, mut ask: impl FnMut() -> Value) {
    let mut last = Value::Null;
    wait_for(what, Duration::from_secs(20), || {
        last = ask();
        (last == want).then_some(())
    });
}

/// Subscribers on node `b` only and on both; node `a` answers with the sums, and a subscriber that
/// leaves `b` makes `a`'s count drop.
fn counts_cover_both_nodes(a: &TestServer, b: &TestServer) {
    let _on_a = subscriber(a, "room-1");
    let _on_b = [subscriber(b, "room-1"), subscriber(b, "room-1")];
    let only_b = subscriber(b, "room-2");
    let _elsewhere = subscriber(b, "other");
    expect(
        "room-1 counted on both nodes",
        json!({"occupied":true,"subscription_count":3}),
        || channel_info(a, "room-1"),
    );
    assert_eq!(
        channel_info(a, "room-2"),
        json!({"occupied":true,"subscription_count":1})
    );
    assert_eq!(
        channel_list(a, "room-"),
        json!({"channels":{"room-1":{"subscription_count":3},"room-2":{"subscription_count":1}}})
    );
    assert_eq!(
        channel_info(b, "room-1"),
        json!({"occupied":true,"subscription_count":3})
    );
    drop(only_b);
    expect(
        "room-2 empty once its subscriber left node b",
        json!({"occupied":false,"subscription_count":0}),
        || channel_info(a, "room-2"),
    );
    assert_eq!(
        channel_list(a, "room-"),
        json!({"channels":{"room-1":{"subscription_count":3}}})
    );
}

/// A node with the Pusher app, joined through `target` (`REDIS_URL` or `REDIS_CLUSTER` and its value)
/// under `prefix`, with `extra` settings.
fn pusher_node(target: (&str, &str), prefix: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("PUSHER_APPS", APPS), target, ("REDIS_PREFIX", prefix)];
    env.extend_from_slice(extra);
    TestServer::start_with(&env)
}

#[test]
fn channel_queries_count_the_subscribers_of_every_node() {
    let Some(redis) = common::redis::TestRedis::shared() else {
        return;
    };
    let node = || {
        pusher_node(
            ("REDIS_URL", &redis.url),
            &redis.prefix,
            &[("REDIS_NODE_TIMEOUT_MS", "600")],
        )
    };
    let (a, b) = (node(), node());
    redis.wait_numsub("b", 2);
    counts_cover_both_nodes(&a, &b);
}

#[test]
fn channel_queries_count_every_node_on_a_redis_cluster() {
    let Some(cluster) = TestCluster::start() else {
        return;
    };
    let prefix = format!("nstest:{}:", uuid::Uuid::now_v7().simple());
    let seeds = cluster.seeds();
    let node = || {
        pusher_node(
            ("REDIS_CLUSTER", &seeds),
            &prefix,
            &[("REDIS_NODE_TIMEOUT_MS", "600")],
        )
    };
    let (a, b) = (node(), node());
    counts_cover_both_nodes(&a, &b);
}

#[test]
fn a_node_that_does_not_answer_is_left_out_after_the_survey_timeout() {
    let Some(redis) = common::redis::TestRedis::shared() else {
        return;
    };
    // The stopped node's announcement stays fresh for the whole test: the others still wait for it.
    let node = || {
        pusher_node(
            ("REDIS_URL", &redis.url),
            &redis.prefix,
            &[
                ("REDIS_NODE_TIMEOUT_MS", "9000"),
                ("SURVEY_TIMEOUT_MS", "1500"),
            ],
        )
    };
    let (a, b, c) = (node(), node(), node());
    redis.wait_numsub("b", 3);
    let _on_b = subscriber(&b, "room");
    let _on_c = [subscriber(&c, "room"), subscriber(&c, "room")];
    expect(
        "room counted on b and c",
        json!({"occupied":true,"subscription_count":3}),
        || channel_info(&a, "room"),
    );
    let timeouts = a.metric("notif_survey_timeouts_total");

    unsafe { libc::kill(c.pid() as i32, libc::SIGSTOP) };
    let asked = Instant::now();
    let answer = channel_info(&a, "room");
    let took = asked.elapsed();
    unsafe { libc::kill(c.pid() as i32, libc::SIGCONT) };
    assert_eq!(answer, json!({"occupied":true,"subscription_count":1}));
    // Generous: SURVEY_TIMEOUT_MS is 1.5 s; anything under 10 s shows it did not wait for c.
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert_eq!(a.metric("notif_survey_timeouts_total"), timeouts + 1);
}

#[test]
fn while_redis_is_away_a_node_answers_at_once_with_its_own_counts() {
    let Some(mut redis_server) = common::redis::PrivateRedis::start() else {
        return;
    };
    let redis = redis_server.as_test_redis();
    // A survey that waited for the other node would take a minute: the answer must not.
    let node = || {
        pusher_node(
            ("REDIS_URL", &redis.url),
            &redis.prefix,
            &[
                ("REDIS_NODE_TIMEOUT_MS", "600"),
                ("SURVEY_TIMEOUT_MS", "60000"),
            ],
        )
    };
    let (a, b) = (node(), node());
    redis.wait_numsub("b", 2);
    let _on_a = subscriber(&a, "room");
    let _on_b = subscriber(&b, "room");
    expect(
        "room counted on both nodes",
        json!({"occupied":true,"subscription_count":2}),
        || channel_info(&a, "room"),
    );
    redis_server.stop();
    wait_for("redis to be down on a", Duration::from_secs(20), || {
        (a.get("/health").json()["redis"] == "down").then_some(())
    });
    let asked = Instant::now();
    assert_eq!(
        channel_info(&a, "room"),
        json!({"occupied":true,"subscription_count":1})
    );
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "answered after {:?}",
        asked.elapsed()
    );
}
