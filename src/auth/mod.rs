//! Who may do what, and how much: API keys for the HTTP API, JWTs for WebSockets, rate limits and
//! connection caps. One [`Auth`] per node, built from the config at start-up and shared by every shard.
//!
//! - [`api_key`]: the key set and how a request presents a key (constant-time comparison).
//! - [`jwt`]: HS256 token verification, where an upgrade carries its token, and channel grants.
//! - [`rate_limit`]: GCRA buckets, lock-free shared ones (per API key) and task-local ones (per
//!   WebSocket connection).
//! - [`admission`]: connection caps per node, per IP and per user, counted across shards.
//! - [`expiry`]: the per-shard queue of token expiries on live connections.
//!
//! Where each check runs: a connection is admitted (node and IP caps) before its first byte is read;
//! an HTTP request is checked ([`Auth::check_request`]: key, then rate) as soon as its head is parsed,
//! before its body is read, so an unauthenticated client cannot make the server buffer a body; a
//! WebSocket upgrade is checked ([`Auth::authenticate_upgrade`]) before the 101; what a live session
//! may do (channels, message rate, expiry) is checked by the session with the pieces above.

pub mod admission;
pub mod api_key;
pub mod expiry;
pub mod jwt;
pub mod rate_limit;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::http::query::decode_path_segment;
use crate::http::request::RequestHead;
use crate::http::response::Response;

use admission::ConnectionCounts;
use api_key::{presented_key, KeySet};
use jwt::{presented_token, Claims, JwtVerifier};
use rate_limit::{Clock, Rate, SharedBucket};

/// What a path needs, by its decoded segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// `/health` and `/openapi.yaml`: open, so load balancers and API tools need no secret.
    Open,
    /// `/metrics`: `METRICS_TOKEN`, when set.
    Metrics,
    /// `/ws`: checked at the upgrade (JWT), not here.
    WebSocket,
    /// Everything else (`/api/*`, the `/notifications` alias, unknown paths): an API key, when set.
    Api,
}

fn guard_of(path: &str) -> Guard {
    // Decoded like the router decodes, so `/%61pi/...` cannot slip past as something else.
    let mut segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_path_segment);
    let first = segments.next();
    if segments.next().is_some() {
        return Guard::Api;
    }
    match first.flatten().as_deref() {
        Some("health" | "openapi.yaml") => Guard::Open,
        Some("metrics") => Guard::Metrics,
        Some("ws") => Guard::WebSocket,
        _ => Guard::Api,
    }
}

/// A verified WebSocket identity.
#[derive(Debug)]
pub struct UpgradeIdentity {
    /// The token's claims.
    pub claims: Claims,
    /// The subprotocol to name in the 101 (`bearer`), when the token came that way.
    pub protocol: Option<&'static str>,
}

/// The node's authentication and limits. See the module docs.
#[derive(Debug)]
pub struct Auth {
    api_keys: Option<KeySet>,
    metrics_token: Option<KeySet>,
    jwt: Option<JwtVerifier>,
    /// One bucket per API key, in the order of `API_KEY`.
    api_buckets: Vec<SharedBucket>,
    api_rate: Option<Rate>,
    ws_rate: Option<Rate>,
    clock: Clock,
    leeway_s: u64,
    /// The connection caps.
    pub connections: Arc<ConnectionCounts>,
}

/// `401 unauthorized`, with the `WWW-Authenticate` challenge RFC 6750 asks for.
pub fn unauthorized(message: &str) -> Response {
    Response::error(401, "unauthorized", message).with_header("WWW-Authenticate", "Bearer")
}

/// `403 forbidden`.
pub fn forbidden(message: &str) -> Response {
    Response::error(403, "forbidden", message)
}

