//! The HTTP API of API.md: the route table and one handler per route, the monitor page's static files
//! ([`assets`]) included.
//!
//! Routing matches the method and the path's segments together, so two routes may share a shape with
//! different methods (`GET …/user/:id` and `DELETE …/:user_id/:notification_id`). A path that matches
//! some route under another method gets 405 with `Allow`; one that matches none gets 404. Path segments
//! are percent-decoded, so a user id may hold any character.
//!
//! Handlers get an [`ApiContext`], the parsed head and the body bytes (mutable: simd-json parses in place)
//! and return a [`Response`]; they never see the socket or the shard, so they run (and are tested) with
//! a store and a config alone.

mod assets;
mod notifications;
mod openapi;
mod preferences;
mod presence;
mod pusher;
mod status;

use crate::audit::{Audit, Caller, Event, Origin};
use crate::bus::Fanout;
use crate::config::Config;
use crate::http::query::decode_path_segment;
use crate::http::request::{Method, RequestHead};
use crate::http::response::Response;
use crate::metrics::{Metrics, Route, ShardCounters};
use crate::store::{Store, StoreError};

/// What the handlers may use, borrowed from whatever serves the request: in the server, the shard the
/// connection lives on (`crate::connection` makes one per request, a few references on the stack).
#[derive(Clone, Copy)]
pub struct ApiContext<'a> {
    /// Server settings (body limits, JSON depth).
    pub config: &'a Config,
    /// The store handle.
    pub store: &'a Store,
    /// The counters this request counts in: those of the shard serving it.
    pub counters: &'a ShardCounters,
    /// Every shard's counters, for `/health` and `/metrics`.
    pub metrics: &'a Metrics,
    /// The fan-out, for the Redis bus's state (`/health`) and metrics (`/metrics`).
    pub fanout: &'a Fanout,
    /// The audit log, where handlers record what they changed and for whom.
    pub audit: &'a Audit,
    /// Who sent the request (its credential and address), for the audit log.
    pub caller: &'a Caller,
}

impl ApiContext<'_> {
    /// The counters of the shard serving the request.
    pub fn stats(&self) -> &ShardCounters {
        self.counters
    }

    /// Records in the audit log the event `make` builds from the request's origin (who sent `head`,
    /// how). Nothing runs when the log is off.
    fn record(&self, head: &RequestHead, make: impl FnOnce(Box<Origin>) -> Event) {
        self.audit
            .emit(|| make(self.caller.origin(head.method.as_str(), head.path())));
    }
}

/// One route, with its path parameters decoded.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Send,
    Batch,
    Schedule,
    GetScheduled(String),
    CancelScheduled(String),
    History(String),
    HistoryByQuery,
    Read(String, String),
    ReadAll(String),
    /// `PUT /api/v1/notifications/:user_id/seen`.
    Seen(String),
    Delete(String, String),
    /// `GET /api/v1/channels/:channel/presence`.
    Presence(String),
    Health,
    Metrics,
    /// `GET /`: the monitor and demo page.
    Page,
    /// `GET /assets/:name`: a file of the page.
    Asset(String),
    /// `GET /openapi.yaml`: the OpenAPI description of this API.
    OpenApi,
    /// `GET /api/v1/users/:user_id/preferences`.
    GetPreferences(String),
    /// `PUT /api/v1/users/:user_id/preferences`.
    PutPreferences(String),
    /// `GET /ws` without a proper upgrade reaches the session's handshake check instead; other methods
    /// on `/ws` get 405 from here.
    WebSocket,
    /// `GET /api/v1/notifications/stream`: the SSE stream, served by its session, not here (only a
    /// `HEAD` arrives here).
    Stream,
    /// `GET /api/v1/notifications/poll`: the long-poll, served by its session, not here (only a `HEAD`
    /// arrives here).
    Poll,
    /// `/apps/{id}/…`: the Pusher HTTP API of app `id`.
    Pusher(String, pusher::Call),
}

