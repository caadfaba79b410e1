//! Every limit is configurable: each test lowers one and checks the documented answer.

mod common;

use std::io::Read;

use common::{parse_responses, TestServer};
use serde_json::json;

#[test]
fn connections_over_the_shard_limit_get_503_and_the_limit_frees_up() {
    let server = TestServer::start_with(&[("SHARDS", "1"), ("MAX_CONNECTIONS_PER_SHARD", "2")]);
    let _a = server.ws("user_id=a");
    let _b = server.ws("user_id=b");
    let mut third = server.tcp();
    let mut raw = Vec::new();
    let _ = third.read_to_end(&mut raw);
    let r = parse_responses(&raw).remove(0);
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "too_many_connections");
    drop(_a);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(server.get("/health").status, 200, "a slot is free again");
}

#[test]
fn the_header_limit_is_configurable() {
    let server = TestServer::start_with(&[("MAX_HEADER_BYTES", "512")]);
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(600)
    );
    let r = parse_responses(&server.raw(req.as_bytes())).remove(0);
    assert_eq!(r.status, 431);
    assert_eq!(r.error_code(), "headers_too_large");
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn the_batch_body_limit_is_its_own_and_configurable() {
    let server = TestServer::start_with(&[("MAX_BODY", "1024"), ("MAX_BATCH_BODY", "4096")]);
    let small: Vec<_> = (0..40)
        .map(|i| json!({"user_id": "u", "message": format!("m{i}")}))
        .collect();
    let body = json!({ "notifications": small });
    assert!(
        body.to_string().len() > 1024,
        "bigger than MAX_BODY, within MAX_BATCH_BODY"
    );
    assert_eq!(
        server.post("/api/v1/notifications/batch", &body).status,
        201
    );
    let big: Vec<_> = (0..200)
        .map(|i| json!({"user_id": "u", "message": format!("m{i}")}))
        .collect();
    let r = server.post(
        "/api/v1/notifications/batch",
        &json!({ "notifications": big }),
    );
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), "body_too_large");
}

#[test]
fn invalid_settings_are_refused_at_start_with_a_clear_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("SHARDS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHARDS"),
        "{out:?}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("PORT", "not-a-port")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PORT")
            || String::from_utf8_lossy(&out.stderr).contains("port")
    );
}
