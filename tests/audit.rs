//! The audit log (`AUDIT_LOG`, docs/audit.md) through the real binary: a notification's life over
//! HTTP and WebSocket (accepted with its credential, stored, delivered, read, read-all, deleted,
//! scheduled, fired, cancelled) and every refused credential and rate limit, each one JSON line with
//! the documented fields; a queue too small for a burst counts and reports what it drops and never
//! slows the server; the stdout target; the reopen on SIGHUP; an unwritable file at start-up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::auth::{request_with, token, token_with, try_ws, ws_with_token, SECRET};
use common::{wait_for, HttpResponse, TestServer, WAIT};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const KEY: &str = "audit-key-current";

/// The audit log's id of an API key: the first 8 hex digits of its SHA-256.
fn key_id(key: &str) -> String {
    Sha256::digest(key.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every line of the audit file, each parsed as JSON (a line that is not JSON fails the test).
fn audit_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: the writer may be between two writes.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for the first line of `path` for which `matches` holds.
fn wait_line(path: &Path, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, WAIT, || audit_lines(path).into_iter().find(&matches))
}

/// The line of `event` about notification (or schedule) `id`.
fn line_of(path: &Path, event: &str, id: &str) -> Value {
    wait_line(path, &format!("{event} line of {id}"), |l| {
        l["event"] == event && l["id"] == id
    })
}

fn audited_server(dir: &tempfile::TempDir, extra: &[(&str, &str)]) -> (TestServer, PathBuf) {
    let path = dir.path().join("audit.log");
    let mut env = vec![("AUDIT_LOG", path.to_str().unwrap())];
    env.extend_from_slice(extra);
    (TestServer::start_with(&env), path)
}

fn with_key(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&Value>,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let mut headers = vec![("X-API-Key", KEY)];
    headers.extend_from_slice(extra);
    let body = body.map(Value::to_string);
    request_with(server, method, path, body.as_deref(), &headers)
}

/// The fields every line about an HTTP request made with `KEY` carries.
fn assert_by_key(line: &Value, method: &str, path: &str) {
    assert_eq!(line["via"], "http", "{line}");
    assert_eq!(line["method"], method, "{line}");
    assert_eq!(line["path"], path, "{line}");
    assert_eq!(line["auth"], "api_key", "{line}");
    assert_eq!(line["key_id"], key_id(KEY), "{line}");
    assert_eq!(line["ip"], "127.0.0.1", "{line}");
}

#[test]
fn a_notifications_life_over_http_and_websocket_is_one_line_per_step_with_its_credential() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = audited_server(
        &dir,
        &[
            ("API_KEY", &format!("{KEY},other-key")),
            ("JWT_SECRET", SECRET),
        ],
    );
    let mut alice = ws_with_token(&server, &token("alice", &["news"]), "channels=news");
    alice.expect_event("subscribed");

    // A send: accepted (with the key), stored, delivered to alice's one connection.
    let r = with_key(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&json!({"user_id": "alice", "message": "hola"})),
        &[],
    );
    assert_eq!(r.status, 201);
    let sent = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(alice.expect_notification()["id"], sent.as_str());
    let accepted = line_of(&log, "accepted", &sent);
    assert_by_key(&accepted, "POST", "/api/v1/notifications/send");
    assert_eq!(accepted["replayed"], false);
    let stored = line_of(&log, "stored", &sent);
    assert_eq!(stored["user_id"], "alice");
    assert_eq!(stored["channels"], json!([]));
    assert_eq!(stored["broadcast"], false);
    let delivered = line_of(&log, "delivered", &sent);
    assert_eq!(delivered["connections"], 1);
    assert_eq!(delivered["shard"], alice.shard());

    // A batch to alice and to a channel: one accepted and one stored line per notification.
    let r = with_key(
        &server,
        "POST",
        "/api/v1/notifications/batch",
        Some(&json!({"notifications": [
            {"user_id": "alice", "message": "uno"},
            {"channels": ["news"], "message": "dos"}
        ]})),
        &[],
    );
    assert_eq!(r.status, 201);
    let ids: Vec<String> = r.json()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        assert_by_key(
            &line_of(&log, "accepted", id),
            "POST",
            "/api/v1/notifications/batch",
        );
        alice.expect_notification();
    }
    assert_eq!(
        line_of(&log, "stored", &ids[1])["channels"],
        json!(["news"])
    );

    // An Idempotency-Key retry stores nothing: accepted again, marked replayed, no second stored.
    let keyed = json!({"user_id": "alice", "message": "once"});
    let first = with_key(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&keyed),
        &[("Idempotency-Key", "audit-1")],
    );
    let retry = with_key(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&keyed),
        &[("Idempotency-Key", "audit-1")],
    );
    let once = first.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(alice.expect_notification()["id"], once.as_str());
    assert_eq!(retry.json()["id"], once.as_str());
    wait_line(&log, "the replayed accepted line", |l| {
        l["event"] == "accepted" && l["id"] == once.as_str() && l["replayed"] == true
    });

    // Read over HTTP and over the WebSocket, read-all, delete.
    let r = with_key(
        &server,
        "PUT",
        &format!("/api/v1/notifications/alice/{sent}/read"),
        None,
        &[],
    );
    assert_eq!(r.status, 200);
    let read = line_of(&log, "read", &sent);
    assert_by_key(
        &read,
        "PUT",
        &format!("/api/v1/notifications/alice/{sent}/read"),
    );
    assert_eq!(read["user_id"], "alice");
    alice.send_json(json!({"action": "read", "id": ids[0]}));
    let read_ws = line_of(&log, "read", &ids[0]);
    assert_eq!(read_ws["via"], "ws");
    assert_eq!(read_ws["auth"], "jwt");
    assert_eq!(read_ws["sub"], "alice");
    assert_eq!(read_ws["ip"], "127.0.0.1");
    let r = with_key(
        &server,
        "PUT",
        "/api/v1/notifications/alice/read-all",
        None,
        &[],
    );
    let updated = r.json()["updated"].as_u64().unwrap();
    let read_all = wait_line(&log, "read_all", |l| l["event"] == "read_all");
    assert_eq!(read_all["user_id"], "alice");
    assert_eq!(read_all["updated"], updated);
    assert_by_key(&read_all, "PUT", "/api/v1/notifications/alice/read-all");
    let r = with_key(
        &server,
        "DELETE",
        &format!("/api/v1/notifications/alice/{sent}"),
        None,
        &[],
    );
    assert_eq!(r.status, 204);
    assert_eq!(line_of(&log, "deleted", &sent)["user_id"], "alice");
    // A delete that finds nothing changed nothing: no second line.
    let again = with_key(
        &server,
        "DELETE",
        &format!("/api/v1/notifications/alice/{sent}"),
        None,
        &[],
    );
    assert_eq!(again.status, 404);

    // Scheduled and cancelled; scheduled in the past, so it fires at the next tick.
    let later = (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    let r = with_key(
        &server,
        "POST",
        "/api/v1/notifications/schedule",
        Some(&json!({"user_id": "alice", "message": "later", "scheduled_at": later})),
        &[],
    );
    let pending = r.json()["id"].as_str().unwrap().to_owned();
    let scheduled = line_of(&log, "scheduled", &pending);
    assert_eq!(scheduled["user_id"], "alice");
    assert_eq!(scheduled["scheduled_at"], r.json()["scheduled_at"]);
    assert_by_key(&scheduled, "POST", "/api/v1/notifications/schedule");
    let r = with_key(
        &server,
        "DELETE",
        &format!("/api/v1/notifications/scheduled/{pending}"),
        None,
        &[],
    );
    assert_eq!(r.status, 204);
    assert_by_key(
        &line_of(&log, "cancelled", &pending),
        "DELETE",
        &format!("/api/v1/notifications/scheduled/{pending}"),
    );
    let r = with_key(
        &server,
        "POST",
        "/api/v1/notifications/schedule",
        Some(
            &json!({"user_id": "alice", "message": "now", "scheduled_at": "2020-01-01T00:00:00Z"}),
        ),
        &[],
    );
    let due = r.json()["id"].as_str().unwrap().to_owned();
    let fired_id = alice.expect_notification()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fired = line_of(&log, "fired", &fired_id);
    assert_eq!(fired["schedule_id"], due.as_str());
    assert_eq!(fired["user_id"], "alice");
    assert_eq!(line_of(&log, "delivered", &fired_id)["connections"], 1);

    // Every line: an RFC 3339 time and an event; the id of the stored line comes before its
    // delivered line; nothing about a read that found nothing; no secret anywhere.
    let lines = audit_lines(&log);
    for l in &lines {
        chrono::DateTime::parse_from_rfc3339(l["ts"].as_str().unwrap()).unwrap();
        assert!(l["event"].is_string(), "{l}");
    }
    let position = |event: &str, id: &str| {
        lines
            .iter()
            .position(|l| l["event"] == event && l["id"] == id)
            .unwrap()
    };
    assert!(position("stored", &sent) < position("delivered", &sent));
    assert_eq!(
        lines
            .iter()
            .filter(
                |l| l["event"] == "deleted" || (l["event"] == "stored" && l["id"] == once.as_str())
            )
            .count(),
        2,
        "one deleted line (the 404 wrote none), one stored line for the keyed send"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(KEY) && !text.contains(SECRET));
}

