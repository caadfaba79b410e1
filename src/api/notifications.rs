//! Handlers of the notification routes: send, batch, history, read, read-all, delete.
//!
//! A send is answered only after the store thread committed it (API.md, "Durability"); live delivery
//! happens from the store thread right after the commit, so a 201 never reports something that could
//! still be lost, and a client never sees a notification the store does not have.

use serde::Deserialize;
use uuid::Uuid;

use super::store_unavailable;
use crate::http::query::query_param;
use crate::http::response::Response;
use crate::model::{format_time, validate_user_id, FieldError, NewNotification, SendInput};
use crate::shard::Shard;
use crate::store::HistoryQuery;

/// Most notifications in one batch (API.md).
pub const MAX_BATCH: usize = 1000;
/// History page size when the client names none.
pub const DEFAULT_PAGE: usize = 50;
/// Largest history page.
pub const MAX_PAGE: usize = 500;

fn invalid_json(e: impl std::fmt::Display) -> Response {
    Response::error(
        400,
        "invalid_json",
        &format!("the body is not valid JSON: {e}"),
    )
}

fn invalid_field(e: &FieldError) -> Response {
    let code = if e.field == "target" {
        "no_target"
    } else {
        "invalid_field"
    };
    Response::error(400, code, &e.message)
}

/// `POST /api/v1/notifications/send` (and `POST /notifications`).
pub async fn send(shard: &Shard, body: &mut [u8]) -> Response {
    let input: SendInput = match simd_json::serde::from_slice(body) {
        Ok(input) => input,
        Err(e) => return invalid_json(e),
    };
    let notification = match input.validate() {
        Ok(n) => n,
        Err(e) => return invalid_field(&e),
    };
    match shard.store.insert(vec![notification]).await {
        Ok(stored) => {
            shard.stats().notifications_stored(stored.len());
            let Some(n) = stored.first() else {
                return Response::error(500, "internal", "the store returned no notification");
            };
            let body = format!(
                "{{\"id\":\"{}\",\"timestamp\":\"{}\"}}",
                n.id,
                format_time(n.created_at)
            );
            Response::json(201, body.into_bytes())
        }
        Err(e) => store_unavailable(e),
    }
}

/// The body of a batch.
#[derive(Debug, Deserialize)]
struct BatchInput {
    notifications: Option<Vec<SendInput>>,
}

/// Validates every element of a batch, naming the first bad one (`notifications[3].message`).
fn validate_batch(input: BatchInput) -> Result<Vec<NewNotification>, FieldError> {
    let list = input
        .notifications
        .ok_or_else(|| FieldError::new("notifications", "is required"))?;
    if list.is_empty() {
        return Err(FieldError::new("notifications", "must not be empty"));
    }
    if list.len() > MAX_BATCH {
        return Err(FieldError::new(
            "notifications",
            &format!("must hold at most {MAX_BATCH} notifications"),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, n)| {
            n.validate().map_err(|e| {
                let field = format!("notifications[{i}].{}", e.field);
                FieldError {
                    message: e.message.replacen(&e.field, &field, 1),
                    field,
                }
            })
        })
        .collect()
}

/// `POST /api/v1/notifications/batch`: all or nothing.
pub async fn batch(shard: &Shard, body: &mut [u8]) -> Response {
    let input: BatchInput = match simd_json::serde::from_slice(body) {
        Ok(input) => input,
        Err(e) => return invalid_json(e),
    };
    let list = match validate_batch(input) {
        Ok(list) => list,
        Err(e) => return Response::error(400, "invalid_field", &e.message),
    };
    match shard.store.insert(list).await {
        Ok(stored) => {
            shard.stats().notifications_stored(stored.len());
            let mut body = String::with_capacity(16 + stored.len() * 39);
            body.push_str("{\"ids\":[");
            for (i, n) in stored.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push('"');
                body.push_str(&n.id.to_string());
                body.push('"');
            }
            body.push_str("]}");
            Response::json(201, body.into_bytes())
        }
        Err(e) => store_unavailable(e),
    }
}

/// Reads `limit`, `before` and `unread` from a history query string.
fn history_query(user_id: String, query: &str) -> Result<HistoryQuery, FieldError> {
    validate_user_id(&user_id)?;
    let limit = match query_param(query, "limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_PAGE),
            _ => {
                return Err(FieldError::new(
                    "limit",
                    "must be a whole number from 1 to 500",
                ))
            }
        },
    };
    let before = match query_param(query, "before") {
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) => Some(
            Uuid::parse_str(&v)
                .map_err(|_| FieldError::new("before", "must be a notification id"))?,
        ),
    };
    let unread_only = match query_param(query, "unread").as_deref() {
        None | Some("false") | Some("0") | Some("") => false,
        Some("true") | Some("1") => true,
        Some(_) => return Err(FieldError::new("unread", "must be true or false")),
    };
    Ok(HistoryQuery {
        user_id,
        limit,
        before,
        unread_only,
    })
}