/// Matches a method and decoded path segments to an endpoint.
fn resolve(method: Method, segments: &[String]) -> Option<Endpoint> {
    use Method::{Delete, Get, Post, Put};
    let method = if method == Method::Head { Get } else { method };
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let endpoint = match (method, s.as_slice()) {
        (Post, ["api", "v1", "notifications", "send"]) => Endpoint::Send,
        (Post, ["api", "v1", "notifications", "batch"]) => Endpoint::Batch,
        (Post, ["api", "v1", "notifications", "schedule"]) => Endpoint::Schedule,
        // Before the inbox's `DELETE …/:user_id/:notification_id`, which has the same shape: a user
        // named "scheduled" cannot delete through that route (documented in docs/API.md).
        (Get, ["api", "v1", "notifications", "scheduled", id]) => {
            Endpoint::GetScheduled(id.to_string())
        }
        (Delete, ["api", "v1", "notifications", "scheduled", id]) => {
            Endpoint::CancelScheduled(id.to_string())
        }
        (Get, ["api", "v1", "notifications", "stream"]) => Endpoint::Stream,
        (Get, ["api", "v1", "notifications", "poll"]) => Endpoint::Poll,
        (Get, ["api", "v1", "notifications", "user", user]) => Endpoint::History(user.to_string()),
        (Put, ["api", "v1", "notifications", user, "read-all"]) => {
            Endpoint::ReadAll(user.to_string())
        }
        (Put, ["api", "v1", "notifications", user, "seen"]) => Endpoint::Seen(user.to_string()),
        (Put, ["api", "v1", "notifications", user, id, "read"]) => {
            Endpoint::Read(user.to_string(), id.to_string())
        }
        (Delete, ["api", "v1", "notifications", user, id]) => {
            Endpoint::Delete(user.to_string(), id.to_string())
        }
        (Get, ["api", "v1", "channels", channel, "presence"]) => {
            Endpoint::Presence(channel.to_string())
        }
        (Get, ["api", "v1", "users", user, "preferences"]) => {
            Endpoint::GetPreferences(user.to_string())
        }
        (Put, ["api", "v1", "users", user, "preferences"]) => {
            Endpoint::PutPreferences(user.to_string())
        }
        (Post, ["notifications"]) => Endpoint::Send,
        (Get, ["notifications"]) => Endpoint::HistoryByQuery,
        (Get, ["health"]) => Endpoint::Health,
        (Get, ["metrics"]) => Endpoint::Metrics,
        (Get, ["openapi.yaml"]) => Endpoint::OpenApi,
        (Get, ["ws"]) => Endpoint::WebSocket,
        (Get, []) => Endpoint::Page,
        (Get, ["assets", name]) => Endpoint::Asset(name.to_string()),
        (Post, ["apps", app, "events"]) => Endpoint::Pusher(app.to_string(), pusher::Call::Events),
        (Post, ["apps", app, "batch_events"]) => {
            Endpoint::Pusher(app.to_string(), pusher::Call::BatchEvents)
        }
        (Get, ["apps", app, "channels"]) => {
            Endpoint::Pusher(app.to_string(), pusher::Call::Channels)
        }
        (Get, ["apps", app, "channels", name]) => {
            Endpoint::Pusher(app.to_string(), pusher::Call::Channel(name.to_string()))
        }
        (Get, ["apps", app, "channels", name, "users"]) => Endpoint::Pusher(
            app.to_string(),
            pusher::Call::ChannelUsers(name.to_string()),
        ),
        (Post, ["apps", app, "users", user, "terminate_connections"]) => Endpoint::Pusher(
            app.to_string(),
            pusher::Call::TerminateUser(user.to_string()),
        ),
        _ => return None,
    };
    Some(endpoint)
}

/// Splits and decodes a path; `None` if a segment is not valid UTF-8 once decoded.
fn path_segments(path: &str) -> Option<Vec<String>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| decode_path_segment(s).map(|c| c.into_owned()))
        .collect()
}

impl Endpoint {
    /// The `route` label of `notif_http_responses_total`.
    fn route(&self) -> Route {
        match self {
            Endpoint::Send => Route::Send,
            Endpoint::Batch => Route::Batch,
            Endpoint::Schedule => Route::Schedule,
            Endpoint::GetScheduled(_) => Route::ScheduledGet,
            Endpoint::CancelScheduled(_) => Route::ScheduledCancel,
            Endpoint::History(_) | Endpoint::HistoryByQuery => Route::History,
            Endpoint::Read(..) => Route::Read,
            Endpoint::ReadAll(_) => Route::ReadAll,
            Endpoint::Seen(_) => Route::Seen,
            Endpoint::Delete(..) => Route::Delete,
            Endpoint::Presence(_) => Route::Presence,
            Endpoint::Health => Route::Health,
            Endpoint::Metrics => Route::Metrics,
            Endpoint::WebSocket => Route::WebSocket,
            Endpoint::Stream => Route::Stream,
            Endpoint::Poll => Route::Poll,
            Endpoint::Page | Endpoint::Asset(_) => Route::Page,
            Endpoint::OpenApi => Route::OpenApi,
            Endpoint::Pusher(..) => Route::Pusher,
            Endpoint::GetPreferences(_) | Endpoint::PutPreferences(_) => Route::Preferences,
        }
    }
}

