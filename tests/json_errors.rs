//! The wording of every message the JSON and validation paths can give, over real HTTP and WebSocket:
//! bodies of send, batch and schedule, and client WebSocket messages. Messages are for people: they
//! name the key or field and the byte, never a parser's internals. Also what escapes become: a valid
//! surrogate pair is stored as its character, and every invalid escape is refused as `invalid_json`
//! naming it, never decoded into another character.

mod common;

use common::TestServer;
use serde_json::{json, Value};

/// POSTs `body` as is and returns (status, code, message).
fn post(server: &TestServer, path: &str, body: &str) -> (u16, String, String) {
    let r = server.request("POST", path, Some(body));
    let v = r.json();
    (
        r.status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

const SEND: &str = "/api/v1/notifications/send";
const BATCH: &str = "/api/v1/notifications/batch";
const SCHEDULE: &str = "/api/v1/notifications/schedule";

/// Asserts one refusal: status 400, `code`, and the exact message.
fn refused(server: &TestServer, path: &str, body: &str, code: &str, message: &str) {
    let (status, got_code, got) = post(server, path, body);
    assert_eq!(
        (status, got_code.as_str(), got.as_str()),
        (400, code, message),
        "{path} {body}"
    );
}

#[test]
fn http_json_errors_name_the_key_the_field_and_the_byte() {
    let server = TestServer::start();
    for path in [SEND, SCHEDULE] {
        refused(
            &server,
            path,
            r#"{"user_id":"a","user_id":"b","message":"m"}"#,
            "invalid_json",
            r#"duplicate key "user_id""#,
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","data":{"big":1e400}}"#,
            "invalid_json",
            "the body is not valid JSON: number out of range at byte 43 (data.big)",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","data":{"id":123456789012345678901234567890}}"#,
            "invalid_json",
            "the body is not valid JSON: number out of range at byte 42 (data.id)",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","data":{"n":01}}"#,
            "invalid_json",
            r#"the body is not valid JSON: malformed number "01" at byte 41 (data.n)"#,
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":5}"#,
            "invalid_json",
            "message must be a string",
        );
        refused(
            &server,
            path,
            r#"{"user_id":[1],"message":"m"}"#,
            "invalid_json",
            "user_id must be a string or an integer",
        );
        refused(
            &server,
            path,
            r#"{"user_id":4.5,"message":"m"}"#,
            "invalid_json",
            "user_id must be a string or an integer",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","channels":"news"}"#,
            "invalid_json",
            "channels must be an array",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","channels":["ok",7]}"#,
            "invalid_json",
            "channels[1] must be a string",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m","broadcast":"yes"}"#,
            "invalid_json",
            "broadcast must be true or false",
        );
        refused(
            &server,
            path,
            r#"["info","title","message"]"#,
            "invalid_json",
            "the body must be a JSON object",
        );
        refused(
            &server,
            path,
            r#""just a string""#,
            "invalid_json",
            "the body must be a JSON object",
        );
        refused(
            &server,
            path,
            "",
            "invalid_json",
            "the body is empty: expected a JSON object",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m""#,
            "invalid_json",
            "the body is not valid JSON: it ends before every object and array is closed",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":"m}"#,
            "invalid_json",
            "the body is not valid JSON: unterminated string at byte 25 (message)",
        );
        refused(
            &server,
            path,
            r#"{"user_id" "a"}"#,
            "invalid_json",
            r#"the body is not valid JSON: unexpected character '"': expected ":" after a key at byte 11 (user_id)"#,
        );
        refused(
            &server,
            path,
            r#"{user_id:"a"}"#,
            "invalid_json",
            "the body is not valid JSON: unexpected character 'u': expected a key in double quotes at byte 1",
        );
        refused(
            &server,
            path,
            r#"{"user_id":"a","message":tru}"#,
            "invalid_json",
            "the body is not valid JSON: unexpected character 't': expected a value (a string, number, object, array, true, false or null) at byte 25 (message)",
        );
        refused(
            &server,
            path,
            "{\"user_id\":\"a\",\"message\":\"line\nbreak\"}",
            "invalid_json",
            r"the body is not valid JSON: control character U+000A inside a string (write it as \u000a) at byte 30 (message)",
        );
    }
    // Validation after a good parse: the field, in a sentence.
    let path = SEND;
    refused(
        &server,
        path,
        r#"{"user_id":"a","message":""}"#,
        "invalid_field",
        "message must not be empty",
    );
    refused(
        &server,
        path,
        r#"{"user_id":"a","message":"m","data":[1]}"#,
        "invalid_field",
        "data must be a JSON object",
    );
    refused(
        &server,
        path,
        r#"{"message":"m"}"#,
        "no_target",
        "no target: set user_id, a non-empty channels list, or broadcast: true",
    );
    // The send-only and schedule-only fields.
    refused(
        &server,
        SEND,
        r#"{"user_id":"a","message":"m","scheduled_at":"2030-01-01T00:00:00Z"}"#,
        "invalid_field",
        "scheduled_at is only accepted by POST /api/v1/notifications/schedule",
    );
    refused(
        &server,
        SCHEDULE,
        r#"{"user_id":"a","message":"m"}"#,
        "invalid_field",
        "scheduled_at is required",
    );
    refused(
        &server,
        SCHEDULE,
        r#"{"user_id":"a","message":"m","scheduled_at":17}"#,
        "invalid_json",
        "scheduled_at must be a string",
    );
}

#[test]
fn batch_errors_name_the_element() {
    let server = TestServer::start();
    refused(
        &server,
        BATCH,
        r#"{"notifications":[{"user_id":"a","message":"m"},{"user_id":"a","message":"m","message":"n"}]}"#,
        "invalid_json",
        r#"duplicate key "message" in notifications[1]"#,
    );
    refused(
        &server,
        BATCH,
        r#"{"notifications":[{"user_id":"a","message":"m","channels":[1]}]}"#,
        "invalid_json",
        "notifications[0].channels[0] must be a string",
    );
    refused(
        &server,
        BATCH,
        r#"{"notifications":[{"user_id":"a","message":"m","data":{"x":[2e999]}}]}"#,
        "invalid_json",
        "the body is not valid JSON: number out of range at byte 60 (notifications[0].data.x[0])",
    );
    refused(
        &server,
        BATCH,
        r#"{"notifications":{"user_id":"a"}}"#,
        "invalid_json",
        "notifications must be an array",
    );
    refused(
        &server,
        BATCH,
        r#"{"notifications":[{"user_id":"a","message":"m"},{"user_id":"a"}]}"#,
        "invalid_field",
        "notifications[1].message is required",
    );
    refused(
        &server,
        BATCH,
        r#"{"notifications":[]}"#,
        "invalid_field",
        "notifications must not be empty",
    );
    refused(
        &server,
        BATCH,
        r#"{}"#,
        "invalid_field",
        "notifications is required",
    );
}

#[test]
fn websocket_message_errors_are_worded_like_http_ones() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=wordy");
    for (text, code, message) in [
        (
            r#"{"action":"subscribe","action":"ping"}"#,
            "invalid_json",
            r#"duplicate key "action""#,
        ),
        (
            r#"{"action":"subscribe","channels":"news"}"#,
            "invalid_json",
            "channels must be an array",
        ),
        (
            r#"{"action":"subscribe","channels":["ok",1]}"#,
            "invalid_json",
            "channels[1] must be a string",
        ),
        (
            r#"{"action":"publish","channel":"c","data":{"n":1e400}}"#,
            "invalid_json",
            "the message is not valid JSON: number out of range at byte 46 (data.n)",
        ),
        (
            r#"{"action":"read","id":5}"#,
            "invalid_json",
            "id must be a string",
        ),
        (
            r#"{"action":"resume","since":"\ud800"}"#,
            "invalid_json",
            r#"the message is not valid JSON: lone surrogate "\ud800": an escape from \ud800 to \udbff must be followed by one from \udc00 to \udfff at byte 28 (since)"#,
        ),
        ("[]", "invalid_json", "the message must be a JSON object"),
        ("ping", "invalid_json", "the message must be a JSON object"),
        (
            r#"{"action":"ping""#,
            "invalid_json",
            "the message is not valid JSON: it ends before every object and array is closed",
        ),
        (r#"{}"#, "invalid_field", "action is required"),
        (r#"{"action":"read"}"#, "invalid_field", "id is required"),
        (
            r#"{"action":"read","id":"nope"}"#,
            "invalid_field",
            "id must be a notification id (UUID)",
        ),
        (
            r#"{"action":"subscribe","channels":["no spaces"]}"#,
            "invalid_field",
            "channels[0] must be 1 to 128 bytes of A-Z a-z 0-9 _ - = @ , . ; :",
        ),
        (
            r#"{"action":"dance"}"#,
            "unknown_action",
            r#"unknown action "dance": expected subscribe, unsubscribe, publish, ping, read, seen, resume, refresh or presence"#,
        ),
    ] {
        client.ws.send(tungstenite::Message::text(text)).unwrap();
        let e = client.expect_event("error");
        assert_eq!(
            (e["code"].as_str(), e["message"].as_str()),
            (Some(code), Some(message)),
            "{text}"
        );
    }
    // The connection is still usable.
    client.send_json(json!({"action": "ping"}));
    client.expect_event("pong");
}

#[test]
fn escapes_are_decoded_exactly_or_refused_naming_them() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=esc");
    // A valid surrogate pair is its character, live and stored; so are other escapes.
    let id = server.send(serde_json::from_str::<Value>(r#"{"user_id":"esc","message":"smile \ud83d\ude00 \u00e9\t\"\/","data":{"k\u0041":"\uD83D\uDE00"}}"#).unwrap());
    // Sent as raw text too, so the server (not serde_json in the test) decodes the escapes.
    let (status, _, _) = post(
        &server,
        SEND,
        r#"{"user_id":"esc","message":"raw \ud83d\ude00 \u00e9\t\"\/","data":{"k\u0041":"\uD83D\uDE00"}}"#,
    );
    assert_eq!(status, 201);
    let first = client.expect_notification();
    assert_eq!(first["id"], id.as_str());
    let live = client.expect_notification();
    assert_eq!(live["message"], "raw \u{1F600} \u{e9}\t\"/");
    assert_eq!(live["data"], json!({"kA": "😀"}));
    let stored = server.get("/api/v1/notifications/user/esc").json();
    assert_eq!(stored["notifications"][0]["message"], "raw 😀 é\t\"/");
    assert_eq!(stored["notifications"][0]["data"]["kA"], "😀");

    // Every invalid escape is invalid_json naming it (in message, title, type, user_id, data keys
    // and values), and nothing is stored.
    for (escape, named) in [
        (r"\ud800", r#"lone surrogate "\ud800""#),
        (r"\udbff", r#"lone surrogate "\udbff""#),
        (r"\udc00", r#"lone surrogate "\udc00""#),
        (r"\ud800\u0041", r#"lone surrogate "\ud800""#),
        (r"\ud800\ue000", r#"lone surrogate "\ud800""#),
        (r"\ud800\ud800", r#"lone surrogate "\ud800""#),
        (r"\ud800x", r#"lone surrogate "\ud800""#),
        (r"\x", r#"invalid escape "\x""#),
        (r"\a", r#"invalid escape "\a""#),
        (r"\u12", r#"incomplete escape "\u12"#),
        (r"\u12g4", r#"incomplete escape "\u12""#),
        (r"\U0041", r#"invalid escape "\U""#),
    ] {
        for body in [
            format!(r#"{{"user_id":"esc","message":"a{escape}b"}}"#),
            format!(r#"{{"user_id":"esc","message":"m","title":"{escape}"}}"#),
            format!(r#"{{"user_id":"esc{escape}","message":"m"}}"#),
            format!(r#"{{"user_id":"esc","message":"m","data":{{"k{escape}":1}}}}"#),
            format!(r#"{{"user_id":"esc","message":"m","data":{{"k":["{escape}"]}}}}"#),
        ] {
            let (status, code, message) = post(&server, SEND, &body);
            assert_eq!(
                (status, code.as_str()),
                (400, "invalid_json"),
                "{body}: {message}"
            );
            assert!(message.contains(named), "{body}: {message}");
            assert!(!message.contains("U+0000"), "{body}: {message}");
        }
    }
    // A real U+0000 is still refused by its own rule.
    refused(
        &server,
        SEND,
        r#"{"user_id":"esc","message":"a\u0000b"}"#,
        "invalid_field",
        "message must not contain the character U+0000",
    );
    assert_eq!(
        server.get("/api/v1/notifications/user/esc").json()["total"],
        2,
        "only the two valid sends were stored"
    );
}