/// `GET /api/v1/notifications/user/:user_id`.
pub async fn history(shard: &Shard, user_id: String, query: &str) -> Response {
    let q = match history_query(user_id, query) {
        Ok(q) => q,
        Err(e) => return invalid_field(&e),
    };
    let user_id = q.user_id.clone();
    match shard.store.history(q).await {
        Ok(page) => {
            let mut body = Vec::with_capacity(128 + page.notifications.len() * 400);
            body.extend_from_slice(b"{\"user_id\":");
            crate::model::write_json_str(&mut body, &user_id);
            body.extend_from_slice(b",\"notifications\":[");
            for (i, n) in page.notifications.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                n.write_json(&mut body, None);
            }
            body.extend_from_slice(
                format!(
                    "],\"total\":{},\"unread\":{},\"next_before\":",
                    page.total, page.unread
                )
                .as_bytes(),
            );
            match page.next_before {
                Some(id) => body.extend_from_slice(format!("\"{id}\"}}").as_bytes()),
                None => body.extend_from_slice(b"null}"),
            }
            Response::json(200, body)
        }
        Err(e) => store_unavailable(e),
    }
}

/// `GET /notifications?user_id=…`: the seeds' alias of history.
pub async fn history_by_query(shard: &Shard, query: &str) -> Response {
    match query_param(query, "user_id") {
        Some(user) => history(shard, user.into_owned(), query).await,
        None => invalid_field(&FieldError::new("user_id", "is required")),
    }
}

/// Parses the `:notification_id` path segment.
fn notification_id(raw: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(raw).map_err(|_| {
        Response::error(
            400,
            "invalid_field",
            "notification_id must be a notification id (UUID)",
        )
    })
}

fn not_found() -> Response {
    Response::error(404, "not_found", "no such notification for this user")
}

/// `PUT /api/v1/notifications/:user_id/:notification_id/read`.
pub async fn read(shard: &Shard, user_id: String, id: &str) -> Response {
    let id = match notification_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match shard.store.mark_read(user_id, id).await {
        Ok(Some(n)) => Response::json(200, n.to_json()),
        Ok(None) => not_found(),
        Err(e) => store_unavailable(e),
    }
}

/// `PUT /api/v1/notifications/:user_id/read-all`.
pub async fn read_all(shard: &Shard, user_id: String) -> Response {
    match shard.store.mark_all_read(user_id).await {
        Ok(n) => Response::json(200, format!("{{\"updated\":{n}}}").into_bytes()),
        Err(e) => store_unavailable(e),
    }
}

/// `DELETE /api/v1/notifications/:user_id/:notification_id`.
pub async fn delete(shard: &Shard, user_id: String, id: &str) -> Response {
    let id = match notification_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match shard.store.delete(user_id, id).await {
        Ok(true) => Response::empty(204),
        Ok(false) => not_found(),
        Err(e) => store_unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_name_the_element_and_field() {
        let input: BatchInput = serde_json::from_str(
            r#"{"notifications":[{"message":"a","user_id":"u"},{"user_id":"u"}]}"#,
        )
        .unwrap();
        let e = validate_batch(input).unwrap_err();
        assert_eq!(e.field, "notifications[1].message");
        assert!(
            e.message.starts_with("notifications[1].message"),
            "{}",
            e.message
        );
        let too_many = BatchInput {
            notifications: Some((0..1001).map(|_| SendInput::default()).collect()),
        };
        assert_eq!(validate_batch(too_many).unwrap_err().field, "notifications");
    }

    #[test]
    fn history_query_defaults_clamps_and_rejects() {
        let q = history_query("u".into(), "").unwrap();
        assert_eq!(
            (q.limit, q.before, q.unread_only),
            (DEFAULT_PAGE, None, false)
        );
        let q = history_query("u".into(), "limit=9999&unread=true").unwrap();
        assert_eq!((q.limit, q.unread_only), (MAX_PAGE, true));
        assert_eq!(
            history_query("u".into(), "limit=0").unwrap_err().field,
            "limit"
        );
        assert_eq!(
            history_query("u".into(), "before=xyz").unwrap_err().field,
            "before"
        );
        assert_eq!(
            history_query("u".into(), "unread=maybe").unwrap_err().field,
            "unread"
        );
    }
}
