//! Several nodes behind a load balancer: separate server processes sharing one PostgreSQL and joined by
//! Redis Pub/Sub. A client on any node gets what a producer sent to any node, once; the nodes subscribe
//! to exactly what their connections want; scheduled notifications fire once while nodes die.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::{TestServer, WsClient};
use serde_json::json;

/// Sends a marker to `user` through `via` and expects it as the next frame of each of the user's
/// `clients`: whatever they got before was checked, and nothing else (no duplicate) came in between.
fn expect_marker_next(via: &TestServer, user: &str, clients: &mut [&mut WsClient]) {
    let id = via.send(json!({"user_id": user, "message": "marker"}));
    for client in clients {
        let n = client.expect_notification();
        assert_eq!(
            (n["id"].as_str(), n["message"].as_str()),
            (Some(id.as_str()), Some("marker")),
            "expected the marker, got {n}"
        );
    }
}

#[test]
fn three_nodes_deliver_users_channels_broadcasts_and_share_read_state() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let a = cluster_node(&schema, &redis);
    let b = cluster_node(&schema, &redis);
    let c = cluster_node(&schema, &redis);
    redis.wait_numsub("b", 3);

    // Alice has a phone on node A and a laptop on node B; a producer posts to node C.
    let mut phone = a.ws("user_id=alice");
    let mut laptop = b.ws("user_id=alice");
    redis.wait_numsub("u:alice", 2);
    let id = c.send(json!({"user_id": "alice", "message": "hello from C"}));
    for device in [&mut phone, &mut laptop] {
        let n = device.expect_notification();
        assert_eq!(n["id"], id.as_str());
        assert_eq!(n["message"], "hello from C");
    }
    // A send to node A reaches the phone once (locally, not again through Redis) and the laptop once.
    let local = a.send(json!({"user_id": "alice", "message": "local"}));
    assert_eq!(phone.expect_notification()["id"], local.as_str());
    assert_eq!(laptop.expect_notification()["id"], local.as_str());
    expect_marker_next(&c, "alice", &mut [&mut phone, &mut laptop]);

    // Channels: Bob on A and Carol on B share a room; the phone is in it too.
    let mut bob = a.ws("user_id=bob&channels=room");
    bob.expect_event("subscribed");
    let mut carol = b.ws("user_id=carol&channels=room");
    carol.expect_event("subscribed");
    phone.send_json(json!({"action": "subscribe", "channels": ["room"]}));
    phone.expect_event("subscribed");
    redis.wait_numsub("c:room", 2);
    bob.send_json(json!({"action": "publish", "channel": "room", "data": {"text": "hi all"}}));
    let msg = carol.next_json();
    assert_eq!(msg["event"], "message", "{msg}");
    assert_eq!(
        (msg["from"].as_str(), msg["data"]["text"].as_str()),
        (Some("bob"), Some("hi all"))
    );
    assert_eq!(phone.next_json()["from"], "bob");
    // A stored notification to Alice and the room reaches the phone once, though it reaches node A
    // through two Redis channels; through the room, Carol's copy names the channel.
    let both = c.send(json!({"user_id": "alice", "channels": ["room"], "message": "both"}));
    let n = phone.expect_notification();
    assert_eq!(n["id"], both.as_str());
    assert!(n.get("channel").is_none(), "reached through the user: {n}");
    assert_eq!(carol.expect_notification()["channel"], "room");
    assert_eq!(bob.expect_notification()["id"], both.as_str());
    assert_eq!(laptop.expect_notification()["id"], both.as_str());
    expect_marker_next(&c, "alice", &mut [&mut phone, &mut laptop]);
    expect_marker_next(&a, "carol", &mut [&mut carol]);

    // Broadcast from A reaches everyone, on every node, once.
    let mut dave = c.ws("user_id=dave");
    let cast = a.send(json!({"broadcast": true, "message": "to all"}));
    for client in [&mut phone, &mut laptop, &mut bob, &mut carol, &mut dave] {
        assert_eq!(client.expect_notification()["id"], cast.as_str());
    }
    expect_marker_next(&b, "dave", &mut [&mut dave]);
    expect_marker_next(&b, "bob", &mut [&mut bob]);

    // Read state set on one node is seen on another (the store is shared).
    let r = b.request(
        "PUT",
        &format!("/api/v1/notifications/alice/{id}/read"),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let page = a.get("/api/v1/notifications/user/alice").json();
    let seen = page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id.as_str())
        .expect("in history on node A")
        .clone();
    assert_eq!(seen["read"], true, "{seen}");

    for server in [&a, &b, &c] {
        let health = server.get("/health").json();
        assert_eq!(health["redis"], "ok", "{health}");
    }
}

