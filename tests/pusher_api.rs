//! The Pusher HTTP API and protocol through the public interface, from Rust: what a native client
//! receives for a Pusher event and a Pusher client for a native notification, the Pusher limits (each
//! a setting), stale and forged signatures, and the routes answering 404 when no app is configured.
//! The real Pusher clients are driven in tests/pusher_clients.rs.

mod common;

use std::net::TcpStream;

use common::{HttpResponse, TestServer};
use notification_service::pusher::sign::{md5_hex, sign};
use serde_json::{json, Value};
use tungstenite::Message;

const APPS: &str = "app-1:key-1:secret-1";

/// A request to the Pusher HTTP API signed as the `pusher` SDK signs it, at `timestamp`.
fn signed_at(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
    secret: &str,
    timestamp: u64,
) -> HttpResponse {
    let mut query = format!("auth_key=key-1&auth_timestamp={timestamp}&auth_version=1.0");
    if let Some(body) = body {
        query.push_str(&format!("&body_md5={}", md5_hex(body.as_bytes())));
    }
    let signature = sign(secret, &format!("{method}\n{path}\n{query}"));
    server.request(
        method,
        &format!("{path}?{query}&auth_signature={signature}"),
        body,
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(server: &TestServer, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    signed_at(server, method, path, body, "secret-1", now())
}

/// A Pusher-protocol client (a plain WebSocket speaking the protocol's JSON), past
/// `pusher:connection_established`.
fn pusher_client(server: &TestServer, key: &str) -> (tungstenite::WebSocket<TcpStream>, Value) {
    let url = format!(
        "ws://{}/app/{key}?protocol=7&client=rust&version=1",
        server.addr
    );
    let (mut ws, _) = tungstenite::client(url, server.tcp()).expect("Pusher handshake");
    let first = next_json(&mut ws);
    (ws, first)
}

fn next_json(ws: &mut tungstenite::WebSocket<TcpStream>) -> Value {
    loop {
        match ws.read().expect("a frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
            Message::Close(frame) => {
                return json!({"closed": frame.map(|f| u16::from(f.code))});
            }
            _ => continue,
        }
    }
}

#[test]
fn a_pusher_event_reaches_native_clients_and_a_native_notification_reaches_pusher_clients() {
    let server = TestServer::start_with(&[("PUSHER_APPS", APPS)]);
    let mut native = server.ws("user_id=ann&channels=mixed");
    native.expect_event("subscribed");
    let (mut pusher, established) = pusher_client(&server, "key-1");
    assert_eq!(established["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_owned();
    pusher
        .send(Message::text(
            json!({"event":"pusher:subscribe","data":{"channel":"mixed"}}).to_string(),
        ))
        .unwrap();
    let ok = next_json(&mut pusher);
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");

    let body = json!({"name":"greeting","channels":["mixed"],"data":"{\"hi\":1}"}).to_string();
    let r = signed(&server, "POST", "/apps/app-1/events", Some(&body));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = native.next_json();
    assert_eq!(
        got,
        json!({"event":"pusher_event","channel":"mixed","name":"greeting","data":"{\"hi\":1}"})
    );
    let got = next_json(&mut pusher);
    assert_eq!(
        got,
        json!({"event":"greeting","channel":"mixed","data":"{\"hi\":1}"})
    );

    // Excluding the Pusher client's own socket leaves the native client alone to get it.
    let body =
        json!({"name":"second","channel":"mixed","data":"x","socket_id":socket_id}).to_string();
    assert_eq!(
        signed(&server, "POST", "/apps/app-1/events", Some(&body)).status,
        200
    );
    assert_eq!(native.next_json()["name"], "second");

    // A native notification on the channel reaches the Pusher client as `notification`, and the
    // event it gets next is not the excluded one.
    let id = server.send(json!({"channels":["mixed"],"message":"native"}));
    let got = next_json(&mut pusher);
    assert_eq!(got["event"], "notification", "{got}");
    assert_eq!(got["channel"], "mixed");
    let inner: Value = serde_json::from_str(got["data"].as_str().unwrap()).unwrap();
    assert_eq!(inner["id"], id.as_str());
    assert_eq!(inner["message"], "native");
}

#[test]
fn pusher_limits_are_settings_and_signatures_are_checked() {
    let server = TestServer::start_with(&[
        ("PUSHER_APPS", APPS),
        ("PUSHER_MAX_EVENT_BYTES", "16"),
        ("PUSHER_MAX_EVENT_CHANNELS", "2"),
        ("PUSHER_MAX_CHANNEL_NAME", "8"),
        ("PUSHER_MAX_BATCH", "2"),
        // The node's API key does not apply to the signed Pusher API.
        ("API_KEY", "native-key"),
    ]);
    let events = |body: Value| {
        signed(
            &server,
            "POST",
            "/apps/app-1/events",
            Some(&body.to_string()),
        )
    };
    assert_eq!(
        events(json!({"name":"e","channel":"a","data":"small"})).status,
        200
    );
    events(json!({"name":"e","channel":"a","data":"x".repeat(17)})).assert_error(
        "data over PUSHER_MAX_EVENT_BYTES",
        413,
        "body_too_large",
    );
    events(json!({"name":"e","channels":["a","b","c"],"data":"x"})).assert_error(
        "channels over PUSHER_MAX_EVENT_CHANNELS",
        400,
        "invalid_field",
    );
    events(json!({"name":"e","channel":"longer-than-8","data":"x"})).assert_error(
        "a name over PUSHER_MAX_CHANNEL_NAME",
        400,
        "invalid_field",
    );
    let batch = json!({"batch":[
        {"name":"e","channel":"a","data":"1"},
        {"name":"e","channel":"a","data":"2"},
        {"name":"e","channel":"a","data":"3"}
    ]})
    .to_string();
    signed(&server, "POST", "/apps/app-1/batch_events", Some(&batch)).assert_error(
        "a batch over PUSHER_MAX_BATCH",
        400,
        "invalid_field",
    );
    events(json!({"name":"e","channel":"a","data":"x","socket_id":"not-one"})).assert_error(
        "a malformed socket_id",
        400,
        "invalid_field",
    );
    let body = json!({"name":"e","channel":"a","data":"x"}).to_string();
    signed_at(
        &server,
        "POST",
        "/apps/app-1/events",
        Some(&body),
        "secret-1",
        now() - 601,
    )
    .assert_error("a stale timestamp", 401, "unauthorized");
    signed_at(
        &server,
        "POST",
        "/apps/app-1/events",
        Some(&body),
        "wrong",
        now(),
    )
    .assert_error("a forged signature", 401, "unauthorized");
    signed(&server, "POST", "/apps/app-9/events", Some(&body)).assert_error(
        "an unknown app",
        404,
        "not_found",
    );
    let unsigned = server.request("POST", "/apps/app-1/events", Some(&body));
    unsigned.assert_error("an unsigned request", 401, "unauthorized");
    let r = signed(&server, "GET", "/apps/app-1/channels", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"channels":{}}));

    let (mut ws, first) = pusher_client(&server, "no-such-key");
    assert_eq!(first["event"], "pusher:error");
    assert_eq!(first["data"]["code"], 4001);
    assert_eq!(next_json(&mut ws), json!({"closed": 4001}));
}

#[test]
fn without_an_app_the_pusher_routes_are_404() {
    let server = TestServer::start();
    let body = json!({"name":"e","channel":"a","data":"x"}).to_string();
    signed(&server, "POST", "/apps/app-1/events", Some(&body)).assert_error(
        "the events route",
        404,
        "not_found",
    );
    server
        .get("/app/key-1?protocol=7")
        .assert_error("the Pusher upgrade", 404, "not_found");
}