/// The route a request head names (`Route::None` when none), for counting answers given before the
/// API sees the request (a refused credential or rate).
pub fn route_of(head: &RequestHead) -> Route {
    path_segments(head.path())
        .and_then(|segments| resolve(head.method, &segments))
        .map_or(Route::None, |endpoint| endpoint.route())
}

/// Answers one request, and counts the answer by route and status class.
pub async fn handle(ctx: &ApiContext<'_>, head: &RequestHead, body: &mut [u8]) -> Response {
    let (route, response) = answer(ctx, head, body).await;
    ctx.counters.http_response(route, response.status);
    response
}

/// Routes a request and runs its handler.
async fn answer(ctx: &ApiContext<'_>, head: &RequestHead, body: &mut [u8]) -> (Route, Response) {
    let Some(segments) = path_segments(head.path()) else {
        let bad_path = Response::error(
            400,
            "bad_request",
            "the path is not valid UTF-8 once decoded",
        );
        return (Route::None, bad_path);
    };
    let Some(endpoint) = resolve(head.method, &segments) else {
        return (Route::None, not_routed(head.method, &segments));
    };
    let route = endpoint.route();
    let json_body = matches!(
        endpoint,
        Endpoint::Send
            | Endpoint::Batch
            | Endpoint::Schedule
            | Endpoint::Seen(_)
            | Endpoint::PutPreferences(_)
    );
    if json_body {
        if head.header("content-type").is_some() && !head.content_type_is_json() {
            let refused = Response::error(
                415,
                "unsupported_media_type",
                "the body must be application/json",
            );
            return (route, refused);
        }
        let limit = if endpoint == Endpoint::Batch {
            ctx.config.max_batch_body
        } else {
            ctx.config.max_body
        };
        if body.len() > limit {
            let refused = Response::error(
                413,
                "body_too_large",
                &format!("the body is larger than the limit of {limit} bytes"),
            );
            return (route, refused);
        }
    }
    let response = match endpoint {
        Endpoint::Send => notifications::send(ctx, head, body).await,
        Endpoint::Batch => notifications::batch(ctx, head, body).await,
        Endpoint::Schedule => notifications::schedule(ctx, head, body).await,
        Endpoint::GetScheduled(id) => notifications::get_scheduled(ctx, &id).await,
        Endpoint::CancelScheduled(id) => notifications::cancel_scheduled(ctx, head, &id).await,
        Endpoint::History(user) => notifications::history(ctx, user, head.query()).await,
        Endpoint::HistoryByQuery => notifications::history_by_query(ctx, head.query()).await,
        Endpoint::Read(user, id) => notifications::read(ctx, head, user, &id).await,
        Endpoint::ReadAll(user) => notifications::read_all(ctx, head, user).await,
        Endpoint::Seen(user) => notifications::seen(ctx, user, body).await,
        Endpoint::Delete(user, id) => notifications::delete(ctx, head, user, &id).await,
        Endpoint::Presence(channel) => presence::members(ctx, channel).await,
        Endpoint::Health => status::health(ctx).await,
        Endpoint::Metrics => status::metrics(ctx).await,
        Endpoint::Page => assets::index(),
        Endpoint::Asset(name) => assets::asset(&name),
        Endpoint::OpenApi => openapi::openapi(),
        Endpoint::GetPreferences(user) => preferences::get(ctx, user).await,
        Endpoint::PutPreferences(user) => preferences::put(ctx, user, body).await,
        Endpoint::WebSocket => {
            Response::error(400, "bad_handshake", "expected a WebSocket upgrade")
        }
        Endpoint::Stream | Endpoint::Poll => Response::error(
            405,
            "method_not_allowed",
            "HEAD is not allowed here; use GET",
        )
        .with_header("Allow", "GET"),
        Endpoint::Pusher(app, call) => pusher::handle(ctx, head, body, &app, call).await,
    };
    (route, response)
}

