//! Bad input gets the answer API.md promises, and the server keeps serving everyone else.
//!
//! Each test sends one kind of bad input, checks the exact answer (status and error code, or close code),
//! then checks that a bystander connected before it still gets a notification.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{client_frame, raw_ws, read_close_code, read_server_frame, TestServer, WsClient};
use serde_json::json;

/// A connected bystander, and a check that it is still served.
struct Bystander(WsClient);

impl Bystander {
    fn new(server: &TestServer) -> Bystander {
        Bystander(server.ws("user_id=bystander"))
    }

    fn still_served(mut self, server: &TestServer) {
        let id = server.send(json!({"user_id": "bystander", "message": "still here"}));
        assert_eq!(self.0.expect_notification()["id"], id.as_str());
    }
}

fn send_raw(server: &TestServer, body: &str, content_type: &str) -> common::HttpResponse {
    let req = format!(
        "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    common::parse_responses(&server.raw(req.as_bytes())).remove(0)
}

#[test]
fn http_bad_input_is_answered_with_the_documented_status_and_code() {
    let server = TestServer::start_with(&[("MAX_BODY", "1024")]);
    let bystander = Bystander::new(&server);
    let cases: Vec<(&str, common::HttpResponse, u16, &str)> = vec![
        (
            "malformed JSON",
            send_raw(&server, "{\"message\": ", "application/json"),
            400,
            "invalid_json",
        ),
        (
            "missing message",
            send_raw(&server, r#"{"user_id":"u"}"#, "application/json"),
            400,
            "invalid_field",
        ),
        (
            "no target",
            send_raw(&server, r#"{"message":"m"}"#, "application/json"),
            400,
            "no_target",
        ),
        (
            "bad channel name",
            send_raw(
                &server,
                r#"{"message":"m","channels":["a b"]}"#,
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "data not an object",
            send_raw(
                &server,
                r#"{"message":"m","user_id":"u","data":"x"}"#,
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "U+0000 in message (PostgreSQL text cannot hold it)",
            send_raw(
                &server,
                r#"{"message":"a\u0000b","user_id":"u"}"#,
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "U+0000 in title",
            send_raw(
                &server,
                r#"{"message":"m","title":"\u0000","user_id":"u"}"#,
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "U+0000 in a data key",
            send_raw(
                &server,
                r#"{"message":"m","user_id":"u","data":{"k":[{"a\u0000":1}]}}"#,
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "user_id too long",
            send_raw(
                &server,
                &format!(r#"{{"message":"m","user_id":"{}"}}"#, "x".repeat(129)),
                "application/json",
            ),
            400,
            "invalid_field",
        ),
        (
            "not JSON content type",
            send_raw(&server, r#"{"message":"m","user_id":"u"}"#, "text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "body over MAX_BODY",
            send_raw(
                &server,
                &format!(r#"{{"message":"{}","user_id":"u"}}"#, "x".repeat(2000)),
                "application/json",
            ),
            413,
            "body_too_large",
        ),
        (
            "unknown route",
            server.get("/api/v2/nothing"),
            404,
            "not_found",
        ),
        (
            "wrong method",
            server.request("DELETE", "/api/v1/notifications/send", None),
            405,
            "method_not_allowed",
        ),
        (
            "bad limit",
            server.get("/api/v1/notifications/user/u?limit=abc"),
            400,
            "invalid_field",
        ),
        (
            "bad before cursor",
            server.get("/api/v1/notifications/user/u?before=nope"),
            400,
            "invalid_field",
        ),
        (
            "bad notification id",
            server.request("PUT", "/api/v1/notifications/u/not-a-uuid/read", None),
            400,
            "invalid_field",
        ),
        (
            "unknown notification",
            server.request(
                "PUT",
                &format!("/api/v1/notifications/u/{}/read", uuid::Uuid::now_v7()),
                None,
            ),
            404,
            "not_found",
        ),
        (
            "alias without user_id",
            server.get("/notifications"),
            400,
            "invalid_field",
        ),
        (
            "GET /ws without upgrade",
            server.get("/ws?user_id=u"),
            400,
            "bad_handshake",
        ),
    ];
    for (name, r, status, code) in cases {
        r.assert_error(name, status, code);
    }
    let r = server.request("DELETE", "/api/v1/notifications/send", None);
    assert_eq!(r.header("Allow"), Some("POST"));
    // Validation messages name the field.
    let r = send_raw(&server, r#"{"user_id":"u"}"#, "application/json");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("message"));
    bystander.still_served(&server);
}

#[test]
fn protocol_level_http_errors_close_the_connection_cleanly() {
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("chunked body", b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(), 411),
        ("POST without length", b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 411),
        ("headers over 8 KiB", format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(9000)).into_bytes(), 431),
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), 400),
        ("binary garbage", vec![0u8, 159, 146, 150, 13, 10, 13, 10], 400),
    ];
    for (name, bytes, status) in cases {
        let raw = server.raw(&bytes);
        let responses = common::parse_responses(&raw);
        assert_eq!(
            responses.len(),
            1,
            "{name}: {}",
            String::from_utf8_lossy(&raw)
        );
        assert_eq!(responses[0].status, status, "{name}");
        assert!(responses[0].json()["error"]["code"].is_string(), "{name}");
    }
    bystander.still_served(&server);
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let server = TestServer::start();
    let body = r#"{"user_id":"pipe","message":"m"}"#;
    let send = format!(
        "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut all = String::new();
    all.push_str("GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    all.push_str(&send);
    all.push_str("GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    all.push_str(&send);
    all.push_str(
        "GET /api/v1/notifications/user/pipe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let raw = server.raw(all.as_bytes());
    let statuses: Vec<u16> = common::parse_responses(&raw)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200, 201, 404, 201, 200]);
    let last = common::parse_responses(&raw).pop().unwrap();
    assert_eq!(last.json()["total"], 2);
}

#[test]
fn slow_headers_get_408_and_the_server_keeps_accepting() {
    let server = TestServer::start_with(&[("HEADER_TIMEOUT_S", "1")]);
    let mut slow = server.tcp();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost:").unwrap();
    let started = Instant::now();
    // Meanwhile others are served.
    assert_eq!(server.get("/health").status, 200);
    let mut raw = Vec::new();
    let _ = slow.read_to_end(&mut raw);
    let r = common::parse_responses(&raw).remove(0);
    assert_eq!(r.status, 408);
    assert_eq!(r.error_code(), "request_timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_its_timeout() {
    let server = TestServer::start_with(&[("KEEPALIVE_TIMEOUT_S", "1")]);
    let mut idle = server.tcp();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let started = Instant::now();
    let _ = idle.read_to_end(&mut raw); // returns at EOF, when the server closes
    assert_eq!(common::parse_responses(&raw)[0].status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn bad_websocket_handshakes_get_400() {
    let server = TestServer::start();
    let base =
        "GET /ws?user_id=u HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let cases = [
        ("missing key", format!("{base}Sec-WebSocket-Version: 13\r\n\r\n")),
        ("bad key", format!("{base}Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n")),
        ("bad version", format!("{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")),
        ("missing user_id", "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_owned()),
        ("bad since", "GET /ws?user_id=u&since=x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_owned()),
    ];
    for (name, req) in cases {
        let r = common::parse_responses(&server.raw(req.as_bytes())).remove(0);
        assert_eq!(r.status, 400, "{name}");
        assert!(
            r.error_code() == "bad_handshake" || r.error_code() == "invalid_field",
            "{name}: {}",
            r.error_code()
        );
    }
    assert_eq!(server.request("POST", "/ws", Some("{}")).status, 405);
}

/// Sends a hand-made frame on a fresh raw WebSocket and returns the close code the server answers with.
fn close_code_for(server: &TestServer, frame: &[u8]) -> u16 {
    let mut s = raw_ws(server, "raw");
    s.write_all(frame).unwrap();
    read_close_code(&mut s)
}

#[test]
fn websocket_frame_violations_get_the_right_close_code() {
    let server = TestServer::start_with(&[("MAX_FRAME", "1024")]);
    let bystander = Bystander::new(&server);
    assert_eq!(
        close_code_for(&server, &client_frame(0x82, b"\x01\x02", true)),
        1003,
        "binary frame"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x81, b"\xff\xfe", true)),
        1007,
        "invalid UTF-8"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x81, &[b'a'; 2000], true)),
        1009,
        "frame over MAX_FRAME"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x81, b"{}", false)),
        1002,
        "unmasked client frame"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0xC1, b"{}", true)),
        1002,
        "reserved bit"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x83, b"x", true)),
        1002,
        "reserved opcode"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x80, b"x", true)),
        1002,
        "continuation without start"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x89, &[b'p'; 126], true)),
        1002,
        "control frame over 125"
    );
    assert_eq!(
        close_code_for(&server, &client_frame(0x09, b"p", true)),
        1002,
        "fragmented ping"
    );
    bystander.still_served(&server);
}

