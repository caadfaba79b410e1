//! Presence channels (`presence-…`), through the public interfaces: `join`/`leave` events to the
//! channel's subscribers when a user's first connection arrives and its last one goes (across shards,
//! and across nodes on Redis and on a Redis Cluster), the `presence` action, the REST route, and the
//! users of a killed node leaving within the documented bound.

mod common;

use std::time::{Duration, Instant};

use common::redis::TestRedis;
use common::redis_cluster::TestCluster;
use common::{wait_until, TestServer, WsClient};
use serde_json::{json, Value};

/// A client of `user` subscribed to `channel` (its `subscribed` event read).
fn member(server: &TestServer, user: &str, channel: &str) -> WsClient {
    let mut c = server.ws(&format!("user_id={user}&channels={channel}"));
    c.expect_event("subscribed");
    c
}

/// [`member`] on a chosen shard. It subscribes once there: the connections that landed on the other
/// shard meanwhile never joined.
fn member_on_shard(server: &TestServer, user: &str, channel: &str, shard: usize) -> WsClient {
    let mut c = server.ws_on_shard(&format!("user_id={user}"), shard);
    c.send_json(json!({"action": "subscribe", "channels": [channel]}));
    c.expect_event("subscribed");
    c
}

/// `GET path` with the API key `key`.
fn get_with_key(server: &TestServer, path: &str, key: &str) -> common::HttpResponse {
    let raw = server.raw(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-API-Key: {key}\r\n\r\n")
            .as_bytes(),
    );
    common::parse_responses(&raw)
        .into_iter()
        .next()
        .expect("a response")
}

/// Expects the next frame to be `event` (`join`/`leave`) of `user` on `channel`.
fn expect_change(client: &mut WsClient, event: &str, channel: &str, user: &str) {
    let v = client.next_json();
    assert_eq!(
        v,
        json!({"event": event, "channel": channel, "user_id": user}),
        "expected {event} of {user}"
    );
}

/// The `presence` action's answer on `client`.
fn ask(client: &mut WsClient, channel: &str) -> Value {
    client.send_json(json!({"action": "presence", "channel": channel}));
    client.next_json()
}

/// The users the REST route lists for `channel` on `server`.
fn rest_users(server: &TestServer, channel: &str) -> Vec<String> {
    let r = server.get(&format!("/api/v1/channels/{channel}/presence"));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let body = r.json();
    let users: Vec<String> = body["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(body["user_count"], users.len(), "{body}");
    assert_eq!(body["channel"], channel);
    users
}

#[test]
fn a_user_joins_once_and_leaves_once_across_shards() {
    let server = TestServer::start_with(&[("SHARDS", "2")]);
    let channel = "presence-room";
    // The watcher joins first: it hears its own join.
    let mut watcher = member_on_shard(&server, "w", channel, 0);
    expect_change(&mut watcher, "join", channel, "w");

    // Ann's first connection, on the other shard: everyone hears one join, Ann included.
    let mut laptop = member_on_shard(&server, "ann", channel, 1);
    expect_change(&mut laptop, "join", channel, "ann");
    expect_change(&mut watcher, "join", channel, "ann");
    // Her second connection, on the watcher's shard: no second join.
    let mut phone = member_on_shard(&server, "ann", channel, 0);
    watcher.expect_silence(Duration::from_millis(300));
    laptop.expect_silence(Duration::from_millis(100));

    let answer = ask(&mut watcher, channel);
    assert_eq!(
        answer,
        json!({"event": "presence", "channel": channel, "users": ["ann", "w"]})
    );
    assert_eq!(rest_users(&server, channel), ["ann", "w"]);

    // One of her two connections closes: she is still there.
    drop(laptop);
    watcher.expect_silence(Duration::from_millis(300));
    assert_eq!(rest_users(&server, channel), ["ann", "w"]);
    // The last one unsubscribes: one leave.
    phone.send_json(json!({"action": "unsubscribe", "channels": [channel]}));
    phone.expect_event("unsubscribed");
    expect_change(&mut watcher, "leave", channel, "ann");
    assert_eq!(rest_users(&server, channel), ["w"]);
    // Back, then gone by closing: join, then leave.
    let again = member_on_shard(&server, "ann", channel, 1);
    expect_change(&mut watcher, "join", channel, "ann");
    drop(again);
    expect_change(&mut watcher, "leave", channel, "ann");
    phone.expect_silence(Duration::from_millis(100));
}

#[test]
fn other_channels_are_not_presence_channels_and_presence_needs_a_subscription() {
    let server = TestServer::start_with(&[("API_KEY", "k1")]);
    let mut c = server.ws("user_id=u1&channels=news");
    c.expect_event("subscribed");
    // Subscribers of an ordinary channel hear no join.
    let mut other = server.ws("user_id=u2&channels=news");
    other.expect_event("subscribed");
    c.expect_silence(Duration::from_millis(200));

    let e = ask(&mut c, "news");
    assert_eq!(
        (e["event"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_field"))
    );
    let e = ask(&mut c, "presence-room");
    assert_eq!(e["code"], "not_subscribed", "{e}");
    let e = ask(&mut c, "presence bad");
    assert_eq!(e["code"], "invalid_field", "{e}");

    // The route wants the API key like every /api/v1 route.
    let without = server.get("/api/v1/channels/presence-room/presence");
    without.assert_error("no key", 401, "unauthorized");
    let with_key = |path: &str| get_with_key(&server, path, "k1");
    let r = with_key("/api/v1/channels/news/presence");
    r.assert_error("a channel without presence", 400, "invalid_field");
    let r = with_key("/api/v1/channels/presence-empty/presence");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"channel": "presence-empty", "users": [], "user_count": 0})
    );
}

