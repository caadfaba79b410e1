//! Delivery and seen receipts through the public interfaces, on both stores: `delivered_at` once a
//! notification reached a live connection of its user (live, replayed by a resume, or from another
//! node through Redis), `seen_at` from the WebSocket `seen` action and `PUT …/seen`, and the history
//! filters `undelivered` and `unseen` that list what is still missing them.

mod common;

use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::{wait_for, TestServer, WsClient, WAIT};
use serde_json::{json, Value};

/// The resume point before every id.
const FROM_THE_START: &str = "00000000-0000-0000-0000-000000000000";

/// The first history page of `user` with the query `filters` (`""`, `"undelivered=true"`, ...).
fn history(server: &TestServer, user: &str, filters: &str) -> Vec<Value> {
    let r = server.get(&format!(
        "/api/v1/notifications/user/{user}?limit=500&{filters}"
    ));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["notifications"].as_array().unwrap().clone()
}

/// Notification `id` as `user`'s history shows it.
fn stored(server: &TestServer, user: &str, id: &str) -> Value {
    history(server, user, "")
        .into_iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not in {user}'s history"))
}

/// The ids of a history page.
fn ids(page: &[Value]) -> Vec<String> {
    page.iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls history until `id` carries `field` (receipts are recorded in batches, a little after the
/// delivery), and returns its value.
fn wait_for_receipt(server: &TestServer, user: &str, id: &str, field: &str) -> String {
    wait_for(&format!("{field} of {id}"), WAIT, || {
        stored(server, user, id)[field].as_str().map(str::to_owned)
    })
}

/// `PUT /api/v1/notifications/:user/seen` with `body`.
fn put_seen(server: &TestServer, user: &str, body: &Value) -> common::HttpResponse {
    server.request(
        "PUT",
        &format!("/api/v1/notifications/{user}/seen"),
        Some(&body.to_string()),
    )
}

/// Sends a ping and expects the pong as the very next frame: whatever the client sent before was
/// handled without a reply.
fn expect_no_reply(client: &mut WsClient) {
    client.send_json(json!({"action": "ping"}));
    client.expect_event("pong");
}

/// Everything delivery receipts promise, on whichever store `server` runs on.
fn delivered_at_is_set_once_for_the_users_own_connections(server: &TestServer) {
    // A live delivery to the user's WebSocket sets `delivered_at`.
    let mut alice = server.ws("user_id=alice");
    let live = server.send(json!({"user_id": "alice", "message": "live"}));
    assert_eq!(alice.expect_notification()["id"], live.as_str());
    let first = wait_for_receipt(server, "alice", &live, "delivered_at");
    assert!(stored(server, "alice", &live)["seen_at"].is_null());

    // To an offline user it stays undelivered, and the filter lists it (and only it).
    let before = server.send(json!({"user_id": "alice", "message": "before leaving"}));
    assert_eq!(alice.expect_notification()["id"], before.as_str());
    let channel_only =
        server.send(json!({"user_id": "carol", "channels": ["room"], "message": "x"}));
    drop(alice);
    wait_for("alice's connection to end", WAIT, || {
        (server.get("/health").json()["connections"] == 0).then_some(())
    });
    let away = server.send(json!({"user_id": "alice", "message": "away"}));
    // Carol is offline; Bob receives her notification only through the room: not her device.
    let mut bob = server.ws("user_id=bob&channels=room");
    bob.expect_event("subscribed");
    let to_room = server.send(json!({"user_id": "carol", "channels": ["room"], "message": "y"}));
    assert_eq!(bob.expect_notification()["id"], to_room.as_str());
    // A marker to Bob on Bob's own connection: once its receipt is recorded, so would have been
    // anything delivered before it on that shard.
    let marker = server.send(json!({"user_id": "bob", "message": "marker"}));
    assert_eq!(bob.expect_notification()["id"], marker.as_str());
    wait_for_receipt(server, "bob", &marker, "delivered_at");
    for id in [&channel_only, &to_room] {
        assert!(stored(server, "carol", id)["delivered_at"].is_null());
    }
    assert_eq!(
        ids(&history(server, "carol", "undelivered=true")),
        vec![to_room.clone(), channel_only.clone()]
    );
    // `before` reached her; `away` did not.
    wait_for_receipt(server, "alice", &before, "delivered_at");
    assert_eq!(
        ids(&history(server, "alice", "undelivered=1")),
        vec![away.clone()]
    );
    assert_eq!(
        ids(&history(server, "alice", "undelivered=true&unread=true")),
        vec![away.clone()]
    );
    assert_eq!(history(server, "alice", "undelivered=false").len(), 3);

    // Delivered later by a resume: the replay counts.
    let mut phone = server.ws(&format!("user_id=alice&since={FROM_THE_START}"));
    for _ in 0..3 {
        phone.expect_notification();
    }
    phone.expect_event("resumed");
    wait_for_receipt(server, "alice", &away, "delivered_at");
    assert!(history(server, "alice", "undelivered=true").is_empty());

    // Replayed again on another device: the first delivery's time stays.
    let mut laptop = server.ws(&format!("user_id=alice&since={FROM_THE_START}"));
    for _ in 0..3 {
        laptop.expect_notification();
    }
    laptop.expect_event("resumed");
    let again = server.send(json!({"user_id": "alice", "message": "both devices"}));
    phone.expect_notification();
    laptop.expect_notification();
    wait_for_receipt(server, "alice", &again, "delivered_at");
    assert_eq!(
        stored(server, "alice", &live)["delivered_at"],
        first.as_str()
    );
}

/// Everything seen receipts promise, on whichever store `server` runs on (with `MAX_SEEN_IDS=3`).
fn seen_over_websocket_and_rest(server: &TestServer) {
    let a = server.send(json!({"user_id": "dora", "message": "a"}));
    let b = server.send(json!({"user_id": "dora", "message": "b"}));
    let c = server.send(json!({"user_id": "dora", "message": "c"}));
    let elsewhere = server.send(json!({"user_id": "eve", "message": "not dora's"}));
    assert_eq!(history(server, "dora", "unseen=true").len(), 3);

    // Over the WebSocket: no reply when it worked; seen is not read.
    let mut dora = server.ws("user_id=dora");
    dora.send_json(json!({"action": "seen", "ids": [a]}));
    expect_no_reply(&mut dora);
    let seen_a = stored(server, "dora", &a);
    let first_seen = seen_a["seen_at"]
        .as_str()
        .expect("seen_at is set")
        .to_owned();
    assert_eq!(
        (seen_a["read"].as_bool(), &seen_a["read_at"]),
        (Some(false), &Value::Null)
    );
    assert_eq!(
        ids(&history(server, "dora", "unseen=true")),
        vec![c.clone(), b.clone()]
    );

    // Bad input over the WebSocket: a clear error event, nothing marked.
    for (ids, code, words) in [
        (
            json!(["nope"]),
            "invalid_field",
            "ids[0] must be a notification id",
        ),
        (
            json!([b, "12"]),
            "invalid_field",
            "ids[1] must be a notification id",
        ),
        (json!([]), "invalid_field", "ids must list at least one"),
        (json!([a, b, c, elsewhere]), "invalid_field", "at most 3"),
        (json!([b, elsewhere]), "not_found", elsewhere.as_str()),
    ] {
        dora.send_json(json!({"action": "seen", "ids": ids}));
        let e = dora.expect_event("error");
        assert_eq!(e["code"], code, "{e}");
        assert!(e["message"].as_str().unwrap().contains(words), "{e}");
    }
    dora.send_json(json!({"action": "seen"}));
    assert_eq!(dora.expect_event("error")["code"], "invalid_field");
    assert!(
        stored(server, "dora", &b)["seen_at"].is_null(),
        "all or nothing"
    );

    // Over REST: how many were unseen; the first `seen_at` stays.
    let r = put_seen(server, "dora", &json!({"ids": [a, b]}));
    assert_eq!((r.status, r.json()), (200, json!({"updated": 1})));
    assert_eq!(stored(server, "dora", &a)["seen_at"], first_seen.as_str());
    let r = put_seen(server, "dora", &json!({"ids": [b]}));
    assert_eq!(r.json(), json!({"updated": 0}));
    assert_eq!(ids(&history(server, "dora", "unseen=1")), vec![c.clone()]);
    // Combined with `unread`: `c` is unseen and unread; read it and the combination is empty.
    assert_eq!(
        ids(&history(server, "dora", "unseen=true&unread=true")),
        vec![c.clone()]
    );
    let r = server.request("PUT", &format!("/api/v1/notifications/dora/{c}/read"), None);
    assert_eq!(r.status, 200);
    assert!(history(server, "dora", "unseen=true&unread=true").is_empty());
    assert_eq!(
        ids(&history(server, "dora", "unseen=true")),
        vec![c.clone()]
    );

    // Bad input over REST: 400 naming the field, 404 naming the id, and nothing marked.
    put_seen(server, "dora", &json!({"ids": ["nope"]})).assert_error(
        "bad id",
        400,
        "invalid_field",
    );
    put_seen(server, "dora", &json!({"ids": []})).assert_error("no ids", 400, "invalid_field");
    put_seen(server, "dora", &json!({})).assert_error("missing ids", 400, "invalid_field");
    put_seen(server, "dora", &json!({"ids": "x"})).assert_error("not a list", 400, "invalid_json");
    put_seen(server, "dora", &json!({"ids": [a, b, c, a]})).assert_error(
        "too many",
        400,
        "invalid_field",
    );
    let r = put_seen(server, "dora", &json!({"ids": [c, elsewhere]}));
    r.assert_error("another user's id", 404, "not_found");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&elsewhere));
    assert!(stored(server, "dora", &c)["seen_at"].is_null());
    let r = server.request("PUT", "/api/v1/notifications/dora/seen", Some("{\"ids\":"));
    r.assert_error("broken JSON", 400, "invalid_json");
    let r = server.request("GET", "/api/v1/notifications/user/dora?unseen=maybe", None);
    r.assert_error("bad filter", 400, "invalid_field");
    let r = server.request("GET", "/api/v1/notifications/user/dora?undelivered=2", None);
    r.assert_error("bad filter", 400, "invalid_field");
}

