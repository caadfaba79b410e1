//! Redis stopped and started again under traffic, with two nodes on a private `redis-server`: sends keep
//! committing, local delivery goes on, `/health` says `"redis":"down"` with status 200, and once Redis
//! is back every client has every notification exactly once.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::pg::PgSchema;
use common::redis::{cluster_node, PrivateRedis};
use common::{TestServer, WsClient};
use serde_json::json;

/// Waits until the node's `/health` reports `redis` as `state`, checking the status stays 200.
fn wait_redis_health(server: &TestServer, state: &str) {
    common::wait_until(
        &format!("redis to be {state}"),
        Duration::from_secs(20),
        || {
            let health = server.get("/health");
            assert_eq!(health.status, 200, "the store is what health is about");
            health.json()["redis"] == state
        },
    );
}

/// Reads notifications until every id of `expected` arrived, then a second of silence; returns the
/// order of arrival, failing on a duplicate or a stranger.
fn receive_exactly(client: &mut WsClient, expected: &[String]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    while seen.len() < expected.len() {
        let n = client.expect_notification();
        let id = n["id"].as_str().unwrap().to_owned();
        assert!(expected.contains(&id), "not expected: {n}");
        *seen.entry(id.clone()).or_default() += 1;
        assert_eq!(seen[&id], 1, "delivered twice: {n}");
        order.push(id);
    }
    client.expect_silence(Duration::from_secs(1));
    order
}

#[test]
fn a_redis_restart_under_traffic_loses_and_duplicates_nothing() {
    let (Some(schema), Some(mut redis_server)) = (PgSchema::create(), PrivateRedis::start()) else {
        return;
    };
    let redis = redis_server.as_test_redis();
    let a = cluster_node(&schema, &redis);
    let b = cluster_node(&schema, &redis);
    let mut alice = a.ws("user_id=alice");
    let mut bob = b.ws("user_id=bob&channels=news");
    bob.expect_event("subscribed");
    redis.wait_numsub("u:alice", 1);
    redis.wait_numsub("c:news", 1);
    redis.wait_numsub("b", 2);
    assert_eq!(a.get("/health").json()["redis"], "ok");

    let mut for_alice = vec![b.send(json!({"user_id": "alice", "message": "before"}))];
    assert_eq!(alice.expect_notification()["id"], for_alice[0].as_str());
    let mut for_bob = Vec::new();

    redis_server.stop();
    wait_redis_health(&a, "down");
    wait_redis_health(&b, "down");

    // Local delivery goes on without Redis.
    let local: Vec<String> = (0..10)
        .map(|i| a.send(json!({"user_id": "alice", "message": format!("local {i}")})))
        .collect();
    for id in &local {
        assert_eq!(alice.expect_notification()["id"], id.as_str());
    }
    for_alice.extend(local);
    // Cross-node sends commit (2xx) while Redis is away.
    let mut outage_remote = Vec::new();
    for i in 0..10 {
        outage_remote.push(b.send(json!({"user_id": "alice", "message": format!("remote {i}")})));
        for_bob.push(a.send(json!({"channels": ["news"], "message": format!("news {i}")})));
    }
    for i in 0..5 {
        let id = b.send(json!({"broadcast": true, "message": format!("all {i}")}));
        for_alice.push(id.clone());
        for_bob.push(id);
    }
    for_alice.extend(outage_remote.iter().cloned());

    redis_server.restart();
    wait_redis_health(&a, "ok");
    wait_redis_health(&b, "ok");
    redis.wait_numsub("u:alice", 1);
    redis.wait_numsub("c:news", 1);
    for i in 0..5 {
        for_alice.push(b.send(json!({"user_id": "alice", "message": format!("after {i}")})));
        for_bob.push(a.send(json!({"channels": ["news"], "message": format!("after {i}")})));
    }

    let alice_got = receive_exactly(&mut alice, &for_alice[11..]);
    let bob_got = receive_exactly(&mut bob, &for_bob);
    // What the catch-up delivered came in id order.
    let caught_up: Vec<&String> = alice_got
        .iter()
        .filter(|id| outage_remote.contains(id))
        .collect();
    let mut sorted = caught_up.clone();
    sorted.sort();
    assert_eq!(caught_up, sorted, "caught up in id order");
    assert_eq!(bob_got.len(), 10 + 5 + 5);
    let metrics = String::from_utf8(a.get("/metrics").body).unwrap();
    let value = |name: &str| a.metric(name);
    assert_eq!(value("notif_redis_up"), 1);
    assert_eq!(value("notif_redis_outages_total"), 1);
    assert!(value("notif_redis_caught_up_total") >= 10, "{metrics}");
    assert!(value("notif_redis_published_total") >= 25, "{metrics}");
}

#[test]
fn a_node_started_while_redis_is_down_serves_locally_and_catches_up_when_it_comes() {
    let (Some(schema), Some(mut redis_server)) = (PgSchema::create(), PrivateRedis::start()) else {
        return;
    };
    let redis = redis_server.as_test_redis();
    redis_server.stop();
    let a = cluster_node(&schema, &redis);
    let b = cluster_node(&schema, &redis);
    wait_redis_health(&a, "down");
    let mut alice = a.ws("user_id=alice");
    let local = a.send(json!({"user_id": "alice", "message": "local"}));
    assert_eq!(alice.expect_notification()["id"], local.as_str());
    let remote = b.send(json!({"user_id": "alice", "message": "stored on B"}));

    redis_server.restart();
    wait_redis_health(&a, "ok");
    wait_redis_health(&b, "ok");
    redis.wait_numsub("u:alice", 1);
    let live = b.send(json!({"user_id": "alice", "message": "live"}));
    receive_exactly(&mut alice, &[remote, live]);
}