#[test]
fn refused_keys_and_tokens_are_audited_with_their_reason_and_never_their_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = audited_server(
        &dir,
        &[
            ("API_KEY", KEY),
            ("JWT_SECRET", SECRET),
            ("METRICS_TOKEN", "m-token"),
        ],
    );
    let send = json!({"user_id": "bob", "message": "x"}).to_string();
    let r = request_with(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&send),
        &[],
    );
    assert_eq!(r.status, 401);
    let missing = wait_line(&log, "missing_api_key", |l| {
        l["reason"] == "missing_api_key"
    });
    assert_eq!(missing["event"], "auth_refused");
    assert_eq!(missing["via"], "http");
    assert_eq!(missing["method"], "POST");
    assert_eq!(missing["path"], "/api/v1/notifications/send");
    assert_eq!(missing["auth"], "none");
    assert_eq!(missing["ip"], "127.0.0.1");
    let wrong = "wrong-key-do-not-log";
    let r = request_with(
        &server,
        "GET",
        "/api/v1/notifications/user/bob",
        None,
        &[("Authorization", &format!("Bearer {wrong}"))],
    );
    assert_eq!(r.status, 401);
    let invalid = wait_line(&log, "invalid_api_key", |l| {
        l["reason"] == "invalid_api_key"
    });
    assert_eq!(invalid["presented_key_id"], key_id(wrong));
    assert_eq!(invalid["path"], "/api/v1/notifications/user/bob");
    let r = request_with(
        &server,
        "GET",
        "/metrics",
        None,
        &[("Authorization", "Bearer nope")],
    );
    assert_eq!(r.status, 401);
    wait_line(&log, "invalid_metrics_token", |l| {
        l["reason"] == "invalid_metrics_token"
    });

    // WebSocket upgrades: no token, a token signed with another secret, an expired one.
    let other = token_with(
        "other-secret",
        json!({"sub": "bob", "exp": common::auth::now() + 60}),
    );
    let expired = token_with(
        SECRET,
        json!({"sub": "bob", "exp": common::auth::now() - 3600}),
    );
    for (query, reason) in [
        ("user_id=bob".to_owned(), "missing_token"),
        (format!("token={other}"), "bad_signature"),
        (format!("token={expired}"), "expired_token"),
    ] {
        let refusal = try_ws(&server, &query, &[]).err().expect("refused");
        assert_eq!(refusal.status, 401, "{reason}");
        let line = wait_line(&log, reason, |l| l["reason"] == reason);
        assert_eq!(line["event"], "auth_refused");
        assert_eq!(line["via"], "ws");
        assert_eq!(line["ip"], "127.0.0.1");
    }
    // A refresh with a bad token on a live connection: refused, and audited as its user's.
    let mut bob = ws_with_token(&server, &token("bob", &[]), "");
    bob.send_json(json!({"action": "refresh", "token": other}));
    assert_eq!(bob.expect_event("error")["code"], "unauthorized");
    let refresh = wait_line(&log, "refused refresh", |l| {
        l["reason"] == "bad_signature" && l["sub"] == "bob"
    });
    assert_eq!(refresh["auth"], "jwt");

    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [
        wrong,
        KEY,
        SECRET,
        "m-token",
        other.as_str(),
        expired.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} is in the audit log");
    }
}

