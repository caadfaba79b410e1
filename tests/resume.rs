//! A client that reconnects gets what it missed: no gap, no duplicate, whether it resumes at connect
//! (`?since=`) or with the `resume` action, and while live sends keep arriving.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;

#[test]
fn reconnecting_with_since_replays_exactly_what_was_missed() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=rita&channels=ops");
    client.expect_event("subscribed");
    let first = server.send(json!({"user_id": "rita", "message": "before"}));
    assert_eq!(client.expect_notification()["id"], first.as_str());
    drop(client);

    // Sent while Rita is away: to her, to her channel, to everyone, and to someone else.
    let missed = vec![
        server.send(json!({"user_id": "rita", "message": "m1"})),
        server.send(json!({"channels": ["ops"], "message": "m2"})),
        server.send(json!({"broadcast": true, "message": "m3"})),
    ];
    server.send(json!({"user_id": "other", "message": "not hers"}));

    let mut client = server.ws(&format!("user_id=rita&channels=ops&since={first}"));
    client.expect_event("subscribed");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            client.expect_notification()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(got, missed, "in order, nothing else");
    let resumed = client.expect_event("resumed");
    assert_eq!(resumed["count"], 3);
    assert_eq!(resumed["complete"], true);
    client.expect_silence(Duration::from_millis(200));
}

#[test]
fn resume_during_a_stream_of_sends_has_no_gap_and_no_duplicate() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=sam");
    let first = server.send(json!({"user_id": "sam", "message": "0"}));
    client.expect_notification();
    drop(client);

    // A producer keeps sending while Sam reconnects and resumes.
    let addr = server.addr;
    let producer = std::thread::spawn(move || {
        let server = common::TestServerRef(addr);
        (1..=200)
            .map(|i| server.send(json!({"user_id": "sam", "message": i.to_string()})))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(30));
    let mut client = server.ws("user_id=sam");
    client.send_json(json!({"action": "resume", "since": first}));
    let sent = producer.join().unwrap();

    // Live notifications may reach the client before its resume request does; the replay then fills in
    // the older ones. What must hold: each notification exactly once, and strict order after `resumed`.
    let mut received = Vec::new();
    let mut after_resumed = Vec::new();
    let mut resumed = false;
    while received.len() < sent.len() || !resumed {
        let v = client.next_json();
        if v["event"] == "resumed" {
            assert!(!resumed, "one resumed event");
            resumed = true;
        } else {
            assert!(v.get("event").is_none(), "unexpected {v}");
            let id = v["id"].as_str().unwrap().to_owned();
            if resumed {
                after_resumed.push(id.clone());
            }
            received.push(id);
        }
    }
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != received.len() {
        let pos = |id: &String| {
            sent.iter()
                .position(|s| s == id)
                .map(|p| p as i64)
                .unwrap_or(-1)
        };
        let trace: Vec<i64> = received.iter().map(pos).collect();
        let after: Vec<i64> = after_resumed.iter().map(pos).collect();
        eprintln!("TRACE received (index in sent): {trace:?}\nafter resumed: {after:?}");
    }
    assert_eq!(unique.len(), received.len(), "no duplicate");
    assert_eq!(
        unique, sent,
        "no gap: every notification sent after `since` arrived"
    );
    assert!(
        after_resumed.windows(2).all(|w| w[0] < w[1]),
        "live delivery after resumed is in order"
    );
    client.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_replay_cut_at_the_limit_continues_exactly_from_last_id() {
    let server = TestServer::start_with(&[("MAX_REPLAY", "5")]);
    let first = server.send(json!({"user_id": "kim", "message": "seen"}));
    for i in 0..8 {
        server.send(json!({"user_id": "kim", "message": i.to_string()}));
    }
    let mut client = server.ws(&format!("user_id=kim&since={first}"));
    for i in 0..5 {
        assert_eq!(client.expect_notification()["message"], i.to_string());
    }
    let resumed = client.expect_event("resumed");
    assert_eq!(
        (resumed["count"].as_u64(), resumed["complete"].as_bool()),
        (Some(5), Some(false))
    );
    let last_id = resumed["last_id"].as_str().unwrap().to_owned();

    // Live delivery goes on meanwhile...
    server.send(json!({"user_id": "kim", "message": "live"}));
    assert_eq!(client.expect_notification()["message"], "live");
    // ...and resuming from last_id fills exactly the gap, with nothing twice.
    client.send_json(json!({"action": "resume", "since": last_id}));
    for i in 5..8 {
        assert_eq!(client.expect_notification()["message"], i.to_string());
    }
    let resumed = client.expect_event("resumed");
    assert_eq!(
        (resumed["count"].as_u64(), resumed["complete"].as_bool()),
        (Some(3), Some(true))
    );
    client.expect_silence(Duration::from_millis(200));
}
