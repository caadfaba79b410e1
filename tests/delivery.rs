//! Live delivery through the real server: users on several shards, channels, broadcast, client publish.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[test]
fn a_user_with_two_devices_on_different_shards_gets_a_send_on_both() {
    let server = TestServer::start();
    let mut phone = server.ws_on_shard("user_id=alice", 0);
    let mut laptop = server.ws_on_shard("user_id=alice", 1);
    let mut bob = server.ws("user_id=bob");

    let id = server.send(json!({"user_id": "alice", "title": "Nueva Tarea", "message": "hola", "data": {"task_id": "t1"}}));

    for device in [&mut phone, &mut laptop] {
        let n = device.expect_notification();
        assert_eq!(n["id"], id.as_str());
        assert_eq!(n["message"], "hola");
        assert_eq!(n["title"], "Nueva Tarea");
        assert_eq!(n["user_id"], "alice");
        assert_eq!(n["data"]["task_id"], "t1");
        assert_eq!(n["read"], false);
        assert!(
            n.get("channel").is_none(),
            "delivered to the user, not through a channel"
        );
    }
    bob.expect_silence(QUIET);
}

#[test]
fn integer_user_ids_from_laravel_reach_the_string_user() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=42");
    server.send(json!({"user_id": 42, "message": "from Laravel"}));
    assert_eq!(client.expect_notification()["user_id"], "42");
}

#[test]
fn channel_subscribers_on_every_shard_get_a_channel_send_with_the_channel_field() {
    let server = TestServer::start();
    let mut a = server.ws_on_shard("user_id=a&channels=tareas", 0);
    a.expect_event("subscribed");
    let mut b = server.ws_on_shard("user_id=b", 1);
    b.send_json(json!({"action": "subscribe", "channels": ["tareas", "finanzas"]}));
    assert_eq!(
        b.expect_event("subscribed")["channels"],
        json!(["tareas", "finanzas"])
    );
    let mut outsider = server.ws("user_id=c");

    server.send(json!({"channels": ["tareas"], "message": "new task"}));
    for client in [&mut a, &mut b] {
        let n = client.expect_notification();
        assert_eq!(n["channel"], "tareas");
        assert_eq!(n["message"], "new task");
    }
    outsider.expect_silence(QUIET);

    b.send_json(json!({"action": "unsubscribe", "channels": ["tareas"]}));
    b.expect_event("unsubscribed");
    server.send(json!({"channels": ["tareas"], "message": "second"}));
    assert_eq!(a.expect_notification()["message"], "second");
    b.expect_silence(QUIET);
}

#[test]
fn targets_combine_as_a_union_and_each_connection_gets_it_once() {
    let server = TestServer::start();
    let mut alice = server.ws("user_id=alice&channels=news,sport");
    alice.expect_event("subscribed");
    let mut bob = server.ws("user_id=bob&channels=sport");
    bob.expect_event("subscribed");
    let mut carol = server.ws("user_id=carol");

    let id =
        server.send(json!({"user_id": "alice", "channels": ["news", "sport"], "message": "both"}));
    assert_eq!(alice.expect_notification()["id"], id.as_str());
    assert_eq!(bob.expect_notification()["channel"], "sport");
    alice.expect_silence(QUIET);
    bob.expect_silence(QUIET);
    carol.expect_silence(QUIET);

    let id = server.send(json!({"broadcast": true, "channels": ["sport"], "message": "everyone"}));
    for c in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(c.expect_notification()["id"], id.as_str());
        c.expect_silence(QUIET);
    }
}

#[test]
fn two_clients_chat_through_a_channel_across_shards() {
    let server = TestServer::start();
    let mut ana = server.ws_on_shard("user_id=ana&channels=sala1", 0);
    ana.expect_event("subscribed");
    let mut ben = server.ws_on_shard("user_id=ben&channels=sala1", 1);
    ben.expect_event("subscribed");

    ana.send_json(json!({"action": "publish", "channel": "sala1", "data": {"text": "hola Ben"}}));
    let m = ben.expect_event("message");
    assert_eq!(m["channel"], "sala1");
    assert_eq!(m["from"], "ana");
    assert_eq!(m["data"]["text"], "hola Ben");
    ana.expect_silence(QUIET);

    ben.send_json(json!({"action": "publish", "channel": "sala1", "data": {"text": "hola Ana"}}));
    assert_eq!(ana.expect_event("message")["data"]["text"], "hola Ana");

    // Ephemeral: nothing of the chat is in anyone's inbox.
    assert_eq!(
        server.get("/api/v1/notifications/user/ana").json()["total"],
        0
    );
}