/// Two nodes on one Redis: `join`/`leave` reach the other node's subscribers, a user on both nodes
/// joins once and leaves once, and the REST route on either node lists everyone.
fn two_nodes(a: &TestServer, b: &TestServer, wait_listening: impl Fn(&str)) {
    let channel = "presence-lobby";
    let mut watcher = member(b, "w", channel);
    expect_change(&mut watcher, "join", channel, "w");
    wait_listening(channel);

    let mut on_a = member(a, "ann", channel);
    expect_change(&mut on_a, "join", channel, "ann");
    expect_change(&mut watcher, "join", channel, "ann");
    // Node A read the watcher from Redis when it began listening: it knows both.
    assert_eq!(ask(&mut on_a, channel)["users"], json!(["ann", "w"]));
    // Ann's second connection, on node B: nobody hears a second join.
    let mut on_b = member(b, "ann", channel);
    watcher.expect_silence(Duration::from_millis(400));
    on_a.expect_silence(Duration::from_millis(100));
    assert_eq!(rest_users(a, channel), ["ann", "w"]);
    assert_eq!(rest_users(b, channel), ["ann", "w"]);

    drop(on_a);
    watcher.expect_silence(Duration::from_millis(400));
    on_b.send_json(json!({"action": "unsubscribe", "channels": [channel]}));
    on_b.expect_event("unsubscribed");
    expect_change(&mut watcher, "leave", channel, "ann");
    wait_until(
        "node A to list only the watcher",
        Duration::from_secs(5),
        || rest_users(a, channel) == ["w"],
    );
}

#[test]
fn two_nodes_on_redis_share_presence() {
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    let node = || {
        TestServer::start_with(&[
            ("REDIS_URL", &redis.url),
            ("REDIS_PREFIX", &redis.prefix),
            ("SHARDS", "2"),
        ])
    };
    let (a, b) = (node(), node());
    redis.wait_numsub("b", 2);
    two_nodes(&a, &b, |channel| {
        redis.wait_numsub(&format!("c:{channel}"), 1)
    });
}

#[test]
fn two_nodes_on_a_redis_cluster_share_presence() {
    let Some(cluster) = TestCluster::start() else {
        return;
    };
    let prefix = format!("nstest:{}:", uuid::Uuid::now_v7().simple());
    let seeds = cluster.seeds();
    let node = || {
        TestServer::start_with(&[
            ("REDIS_CLUSTER", seeds.as_str()),
            ("REDIS_PREFIX", prefix.as_str()),
        ])
    };
    let (a, b) = (node(), node());
    two_nodes(&a, &b, |channel| {
        let name = format!("{prefix}c:{channel}");
        let owner = cluster.owner(cluster.slot(&name));
        cluster.wait_until("node B listens to the channel", |c| {
            c.shardnumsub(owner, &name) == 1
        });
    });
}

