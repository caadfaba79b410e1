//! `GET /metrics` on a live server, parsed with a real Prometheus parser: every family docs/API.md
//! lists is there, and each moves when its event happens (a request per route and status class, a
//! WebSocket close per code, a delivery per kind, a refusal per reason, a schedule pending and fired,
//! bytes queued for a socket that stopped reading, the latency and batch-size histograms, and the
//! process's own figures).

mod common;

use std::io::Write;
use std::time::Duration;

use common::auth::request_with;
use common::prometheus::Scrape;
use common::{wait_for, wait_until, TestServer, WAIT};
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

/// The families of the contract (docs/API.md, "Metrics"), each with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("notif_websocket_connections", "gauge"),
    ("notif_websocket_connections_total", "counter"),
    ("notif_http_requests_total", "counter"),
    ("notif_http_responses_total", "counter"),
    ("notif_websocket_messages_total", "counter"),
    ("notif_websocket_closes_total", "counter"),
    ("notif_deliveries_total", "counter"),
    ("notif_deliveries_by_kind_total", "counter"),
    ("notif_notifications_stored_total", "counter"),
    ("notif_shard_wakeups_total", "counter"),
    ("notif_outbound_queue_bytes", "gauge"),
    ("notif_commit_to_write_seconds", "histogram"),
    ("notif_refused_total", "counter"),
    ("notif_uptime_seconds", "gauge"),
    ("notif_store_commits_total", "counter"),
    ("notif_store_failed_batches_total", "counter"),
    ("notif_store_write_requests_total", "counter"),
    ("notif_store_inserted_total", "counter"),
    ("notif_store_reads_total", "counter"),
    ("notif_scheduled_fired_total", "counter"),
    ("notif_scheduled_pending", "gauge"),
    ("notif_sqlite_memory_bytes", "gauge"),
    ("notif_store_batch_size", "histogram"),
    ("notif_send_to_commit_seconds", "histogram"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
];

const TOKEN: &str = "scrape-secret";