#[test]
fn rate_limits_are_audited_per_key_and_per_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = audited_server(
        &dir,
        &[
            ("API_KEY", KEY),
            ("RATE_LIMIT_API", "1"),
            ("RATE_LIMIT_API_BURST", "1"),
            ("RATE_LIMIT_WS", "1"),
            ("RATE_LIMIT_WS_BURST", "1"),
        ],
    );
    let body = json!({"user_id": "carol", "message": "x"});
    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            with_key(
                &server,
                "POST",
                "/api/v1/notifications/send",
                Some(&body),
                &[],
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [201, 429]);
    let limited = wait_line(&log, "api rate_limited", |l| l["event"] == "rate_limited");
    assert_eq!(limited["limit"], "api_key");
    assert_by_key(&limited, "POST", "/api/v1/notifications/send");

    let mut carol = server.ws("user_id=carol");
    carol.send_json(json!({"action": "ping"}));
    carol.send_json(json!({"action": "ping"}));
    assert_eq!(carol.expect_event("pong")["event"], "pong");
    assert_eq!(carol.expect_event("error")["code"], "rate_limited");
    let limited = wait_line(&log, "ws rate_limited", |l| l["limit"] == "ws_messages");
    assert_eq!(limited["event"], "rate_limited");
    assert_eq!(limited["via"], "ws");
    assert_eq!(limited["auth"], "none");
    assert_eq!(limited["ip"], "127.0.0.1");
}

/// The lines of `event` written, plus those a `dropped` line counted, for that event.
fn written_and_dropped(lines: &[Value], event: &str) -> (u64, u64) {
    let written = lines.iter().filter(|l| l["event"] == event).count() as u64;
    let dropped = lines
        .iter()
        .filter(|l| l["event"] == "dropped")
        .map(|l| l["by_event"][event].as_u64().unwrap_or(0))
        .sum();
    (written, dropped)
}

