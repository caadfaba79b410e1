//! Credentials for tests: HTTP requests with headers, minted and forged JWTs, and WebSocket upgrades
//! that may be refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;

use super::{parse_responses, HttpResponse, TestServer, WsClient};

/// The secret test servers sign tokens with.
pub const SECRET: &str = "test-jwt-secret";

/// Seconds since the epoch.
pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An HS256 token signed with `secret` carrying `claims`.
pub fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A valid token of `user` for an hour, allowed `channels` (glob patterns).
pub fn token(user: &str, channels: &[&str]) -> String {
    token_with(
        SECRET,
        json!({"sub": user, "exp": now() + 3600, "channels": channels}),
    )
}

/// A token whose header names `alg` but which is signed (HMAC-SHA256 with the real secret, or not at
/// all when `signed` is false): the algorithm-confusion forgeries.
pub fn forged_token(alg: &str, claims: Value, signed: bool) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = if signed {
        jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap()
    } else {
        String::new()
    };
    format!("{signing_input}.{signature}")
}

/// The answer to a refused WebSocket upgrade.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub body: Value,
}

/// A WebSocket upgrade with extra headers: the client and the 101's headers, or the refusal.
pub fn try_ws(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<(WsClient, tungstenite::handshake::client::Response), Refusal> {
    let url = format!("ws://{}/ws?{query}", server.addr);
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tungstenite::client::client(request, server.tcp()) {
        Ok((ws, response)) => Ok((
            WsClient {
                ws,
                connection_id: String::new(),
                unread_seen: Vec::new(),
            },
            response,
        )),
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => Err(Refusal {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null),
        }),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

/// A connected WebSocket client (the `connected` event consumed) presenting `token` in the query.
pub fn ws_with_token(server: &TestServer, token: &str, query: &str) -> WsClient {
    let query = if query.is_empty() {
        format!("token={token}")
    } else {
        format!("token={token}&{query}")
    };
    let (mut client, _) = try_ws(server, &query, &[]).unwrap_or_else(|r| panic!("refused: {r:?}"));
    let connected = client.expect_event("connected");
    client.connection_id = connected["connection_id"].as_str().unwrap().to_owned();
    client
}

/// One HTTP request with extra headers, on its own connection.
pub fn request_with(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Some(body) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => req.push_str("\r\n"),
    }
    let raw = server.raw(req.as_bytes());
    parse_responses(&raw)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no response to {method} {path}"))
}