#[test]
fn a_client_close_is_answered_with_the_same_code() {
    let server = TestServer::start();
    let mut s = raw_ws(&server, "closer");
    s.write_all(&client_frame(0x88, &1000u16.to_be_bytes(), true))
        .unwrap();
    assert_eq!(read_close_code(&mut s), 1000);
}

#[test]
fn bad_client_messages_get_error_events_and_the_connection_stays_open() {
    let server = TestServer::start_with(&[("MAX_CHANNELS_PER_CONNECTION", "2")]);
    let mut c = server.ws("user_id=messy");
    for (msg, code) in [
        ("not json at all", "invalid_json"),
        (r#"{"action":"dance"}"#, "unknown_action"),
        (r#"{"channels":["a"]}"#, "invalid_field"),
        (
            r#"{"action":"subscribe","channels":["bad name"]}"#,
            "invalid_field",
        ),
        (r#"{"action":"read","id":"nope"}"#, "invalid_field"),
        (r#"{"action":"resume"}"#, "invalid_field"),
    ] {
        c.ws.send(tungstenite::Message::text(msg)).unwrap();
        assert_eq!(c.expect_event("error")["code"], code, "{msg}");
    }
    c.send_json(json!({"action": "read", "id": uuid::Uuid::now_v7().to_string()}));
    assert_eq!(c.expect_event("error")["code"], "not_found");
    c.send_json(json!({"action": "subscribe", "channels": ["a", "b", "c"]}));
    assert_eq!(c.expect_event("subscribed")["channels"], json!(["a", "b"]));
    assert_eq!(c.expect_event("error")["code"], "too_many_channels");
    c.send_json(json!({"action": "ping"}));
    c.expect_event("pong");
}

#[test]
fn fragmented_messages_and_pings_work() {
    let server = TestServer::start();
    let mut s = raw_ws(&server, "frag");
    // {"action": "ping"} split in three fragments, with a ping frame in between.
    s.write_all(&client_frame(0x01, br#"{"action""#, true))
        .unwrap();
    s.write_all(&client_frame(0x89, b"hi", true)).unwrap();
    s.write_all(&client_frame(0x00, br#":"pi"#, true)).unwrap();
    s.write_all(&client_frame(0x80, br#"ng"}"#, true)).unwrap();
    let (op, payload) = read_server_frame(&mut s);
    assert_eq!(
        (op, payload.as_slice()),
        (0xA, &b"hi"[..]),
        "pong echoes the ping"
    );
    let (op, payload) = read_server_frame(&mut s);
    assert_eq!(op, 1);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["event"],
        "pong"
    );
}