#[test]
fn a_queue_too_small_for_a_burst_counts_and_reports_every_dropped_line_and_never_slows_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = audited_server(&dir, &[("AUDIT_QUEUE", "1")]);
    let mut dana = server.ws("user_id=dana");
    const BATCHES: usize = 3;
    const PER_BATCH: usize = 1000;
    for b in 0..BATCHES {
        let list: Vec<Value> = (0..PER_BATCH)
            .map(|i| json!({"user_id": "dana", "message": format!("{b}-{i}")}))
            .collect();
        let r = server.post(
            "/api/v1/notifications/batch",
            &json!({ "notifications": list }),
        );
        assert_eq!(r.status, 201);
    }
    // Every notification reaches the client: the audit log never held delivery back.
    for _ in 0..BATCHES * PER_BATCH {
        dana.expect_notification();
    }
    assert_eq!(server.get("/health").status, 200);
    // The writer saw the whole burst: each delivery, each accepted and each stored notification is
    // a written line or a counted drop.
    let total = (BATCHES * PER_BATCH) as u64;
    wait_for("every delivery written or counted", WAIT, || {
        let lines = audit_lines(&log);
        ["delivered", "accepted", "stored"]
            .iter()
            .all(|event| {
                let (written, dropped) = written_and_dropped(&lines, event);
                written + dropped == total
            })
            .then_some(())
    });
    let lines = audit_lines(&log);
    let dropped_lines: u64 = lines
        .iter()
        .filter(|l| l["event"] == "dropped")
        .map(|l| l["lines"].as_u64().unwrap())
        .sum();
    assert!(
        dropped_lines > 0,
        "a one-event queue took a burst of 3,000 deliveries whole"
    );
    assert_eq!(server.metric("notif_audit_dropped_total"), dropped_lines);
    common::wait_until("every written line counted", WAIT, || {
        server.metric("notif_audit_lines_total") == lines.len() as u64
    });
    common::wait_until("the warning in the server log", WAIT, || {
        server.log_contains("audit log queue full")
    });
}

#[test]
fn stdout_gets_the_lines_between_the_log_lines_and_off_writes_none() {
    let server = TestServer::start_with(&[("AUDIT_LOG", "stdout")]);
    let id = server.send(json!({"user_id": "erin", "message": "hi"}));
    let audit_line = |event: &'static str| {
        let id = id.clone();
        let log = server.log.clone();
        move || {
            log.lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| l["event"] == event && l["id"] == id.as_str())
        }
    };
    let accepted = wait_for("accepted on stdout", WAIT, audit_line("accepted"));
    assert_eq!(accepted["auth"], "none");
    assert_eq!(accepted["path"], "/api/v1/notifications/send");
    wait_for("stored on stdout", WAIT, audit_line("stored"));
    // Counted once the write returned, a moment after the reader saw the lines.
    common::wait_until("the lines counted", WAIT, || {
        server.metric("notif_audit_lines_total") >= 2
    });

    let quiet = TestServer::start();
    quiet.send(json!({"user_id": "erin", "message": "hi"}));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!quiet.log_contains("\"event\":\"accepted\""));
    assert_eq!(quiet.metric("notif_audit_lines_total"), 0);
}

#[test]
fn sighup_reopens_the_file_so_a_renamed_log_is_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = audited_server(&dir, &[]);
    let before = server.send(json!({"user_id": "finn", "message": "1"}));
    line_of(&log, "stored", &before);
    let rotated = dir.path().join("audit.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
    common::wait_until("the reopen", WAIT, || {
        server.log_contains("audit log reopened")
    });
    let after = server.send(json!({"user_id": "finn", "message": "2"}));
    line_of(&log, "stored", &after);
    let old = audit_lines(&rotated);
    assert!(old.iter().any(|l| l["id"] == before.as_str()));
    assert!(!old.iter().any(|l| l["id"] == after.as_str()));
    assert_eq!(
        server.get("/health").status,
        200,
        "SIGHUP did not stop the server"
    );
}

#[test]
fn an_audit_file_that_cannot_be_opened_stops_start_up_and_check_config_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/n.db", dir.path().display()),
        )
        .env("AUDIT_LOG", dir.path().join("missing/dir/audit.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("cannot open AUDIT_LOG"), "{all}");
    // check-config says so beforehand, creating nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .arg("check-config")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/n.db", dir.path().display()),
        )
        .env("AUDIT_LOG", dir.path().join("missing/dir/audit.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("problem: audit log: AUDIT_LOG") && stdout.contains("does not exist"),
        "{stdout}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("AUDIT_QUEUE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("audit-queue"), "{stderr}");
}
