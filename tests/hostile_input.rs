//! Hostile input, through real sockets against the real binary: HTTP requests that break HTTP/1.1 framing
//! or the API's limits, and WebSocket frames that break RFC 6455. Each case checks the exact answer of
//! API.md (status and error code, or close code) and that the connection ends cleanly; each test then
//! checks that the server still serves others. `tests/bad_input.rs` holds the first, common cases; the
//! full catalog, with the test of every row, is in `docs/security.md`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{
    client_frame, parse_responses, raw_ws, read_close_code, read_server_frame, HttpResponse,
    TestServer,
};
use serde_json::{json, Value};

/// Sends raw bytes on a fresh connection and parses the single answer. The server must close the
/// connection after it (every error here is final), so reading to EOF returns.
fn one_answer(server: &TestServer, bytes: &[u8]) -> HttpResponse {
    let raw = server.raw(bytes);
    let mut responses = parse_responses(&raw);
    assert_eq!(
        responses.len(),
        1,
        "exactly one answer: {}",
        String::from_utf8_lossy(&raw)
    );
    responses.remove(0)
}

/// A `POST` of `body` to `path`, declared as JSON, closing after the answer.
fn post_bytes(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// `[[[…]]]` nested `depth` levels.
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn malformed_http_framing_gets_the_documented_status() {
    let server = TestServer::start();
    let many_headers: String = (0..65).map(|i| format!("X-{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "Content-Length not a number",
            b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "negative Content-Length",
            b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "two different Content-Length headers",
            b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"
                .to_vec(),
            400,
            "bad_request",
        ),
        (
            "Content-Length together with Transfer-Encoding",
            b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}"
                .to_vec(),
            411,
            "length_required",
        ),
        (
            "HTTP/1.0 POST without Content-Length",
            b"POST /api/v1/notifications/send HTTP/1.0\r\n\r\n".to_vec(),
            411,
            "length_required",
        ),
        (
            "HTTP/2.0 request line",
            b"GET /health HTTP/2.0\r\n\r\n".to_vec(),
            505,
            "http_version_not_supported",
        ),
        (
            "HTTP/2 connection preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            505,
            "http_version_not_supported",
        ),
        (
            "space inside a header name",
            b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "space before the colon",
            b"GET /health HTTP/1.1\r\nHost : t\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "obsolete line folding",
            b"GET /health HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "bare CR inside a header value",
            b"GET /health HTTP/1.1\r\nX-A: a\rb\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "NUL in the request target",
            b"GET /hea\x00lth HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "65 header fields",
            format!("GET /health HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "percent-encoded path that is not UTF-8",
            // Not a framing error, so the connection would stay open without `Connection: close`.
            b"GET /api/v1/notifications/user/%ff HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
    ];
    for (name, bytes, status, code) in cases {
        let r = one_answer(&server, &bytes);
        r.assert_error(name, status, code);
        assert_eq!(r.header("Connection"), Some("close"), "{name}");
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_request_after_a_framing_error_on_the_same_connection_is_never_answered() {
    // After a framing error the server cannot know where the next request starts, so it must not
    // guess: one answer, then the connection closes.
    let server = TestServer::start();
    let r = one_answer(
        &server,
        b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
    );
    r.assert_error("pipelined after an error", 400, "bad_request");
}

#[test]
fn identical_duplicate_content_lengths_are_one_length() {
    let server = TestServer::start();
    let body = br#"{"user_id":"dup","message":"m"}"#;
    let mut req = format!(
        "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {0}\r\nContent-Length: {0}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let r = one_answer(&server, &req);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn an_oversized_content_length_is_refused_from_the_head_alone() {
    let server = TestServer::start();
    // No body byte is ever sent: the answer must not wait for a gigabyte.
    let mut s = server.tcp();
    s.write_all(b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_responses(&raw).remove(0);
    r.assert_error("1 GB Content-Length", 413, "body_too_large");
}

#[test]
fn a_body_that_stops_arriving_gets_408() {
    let server = TestServer::start_with(&[("HEADER_TIMEOUT_S", "1")]);
    let mut s = server.tcp();
    // The head promises 10 bytes; only 2 come.
    s.write_all(b"POST /api/v1/notifications/send HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{}")
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_responses(&raw).remove(0);
    r.assert_error("short body", 408, "request_timeout");
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn methods_the_route_does_not_have_get_405_with_allow() {
    let server = TestServer::start();
    let cases: [(&[u8], &str); 4] = [
        (b"get /health HTTP/1.1\r\nConnection: close\r\n\r\n", "GET"),
        (b"BREW /health HTTP/1.1\r\nConnection: close\r\n\r\n", "GET"),
        (
            b"OPTIONS /api/v1/notifications/send HTTP/1.1\r\nConnection: close\r\n\r\n",
            "POST",
        ),
        (
            b"POST /ws?user_id=u HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
            "GET",
        ),
    ];
    for (req, allow) in cases {
        let name = String::from_utf8_lossy(&req[..12]).into_owned();
        let r = one_answer(&server, req);
        r.assert_error(&name, 405, "method_not_allowed");
        assert_eq!(r.header("Allow"), Some(allow), "{name}");
    }
}

#[test]
fn a_websocket_version_other_than_13_names_the_supported_one() {
    let server = TestServer::start();
    let r = one_answer(
        &server,
        b"GET /ws?user_id=u HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    r.assert_error("version 8", 400, "bad_handshake");
    assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));
}

#[test]
fn hostile_json_bodies_get_400_invalid_json() {
    let server = TestServer::start();
    let send = "/api/v1/notifications/send";
    let deep_data = format!(
        r#"{{"user_id":"u","message":"m","data":{{"a":{}}}}}"#,
        nested_arrays(30_000)
    );
    let deep_object = format!(
        r#"{{"user_id":"u","message":"m","data":{}1{}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    let deep_batch = format!(r#"{{"notifications":{}}}"#, nested_arrays(20_000));
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("empty body", send, Vec::new()),
        (
            "invalid UTF-8 in a string",
            send,
            b"{\"user_id\":\"u\",\"message\":\"\xff\"}".to_vec(),
        ),
        (
            "trailing bytes after the object",
            send,
            br#"{"user_id":"u","message":"m"} xx"#.to_vec(),
        ),
        (
            "integer beyond 64 bits",
            send,
            br#"{"user_id":"u","message":"m","data":{"n":123456789012345678901234567}}"#.to_vec(),
        ),
        ("top level is an array", send, b"[1,2]".to_vec()),
        (
            "data nested 30,000 arrays deep",
            send,
            deep_data.into_bytes(),
        ),
        (
            "data nested 10,000 objects deep",
            send,
            deep_object.into_bytes(),
        ),
        (
            "batch nested 20,000 deep",
            "/api/v1/notifications/batch",
            deep_batch.into_bytes(),
        ),
        (
            "schedule nested 30,000 deep",
            "/api/v1/notifications/schedule",
            nested_arrays(30_000).into_bytes(),
        ),
    ];
    for (name, path, body) in cases {
        let r = one_answer(&server, &post_bytes(path, &body));
        r.assert_error(name, 400, "invalid_json");
    }
    // The server survived all of it.
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn nesting_up_to_max_json_depth_is_accepted_and_the_limit_is_configurable() {
    let server = TestServer::start_with(&[("MAX_JSON_DEPTH", "128")]);
    // The envelope and `data` are two levels; the array inside makes 128.
    let at_limit = format!(
        r#"{{"user_id":"deep","message":"m","data":{{"a":{}}}}}"#,
        nested_arrays(126)
    );
    let r = one_answer(
        &server,
        &post_bytes("/api/v1/notifications/send", at_limit.as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // Read back whole. (Not parsed here: with the history envelope around it, it is deeper than
    // serde_json's own limit of 128.)
    let history = server.get("/api/v1/notifications/user/deep");
    assert_eq!(history.status, 200);
    let body = String::from_utf8_lossy(&history.body);
    assert!(
        body.contains(&format!(r#""data":{{"a":{}}}"#, nested_arrays(126))),
        "{body}"
    );

    let over = format!(
        r#"{{"user_id":"deep","message":"m","data":{{"a":{}}}}}"#,
        nested_arrays(127)
    );
    let r = one_answer(
        &server,
        &post_bytes("/api/v1/notifications/send", over.as_bytes()),
    );
    r.assert_error("one level over", 400, "invalid_json");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("MAX_JSON_DEPTH"));
}

#[test]
fn a_max_json_depth_outside_its_range_is_refused_at_start() {
    for value in ["1", "129"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
            .env_clear()
            .env("MAX_JSON_DEPTH", value)
            .env("PORT", "0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{value}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("MAX_JSON_DEPTH"),
            "{value}: {out:?}"
        );
    }
}

/// Sends `bytes` on a fresh raw WebSocket and returns the server's close code. Also checks that the
/// server then ends the TCP connection (EOF), rather than leaving it half open.
fn close_code_for(server: &TestServer, bytes: &[u8]) -> u16 {
    let mut s = raw_ws(server, "hostile");
    s.write_all(bytes).unwrap();
    let code = read_close_code(&mut s);
    assert_eof(&mut s);
    code
}

/// Reads until the server closes the TCP connection; fails if it stays open.
fn assert_eof(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
}

/// A masked client close frame with `payload`.
fn close_frame(payload: &[u8]) -> Vec<u8> {
    client_frame(0x88, payload, true)
}

#[test]
fn websocket_frames_that_break_rfc_6455_get_1002() {
    let server = TestServer::start();
    let mut over_125_close = 1000u16.to_be_bytes().to_vec();
    over_125_close.extend_from_slice(&[b'r'; 124]);
    let mut text_inside_fragmented = client_frame(0x01, b"{\"a", true);
    text_inside_fragmented.extend(client_frame(0x81, b"{}", true));
    let mut continuation_after_end = client_frame(0x01, b"{", true);
    continuation_after_end.extend(client_frame(0x80, b"}", true));
    continuation_after_end.extend(client_frame(0x80, b"x", true));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("RSV2 set", client_frame(0xA1, b"{}", true)),
        ("RSV3 set", client_frame(0x91, b"{}", true)),
        ("all RSV bits on a ping", client_frame(0xF9, b"", true)),
        ("reserved data opcode 0x4", client_frame(0x84, b"x", true)),
        ("reserved data opcode 0x7", client_frame(0x87, b"x", true)),
        (
            "reserved control opcode 0xB",
            client_frame(0x8B, b"x", true),
        ),
        ("reserved control opcode 0xF", client_frame(0x8F, b"", true)),
        ("unmasked ping", client_frame(0x89, b"p", false)),
        (
            "unmasked close",
            client_frame(0x88, &1000u16.to_be_bytes(), false),
        ),
        (
            "pong over 125 bytes",
            client_frame(0x8A, &[b'p'; 126], true),
        ),
        ("close over 125 bytes", close_frame(&over_125_close)),
        (
            "fragmented close",
            client_frame(0x08, &1000u16.to_be_bytes(), true),
        ),
        ("fragmented pong", client_frame(0x0A, b"p", true)),
        (
            "non-final continuation without start",
            client_frame(0x00, b"x", true),
        ),
        (
            "text frame inside a fragmented message",
            text_inside_fragmented,
        ),
        (
            "continuation after the message ended",
            continuation_after_end,
        ),
        ("close with a 1-byte payload", close_frame(&[0x03])),
        (
            "close code 1005 (never sent on the wire)",
            close_frame(&1005u16.to_be_bytes()),
        ),
        ("close code 999", close_frame(&999u16.to_be_bytes())),
        ("close code 5000", close_frame(&5000u16.to_be_bytes())),
    ];
    for (name, bytes) in cases {
        assert_eq!(close_code_for(&server, &bytes), 1002, "{name}");
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn websocket_payload_violations_get_1003_1007_and_1009() {
    let server = TestServer::start_with(&[("MAX_FRAME", "1024")]);
    let euro = "\u{20ac}".as_bytes();
    let mut utf8_cut_at_end = client_frame(0x01, b"\"a", true);
    utf8_cut_at_end.extend(client_frame(0x80, &euro[..2], true));
    let mut bad_utf8_in_fragment = client_frame(0x01, b"ok", true);
    bad_utf8_in_fragment.extend(client_frame(0x00, b"\xc3\x28", true));
    let mut bad_close_reason = 1000u16.to_be_bytes().to_vec();
    bad_close_reason.extend_from_slice(b"bye \xff");
    let mut fragmented_over_limit = client_frame(0x01, &[b'a'; 600], true);
    fragmented_over_limit.extend(client_frame(0x80, &[b'a'; 600], true));
    // A 64-bit length of 2^63 with no payload at all: refused from the header.
    let mut huge_header = vec![0x81, 0x80 | 127];
    huge_header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    huge_header.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "binary message in fragments",
            client_frame(0x02, b"\x00", true),
            1003,
        ),
        (
            "overlong UTF-8 encoding",
            client_frame(0x81, b"\xc0\xaf", true),
            1007,
        ),
        (
            "UTF-16 surrogate encoded in UTF-8",
            client_frame(0x81, b"\xed\xa0\x80", true),
            1007,
        ),
        ("message ends inside a character", utf8_cut_at_end, 1007),
        (
            "invalid UTF-8 in a middle fragment",
            bad_utf8_in_fragment,
            1007,
        ),
        (
            "close reason not UTF-8",
            close_frame(&bad_close_reason),
            1007,
        ),
        (
            "fragments over MAX_FRAME in total",
            fragmented_over_limit,
            1009,
        ),
        ("64-bit length of 2^63", huge_header, 1009),
    ];
    for (name, bytes, code) in cases {
        assert_eq!(close_code_for(&server, &bytes), code, "{name}");
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_client_close_code_is_echoed_and_an_empty_close_gets_1000() {
    let server = TestServer::start();
    assert_eq!(close_code_for(&server, &close_frame(b"")), 1000);
    assert_eq!(
        close_code_for(&server, &close_frame(&4000u16.to_be_bytes())),
        4000
    );
    let mut with_reason = 1001u16.to_be_bytes().to_vec();
    with_reason.extend_from_slice("au revoir \u{e9}".as_bytes());
    assert_eq!(close_code_for(&server, &close_frame(&with_reason)), 1001);
}

/// Reads server frames until the first text frame, answering nothing; returns it as JSON.
fn next_text(s: &mut TcpStream) -> Value {
    loop {
        let (op, payload) = read_server_frame(s);
        if op == 1 {
            return serde_json::from_slice(&payload).expect("a JSON event");
        }
    }
}

#[test]
fn legal_but_awkward_frames_are_understood() {
    let server = TestServer::start();
    let mut s = raw_ws(&server, "awkward");
    // A character split across fragments, with empty fragments and a ping in the middle.
    let msg = "{\"action\":\"ping\",\"x\":\"\u{20ac}\"}".as_bytes();
    let cut = msg.iter().position(|&b| b == 0xe2).unwrap() + 1;
    let mut bytes = client_frame(0x01, &msg[..cut], true);
    bytes.extend(client_frame(0x00, b"", true));
    bytes.extend(client_frame(0x89, b"mid", true));
    bytes.extend(client_frame(0x80, &msg[cut..], true));
    // Then a whole message sent one byte per write, header included.
    let one_by_one = client_frame(0x81, br#"{"action":"ping"}"#, true);
    s.write_all(&bytes).unwrap();
    let (op, payload) = read_server_frame(&mut s);
    assert_eq!((op, payload.as_slice()), (0xA, &b"mid"[..]));
    assert_eq!(next_text(&mut s)["event"], "pong");
    for byte in one_by_one {
        s.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(next_text(&mut s)["event"], "pong");
    // A 16-bit length and a frame whose payload length is zero.
    s.write_all(&client_frame(0x81, &[b' '; 300], true))
        .unwrap();
    assert_eq!(next_text(&mut s)["code"], "invalid_json");
    s.write_all(&client_frame(0x89, b"", true)).unwrap();
    let (op, payload) = read_server_frame(&mut s);
    assert_eq!((op, payload.len()), (0xA, 0));
}

#[test]
fn hostile_client_messages_get_error_events_and_the_connection_stays_open() {
    let server = TestServer::start();
    let mut c = server.ws("user_id=deepws&channels=c");
    c.expect_event("subscribed");
    let deep = format!(
        r#"{{"action":"publish","channel":"c","data":{{"a":{}}}}}"#,
        nested_arrays(30_000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("publish data nested 30,000 deep", deep, "invalid_json"),
        (
            "nesting without an action",
            nested_arrays(20_000),
            "invalid_json",
        ),
        (
            "action not a string",
            r#"{"action":5}"#.into(),
            "invalid_json",
        ),
        (
            "channels not a list",
            r#"{"action":"subscribe","channels":"c"}"#.into(),
            "invalid_json",
        ),
        (
            "empty channel list",
            r#"{"action":"subscribe","channels":[]}"#.into(),
            "invalid_field",
        ),
        (
            "publish without a channel",
            r#"{"action":"publish","data":{}}"#.into(),
            "invalid_field",
        ),
        (
            "publish to a channel not subscribed",
            r#"{"action":"publish","channel":"other","data":{}}"#.into(),
            "not_subscribed",
        ),
    ];
    for (name, text, code) in cases {
        c.ws.send(tungstenite::Message::text(text)).unwrap();
        assert_eq!(c.expect_event("error")["code"], code, "{name}");
    }
    c.send_json(json!({"action": "ping"}));
    c.expect_event("pong");
    let id = server.send(json!({"user_id": "deepws", "message": "still served"}));
    assert_eq!(c.expect_notification()["id"], id.as_str());
}
