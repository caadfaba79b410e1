//! Authentication and authorization through the real binary: with `API_KEY` and `JWT_SECRET` set,
//! nothing in the HTTP or WebSocket API works without the right credential (route by route), and the
//! auth matrix of docs/security.md is refused the documented way.

mod common;

use std::time::Duration;

use common::auth::{
    forged_token, now, request_with, token, token_with, try_ws, ws_with_token, SECRET,
};
use common::{HttpResponse, TestServer};
use serde_json::json;

const KEY: &str = "key-current";
const OLD_KEY: &str = "key-old";

fn secured() -> TestServer {
    TestServer::start_with(&[
        ("API_KEY", &format!("{KEY}, {OLD_KEY}")),
        ("JWT_SECRET", SECRET),
    ])
}

/// A `scheduled_at` a month ahead (the schedule route takes up to a year).
fn in_a_month() -> String {
    (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339()
}

/// Every HTTP route of API.md (and an unknown one), with a body where the route takes one.
fn routes(scheduled: &str, notification: &str) -> Vec<(&'static str, String, Option<String>)> {
    let send = json!({"user_id": "u1", "message": "hi"}).to_string();
    vec![
        (
            "POST",
            "/api/v1/notifications/send".into(),
            Some(send.clone()),
        ),
        (
            "POST",
            "/api/v1/notifications/batch".into(),
            Some(json!({"notifications": [{"user_id": "u1", "message": "b"}]}).to_string()),
        ),
        (
            "POST",
            "/api/v1/notifications/schedule".into(),
            Some(
                json!({"user_id": "u1", "message": "later", "scheduled_at": in_a_month()})
                    .to_string(),
            ),
        ),
        (
            "GET",
            format!("/api/v1/notifications/scheduled/{scheduled}"),
            None,
        ),
        (
            "DELETE",
            format!("/api/v1/notifications/scheduled/{scheduled}"),
            None,
        ),
        ("GET", "/api/v1/notifications/user/u1".into(), None),
        (
            "PUT",
            format!("/api/v1/notifications/u1/{notification}/read"),
            None,
        ),
        ("PUT", "/api/v1/notifications/u1/read-all".into(), None),
        (
            "DELETE",
            format!("/api/v1/notifications/u1/{notification}"),
            None,
        ),
        ("POST", "/notifications".into(), Some(send)),
        ("GET", "/notifications?user_id=u1".into(), None),
        ("GET", "/api/v1/no-such-route".into(), None),
        // Percent-encoded segments route like plain ones, so they must be guarded like them.
        (
            "POST",
            "/%61pi/v1/notifications/send".into(),
            Some(json!({"user_id": "u1", "message": "sneaky"}).to_string()),
        ),
    ]
}

fn assert_unauthorized(r: &HttpResponse, what: &str) {
    assert_eq!(
        r.status,
        401,
        "{what}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.error_code(), "unauthorized", "{what}");
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"), "{what}");
}

#[test]
fn every_http_route_wants_a_valid_api_key() {
    let server = secured();
    let some_id = "01a209d9-1cf4-7000-8000-00002e70a82c";
    for (method, path, body) in routes(some_id, some_id) {
        let what = format!("{method} {path}");
        let body = body.as_deref();
        assert_unauthorized(&request_with(&server, method, &path, body, &[]), &what);
        for bad in [
            ("Authorization", "Bearer wrong-key"),
            ("Authorization", "Bearer key-current-and-more"),
            ("Authorization", "Basic a2V5LWN1cnJlbnQ="),
            ("X-API-Key", "key-curren"),
        ] {
            assert_unauthorized(
                &request_with(&server, method, &path, body, &[bad]),
                &format!("{what} with {bad:?}"),
            );
        }
    }
    // None of that stored anything.
    let r = request_with(
        &server,
        "GET",
        "/api/v1/notifications/user/u1",
        None,
        &[("X-API-Key", KEY)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 0);

    // With a key (either one, either header), each route does its job.
    let bearer = format!("Bearer {KEY}");
    let by_bearer = [("Authorization", bearer.as_str())];
    let by_header = [("X-API-Key", OLD_KEY)];
    let sent = request_with(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&json!({"user_id": "u1", "message": "hi"}).to_string()),
        &by_bearer,
    );
    assert_eq!(sent.status, 201);
    let notification = sent.json()["id"].as_str().unwrap().to_owned();
    let scheduled = request_with(
        &server,
        "POST",
        "/api/v1/notifications/schedule",
        Some(
            &json!({"user_id": "u1", "message": "later", "scheduled_at": in_a_month()}).to_string(),
        ),
        &by_header,
    );
    assert_eq!(scheduled.status, 201);
    let scheduled = scheduled.json()["id"].as_str().unwrap().to_owned();
    let expected = [
        201, 201, 201, 200, 204, 200, 200, 200, 204, 201, 200, 404, 201,
    ];
    for (i, (method, path, body)) in routes(&scheduled, &notification).into_iter().enumerate() {
        let headers: &[(&str, &str)] = if i % 2 == 0 { &by_bearer } else { &by_header };
        let r = request_with(&server, method, &path, body.as_deref(), headers);
        assert_eq!(
            r.status,
            expected[i],
            "{method} {path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[test]
fn health_stays_open_and_metrics_wants_its_own_token_when_set() {
    let server = secured();
    assert_eq!(
        request_with(&server, "GET", "/health", None, &[]).status,
        200
    );
    assert_eq!(
        request_with(&server, "GET", "/metrics", None, &[]).status,
        200,
        "open without METRICS_TOKEN"
    );

    let server = TestServer::start_with(&[("API_KEY", KEY), ("METRICS_TOKEN", "scrape-me")]);
    assert_eq!(
        request_with(&server, "GET", "/health", None, &[]).status,
        200
    );
    assert_unauthorized(
        &request_with(&server, "GET", "/metrics", None, &[]),
        "metrics without a token",
    );
    let api_key = format!("Bearer {KEY}");
    assert_unauthorized(
        &request_with(
            &server,
            "GET",
            "/metrics",
            None,
            &[("Authorization", &api_key)],
        ),
        "metrics with the API key",
    );
    let r = request_with(
        &server,
        "GET",
        "/metrics",
        None,
        &[("Authorization", "Bearer scrape-me")],
    );
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("notif_uptime_seconds"));
}

#[test]
fn a_revoked_api_key_is_refused_after_the_restart_that_drops_it() {
    let env = [("API_KEY", "new-key,old-key")];
    let mut server = TestServer::start_with(&env);
    let body = json!({"user_id": "u1", "message": "hi"}).to_string();
    let send = |server: &TestServer, key: &str| {
        request_with(
            server,
            "POST",
            "/api/v1/notifications/send",
            Some(&body),
            &[("X-API-Key", key)],
        )
    };
    assert_eq!(
        send(&server, "old-key").status,
        201,
        "both keys during rotation"
    );
    assert_eq!(send(&server, "new-key").status, 201);
    assert!(server.terminate().success());
    let server = TestServer::start_in(server.dir.clone(), &[("API_KEY", "new-key")]);
    assert_unauthorized(&send(&server, "old-key"), "the revoked key");
    assert_eq!(send(&server, "new-key").status, 201);
}

#[test]
fn a_websocket_needs_a_token_and_takes_it_three_ways() {
    let server = secured();
    let jwt = token("alice", &[]);

    let by_query = ws_with_token(&server, &jwt, "");
    assert!(!by_query.connection_id.is_empty());

    let bearer = format!("Bearer {jwt}");
    let (mut by_header, _) = try_ws(&server, "", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(by_header.expect_event("connected")["user_id"], "alice");

    // Browsers: the token as the second offered subprotocol; the server names `bearer`.
    let offered = format!("bearer, {jwt}");
    let (mut by_protocol, response) =
        try_ws(&server, "", &[("Sec-WebSocket-Protocol", &offered)]).unwrap();
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some("bearer")
    );
    assert_eq!(by_protocol.expect_event("connected")["user_id"], "alice");

    // The token's user is the one notifications reach.
    let key = format!("Bearer {KEY}");
    let r = request_with(
        &server,
        "POST",
        "/api/v1/notifications/send",
        Some(&json!({"user_id": "alice", "message": "for alice"}).to_string()),
        &[("Authorization", &key)],
    );
    assert_eq!(r.status, 201);
    let mut by_query = by_query;
    assert_eq!(by_query.expect_notification()["message"], "for alice");
    assert_eq!(by_header.expect_notification()["message"], "for alice");
}

/// Each row of the matrix in docs/security.md: the upgrade is refused with 401 and no upgrade.
#[test]
fn the_websocket_auth_matrix_is_refused_before_the_upgrade() {
    let server = secured();
    let claims = json!({"sub": "alice", "exp": now() + 3600});
    let cases: Vec<(&str, String)> = vec![
        ("no token", "".into()),
        ("a bare user_id", "user_id=alice".into()),
        ("an empty token", "token=".into()),
        ("garbage", "token=not-a-jwt".into()),
        (
            "a bad signature",
            format!("token={}", token_with("another-secret", claims.clone())),
        ),
        (
            "alg none",
            format!("token={}", forged_token("none", claims.clone(), false)),
        ),
        (
            "alg RS256 (HMAC-signed with the secret)",
            format!("token={}", forged_token("RS256", claims.clone(), true)),
        ),
        (
            "alg HS512",
            format!(
                "token={}",
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .unwrap()
            ),
        ),
        (
            "expired (beyond the 30 s leeway)",
            format!(
                "token={}",
                token_with(SECRET, json!({"sub": "alice", "exp": now() - 120}))
            ),
        ),
        (
            "not yet valid (nbf beyond the leeway)",
            format!(
                "token={}",
                token_with(
                    SECRET,
                    json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600})
                )
            ),
        ),
        (
            "no exp",
            format!("token={}", token_with(SECRET, json!({"sub": "alice"}))),
        ),
        (
            "no sub",
            format!("token={}", token_with(SECRET, json!({"exp": now() + 3600}))),
        ),
    ];
    for (what, query) in cases {
        let refusal = try_ws(&server, &query, &[])
            .err()
            .unwrap_or_else(|| panic!("{what}: upgraded"));
        assert_eq!(refusal.status, 401, "{what}: {refusal:?}");
        assert_eq!(refusal.body["error"]["code"], "unauthorized", "{what}");
    }
    // A valid token with someone else's user_id: 403.
    let refusal = try_ws(
        &server,
        &format!("token={}&user_id=bob", token("alice", &[])),
        &[],
    )
    .err()
    .expect("refused");
    assert_eq!(refusal.status, 403);
    assert_eq!(refusal.body["error"]["code"], "forbidden");
    // A correctly signed token within the leeway still passes.
    let skewed = token_with(SECRET, json!({"sub": "alice", "exp": now() - 5}));
    ws_with_token(&server, &skewed, "");
}

#[test]
fn channels_outside_the_token_claim_are_forbidden_and_not_subscribed() {
    let server = secured();
    let jwt = token("alice", &["team-42.*", "news"]);
    let mut alice = ws_with_token(&server, &jwt, "channels=news,team-7.general");
    assert_eq!(
        alice.expect_event("error")["code"],
        "forbidden",
        "channels= at connect is checked like subscribe"
    );
    assert_eq!(
        alice.expect_event("subscribed")["channels"],
        json!(["news"])
    );

    alice.send_json(json!({"action": "subscribe", "channels": ["team-42.dev", "team-43.dev"]}));
    let e = alice.expect_event("error");
    assert_eq!(e["code"], "forbidden");
    assert!(
        e["message"].as_str().unwrap().contains("team-43.dev"),
        "{e}"
    );
    assert_eq!(
        alice.expect_event("subscribed")["channels"],
        json!(["team-42.dev"])
    );

    // Nothing sent to the refused channels reaches alice; the allowed one does.
    let key = format!("Bearer {KEY}");
    for channel in ["team-43.dev", "team-7.general", "team-42.dev"] {
        let r = request_with(
            &server,
            "POST",
            "/api/v1/notifications/send",
            Some(&json!({"channels": [channel], "message": channel}).to_string()),
            &[("Authorization", &key)],
        );
        assert_eq!(r.status, 201);
    }
    let got = alice.expect_notification();
    assert_eq!(got["channel"], "team-42.dev");

    // Publishing to a channel outside the claim is refused too (never subscribed).
    alice.send_json(json!({"action": "publish", "channel": "team-43.dev", "data": {}}));
    assert_eq!(alice.expect_event("error")["code"], "not_subscribed");
}

#[test]
fn an_expired_token_closes_the_connection_with_1008_unless_refreshed() {
    let server = TestServer::start_with(&[("JWT_SECRET", SECRET), ("JWT_LEEWAY_S", "0")]);
    let short = |user: &str, channels: &[&str]| {
        token_with(
            SECRET,
            json!({"sub": user, "exp": now() + 3, "channels": channels}),
        )
    };
    let mut expiring = ws_with_token(&server, &short("alice", &[]), "");
    let mut refreshed = ws_with_token(&server, &short("bob", &["a", "b"]), "channels=a,b");
    refreshed.expect_event("subscribed");

    // A refresh for another user, or a bad token, changes nothing.
    refreshed.send_json(json!({"action": "refresh", "token": token("mallory", &["*"])}));
    assert_eq!(refreshed.expect_event("error")["code"], "forbidden");
    refreshed.send_json(json!({"action": "refresh", "token": "nope"}));
    assert_eq!(refreshed.expect_event("error")["code"], "unauthorized");
    // A good one moves the expiry and narrows the channels to the new claim.
    refreshed.send_json(json!({"action": "refresh", "token": token("bob", &["a"])}));
    assert_eq!(
        refreshed.expect_event("unsubscribed")["channels"],
        json!(["b"])
    );
    let r = refreshed.expect_event("refreshed");
    assert!(r["expires_at"].as_u64().unwrap() > now() + 3000);

    assert_eq!(expiring.expect_close(), Some(1008));
    refreshed.expect_silence(Duration::from_secs(2));
    refreshed.send_json(json!({"action": "ping"}));
    refreshed.expect_event("pong");
}

#[test]
fn open_dev_mode_still_works_and_warns_at_start_up() {
    let server = TestServer::start();
    assert!(server.log_contains("running open"));
    let mut ws = server.ws("user_id=dev");
    server.send(json!({"user_id": "dev", "message": "open"}));
    assert_eq!(ws.expect_notification()["message"], "open");
    ws.send_json(json!({"action": "refresh", "token": "x.y.z"}));
    assert_eq!(ws.expect_event("error")["code"], "invalid_field");

    let half = TestServer::start_with(&[("API_KEY", KEY)]);
    assert!(half.log_contains("JWT_SECRET is not set"));
    assert!(!half.log_contains("running open"));
}
