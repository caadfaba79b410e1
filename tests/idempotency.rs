//! `Idempotency-Key`: a retry gets the first answer byte for byte and stores nothing new, also when
//! retries race on different shards; the same key with another body is 422.

mod common;

use common::{parse_responses, TestServer};
use serde_json::json;

fn post_with_key(server: &TestServer, path: &str, key: &str, body: &str) -> common::HttpResponse {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    parse_responses(&server.raw(req.as_bytes())).remove(0)
}

#[test]
fn a_retried_send_returns_the_first_answer_and_stores_once() {
    let server = TestServer::start();
    let body = json!({"user_id": "ida", "message": "pay invoice 7"}).to_string();
    let first = post_with_key(&server, "/api/v1/notifications/send", "invoice-7", &body);
    assert_eq!(first.status, 201);
    let retry = post_with_key(&server, "/api/v1/notifications/send", "invoice-7", &body);
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body, first.body, "byte for byte");
    assert_eq!(
        server.get("/api/v1/notifications/user/ida").json()["total"],
        1
    );

    let other = json!({"user_id": "ida", "message": "something else"}).to_string();
    let reused = post_with_key(&server, "/api/v1/notifications/send", "invoice-7", &other);
    assert_eq!(reused.status, 422);
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    assert_eq!(
        server.get("/api/v1/notifications/user/ida").json()["total"],
        1
    );

    // The same key on another route is another request.
    let batch =
        json!({"notifications": [{"user_id": "ida", "message": "pay invoice 7"}]}).to_string();
    assert_eq!(
        post_with_key(&server, "/api/v1/notifications/batch", "invoice-7", &batch).status,
        422
    );
}

#[test]
fn retries_racing_on_many_connections_store_exactly_once() {
    let server = TestServer::start();
    let body = json!({"notifications": [{"user_id": "race", "message": "a"}, {"user_id": "race", "message": "b"}]}).to_string();
    let addr = server.addr;
    let answers: Vec<(u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let body = body.clone();
                scope.spawn(move || {
                    let server_ref = common::TestServerRef(addr);
                    let r = server_ref.post_raw(
                        "/api/v1/notifications/batch",
                        &body,
                        &[("Idempotency-Key", "batch-42")],
                    );
                    (r.status, r.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|(status, _)| *status == 201),
        "{answers:?}"
    );
    assert!(
        answers.windows(2).all(|w| w[0].1 == w[1].1),
        "every retry got the same bytes"
    );
    assert_eq!(
        server.get("/api/v1/notifications/user/race").json()["total"],
        2
    );
}

#[test]
fn a_retried_schedule_is_scheduled_once() {
    let server = TestServer::start();
    let at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let body = json!({"user_id": "sched", "message": "m", "scheduled_at": at}).to_string();
    let a = post_with_key(&server, "/api/v1/notifications/schedule", "s-1", &body);
    let b = post_with_key(&server, "/api/v1/notifications/schedule", "s-1", &body);
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(a.body, b.body);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .get(&format!("/api/v1/notifications/scheduled/{id}"))
            .status,
        200
    );
}

#[test]
fn an_unusable_key_is_refused() {
    let server = TestServer::start();
    let body = json!({"user_id": "u", "message": "m"}).to_string();
    let long = "k".repeat(300);
    let r = post_with_key(&server, "/api/v1/notifications/send", &long, &body);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
}

/// A version before this one stored the HTTP answer itself with the key; after an upgrade (within the
/// key's 24 hours) a retry still gets that answer, byte for byte, and stores nothing.
#[test]
fn a_key_recorded_before_an_upgrade_still_replays_its_answer() {
    use sha2::{Digest, Sha256};

    let mut server = TestServer::start();
    assert!(server.terminate().success());
    let path = "/api/v1/notifications/send";
    let body = json!({"user_id": "upgraded", "message": "pay invoice 8"}).to_string();
    let mut fingerprint = Sha256::new();
    fingerprint.update(path.as_bytes());
    fingerprint.update([0]);
    fingerprint.update(body.as_bytes());
    let fingerprint: [u8; 32] = fingerprint.finalize().into();
    let answer =
        br#"{"id":"0190a0a0-0000-7000-8000-000000000008","timestamp":"2024-01-29T17:00:00.000Z"}"#;
    let db = rusqlite::Connection::open(server.dir.path().join("notifications.db")).unwrap();
    db.execute(
        "INSERT INTO idempotency_keys (key, fingerprint, status, body, created_at)
         VALUES ('invoice-8', ?1, 201, ?2, ?3)",
        rusqlite::params![
            fingerprint.as_slice(),
            answer.as_slice(),
            chrono::Utc::now().timestamp_millis()
        ],
    )
    .unwrap();
    drop(db);

    let server = TestServer::start_in(server.dir.clone(), &[]);
    let retry = post_with_key(&server, path, "invoice-8", &body);
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body, answer.as_slice(), "byte for byte");
    assert_eq!(
        server.get("/api/v1/notifications/user/upgraded").json()["total"],
        0
    );
}
