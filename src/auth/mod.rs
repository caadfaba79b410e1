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
//!
//! Every refusal of a credential and of a rate limit is also an audit event (`auth_refused`,
//! `rate_limited`: docs/audit.md), recorded here where the reason is known; the node's [`Audit`]
//! handle lives in [`Auth`], which every shard holds.

pub mod admission;
pub mod api_key;
pub mod expiry;
pub mod jwt;
pub mod rate_limit;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Audit, Credential, Event, KeyId, Origin, Via};
use crate::config::Config;
use crate::http::query::decode_path_segment;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::metrics::{Refusal, Refusals};

use admission::ConnectionCounts;
use api_key::{presented_key, KeySet};
use jwt::{presented_token, Claims, JwtVerifier};
use rate_limit::{Clock, Rate, SharedBucket};

/// What a path needs, by its decoded segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// `/health` (load balancers need no secret), `/openapi.yaml` (API tools need none either), and the
    /// monitor page `/` with its `/assets/*` files (they hold no data; the page asks for a key itself),
    /// and the Pusher HTTP API `/apps/*` (signed per request; its handlers check the signature).
    Open,
    /// `/metrics`: `METRICS_TOKEN`, when set.
    Metrics,
    /// `/ws` (checked at the upgrade: JWT) and the Pusher protocol's `/app/{key}` (app key and
    /// signatures): not here.
    WebSocket,
    /// The SSE stream and the long-poll: checked when the session opens ([`Auth::authenticate_stream`]:
    /// a JWT, or an API key), not here.
    Stream,
    /// Everything else (`/api/*`, the `/notifications` alias, unknown paths): an API key, when set.
    Api,
}