fn rfc3339_in(ms: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(ms);
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn responses(s: &Scrape, route: &str, class: &str) -> f64 {
    s.find(
        "notif_http_responses_total",
        &[("route", route), ("status_class", class)],
    )
    .unwrap_or(0.0)
}

fn kind(s: &Scrape, kind: &str) -> f64 {
    s.value("notif_deliveries_by_kind_total", &[("kind", kind)])
}

fn closes(s: &Scrape, code: &str) -> f64 {
    s.value("notif_websocket_closes_total", &[("code", code)])
}

fn refused(s: &Scrape, reason: &str) -> f64 {
    s.value("notif_refused_total", &[("reason", reason)])
}

#[test]
fn every_family_is_exposed_with_its_type_and_moves_with_its_event() {
    let server = TestServer::start_with(&[
        ("METRICS_TOKEN", TOKEN),
        ("MAX_CONNECTIONS_PER_USER", "1"),
        // Room for the slow reader below to hold megabytes without being closed as a slow consumer.
        ("MAX_OUTBOUND_BYTES", "67108864"),
    ]);
    let scrape = || Scrape::of(&server, Some(TOKEN));
    let before = scrape();
    for (name, kind) in FAMILIES {
        assert!(
            before.text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} ({kind}) missing:\n{}",
            before.text
        );
    }
    assert_eq!(before.value("notif_scheduled_pending", &[]), 0.0);
    assert!(before.value("process_resident_memory_bytes", &[]) > 1e6);
    // The test server runs on SQLite: its caches and statements are there from the start.
    assert!(before.value("notif_sqlite_memory_bytes", &[]) > 1e4);
    assert!(before.value("process_open_fds", &[]) > 3.0);
    assert!(before.value("process_start_time_seconds", &[]) > 1.7e9);

    // A scrape without the token: 401, counted as a refusal and as a 4xx on the metrics route.
    let r = request_with(&server, "GET", "/metrics", None, &[]);
    assert_eq!(r.status, 401);
    // No route: 404.
    assert_eq!(server.get("/nope").status, 404);

    // alice and bob on the channel "news"; alice's second connection is over her cap: 1013.
    let mut alice = server.ws("user_id=alice&channels=news");
    alice.expect_event("subscribed");
    let mut bob = server.ws("user_id=bob&channels=news");
    bob.expect_event("subscribed");
    let url = format!("ws://{}/ws?user_id=alice", server.addr);
    let (ws, _) =
        tungstenite::client::client(url, server.tcp()).expect("the upgrade, then a close");
    let mut second = common::WsClient {
        ws,
        connection_id: String::new(),
        unread_seen: Vec::new(),
    };
    assert_eq!(second.expect_close(), Some(1013));

    let s = scrape();
    assert_eq!(
        refused(&s, "unauthorized") - refused(&before, "unauthorized"),
        1.0
    );
    assert_eq!(
        refused(&s, "max_connections_per_user") - refused(&before, "max_connections_per_user"),
        1.0
    );
    assert_eq!(
        responses(&s, "metrics", "4xx") - responses(&before, "metrics", "4xx"),
        1.0
    );
    assert_eq!(
        responses(&s, "none", "4xx") - responses(&before, "none", "4xx"),
        1.0
    );
    assert_eq!(
        responses(&s, "ws", "1xx") - responses(&before, "ws", "1xx"),
        3.0,
        "{}",
        s.text
    );
    assert!(responses(&s, "metrics", "2xx") >= 1.0);
    assert_eq!(closes(&s, "1013") - closes(&before, "1013"), 1.0);
    assert_eq!(s.value("notif_websocket_connections", &[]), 2.0);
    assert_eq!(
        s.value("notif_websocket_connections_total", &[])
            - before.value("notif_websocket_connections_total", &[]),
        2.0
    );
    assert!(s.value("process_open_fds", &[]) >= before.value("process_open_fds", &[]) + 2.0);

    // One delivery of each kind: to alice's user, to the channel (alice and bob), to everyone, and
    // bob's publish (to alice; the sender is skipped).
    server.send(json!({"user_id": "alice", "message": "to alice"}));
    alice.expect_notification();
    server.send(json!({"channels": ["news"], "message": "to news"}));
    alice.expect_notification();
    bob.expect_notification();
    server.send(json!({"broadcast": true, "message": "to all"}));
    alice.expect_notification();
    bob.expect_notification();
    bob.send_json(json!({"action": "publish", "channel": "news", "data": {"x": 1}}));
    assert_eq!(alice.next_json()["event"], "message");
    let batch = server.post(
        "/api/v1/notifications/batch",
        &json!({"notifications": [{"user_id": "carol", "message": "a"}, {"user_id": "carol", "message": "b"}]}),
    );
    assert_eq!(
        batch.status,
        201,
        "{}",
        String::from_utf8_lossy(&batch.body)
    );

    let s = scrape();
    for (k, n) in [
        ("user", 1.0),
        ("channel", 2.0),
        ("broadcast", 2.0),
        ("publish", 1.0),
    ] {
        assert_eq!(kind(&s, k) - kind(&before, k), n, "deliveries of kind {k}");
    }
    assert_eq!(
        s.value("notif_deliveries_total", &[]) - before.value("notif_deliveries_total", &[]),
        6.0
    );
    assert_eq!(
        responses(&s, "send", "2xx") - responses(&before, "send", "2xx"),
        3.0
    );
    assert_eq!(
        responses(&s, "batch", "2xx") - responses(&before, "batch", "2xx"),
        1.0
    );
    assert!(s.value("notif_websocket_messages_total", &[]) >= 1.0);
    // Four write requests, each timed from its queueing to its commit, in transactions of 1 to 4.
    let sends =
        s.count("notif_send_to_commit_seconds") - before.count("notif_send_to_commit_seconds");
    assert_eq!(sends, 4.0);
    assert!(s.count("notif_store_batch_size") - before.count("notif_store_batch_size") >= 1.0);
    let batch_sum = s.value("notif_store_batch_size_sum", &[])
        - before.value("notif_store_batch_size_sum", &[]);
    assert_eq!(
        batch_sum, 4.0,
        "each send and the batch is one write request"
    );
    // The three stored deliveries that reached someone were timed from commit to first write (once per
    // shard that delivered them: one or two).
    let timed =
        s.count("notif_commit_to_write_seconds") - before.count("notif_commit_to_write_seconds");
    assert!(
        (3.0..=6.0).contains(&timed),
        "commit → first write observations: {timed}"
    );
    let buckets = s.buckets("notif_commit_to_write_seconds");
    assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");

    // Scheduled: one far ahead stays pending, one soon fires.
    for at in [rfc3339_in(3_600_000), rfc3339_in(300)] {
        let r = server.post(
            "/api/v1/notifications/schedule",
            &json!({"user_id": "dora", "message": "later", "scheduled_at": at}),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    wait_until("the soon schedule to fire", WAIT, || {
        let s = scrape();
        s.value("notif_scheduled_fired_total", &[]) == 1.0
            && s.value("notif_scheduled_pending", &[]) == 1.0
    });

    // A reader that stops reading: what the socket does not take is queued, then given back when the
    // connection ends.
    let slow_socket = server.tcp();
    let mut slow = server.ws_with_socket("user_id=slow&channels=bulk", slow_socket);
    slow.expect_event("subscribed");
    let mut publisher = server.ws("user_id=pub&channels=bulk");
    publisher.expect_event("subscribed");
    let payload = "x".repeat(60_000);
    wait_for(
        "bytes queued for the slow reader",
        Duration::from_secs(30),
        || {
            for _ in 0..20 {
                publisher
                    .send_json(json!({"action": "publish", "channel": "bulk", "data": payload}));
            }
            let queued = scrape().value("notif_outbound_queue_bytes", &[]);
            (queued > 0.0).then_some(queued)
        },
    );
    drop(slow);
    wait_until("the queue to be given back", WAIT, || {
        scrape().value("notif_outbound_queue_bytes", &[]) == 0.0
    });

    // Closes by code: alice says goodbye with 1000; bob's socket just vanishes (no close frame).
    let before_closes = scrape();
    alice
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .unwrap();
    let _ = alice.expect_close();
    let mut bob_socket = bob.ws.get_ref().try_clone().unwrap();
    let _ = bob_socket.flush();
    bob_socket.shutdown(std::net::Shutdown::Both).unwrap();
    drop(bob);
    wait_until("both closes to be counted", WAIT, || {
        let s = scrape();
        closes(&s, "1000") - closes(&before_closes, "1000") == 1.0
            && closes(&s, "none") - closes(&before_closes, "none") >= 1.0
    });
    let after = scrape();
    assert!(
        after.value("process_cpu_seconds_total", &[]) > 0.0,
        "{}",
        after.text
    );
    assert!(
        after.value("notif_http_requests_total", &[])
            > before.value("notif_http_requests_total", &[])
    );
}

/// A connection that got a 200 to a kept-alive request (so it holds its slot), or `None` if the
/// server refused it.
fn admitted_connection(server: &TestServer) -> Option<std::net::TcpStream> {
    let mut stream = server.tcp();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut stream, &mut buf).ok()?;
    buf[..n].starts_with(b"HTTP/1.1 200").then_some(stream)
}

/// Refusals that need an API key and small limits: a key over its rate (429), a connection over the
/// per-IP cap (503), and WebSocket messages over their rate.
#[test]
fn refusals_are_counted_by_reason() {
    let server = TestServer::start_with(&[
        ("API_KEY", "k1"),
        ("RATE_LIMIT_API", "1"),
        ("RATE_LIMIT_API_BURST", "1"),
        ("RATE_LIMIT_WS", "1"),
        ("RATE_LIMIT_WS_BURST", "1"),
        ("MAX_CONNECTIONS_PER_IP", "3"),
    ]);
    let before = Scrape::of(&server, None);
    let key = [("Authorization", "Bearer k1")];
    let body = r#"{"user_id":"u","message":"m"}"#;
    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            request_with(
                &server,
                "POST",
                "/api/v1/notifications/send",
                Some(body),
                &key,
            )
            .status
        })
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(
        request_with(
            &server,
            "POST",
            "/api/v1/notifications/send",
            Some(body),
            &[]
        )
        .status,
        401
    );

    let mut client = server.ws("user_id=u");
    for _ in 0..3 {
        client.send_json(json!({"action": "ping"}));
    }
    assert_eq!(client.expect_close(), Some(1008));

    // Three kept-alive connections fill this address's cap (each proven admitted by a 200: a
    // connection of an earlier step may still be closing); a fourth is refused.
    let held: Vec<_> = (0..3)
        .map(|_| {
            wait_for("an admitted connection", WAIT, || {
                admitted_connection(&server)
            })
        })
        .collect();
    let refused_answer = wait_for("a connection over the per-IP cap", WAIT, || {
        let r = server.get("/health");
        (r.status == 503).then_some(r)
    });
    assert_eq!(refused_answer.error_code(), "too_many_connections");
    drop(held);

    let after = wait_for("the held connections to close", WAIT, || {
        let r = request_with(&server, "GET", "/metrics", None, &[]);
        (r.status == 200).then(|| Scrape::of(&server, None))
    });
    for (reason, at_least) in [
        ("rate_limited", 1.0),
        ("unauthorized", 1.0),
        ("message_rate_limited", 2.0),
        ("max_connections_per_ip", 1.0),
    ] {
        let moved = refused(&after, reason) - refused(&before, reason);
        assert!(
            moved >= at_least,
            "{reason} moved by {moved}:\n{}",
            after.text
        );
    }
    assert_eq!(
        refused(&after, "max_connections") - refused(&before, "max_connections"),
        0.0
    );
    assert!(responses(&after, "send", "4xx") - responses(&before, "send", "4xx") >= 2.0);
    assert!(closes(&after, "1008") - closes(&before, "1008") >= 1.0);
}