/// 405 with `Allow` when the path exists under other methods, else 404.
fn not_routed(method: Method, segments: &[String]) -> Response {
    let allowed: Vec<&str> = [Method::Get, Method::Post, Method::Put, Method::Delete]
        .into_iter()
        .filter(|m| resolve(*m, segments).is_some())
        .map(|m| m.as_str())
        .collect();
    if allowed.is_empty() {
        return Response::error(404, "not_found", "no such route");
    }
    let allow = allowed.join(", ");
    Response::error(
        405,
        "method_not_allowed",
        &format!("{} is not allowed here; use {allow}", method.as_str()),
    )
    .with_header("Allow", allow)
}

/// 503 for a store that cannot answer.
fn store_unavailable(e: StoreError) -> Response {
    Response::error(503, "store_unavailable", &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreConfig, StoreUrl};
    use clap::Parser;

    fn segs(path: &str) -> Vec<String> {
        path_segments(path).unwrap()
    }

    #[test]
    fn routes_resolve_by_method_and_shape() {
        assert_eq!(
            resolve(Method::Post, &segs("/api/v1/notifications/send")),
            Some(Endpoint::Send)
        );
        assert_eq!(
            resolve(Method::Get, &segs("/api/v1/notifications/user/u%201")),
            Some(Endpoint::History("u 1".into()))
        );
        assert_eq!(
            resolve(Method::Delete, &segs("/api/v1/notifications/user/abc")),
            Some(Endpoint::Delete("user".into(), "abc".into()))
        );
        assert_eq!(
            resolve(Method::Put, &segs("/api/v1/notifications/u1/read-all")),
            Some(Endpoint::ReadAll("u1".into()))
        );
        assert_eq!(
            resolve(Method::Head, &segs("/health")),
            Some(Endpoint::Health)
        );
        assert_eq!(resolve(Method::Get, &segs("/nope")), None);
        assert_eq!(resolve(Method::Get, &segs("/")), Some(Endpoint::Page));
        assert_eq!(
            resolve(Method::Head, &segs("/assets/monitor.js")),
            Some(Endpoint::Asset("monitor.js".into()))
        );
    }

    #[test]
    fn wrong_method_is_405_with_allow_and_unknown_path_is_404() {
        let r = not_routed(Method::Delete, &segs("/api/v1/notifications/send"));
        assert_eq!(r.status, 405);
        assert!(r.headers.iter().any(|(k, v)| *k == "Allow" && v == "POST"));
        assert_eq!(not_routed(Method::Get, &segs("/x/y")).status, 404);
        let r = not_routed(Method::Put, &segs("/notifications"));
        assert_eq!(r.status, 405);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "Allow" && v == "GET, POST"));
    }

    /// The handlers run with a store, a config and counters alone: no shard, no socket, no executor
    /// of glommio's.
    #[test]
    fn a_handler_runs_without_a_shard() {
        let dir = tempfile::tempdir().unwrap();
        let fanout = Fanout::new(Vec::new(), None);
        let (store, threads) = Store::open(
            &StoreConfig {
                url: StoreUrl::Sqlite(dir.path().join("api.db")),
                reader_threads: 1,
                max_batch: 16,
                retention: None,
                sqlite_synchronous: Default::default(),
                preferences: Default::default(),
            },
            Box::new(fanout.commit_listener()),
        )
        .unwrap();
        let config = Config::parse_from(["notification-service"]);
        let metrics = Metrics::new(1);
        let ctx = ApiContext {
            config: &config,
            store: &store,
            counters: metrics.shard(0),
            metrics: &metrics,
            fanout: &fanout,
            audit: &Audit::off(),
            caller: &Caller::default(),
        };
        let head = |raw: &[u8]| match crate::http::request::parse_head(
            raw,
            &crate::http::request::Limits::default(),
        ) {
            Ok(crate::http::request::Parsed::Complete { head, .. }) => head,
            _ => panic!("a complete head"),
        };
        let mut body = br#"{"user_id":"u1","message":"hi"}"#.to_vec();
        let send = head(
            format!(
                "POST /api/v1/notifications/send HTTP/1.1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        let r = futures_executor::block_on(handle(&ctx, &send, &mut body));
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let history = head(b"GET /api/v1/notifications/user/u1 HTTP/1.1\r\n\r\n");
        let r = futures_executor::block_on(handle(&ctx, &history, &mut []));
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("\"message\":\"hi\""));
        store.close();
        drop(store);
        threads.join();
    }
}