#[test]
fn redis_subscriptions_follow_connects_and_disconnects() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let a = cluster_node(&schema, &redis);
    let b = cluster_node(&schema, &redis);
    redis.wait_numsub("b", 2);
    assert_eq!(
        redis.channels(),
        vec!["b"],
        "nothing but broadcasts while idle"
    );

    // Two connections of one user on one node: one subscription (counted by the node, not Redis).
    let first = a.ws("user_id=erin&channels=x");
    let second = a.ws("user_id=erin&channels=x");
    redis.wait_numsub("u:erin", 1);
    redis.wait_numsub("c:x", 1);
    let mut other_node = b.ws("user_id=erin");
    redis.wait_numsub("u:erin", 2);
    assert_eq!(redis.numsub("c:x"), 1);

    // Subscribing and unsubscribing by action.
    other_node.send_json(json!({"action": "subscribe", "channels": ["y", "x"]}));
    other_node.expect_event("subscribed");
    redis.wait_numsub("c:y", 1);
    redis.wait_numsub("c:x", 2);
    other_node.send_json(json!({"action": "unsubscribe", "channels": ["y"]}));
    other_node.expect_event("unsubscribed");
    redis.wait_numsub("c:y", 0);

    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        redis.numsub("u:erin"),
        2,
        "node A still has a connection of erin"
    );
    drop(second);
    redis.wait_numsub("u:erin", 1);
    redis.wait_numsub("c:x", 1);
    drop(other_node);
    redis.wait_numsub("u:erin", 0);
    redis.wait_numsub("c:x", 0);
    assert_eq!(redis.channels(), vec!["b"]);

    // Many connects and disconnects at once settle to the right count.
    let crowd: Vec<WsClient> = (0..40)
        .map(|i| a.ws(&format!("user_id=u{}&channels=big", i % 10)))
        .collect();
    redis.wait_numsub("c:big", 1);
    for i in 0..10 {
        redis.wait_numsub(&format!("u:u{i}"), 1);
    }
    drop(crowd);
    redis.wait_numsub("c:big", 0);
    common::wait_until(
        "every subscription but the broadcast to end",
        Duration::from_secs(10),
        || redis.channels() == vec!["b"],
    );
}

#[test]
fn scheduled_notifications_fire_once_across_three_nodes_while_one_is_killed() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let a = cluster_node(&schema, &redis);
    let b = cluster_node(&schema, &redis);
    let mut c = cluster_node(&schema, &redis);
    let mut watcher = a.ws("user_id=crowd");
    redis.wait_numsub("u:crowd", 1);
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let nodes = [&a, &b, &c];
    for i in 0..200 {
        let at = (due + chrono::Duration::milliseconds(i * 15)).to_rfc3339();
        let r = nodes[i as usize % 3].post(
            "/api/v1/notifications/schedule",
            &json!({"user_id": "crowd", "message": i.to_string(), "scheduled_at": at}),
        );
        assert_eq!(r.status, 201);
    }
    // Node C dies hard while the notifications fall due; the others fire the rest.
    std::thread::sleep(Duration::from_millis(2500));
    unsafe { libc::kill(c.pid() as i32, libc::SIGKILL) };
    let _ = c.wait_exit();

    let stored = common::wait_for("all 200 to fire", Duration::from_secs(20), || {
        let page = a.get("/api/v1/notifications/user/crowd?limit=500").json();
        let ids: Vec<String> = page["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["message"].as_str().unwrap().to_owned())
            .collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "a scheduled notification fired twice"
        );
        (ids.len() == 200).then_some(ids)
    });
    // The live client on node A got each exactly once, whichever node fired it: what node C
    // committed in the instant before it was killed, before publishing, comes once node C's
    // announcement expires and node A catches it up from the store.
    let mut live = HashSet::new();
    watcher
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while live.len() < 200 && Instant::now() < deadline {
        let Ok(tungstenite::Message::Text(t)) = watcher.ws.read() else {
            continue;
        };
        let n: serde_json::Value = serde_json::from_str(&t).unwrap();
        if n["event"] == "unread" {
            continue;
        }
        let message = n["message"].as_str().unwrap().to_owned();
        assert!(stored.contains(&message));
        assert!(live.insert(message), "delivered twice live: {n}");
    }
    watcher.expect_silence(Duration::from_secs(1));
    assert_eq!(live.len(), 200, "delivered live");
}