fn guard_of(path: &str) -> Guard {
    // Decoded like the router decodes, so `/%61pi/...` cannot slip past as something else. A segment
    // that does not decode is `None`, which matches no open route.
    let segments: Vec<_> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_path_segment)
        .collect();
    let segments: Vec<Option<&str>> = segments.iter().map(|s| s.as_deref()).collect();
    match segments.as_slice() {
        [] | [Some("health" | "openapi.yaml")] | [Some("assets"), Some(_)] => Guard::Open,
        [Some("metrics")] => Guard::Metrics,
        [Some("ws")] => Guard::WebSocket,
        [Some("api"), Some("v1"), Some("notifications"), Some("stream" | "poll")] => Guard::Stream,
        // The Pusher protocol and HTTP API authenticate by app key and signatures (their handlers
        // check them), not by API_KEY or JWT_SECRET.
        [Some("app"), Some(_)] => Guard::WebSocket,
        [Some("apps"), ..] => Guard::Open,
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

/// Who opened an SSE stream or a long-poll ([`Auth::authenticate_stream`]).
#[derive(Debug)]
pub enum StreamIdentity {
    /// An API key (or nothing, on a server without keys or tokens): the request names the user, and
    /// every channel is allowed.
    Key(Credential),
    /// A token: the user is its `sub`, the channels its grant.
    Token(Claims),
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
    /// The audit log (off unless `AUDIT_LOG` is set).
    audit: Audit,
    /// Where refusals are counted (the node's, rendered at `/metrics`).
    refusals: Arc<Refusals>,
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
    /// The node's auth from its settings (validated already by `Config::validate`), recording its
    /// refusals in `audit` and counting them in `refusals`.
    pub fn from_config(config: &Config, audit: Audit, refusals: Arc<Refusals>) -> Auth {
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
            connections: Arc::new(
                ConnectionCounts::new(
                    config.max_connections,
                    config.max_connections_per_ip,
                    config.max_connections_per_user,
                )
                .counting_refusals_in(refusals.clone()),
            ),
            refusals,
            audit,
        }
    }

    /// The node's audit log.
    pub fn audit(&self) -> &Audit {
        &self.audit
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

    /// Where refusals are counted: the caller counts the ones it decides itself (the per-shard cap,
    /// a WebSocket message over its rate).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Checks an HTTP request from its head: the credential its path needs, then the key's rate.
    /// `Ok` is the credential the request passed with (for the audit log); `Err` is the answer to
    /// send instead (401 or 429), counted as a refusal and recorded in the audit log with `ip`, the
    /// peer's address.
    pub fn check_request(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
    ) -> Result<Credential, Response> {
        let checked = self.check_credentials_and_rate(head, ip);
        if let Err(refusal) = &checked {
            self.refusals.count(if refusal.status == 429 {
                Refusal::RateLimited
            } else {
                Refusal::Unauthorized
            });
        }
        checked
    }

    fn check_credentials_and_rate(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
    ) -> Result<Credential, Response> {
        let refused = |reason: &'static str, key_id: Option<KeyId>, message: &str| {
            self.refuse_http(head, ip, reason, key_id, message)
        };
        match guard_of(head.path()) {
            Guard::Open | Guard::WebSocket | Guard::Stream => Ok(Credential::None),
            Guard::Metrics => match &self.metrics_token {
                None => Ok(Credential::None),
                Some(token) => match api_key::bearer_token(head) {
                    Some(t) if token.find(t.as_bytes()).is_some() => Ok(Credential::None),
                    Some(_) => Err(refused(
                        "invalid_metrics_token",
                        None,
                        "the metrics token is not valid",
                    )),
                    None => Err(refused(
                        "missing_metrics_token",
                        None,
                        "this route wants Authorization: Bearer <METRICS_TOKEN>",
                    )),
                },
            },
            Guard::Api => self.check_api_key(head, ip),
        }
    }

    /// `401` for an HTTP request's credential, recorded in the audit log.
    fn refuse_http(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
        reason: &'static str,
        key_id: Option<KeyId>,
        message: &str,
    ) -> Response {
        self.audit.emit(|| Event::AuthRefused {
            reason,
            key_id,
            by: http_origin(head, Credential::None, ip),
        });
        unauthorized(message)
    }

    /// The API key an `/api` request needs when `API_KEY` is set, and its rate.
    fn check_api_key(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
    ) -> Result<Credential, Response> {
        let refused = |reason: &'static str, key_id: Option<KeyId>, message: &str| {
            self.refuse_http(head, ip, reason, key_id, message)
        };
        let Some(keys) = &self.api_keys else {
            return Ok(Credential::None);
        };
        let Some(presented) = presented_key(head) else {
            return Err(refused(
                "missing_api_key",
                None,
                "an API key is required: Authorization: Bearer <key> or X-API-Key: <key>",
            ));
        };
        let (found, key_id) = keys.lookup(presented.as_bytes());
        let Some(index) = found else {
            return Err(refused(
                "invalid_api_key",
                Some(key_id),
                "the API key is not valid",
            ));
        };
        let credential = Credential::ApiKey(key_id);
        match self.take_api_token(index) {
            Ok(()) => Ok(credential),
            Err(response) => {
                self.audit.emit(|| Event::RateLimited {
                    limit: "api_key",
                    by: http_origin(head, credential, ip),
                });
                Err(response)
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

    /// Checks who opens an SSE stream or a long-poll: a valid API key (when `API_KEY` is set) lets the
    /// request name any user and channel; otherwise, with `JWT_SECRET` set, a token as for a WebSocket
    /// (`?token=`, which a browser's `EventSource` can send, or `Authorization: Bearer`), whose `sub`
    /// and channel claims bind the stream; otherwise, with only `API_KEY` set, the key is required.
    /// Refusals are counted and recorded as [`Auth::check_request`] and
    /// [`Auth::authenticate_upgrade`] record theirs.
    pub fn authenticate_stream(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
    ) -> Result<StreamIdentity, Response> {
        let key_presented = match (&self.api_keys, presented_key(head)) {
            (Some(keys), Some(key)) => keys.lookup(key.as_bytes()).0.is_some(),
            _ => false,
        };
        if key_presented || self.jwt.is_none() {
            return match self.check_api_key(head, ip) {
                Ok(credential) => Ok(StreamIdentity::Key(credential)),
                Err(refusal) => {
                    self.refusals.count(if refusal.status == 429 {
                        Refusal::RateLimited
                    } else {
                        Refusal::Unauthorized
                    });
                    Err(refusal)
                }
            };
        }
        let identity = self.authenticate_upgrade(head, ip)?;
        Ok(identity.map_or(StreamIdentity::Key(Credential::None), |i| {
            StreamIdentity::Token(i.claims)
        }))
    }

    /// Checks a WebSocket upgrade's token. `Ok(None)` when `JWT_SECRET` is not set (open mode). A
    /// refusal is recorded in the audit log with `ip`, the peer's address.
    pub fn authenticate_upgrade(
        &self,
        head: &RequestHead,
        ip: Option<IpAddr>,
    ) -> Result<Option<UpgradeIdentity>, Response> {
        let Some(verifier) = &self.jwt else {
            return Ok(None);
        };
        let refused = |e: jwt::TokenError| {
            self.refusals.count(Refusal::Unauthorized);
            self.audit.emit(|| Event::AuthRefused {
                reason: e.code(),
                key_id: None,
                by: Origin::websocket(Credential::None, ip),
            });
            unauthorized(e.message())
        };
        let presented = presented_token(head).ok_or_else(|| refused(jwt::TokenError::Missing))?;
        let claims = verifier.verify(&presented.token).map_err(refused)?;
        Ok(Some(UpgradeIdentity {
            claims,
            protocol: presented.via_subprotocol.then_some(jwt::BEARER_PROTOCOL),
        }))
    }

    /// Verifies the token of a `refresh` action. `None` when `JWT_SECRET` is not set. A refusal is
    /// recorded in the audit log as coming from `origin` (called only then, and only when the log is
    /// on).
    pub fn verify_token(
        &self,
        token: &str,
        origin: impl FnOnce() -> Box<Origin>,
    ) -> Option<Result<Claims, jwt::TokenError>> {
        let verified = self.jwt.as_ref().map(|v| v.verify(token))?;
        if let Err(e) = &verified {
            self.audit.emit(|| Event::AuthRefused {
                reason: e.code(),
                key_id: None,
                by: origin(),
            });
        }
        Some(verified)
    }
}

/// The origin of an audit event about an HTTP request.
fn http_origin(head: &RequestHead, credential: Credential, ip: Option<IpAddr>) -> Box<Origin> {
    Box::new(Origin {
        via: Via::Http {
            method: head.method.as_str(),
            path: head.path().to_owned(),
        },
        credential,
        ip,
    })
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
        assert_eq!(guard_of("/"), Guard::Open);
        assert_eq!(guard_of("/assets/monitor.js"), Guard::Open);
        assert_eq!(guard_of("/%61ssets/monitor.js"), Guard::Open);
        assert_eq!(guard_of("/assets"), Guard::Api);
        assert_eq!(guard_of("/assets/a/b"), Guard::Api);
        assert_eq!(guard_of("/index.html"), Guard::Api);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
