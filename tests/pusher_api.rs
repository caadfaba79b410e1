//! The Pusher HTTP API and protocol through the public interface, from Rust: what a native client
//! receives for a Pusher event and a Pusher client for a native notification, the Pusher limits (each
//! a setting), stale and forged signatures, the routes answering 404 when no app is configured,
//! presence channels shared by Pusher and native members (across shards and nodes, with their auth
//! errors and caps, `user_count` and `/users`), and `terminate_connections` across nodes.
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

/// The socket id in a `pusher:connection_established`.
fn socket_id_of(established: &Value) -> String {
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    data["socket_id"].as_str().unwrap().to_owned()
}

/// The shard a socket id names (its connection part packs the shard in bits 32..48).
fn shard_of(socket_id: &str) -> usize {
    let connection: u128 = socket_id.split_once('.').unwrap().1.parse().unwrap();
    ((connection >> 32) & 0xffff) as usize
}

/// A Pusher client on `shard` of `server`, with its socket id.
fn pusher_on_shard(
    server: &TestServer,
    shard: usize,
) -> (tungstenite::WebSocket<TcpStream>, String) {
    for _ in 0..200 {
        let (ws, established) = pusher_client(server, "key-1");
        let socket_id = socket_id_of(&established);
        if shard_of(&socket_id) == shard {
            return (ws, socket_id);
        }
    }
    panic!("no Pusher connection landed on shard {shard}");
}

/// Sends a presence subscription signed as an app's auth endpoint signs it (with `secret`), and
/// returns the answer to it (the first message after, skipping nothing).
fn join_presence(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    socket_id: &str,
    channel: &str,
    channel_data: &Value,
    secret: &str,
) -> Value {
    let channel_data = channel_data.to_string();
    let auth = format!(
        "key-1:{}",
        sign(secret, &format!("{socket_id}:{channel}:{channel_data}"))
    );
    ws.send(Message::text(
        json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth,"channel_data":channel_data}})
            .to_string(),
    ))
    .unwrap();
    next_json(ws)
}

/// The `data` of a Pusher message, parsed from its JSON string.
fn data_of(message: &Value) -> Value {
    serde_json::from_str(message["data"].as_str().expect("data is a string")).expect("JSON data")
}

/// Expects `pusher_internal:member_added` (`user_info` given) or `member_removed` (`None`).
fn expect_member(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    channel: &str,
    user: &str,
    added: Option<Value>,
) {
    let got = next_json(ws);
    let event = if added.is_some() {
        "pusher_internal:member_added"
    } else {
        "pusher_internal:member_removed"
    };
    assert_eq!(got["event"], event, "{got}");
    assert_eq!(got["channel"], channel, "{got}");
    let mut want = json!({"user_id": user});
    if let Some(info) = added.filter(|i| !i.is_null()) {
        want["user_info"] = info;
    }
    assert_eq!(data_of(&got), want);
}