#[test]
fn receipts_on_sqlite() {
    let server = TestServer::start_with(&[("MAX_SEEN_IDS", "3")]);
    delivered_at_is_set_once_for_the_users_own_connections(&server);
    seen_over_websocket_and_rest(&server);
}

#[test]
fn receipts_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let server = TestServer::start_with(&[("DATABASE_URL", &schema.url), ("MAX_SEEN_IDS", "3")]);
    delivered_at_is_set_once_for_the_users_own_connections(&server);
    seen_over_websocket_and_rest(&server);
}

#[test]
fn a_delivery_through_redis_on_another_node_sets_delivered_at() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let node = |redis: &TestRedis| cluster_node(&schema, redis);
    let a = node(&redis);
    let b = node(&redis);
    let mut phone = a.ws("user_id=frank");
    redis.wait_numsub("u:frank", 1);
    // Committed by B, delivered by A: A records the receipt, B's history shows it.
    let id = b.send(json!({"user_id": "frank", "message": "from B"}));
    assert_eq!(phone.expect_notification()["id"], id.as_str());
    let at = wait_for_receipt(&b, "frank", &id, "delivered_at");
    assert!(history(&b, "frank", "undelivered=true").is_empty());
    // The user on both nodes: each records its delivery, the first time stays.
    let mut laptop = b.ws("user_id=frank");
    redis.wait_numsub("u:frank", 2);
    let both = a.send(json!({"user_id": "frank", "message": "to both"}));
    assert_eq!(phone.expect_notification()["id"], both.as_str());
    assert_eq!(laptop.expect_notification()["id"], both.as_str());
    wait_for_receipt(&a, "frank", &both, "delivered_at");
    assert_eq!(stored(&a, "frank", &id)["delivered_at"], at.as_str());
    // Seen on one node is seen on the other: one store.
    laptop.send_json(json!({"action": "seen", "ids": [both]}));
    expect_no_reply(&mut laptop);
    assert!(stored(&a, "frank", &both)["seen_at"].is_string());
}