#[test]
fn publishing_without_subscribing_is_refused_and_the_connection_stays_open() {
    let server = TestServer::start();
    let mut eve = server.ws("user_id=eve");
    let mut member = server.ws("user_id=m&channels=private");
    member.expect_event("subscribed");
    eve.send_json(json!({"action": "publish", "channel": "private", "data": {}}));
    assert_eq!(eve.expect_event("error")["code"], "not_subscribed");
    member.expect_silence(QUIET);
    eve.send_json(json!({"action": "ping"}));
    eve.expect_event("pong");
}

#[test]
fn a_disconnected_client_leaves_the_indexes() {
    let server = TestServer::start();
    let leaver = server.ws("user_id=gone&channels=room");
    drop(leaver);
    let mut stayer = server.ws("user_id=stay&channels=room");
    stayer.expect_event("subscribed");
    std::thread::sleep(Duration::from_millis(200));
    let health = server.get("/health").json();
    assert_eq!(health["connections"], 1, "{health}");
    server.send(json!({"channels": ["room"], "message": "still works"}));
    assert_eq!(stayer.expect_notification()["message"], "still works");
}

/// A client publish reaches its channel's subscribers on every shard that has one, including a
/// subscriber whose `subscribed` came just before the publish on another shard (the first of its
/// shard, so the node's interest table changed just then), and wakes no shard without a subscriber.
#[test]
fn a_publish_reaches_every_shard_with_a_subscriber_and_wakes_only_those() {
    let server = TestServer::start_with(&[("SHARDS", "3")]);
    let mut sender = server.ws_on_shard("user_id=ana", 0);
    let mut bystander = server.ws_on_shard("user_id=carl&channels=other", 2);
    bystander.expect_event("subscribed");

    for round in 0..20 {
        let room = format!("room{round}");
        sender.send_json(json!({"action": "subscribe", "channels": [room]}));
        sender.expect_event("subscribed");
        // A new connection each round, alternating shards, each the first subscriber of its shard.
        let mut late = server.ws_on_shard(&format!("user_id=late{round}"), 1 + round % 2);
        late.send_json(json!({"action": "subscribe", "channels": [room]}));
        late.expect_event("subscribed");
        sender.send_json(json!({"action": "publish", "channel": room, "data": {"n": round}}));
        let m = late.expect_event("message");
        assert_eq!(
            (m["channel"].as_str(), m["data"]["n"].as_u64()),
            (Some(room.as_str()), Some(round as u64))
        );
    }

    // Shard 0 (the sender's) and shard 1 hold subscribers of `chat`; shard 2 holds none.
    sender.send_json(json!({"action": "subscribe", "channels": ["chat"]}));
    sender.expect_event("subscribed");
    let mut ben = server.ws_on_shard("user_id=ben&channels=chat", 1);
    ben.expect_event("subscribed");
    let mut cleo = server.ws_on_shard("user_id=cleo&channels=chat", 0);
    cleo.expect_event("subscribed");
    let before = server.metric("notif_shard_wakeups_total");
    const PUBLISHES: u64 = 10;
    for n in 0..PUBLISHES {
        sender.send_json(json!({"action": "publish", "channel": "chat", "data": {"n": n}}));
        for receiver in [&mut ben, &mut cleo] {
            assert_eq!(receiver.expect_event("message")["data"]["n"], n);
        }
    }
    let woken = server.metric("notif_shard_wakeups_total") - before;
    assert!(
        (PUBLISHES..=2 * PUBLISHES).contains(&woken),
        "{PUBLISHES} publishes woke shards {woken} times: shard 2 has no subscriber of the channel"
    );
    bystander.expect_silence(QUIET);
    sender.expect_silence(QUIET);

    // A notification to a user wakes the user's shard only (its delivery and its unread count).
    let before = server.metric("notif_shard_wakeups_total");
    const SENDS: u64 = 5;
    for n in 0..SENDS {
        server.send(json!({"user_id": "ben", "message": format!("n{n}")}));
        assert_eq!(ben.expect_notification()["message"], format!("n{n}"));
    }
    // Let the last unread count arrive before counting.
    ben.expect_silence(QUIET);
    let woken = server.metric("notif_shard_wakeups_total") - before;
    assert!(
        woken <= 2 * SENDS,
        "{SENDS} sends to a user on one shard woke shards {woken} times"
    );
    bystander.expect_silence(QUIET);
}