#[test]
fn pusher_presence_shares_the_registry_with_native_clients_and_is_capped() {
    let server = TestServer::start_with(&[
        ("PUSHER_APPS", APPS),
        ("SHARDS", "2"),
        ("PUSHER_MAX_PRESENCE_MEMBERS", "3"),
        ("PUSHER_MAX_PRESENCE_INFO_BYTES", "64"),
    ]);
    let channel = "presence-room";

    // Refusals: no auth, a forged one, channel_data without a user id, a user_info too large.
    let (mut a, a_socket) = pusher_on_shard(&server, 0);
    a.send(Message::text(
        json!({"event":"pusher:subscribe","data":{"channel":channel}}).to_string(),
    ))
    .unwrap();
    let refused = next_json(&mut a);
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 401);
    let forged = join_presence(&mut a, &a_socket, channel, &json!({"user_id":"1"}), "wrong");
    assert_eq!(forged["data"]["status"], 401, "{forged}");
    assert_eq!(forged["data"]["type"], "AuthError");
    let no_id = join_presence(&mut a, &a_socket, channel, &json!({"id":"1"}), "secret-1");
    assert_eq!(no_id["data"]["status"], 400, "{no_id}");
    let big = join_presence(
        &mut a,
        &a_socket,
        channel,
        &json!({"user_id":"1","user_info":{"bio":"x".repeat(80)}}),
        "secret-1",
    );
    assert_eq!(big["data"]["status"], 400, "{big}");
    assert!(big["data"]["error"]
        .as_str()
        .unwrap()
        .contains("PUSHER_MAX_PRESENCE_INFO_BYTES"));

    // Pusher member 1 joins alone.
    let ok = join_presence(
        &mut a,
        &a_socket,
        channel,
        &json!({"user_id":1,"user_info":{"name":"A"}}),
        "secret-1",
    );
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    assert_eq!(
        data_of(&ok),
        json!({"presence":{"ids":["1"],"hash":{"1":{"name":"A"}},"count":1}})
    );

    // A native member joins on the other shard: the Pusher member hears member_added (no
    // user_info), the native one its own join, and it lists both.
    let mut native = server.ws_on_shard("user_id=n", 1);
    native.send_json(json!({"action":"subscribe","channels":[channel]}));
    native.expect_event("subscribed");
    assert_eq!(
        native.next_json(),
        json!({"event":"join","channel":channel,"user_id":"n"})
    );
    expect_member(&mut a, channel, "n", Some(Value::Null));
    native.send_json(json!({"action":"presence","channel":channel}));
    let listed = native.next_json();
    assert_eq!(listed["users"], json!(["1", "n"]), "{listed}");

    // Pusher member 2 joins on shard 1: the list has everyone (the native member's info null),
    // the others hear of it, and it does not hear of itself.
    let (mut b, b_socket) = pusher_on_shard(&server, 1);
    let ok = join_presence(
        &mut b,
        &b_socket,
        channel,
        &json!({"user_id":"2","user_info":{"name":"B"}}),
        "secret-1",
    );
    assert_eq!(
        data_of(&ok),
        json!({"presence":{"ids":["1","2","n"],"hash":{"1":{"name":"A"},"2":{"name":"B"},"n":null},"count":3}})
    );
    expect_member(&mut a, channel, "2", Some(json!({"name":"B"})));
    assert_eq!(
        native.next_json(),
        json!({"event":"join","channel":channel,"user_id":"2"})
    );

    // The channel is full for a new user (status 4100), not for a second connection of a member.
    let (mut c, established) = pusher_client(&server, "key-1");
    let c_socket = socket_id_of(&established);
    let full = join_presence(
        &mut c,
        &c_socket,
        channel,
        &json!({"user_id":"4"}),
        "secret-1",
    );
    assert_eq!(full["event"], "pusher:subscription_error", "{full}");
    assert_eq!(full["data"]["status"], 4100);
    assert_eq!(full["data"]["type"], "LimitReached");
    let again = join_presence(
        &mut c,
        &c_socket,
        channel,
        &json!({"user_id":"2"}),
        "secret-1",
    );
    assert_eq!(data_of(&again)["presence"]["count"], 3, "{again}");

    // The HTTP API: user_count and the users, and what it refuses.
    let r = signed(
        &server,
        "GET",
        &format!("/apps/app-1/channels/{channel}"),
        None,
    );
    assert_eq!(r.status, 200);
    let r = server.request(
        "GET",
        &signed_path(
            "GET",
            &format!("/apps/app-1/channels/{channel}"),
            "info=user_count%2Csubscription_count",
        ),
        None,
    );
    assert_eq!(
        r.json(),
        json!({"occupied":true,"subscription_count":4,"user_count":3}),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = server.request(
        "GET",
        &signed_path(
            "GET",
            "/apps/app-1/channels",
            "filter_by_prefix=presence-&info=user_count",
        ),
        None,
    );
    assert_eq!(
        r.json(),
        json!({"channels":{channel:{"subscription_count":4,"user_count":3}}})
    );
    server
        .request(
            "GET",
            &signed_path("GET", "/apps/app-1/channels", "info=user_count"),
            None,
        )
        .assert_error(
            "user_count without the presence prefix",
            400,
            "invalid_field",
        );
    let r = signed(
        &server,
        "GET",
        &format!("/apps/app-1/channels/{channel}/users"),
        None,
    );
    assert_eq!(
        r.json(),
        json!({"users":[{"id":"1"},{"id":"2"},{"id":"n"}]})
    );
    signed(&server, "GET", "/apps/app-1/channels/public/users", None).assert_error(
        "users of a channel that is not a presence channel",
        400,
        "invalid_field",
    );

    // Member 1 unsubscribes, member 2's two connections go one after the other: member_removed and
    // leave come once per user, when its last connection goes.
    a.send(Message::text(
        json!({"event":"pusher:unsubscribe","data":{"channel":channel}}).to_string(),
    ))
    .unwrap();
    expect_member(&mut b, channel, "1", None);
    assert_eq!(
        native.next_json(),
        json!({"event":"leave","channel":channel,"user_id":"1"})
    );
    drop(c);
    drop(b);
    assert_eq!(
        native.next_json(),
        json!({"event":"leave","channel":channel,"user_id":"2"})
    );
    // The native member leaves: the Pusher side hears it (a's resubscription, as a new member 5).
    let ok = join_presence(
        &mut a,
        &a_socket,
        channel,
        &json!({"user_id":"5"}),
        "secret-1",
    );
    assert_eq!(data_of(&ok)["presence"]["ids"], json!(["5", "n"]));
    assert_eq!(
        native.next_json(),
        json!({"event":"join","channel":channel,"user_id":"5"})
    );
    drop(native);
    expect_member(&mut a, channel, "n", None);
}

