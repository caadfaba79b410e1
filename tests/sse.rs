//! Streams without WebSocket, through the real binary: the Server-Sent Events stream read the way an
//! `EventSource` reads it (reconnecting with `Last-Event-ID`), and the long-poll; with tokens and API
//! keys, bad parameters, the per-user cap and shutdown; replay on both stores; across two nodes on Redis.

mod common;

use std::time::{Duration, Instant};

use common::auth::{token, SECRET};
use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::sse::{self, poll, poll_ids, SseClient};
use common::{TestServer, TestServerRef};
use serde_json::json;

fn stream(server: &TestServer, query: &str) -> SseClient {
    stream_with(server, query, &[])
}

/// Opens a stream and reads its opening: `retry:` and `connected`.
fn stream_with(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> SseClient {
    let mut s = sse::open(server.addr, query, headers)
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, String::from_utf8_lossy(&r.body)));
    let first = s.next().expect("the retry line");
    assert_eq!(first.retry, Some(1000), "{first:?}");
    let connected = s.expect_event("connected");
    assert!(connected["connection_id"].is_string(), "{connected}");
    s
}

/// Sends a notification with the API key `k-1`; its id.
fn send_with_key(server: &TestServer, body: serde_json::Value) -> String {
    let r = TestServerRef(server.addr).post_raw(
        "/api/v1/notifications/send",
        &body.to_string(),
        &[("X-API-Key", "k-1")],
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn refused(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> common::HttpResponse {
    match sse::open(server.addr, query, headers) {
        Ok(_) => panic!("the stream opened: {query}"),
        Err(r) => r,
    }
}

#[test]
fn a_stream_gets_notifications_messages_and_control_events() {
    let server = TestServer::start();
    let mut s = stream(&server, "user_id=ann&channels=news");
    assert_eq!(s.expect_event("subscribed")["channels"], json!(["news"]));

    let to_her = server.send(json!({"user_id": "ann", "message": "hello"}));
    let n = s.expect_notification();
    assert_eq!(
        (n["id"].as_str(), n["message"].as_str()),
        (Some(to_her.as_str()), Some("hello"))
    );
    assert!(n.get("channel").is_none());
    let to_news = server.send(json!({"channels": ["news"], "message": "headline"}));
    let n = s.expect_notification();
    assert_eq!(
        (n["id"].as_str(), n["channel"].as_str()),
        (Some(to_news.as_str()), Some("news"))
    );
    let to_all = server.send(json!({"broadcast": true, "message": "all"}));
    assert_eq!(s.expect_notification()["id"], to_all.as_str());
    assert_eq!(s.last_event_id.as_deref(), Some(to_all.as_str()));

    // A WebSocket client's publish on the channel reaches the stream as `event: message`.
    let mut ws = server.ws("user_id=bob&channels=news");
    ws.expect_event("subscribed");
    ws.send_json(json!({"action": "publish", "channel": "news", "data": {"x": 1}}));
    let m = s.expect_event("message");
    assert_eq!(
        (m["from"].as_str(), m["data"]["x"].as_i64()),
        (Some("bob"), Some(1))
    );

    server.send(json!({"user_id": "someone-else", "message": "not hers"}));
    s.expect_silence(Duration::from_millis(300));
}

#[test]
fn reconnecting_with_last_event_id_gets_exactly_the_missed_ones_once_in_order() {
    let server = TestServer::start();
    let mut s = stream(&server, "user_id=rita&channels=ops");
    s.expect_event("subscribed");
    let first = server.send(json!({"user_id": "rita", "message": "before"}));
    assert_eq!(s.expect_notification()["id"], first.as_str());
    let last = s.last_event_id.clone().unwrap();
    drop(s);

    let missed = vec![
        server.send(json!({"user_id": "rita", "message": "m1"})),
        server.send(json!({"channels": ["ops"], "message": "m2"})),
        server.send(json!({"broadcast": true, "message": "m3"})),
    ];
    server.send(json!({"user_id": "other", "message": "not hers"}));

    // An EventSource reconnects to the same URL (here with an older `since=`) plus the header: the
    // header wins.
    let query = format!("user_id=rita&channels=ops&since={}", uuid::Uuid::nil());
    let mut s = stream_with(&server, &query, &[("Last-Event-ID", &last)]);
    s.expect_event("subscribed");
    let got: Vec<String> = (0..3)
        .map(|_| s.expect_notification()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, missed, "in order, nothing else");
    let resumed = s.expect_event("resumed");
    assert_eq!(
        (resumed["count"].as_u64(), resumed["complete"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(resumed["last_id"], missed[2].as_str());
    let live = server.send(json!({"user_id": "rita", "message": "live"}));
    assert_eq!(s.expect_notification()["id"], live.as_str());
    s.expect_silence(Duration::from_millis(200));

    // `last_event_id=` does the same for a client that cannot set the header.
    let mut s = stream(
        &server,
        &format!("user_id=rita&last_event_id={}", missed[2]),
    );
    assert_eq!(s.expect_notification()["id"], live.as_str());
    assert_eq!(s.expect_event("resumed")["count"], 1);
}

#[test]
fn a_reconnect_while_sends_keep_coming_has_no_gap_and_no_duplicate() {
    let server = TestServer::start();
    let mut s = stream(&server, "user_id=sam");
    let first = server.send(json!({"user_id": "sam", "message": "0"}));
    s.expect_notification();
    drop(s);

    let addr = server.addr;
    let producer = std::thread::spawn(move || {
        let server = TestServerRef(addr);
        (1..=150)
            .map(|i| server.send(json!({"user_id": "sam", "message": i.to_string()})))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut s = stream_with(&server, "user_id=sam", &[("Last-Event-ID", &first)]);
    let sent = producer.join().unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let e = s.next_event();
        match e.name.as_str() {
            "notification" => got.push(e.id.unwrap()),
            "resumed" => assert_eq!(e.json()["complete"], true),
            other => panic!("unexpected {other}: {e:?}"),
        }
    }
    assert_eq!(got, sent, "every send once, in order");
    s.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_replay_cut_at_max_replay_ends_the_stream_and_the_reconnect_continues() {
    let server = TestServer::start_with(&[("MAX_REPLAY", "2")]);
    let first = server.send(json!({"user_id": "cal", "message": "seen"}));
    let missed: Vec<String> = (1..=5)
        .map(|i| server.send(json!({"user_id": "cal", "message": i.to_string()})))
        .collect();
    let mut got = Vec::new();
    let mut last = first;
    for _ in 0..3 {
        let mut s = stream_with(&server, "user_id=cal", &[("Last-Event-ID", &last)]);
        let events = s.until_end_or_resumed_complete();
        for e in &events {
            if e.name == "notification" {
                got.push(e.id.clone().unwrap());
            }
        }
        if let Some(id) = s.last_event_id.clone() {
            last = id;
        }
        if events
            .iter()
            .any(|e| e.name == "resumed" && e.json()["complete"] == true)
        {
            break;
        }
    }
    assert_eq!(got, missed);
}

/// Reading helpers of this file only.
trait ReadUntil {
    /// The events until the stream ends or a complete `resumed` arrives.
    fn until_end_or_resumed_complete(&mut self) -> Vec<sse::Event>;
}

impl ReadUntil for SseClient {
    fn until_end_or_resumed_complete(&mut self) -> Vec<sse::Event> {
        let mut got = Vec::new();
        while let Some(e) = self.next() {
            let done = e.name == "resumed" && e.json()["complete"] == true;
            if e.name == "resumed" && !done {
                assert!(e.json()["last_id"].is_string(), "{e:?}");
            }
            got.push(e);
            if done {
                break;
            }
        }
        got
    }
}

#[test]
fn the_heartbeat_is_a_comment_line() {
    let server = TestServer::start_with(&[("HEARTBEAT_S", "1")]);
    let mut s = stream(&server, "user_id=hb");
    let e = s.next().expect("a heartbeat before the end");
    assert_eq!((e.name.as_str(), e.data.as_str()), (":", "ping"));
    // The stream lives on after it.
    let id = server.send(json!({"user_id": "hb", "message": "after"}));
    assert_eq!(s.expect_notification()["id"], id.as_str());
}

#[test]
fn tokens_bind_the_user_and_channels_and_refused_tokens_get_401() {
    let server = TestServer::start_with(&[("JWT_SECRET", SECRET), ("API_KEY", "k-1")]);
    refused(&server, "user_id=tia", &[]).assert_error("no token", 401, "unauthorized");
    refused(&server, "token=not.a.jwt", &[]).assert_error("bad token", 401, "unauthorized");
    let other = common::auth::token_with(
        "another-secret",
        json!({"sub": "tia", "exp": common::auth::now() + 60}),
    );
    refused(&server, &format!("token={other}"), &[]).assert_error("forged", 401, "unauthorized");
    let t = token("tia", &["team.*"]);
    refused(&server, &format!("token={t}&user_id=eve"), &[]).assert_error(
        "other user",
        403,
        "forbidden",
    );

    // `?token=`, as an EventSource sends it: the user is the token's, channels outside the claim are
    // refused with an `error` event and the others are joined.
    let mut s = stream(&server, &format!("token={t}&channels=team.a,secret"));
    let e = s.expect_event("error");
    assert_eq!(e["code"], "forbidden");
    assert!(e["message"].as_str().unwrap().contains("secret"), "{e}");
    assert_eq!(s.expect_event("subscribed")["channels"], json!(["team.a"]));
    let id = send_with_key(&server, json!({"channels": ["team.a"], "message": "x"}));
    assert_eq!(s.expect_notification()["id"], id.as_str());

    // `Authorization: Bearer <JWT>` works too.
    let bearer = format!("Bearer {t}");
    let mut s = stream_with(&server, "", &[("Authorization", &bearer)]);
    let id = send_with_key(&server, json!({"user_id": "tia", "message": "y"}));
    assert_eq!(s.expect_notification()["id"], id.as_str());

    // The API key lets a service open any user's stream.
    let mut s = stream_with(&server, "user_id=zed", &[("X-API-Key", "k-1")]);
    let id = send_with_key(&server, json!({"user_id": "zed", "message": "z"}));
    assert_eq!(s.expect_notification()["id"], id.as_str());
    let a = poll(
        server.addr,
        "user_id=zed&timeout_s=0",
        &[("Authorization", "Bearer wrong")],
    );
    a.assert_error("poll with a wrong token", 401, "unauthorized");
    let a = poll(
        server.addr,
        &format!("token={t}&since={}", uuid::Uuid::nil()),
        &[],
    );
    assert_eq!(poll_ids(&a).len(), 1, "tia's own");
}

#[test]
fn with_only_an_api_key_set_the_key_is_required() {
    let server = TestServer::start_with(&[("API_KEY", "k-2")]);
    refused(&server, "user_id=u", &[]).assert_error("no key", 401, "unauthorized");
    refused(&server, "user_id=u", &[("X-API-Key", "nope")]).assert_error(
        "bad key",
        401,
        "unauthorized",
    );
    stream_with(&server, "user_id=u", &[("Authorization", "Bearer k-2")]);
    poll(server.addr, "user_id=u&timeout_s=0", &[]).assert_error(
        "poll without key",
        401,
        "unauthorized",
    );
    assert_eq!(
        poll(
            server.addr,
            "user_id=u&timeout_s=0",
            &[("X-API-Key", "k-2")]
        )
        .status,
        200
    );
}

#[test]
fn bad_parameters_get_api_errors() {
    let server = TestServer::start_with(&[("MAX_POLL_TIMEOUT_S", "5")]);
    refused(&server, "", &[]).assert_error("no user", 400, "invalid_field");
    refused(&server, "user_id=a&since=nope", &[]).assert_error("since", 400, "invalid_field");
    refused(&server, "user_id=a", &[("Last-Event-ID", "nope")]).assert_error(
        "Last-Event-ID",
        400,
        "invalid_field",
    );
    refused(&server, "user_id=a&channels=bad%20name", &[]).assert_error(
        "channel",
        400,
        "invalid_field",
    );
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    refused(
        &server,
        &format!("user_id=a&channels={}", many.join(",")),
        &[],
    )
    .assert_error("too many channels", 400, "invalid_field");
    for q in [
        "user_id=a&timeout_s=abc",
        "user_id=a&timeout_s=-1",
        "user_id=a&timeout_s=6",
    ] {
        poll(server.addr, q, &[]).assert_error(q, 400, "invalid_field");
    }
    poll(server.addr, "timeout_s=1", &[]).assert_error("poll without user", 400, "invalid_field");
    poll(server.addr, "user_id=a&since=x", &[]).assert_error("poll since", 400, "invalid_field");
    let head = server.request("HEAD", "/api/v1/notifications/stream?user_id=a", None);
    assert_eq!(head.status, 405);
    let post = server.request("POST", "/api/v1/notifications/poll?user_id=a", Some("{}"));
    post.assert_error("POST poll", 405, "method_not_allowed");
}

#[test]
fn the_per_user_cap_counts_streams_and_polls() {
    let server = TestServer::start_with(&[("MAX_CONNECTIONS_PER_USER", "1")]);
    let s = stream(&server, "user_id=cap");
    refused(&server, "user_id=cap", &[]).assert_error("second stream", 503, "too_many_connections");
    poll(server.addr, "user_id=cap&timeout_s=0", &[]).assert_error(
        "poll",
        503,
        "too_many_connections",
    );
    drop(s);
    common::wait_until("the slot is given back", Duration::from_secs(5), || {
        sse::open(server.addr, "user_id=cap", &[]).is_ok()
    });
}

#[test]
fn a_poll_answers_at_once_parks_until_a_send_and_times_out_empty() {
    let server = TestServer::start();
    let first = server.send(json!({"user_id": "pat", "message": "1"}));
    let second = server.send(json!({"channels": ["ops"], "message": "2"}));

    // At once: what is newer than `since`, channels included.
    let a = poll(
        server.addr,
        &format!("user_id=pat&channels=ops&since={}", uuid::Uuid::nil()),
        &[],
    );
    assert_eq!(poll_ids(&a), vec![first.clone(), second.clone()]);
    assert_eq!(a.json()["last_id"], second.as_str());
    assert_eq!(a.json()["more"], false);
    assert_eq!(a.json()["notifications"][1]["channel"], "ops");
    assert_eq!(a.header("connection"), Some("close"));

    // Nothing newer: parked until the next send, which it answers with.
    let addr = server.addr;
    let since = second.clone();
    let parked = std::thread::spawn(move || {
        let started = Instant::now();
        let a = poll(
            addr,
            &format!("user_id=pat&channels=ops&since={since}&timeout_s=30"),
            &[],
        );
        (a, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(400));
    let third = server.send(json!({"user_id": "pat", "message": "3"}));
    let (a, waited) = parked.join().unwrap();
    assert_eq!(poll_ids(&a), vec![third.clone()]);
    assert!(
        waited < Duration::from_secs(25),
        "answered by the send, not the timeout"
    );

    // Without `since`: the next notification, whatever came before.
    let parked = std::thread::spawn(move || poll(addr, "user_id=pat&timeout_s=30", &[]));
    std::thread::sleep(Duration::from_millis(400));
    let fourth = server.send(json!({"broadcast": true, "message": "4"}));
    assert_eq!(poll_ids(&parked.join().unwrap()), vec![fourth.clone()]);

    // Nothing comes: 200 with an empty list after `timeout_s`, `last_id` still the client's.
    let a = poll(
        server.addr,
        &format!("user_id=pat&since={fourth}&timeout_s=1"),
        &[],
    );
    assert_eq!(poll_ids(&a), Vec::<String>::new());
    assert_eq!(a.json()["last_id"], fourth.as_str());
    let a = poll(server.addr, "user_id=nobody&timeout_s=0", &[]);
    assert_eq!(
        a.json(),
        json!({"notifications": [], "last_id": null, "more": false})
    );
}

#[test]
fn a_poll_answers_at_most_max_replay_and_says_there_is_more() {
    let server = TestServer::start_with(&[("MAX_REPLAY", "2")]);
    let ids: Vec<String> = (0..3)
        .map(|i| server.send(json!({"user_id": "mo", "message": i.to_string()})))
        .collect();
    let a = poll(
        server.addr,
        &format!("user_id=mo&since={}", uuid::Uuid::nil()),
        &[],
    );
    assert_eq!(poll_ids(&a), ids[..2].to_vec());
    assert_eq!(a.json()["more"], true);
    let a = poll(server.addr, &format!("user_id=mo&since={}", ids[1]), &[]);
    assert_eq!(
        (poll_ids(&a), a.json()["more"].as_bool()),
        (ids[2..].to_vec(), Some(false))
    );
}

#[test]
fn shutdown_ends_streams_and_answers_parked_polls() {
    let mut server = TestServer::start();
    let mut s = stream(&server, "user_id=end");
    let addr = server.addr;
    let parked = std::thread::spawn(move || poll(addr, "user_id=end2&timeout_s=30", &[]));
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    assert!(server.terminate().success());
    assert!(
        s.until_end().iter().all(|e| e.name == ":"),
        "the stream ended"
    );
    let a = parked.join().unwrap();
    assert_eq!(poll_ids(&a), Vec::<String>::new());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn streams_and_polls_replay_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let server = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    let first = server.send(json!({"user_id": "pg", "message": "1"}));
    let missed = vec![
        server.send(json!({"user_id": "pg", "message": "2"})),
        server.send(json!({"channels": ["c"], "message": "3"})),
    ];
    let mut s = stream_with(
        &server,
        "user_id=pg&channels=c",
        &[("Last-Event-ID", &first)],
    );
    s.expect_event("subscribed");
    let got: Vec<String> = (0..2)
        .map(|_| s.expect_notification()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, missed);
    assert_eq!(s.expect_event("resumed")["count"], 2);
    let a = poll(
        server.addr,
        &format!("user_id=pg&channels=c&since={first}"),
        &[],
    );
    assert_eq!(poll_ids(&a), missed);
}

#[test]
fn a_send_on_one_node_reaches_a_stream_and_a_poll_on_another() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let node = || cluster_node(&schema, &redis);
    let (a, b) = (node(), node());
    let mut s = stream(&b, "user_id=x&channels=room");
    s.expect_event("subscribed");
    // A subscription is asynchronous: send once B listens for the user and the channel.
    redis.wait_numsub("u:x", 1);
    redis.wait_numsub("c:room", 1);
    let first = a.send(json!({"user_id": "x", "message": "to the stream"}));
    assert_eq!(s.expect_notification()["id"], first.as_str());
    let to_room = a.send(json!({"channels": ["room"], "message": "room"}));
    assert_eq!(s.expect_notification()["id"], to_room.as_str());

    let b_addr = b.addr;
    let since = to_room.clone();
    let parked = std::thread::spawn(move || {
        poll(
            b_addr,
            &format!("user_id=x&since={since}&timeout_s=30"),
            &[],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let next = a.send(json!({"user_id": "x", "message": "to the poll"}));
    assert_eq!(poll_ids(&parked.join().unwrap()), vec![next.clone()]);
    assert_eq!(s.expect_notification()["id"], next.as_str());
}