impl Auth {
    /// The node's auth from its settings (validated already by `Config::validate`).
    pub fn from_config(config: &Config) -> Auth {
        let api_keys = config.api_key.as_deref().map(KeySet::from_list);
        let api_buckets = (0..api_keys.as_ref().map_or(0, KeySet::len))
            .map(|_| SharedBucket::default())
            .collect();
        Auth {
            api_keys,
            metrics_token: config.metrics_token.as_deref().map(KeySet::single),
            jwt: config
                .jwt_secret
                .as_deref()
                .map(|s| JwtVerifier::new(s, config.jwt_leeway_s)),
            api_buckets,
            api_rate: Rate::new(config.rate_limit_api, config.rate_limit_api_burst),
            ws_rate: Rate::new(config.rate_limit_ws, config.rate_limit_ws_burst),
            clock: Clock::new(),
            leeway_s: config.jwt_leeway_s,
            connections: Arc::new(ConnectionCounts::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_connections_per_user,
            )),
        }
    }

    /// True when WebSockets need a token.
    pub fn jwt_enabled(&self) -> bool {
        self.jwt.is_some()
    }

    /// The clock rate limits run on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The per-connection WebSocket message rate, if limited.
    pub fn ws_rate(&self) -> Option<&Rate> {
        self.ws_rate.as_ref()
    }

    /// Seconds of skew allowed on `exp`: a live connection is closed this long after its `exp`, the
    /// same moment its token would stop passing the handshake.
    pub fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    /// Checks an HTTP request from its head: the credential its path needs, then the key's rate.
    /// `Err` is the answer to send instead (401 or 429).
    pub fn check_request(&self, head: &RequestHead) -> Result<(), Response> {
        match guard_of(head.path()) {
            Guard::Open | Guard::WebSocket => Ok(()),
            Guard::Metrics => match &self.metrics_token {
                None => Ok(()),
                Some(token) => match api_key::bearer_token(head) {
                    Some(t) if token.find(t.as_bytes()).is_some() => Ok(()),
                    Some(_) => Err(unauthorized("the metrics token is not valid")),
                    None => Err(unauthorized(
                        "this route wants Authorization: Bearer <METRICS_TOKEN>",
                    )),
                },
            },
            Guard::Api => {
                let Some(keys) = &self.api_keys else {
                    return Ok(());
                };
                let Some(presented) = presented_key(head) else {
                    return Err(unauthorized(
                        "an API key is required: Authorization: Bearer <key> or X-API-Key: <key>",
                    ));
                };
                let Some(index) = keys.find(presented.as_bytes()) else {
                    return Err(unauthorized("the API key is not valid"));
                };
                self.take_api_token(index)
            }
        }
    }

    /// One request of key `index` against `RATE_LIMIT_API`.
    fn take_api_token(&self, index: usize) -> Result<(), Response> {
        let Some(rate) = &self.api_rate else {
            return Ok(());
        };
        self.api_buckets[index]
            .take(rate, self.clock.now_ns())
            .map_err(|wait| {
                Response::error(
                    429,
                    "rate_limited",
                    "too many requests for this API key; retry after the Retry-After seconds",
                )
                .with_header("Retry-After", retry_after_seconds(wait).to_string())
            })
    }

    /// Checks a WebSocket upgrade's token. `Ok(None)` when `JWT_SECRET` is not set (open mode).
    pub fn authenticate_upgrade(
        &self,
        head: &RequestHead,
    ) -> Result<Option<UpgradeIdentity>, Response> {
        let Some(verifier) = &self.jwt else {
            return Ok(None);
        };
        let presented = presented_token(head)
            .ok_or_else(|| unauthorized(jwt::TokenError::Missing.message()))?;
        let claims = verifier
            .verify(&presented.token)
            .map_err(|e| unauthorized(e.message()))?;
        Ok(Some(UpgradeIdentity {
            claims,
            protocol: presented.via_subprotocol.then_some(jwt::BEARER_PROTOCOL),
        }))
    }

    /// Verifies the token of a `refresh` action. `None` when `JWT_SECRET` is not set.
    pub fn verify_token(&self, token: &str) -> Option<Result<Claims, jwt::TokenError>> {
        self.jwt.as_ref().map(|v| v.verify(token))
    }
}

/// `Retry-After` is whole seconds (RFC 9110): round up, and never say 0.
fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_guarded_by_their_decoded_segments() {
        assert_eq!(guard_of("/health"), Guard::Open);
        assert_eq!(guard_of("/health/"), Guard::Open);
        assert_eq!(guard_of("/%68ealth"), Guard::Open);
        assert_eq!(guard_of("/openapi.yaml"), Guard::Open);
        assert_eq!(guard_of("/metrics"), Guard::Metrics);
        assert_eq!(guard_of("/ws"), Guard::WebSocket);
        assert_eq!(guard_of("/api/v1/notifications/send"), Guard::Api);
        assert_eq!(guard_of("/%61pi/v1/notifications/send"), Guard::Api);
        assert_eq!(guard_of("/notifications"), Guard::Api);
        assert_eq!(guard_of("/health/x"), Guard::Api);
        assert_eq!(guard_of("/nope"), Guard::Api);
        assert_eq!(guard_of("/"), Guard::Api);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