/// A path with `query` (already encoded) signed as the `pusher` SDK signs it, now.
fn signed_path(method: &str, path: &str, query: &str) -> String {
    let mut params: Vec<String> = vec![
        "auth_key=key-1".into(),
        format!("auth_timestamp={}", now()),
        "auth_version=1.0".into(),
    ];
    params.extend(query.split('&').map(|p| {
        // The signature is over the decoded values.
        p.replace("%2C", ",")
    }));
    params.sort();
    let signature = sign(
        "secret-1",
        &format!("{method}\n{path}\n{}", params.join("&")),
    );
    format!(
        "{path}?{query}&auth_key=key-1&auth_timestamp={}&auth_version=1.0&auth_signature={signature}",
        now()
    )
}

#[test]
fn pusher_presence_members_meet_and_terminate_reaches_across_nodes() {
    let Some(redis) = common::redis::TestRedis::shared() else {
        return;
    };
    let node = || {
        TestServer::start_with(&[
            ("PUSHER_APPS", APPS),
            ("REDIS_URL", &redis.url),
            ("REDIS_PREFIX", &redis.prefix),
            ("SHARDS", "2"),
        ])
    };
    let (one, two) = (node(), node());
    redis.wait_numsub("b", 2);
    let channel = "presence-nodes";
    let (mut a, established) = pusher_client(&one, "key-1");
    let a_socket = socket_id_of(&established);
    let ok = join_presence(
        &mut a,
        &a_socket,
        channel,
        &json!({"user_id":"a"}),
        "secret-1",
    );
    assert_eq!(data_of(&ok)["presence"]["ids"], json!(["a"]));
    let (mut b, established) = pusher_client(&two, "key-1");
    let b_socket = socket_id_of(&established);
    redis.wait_numsub(&format!("c:{channel}"), 1);
    let ok = join_presence(
        &mut b,
        &b_socket,
        channel,
        &json!({"user_id":"b","user_info":{"n":2}}),
        "secret-1",
    );
    assert_eq!(
        data_of(&ok),
        json!({"presence":{"ids":["a","b"],"hash":{"a":null,"b":{"n":2}},"count":2}})
    );
    expect_member(&mut a, channel, "b", Some(json!({"n":2})));
    for server in [&one, &two] {
        let r = signed(
            server,
            "GET",
            &format!("/apps/app-1/channels/{channel}/users"),
            None,
        );
        assert_eq!(r.json(), json!({"users":[{"id":"a"},{"id":"b"}]}));
    }
    drop(b);
    expect_member(&mut a, channel, "b", None);

    // A user signed in on node two is terminated through node one.
    let (mut t, established) = pusher_client(&two, "key-1");
    let t_socket = socket_id_of(&established);
    let user_data = json!({"id":"t1"}).to_string();
    let auth = format!(
        "key-1:{}",
        sign("secret-1", &format!("{t_socket}::user::{user_data}"))
    );
    t.send(Message::text(
        json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}}).to_string(),
    ))
    .unwrap();
    assert_eq!(next_json(&mut t)["event"], "pusher:signin_success");
    let r = signed(
        &one,
        "POST",
        "/apps/app-1/users/t1/terminate_connections",
        Some("{}"),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let error = next_json(&mut t);
    assert_eq!(error["event"], "pusher:error", "{error}");
    assert_eq!(error["data"]["code"], 4009);
    assert_eq!(next_json(&mut t), json!({"closed": 4009}));
}
