//! The HTTP API of API.md: the route table and one handler per route.
//!
//! Routing matches the method and the path's segments together, so two routes may share a shape with
//! different methods (`GET …/user/:id` and `DELETE …/:user_id/:notification_id`). A path that matches
//! some route under another method gets 405 with `Allow`; one that matches none gets 404. Path segments
//! are percent-decoded, so a user id may hold any character.
//!
//! Handlers get the parsed head and the body bytes (mutable: simd-json parses in place) and return a
//! [`Response`]; they never see the socket.

mod notifications;
mod status;

use crate::http::query::decode_path_segment;
use crate::http::request::{Method, RequestHead};
use crate::http::response::Response;
use crate::shard::Shard;
use crate::store::StoreError;

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
    Delete(String, String),
    Health,
    Metrics,
    /// `GET /ws` without a proper upgrade reaches the session's handshake check instead; other methods
    /// on `/ws` get 405 from here.
    WebSocket,
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
        (Get, ["api", "v1", "notifications", "user", user]) => Endpoint::History(user.to_string()),
        (Put, ["api", "v1", "notifications", user, "read-all"]) => {
            Endpoint::ReadAll(user.to_string())
        }
        (Put, ["api", "v1", "notifications", user, id, "read"]) => {
            Endpoint::Read(user.to_string(), id.to_string())
        }
        (Delete, ["api", "v1", "notifications", user, id]) => {
            Endpoint::Delete(user.to_string(), id.to_string())
        }
        (Post, ["notifications"]) => Endpoint::Send,
        (Get, ["notifications"]) => Endpoint::HistoryByQuery,
        (Get, ["health"]) => Endpoint::Health,
        (Get, ["metrics"]) => Endpoint::Metrics,
        (Get, ["ws"]) => Endpoint::WebSocket,
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

/// Answers one request.
pub async fn handle(shard: &Shard, head: &RequestHead, body: &mut [u8]) -> Response {
    let Some(segments) = path_segments(head.path()) else {
        return Response::error(
            400,
            "bad_request",
            "the path is not valid UTF-8 once decoded",
        );
    };
    let Some(endpoint) = resolve(head.method, &segments) else {
        return not_routed(head.method, &segments);
    };
    let json_body = matches!(
        endpoint,
        Endpoint::Send | Endpoint::Batch | Endpoint::Schedule
    );
    if json_body {
        if head.header("content-type").is_some() && !head.content_type_is_json() {
            return Response::error(
                415,
                "unsupported_media_type",
                "the body must be application/json",
            );
        }
        let limit = if endpoint == Endpoint::Batch {
            shard.config.max_batch_body
        } else {
            shard.config.max_body
        };
        if body.len() > limit {
            return Response::error(
                413,
                "body_too_large",
                &format!("the body is larger than the limit of {limit} bytes"),
            );
        }
    }
    match endpoint {
        Endpoint::Send => notifications::send(shard, head, body).await,
        Endpoint::Batch => notifications::batch(shard, head, body).await,
        Endpoint::Schedule => notifications::schedule(shard, head, body).await,
        Endpoint::GetScheduled(id) => notifications::get_scheduled(shard, &id).await,
        Endpoint::CancelScheduled(id) => notifications::cancel_scheduled(shard, &id).await,
        Endpoint::History(user) => notifications::history(shard, user, head.query()).await,
        Endpoint::HistoryByQuery => notifications::history_by_query(shard, head.query()).await,
        Endpoint::Read(user, id) => notifications::read(shard, user, &id).await,
        Endpoint::ReadAll(user) => notifications::read_all(shard, user).await,
        Endpoint::Delete(user, id) => notifications::delete(shard, user, &id).await,
        Endpoint::Health => status::health(shard).await,
        Endpoint::Metrics => status::metrics(shard),
        Endpoint::WebSocket => {
            Response::error(400, "bad_handshake", "expected a WebSocket upgrade")
        }
    }
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
}