#[test]
fn a_killed_nodes_users_leave_within_the_bound() {
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    const TIMEOUT_MS: u64 = 1000;
    let node = || {
        TestServer::start_with(&[
            ("REDIS_URL", &redis.url),
            ("REDIS_PREFIX", &redis.prefix),
            ("REDIS_NODE_TIMEOUT_MS", "1000"),
        ])
    };
    let (a, b) = (node(), node());
    redis.wait_numsub("b", 2);
    let channel = "presence-ops";
    let mut watcher = member(&b, "w", channel);
    expect_change(&mut watcher, "join", channel, "w");
    redis.wait_numsub(&format!("c:{channel}"), 1);
    let _ann = member(&a, "ann", channel);
    let _bob = member(&a, "bob", channel);
    expect_change(&mut watcher, "join", channel, "ann");
    expect_change(&mut watcher, "join", channel, "bob");
    assert_eq!(rest_users(&b, channel), ["ann", "bob", "w"]);

    // SIGKILL: no goodbye, no leave from node A itself.
    drop(a);
    let killed = Instant::now();
    let mut left: Vec<String> = (0..2)
        .map(|_| {
            let v = watcher.expect_event("leave");
            assert_eq!(v["channel"], channel);
            v["user_id"].as_str().unwrap().to_owned()
        })
        .collect();
    left.sort();
    assert_eq!(left, ["ann", "bob"]);
    // docs/API.md: within REDIS_NODE_TIMEOUT_MS plus a third of it, plus a round trip; the slack is for
    // a loaded test machine, not part of the promise.
    let bound = Duration::from_millis(TIMEOUT_MS * 4 / 3) + Duration::from_secs(2);
    assert!(
        killed.elapsed() < bound,
        "the users left {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(rest_users(&b, channel), ["w"]);
}

/// An SSE stream of `user` on `channel`, open (its `connected` and `subscribed` events read).
fn sse_member(server: &TestServer, user: &str, channel: &str) -> common::sse::SseClient {
    let mut s = common::sse::open(
        server.addr,
        &format!("user_id={user}&channels={channel}"),
        &[],
    )
    .unwrap_or_else(|r| panic!("refused: {} {}", r.status, String::from_utf8_lossy(&r.body)));
    let retry = s.next().expect("the retry line");
    assert_eq!(retry.retry, Some(1000), "{retry:?}");
    s.expect_event("connected");
    s.expect_event("subscribed");
    s
}

#[test]
fn an_sse_stream_is_a_presence_member_while_it_is_open() {
    let server = TestServer::start_with(&[("SHARDS", "2")]);
    let channel = "presence-room";
    let mut watcher = member(&server, "w", channel);
    expect_change(&mut watcher, "join", channel, "w");

    let mut stream = sse_member(&server, "sue", channel);
    expect_change(&mut watcher, "join", channel, "sue");
    // The stream hears its own join, like a WebSocket member.
    let own = stream.expect_event("join");
    assert_eq!(own["user_id"], "sue", "{own}");
    assert_eq!(rest_users(&server, channel), ["sue", "w"]);
    assert_eq!(ask(&mut watcher, channel)["users"], json!(["sue", "w"]));

    // The client closes the stream: she leaves.
    drop(stream);
    expect_change(&mut watcher, "leave", channel, "sue");
    assert_eq!(rest_users(&server, channel), ["w"]);
}

#[test]
fn an_sse_stream_on_one_node_is_present_on_the_other() {
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    let node =
        || TestServer::start_with(&[("REDIS_URL", &redis.url), ("REDIS_PREFIX", &redis.prefix)]);
    let (a, b) = (node(), node());
    redis.wait_numsub("b", 2);
    let channel = "presence-hall";
    let mut watcher = member(&b, "w", channel);
    expect_change(&mut watcher, "join", channel, "w");
    redis.wait_numsub(&format!("c:{channel}"), 1);

    let stream = sse_member(&a, "sue", channel);
    expect_change(&mut watcher, "join", channel, "sue");
    assert_eq!(rest_users(&b, channel), ["sue", "w"]);
    drop(stream);
    expect_change(&mut watcher, "leave", channel, "sue");
    wait_until(
        "node B to list only the watcher",
        Duration::from_secs(5),
        || rest_users(&b, channel) == ["w"],
    );
}
