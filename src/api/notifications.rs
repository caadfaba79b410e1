//! Handlers of the notification routes: send, batch, history, read, read-all, seen, delete.
//!
//! A send is answered only after the store thread committed it (API.md, "Durability"); live delivery
//! happens from the store thread right after the commit, so a 201 never reports something that could
//! still be lost, and a client never sees a notification the store does not have.
//!
//! Idempotency: a send, batch or schedule with an `Idempotency-Key` hands the store the key and a
//! SHA-256 fingerprint of route and body. The store thread records a receipt of what the request
//! committed (ids and times) in the same transaction as the write, and hands it back to a retry (even
//! one racing the first request on another shard), which stores nothing. The answer to a retry is
//! rendered from that receipt by the same function that rendered the first answer from the stored
//! notifications, so the two are the same bytes.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::store_unavailable;
use crate::api::ApiContext;
use crate::audit::Event;
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::json_input::parse_object;
use crate::model::{
    format_time, now_millis, parse_notification_ids, validate_user_id, write_json_str, FieldError,
    Millis, NewNotification, Notification, SendInput,
};
use crate::store::{
    Committed, HistoryQuery, IdempotencyKey, MarkedSeen, Receipt, Stamp, StoreError,
};

/// Most notifications in one batch (API.md).
pub const MAX_BATCH: usize = 1000;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// History page size when the client names none.
pub const DEFAULT_PAGE: usize = 50;
/// Largest history page.
pub const MAX_PAGE: usize = 500;

/// Parses a JSON body in place (simd-json, through `json_input`: nesting bounded by `max_depth`,
/// escapes checked, errors worded for people and naming the field).
pub(super) fn parse_body<T: DeserializeOwned>(
    body: &mut [u8],
    max_depth: usize,
) -> Result<T, Response> {
    parse_object(body, max_depth, "the body")
        .map_err(|e| Response::error(400, "invalid_json", &e.0))
}

pub(super) fn invalid_field(e: &FieldError) -> Response {
    let code = if e.field == "target" {
        "no_target"
    } else {
        "invalid_field"
    };
    Response::error(400, code, &e.message)
}

/// The `Idempotency-Key` of a request, with the fingerprint of its route and body. `Ok(None)` when
/// the request has no key; an error response when the key is unusable.
fn idempotency_key(head: &RequestHead, body: &[u8]) -> Result<Option<IdempotencyKey>, Response> {
    let Some(raw) = head.header("idempotency-key") else {
        return Ok(None);
    };
    let key = std::str::from_utf8(raw).map(str::trim).unwrap_or("");
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_BYTES
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Response::error(
            400,
            "invalid_field",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    // The route is part of the fingerprint: the same key and body sent to /send and to /schedule are
    // different requests.
    let mut hasher = Sha256::new();
    hasher.update(head.path().as_bytes());
    hasher.update([0]);
    hasher.update(body);
    Ok(Some(IdempotencyKey {
        key: key.to_owned(),
        fingerprint: hasher.finalize().into(),
    }))
}

/// The answer to a write that may have carried an `Idempotency-Key`: `fresh` renders a write done
/// now, `replayed` the receipt of the first request (both the same bytes for the same commit).
fn committed_answer<T>(
    result: Result<Committed<T>, StoreError>,
    fresh: impl FnOnce(&T) -> Response,
    replayed: impl FnOnce(&Receipt) -> Option<Response>,
) -> Response {
    match result {
        Ok(Committed::Fresh(written)) => fresh(&written),
        // A record of the version that stored HTTP answers: its answer, as it was.
        Ok(Committed::Replayed(Receipt::Answer { status, body })) => Response::json(status, body),
        Ok(Committed::Replayed(receipt)) => replayed(&receipt).unwrap_or_else(|| {
            // Only if a key's fingerprint matched across routes, which the route in it rules out.
            Response::error(
                500,
                "internal",
                "the idempotency record does not match this route",
            )
        }),
        Ok(Committed::KeyReused) => Response::error(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request in the last 24 hours",
        ),
        Err(e) => store_unavailable(e),
    }
}

/// The answer to a committed send: `201 {"id","timestamp"}`.
fn send_answer(stored: Option<Stamp>) -> Response {
    match stored {
        Some(n) => Response::json(
            201,
            format!(
                "{{\"id\":\"{}\",\"timestamp\":\"{}\"}}",
                n.id,
                format_time(n.created_at)
            )
            .into_bytes(),
        ),
        None => Response::json(
            500,
            br#"{"error":{"code":"internal","message":"nothing was stored"}}"#.to_vec(),
        ),
    }
}

/// The answer to a committed batch: `201 {"ids":[...]}`.
fn batch_answer(ids: impl ExactSizeIterator<Item = Uuid>) -> Response {
    let mut body = String::with_capacity(16 + ids.len() * 39);
    body.push_str("{\"ids\":[");
    for (i, id) in ids.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push('"');
        body.push_str(&id.to_string());
        body.push('"');
    }
    body.push_str("]}");
    Response::json(201, body.into_bytes())
}

/// The answer to a committed schedule: `201 {"id","user_id","scheduled_at","created_at"}`.
fn schedule_answer(stamp: Stamp, user_id: Option<&str>, scheduled_at: Millis) -> Response {
    let mut body = Vec::with_capacity(160);
    body.extend_from_slice(format!("{{\"id\":\"{}\",\"user_id\":", stamp.id).as_bytes());
    match user_id {
        Some(user) => write_json_str(&mut body, user),
        None => body.extend_from_slice(b"null"),
    }
    body.extend_from_slice(
        format!(
            ",\"scheduled_at\":\"{}\",\"created_at\":\"{}\"}}",
            format_time(scheduled_at),
            format_time(stamp.created_at)
        )
        .as_bytes(),
    );
    Response::json(201, body)
}

/// Which answer a stored list gets.
#[derive(Clone, Copy)]
enum InsertKind {
    /// A send: the first (only) notification's id and time.
    Send,
    /// A batch: every id.
    Batch,
}

impl InsertKind {
    /// The answer to the insert of notifications stamped `stamps`.
    fn answer(self, mut stamps: impl ExactSizeIterator<Item = Stamp>) -> Response {
        match self {
            InsertKind::Send => send_answer(stamps.next()),
            InsertKind::Batch => batch_answer(stamps.map(|s| s.id)),
        }
    }
}

/// Stores `list` (with its key, if any) and answers as `kind` says.
async fn store_and_answer(
    ctx: &ApiContext<'_>,
    head: &RequestHead,
    list: Vec<NewNotification>,
    key: Option<IdempotencyKey>,
    kind: InsertKind,
) -> Response {
    let result = match key {
        Some(key) => ctx.store.insert_idempotent(list, key).await,
        None => ctx.store.insert(list).await.map(Committed::Fresh),
    };
    match &result {
        Ok(Committed::Fresh(stored)) => {
            ctx.stats().notifications_stored(stored.len());
            ctx.record(head, |by| Event::Accepted {
                ids: stored.iter().map(|n| n.id).collect(),
                replayed: false,
                by,
            });
        }
        Ok(Committed::Replayed(Receipt::Inserted(stamps))) => {
            ctx.record(head, |by| Event::Accepted {
                ids: stamps.iter().map(|s| s.id).collect(),
                replayed: true,
                by,
            });
        }
        _ => {}
    }
    committed_answer(
        result,
        |stored| kind.answer(stored.iter().map(|n| Stamp::of(n))),
        |receipt| match receipt {
            Receipt::Inserted(stamps) => Some(kind.answer(stamps.iter().copied())),
            _ => None,
        },
    )
}

/// `POST /api/v1/notifications/send` (and `POST /notifications`).
pub async fn send(ctx: &ApiContext<'_>, head: &RequestHead, body: &mut [u8]) -> Response {
    let key = match idempotency_key(head, body) {
        Ok(key) => key,
        Err(r) => return r,
    };
    let input: SendInput = match parse_body(body, ctx.config.max_json_depth) {
        Ok(input) => input,
        Err(r) => return r,
    };
    let notification = match input.validate() {
        Ok(n) => n,
        Err(e) => return invalid_field(&e),
    };
    store_and_answer(ctx, head, vec![notification], key, InsertKind::Send).await
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
pub async fn batch(ctx: &ApiContext<'_>, head: &RequestHead, body: &mut [u8]) -> Response {
    let key = match idempotency_key(head, body) {
        Ok(key) => key,
        Err(r) => return r,
    };
    let input: BatchInput = match parse_body(body, ctx.config.max_json_depth) {
        Ok(input) => input,
        Err(r) => return r,
    };
    let list = match validate_batch(input) {
        Ok(list) => list,
        Err(e) => return Response::error(400, "invalid_field", &e.message),
    };
    store_and_answer(ctx, head, list, key, InsertKind::Batch).await
}

/// `POST /api/v1/notifications/schedule`.
pub async fn schedule(ctx: &ApiContext<'_>, head: &RequestHead, body: &mut [u8]) -> Response {
    let key = match idempotency_key(head, body) {
        Ok(key) => key,
        Err(r) => return r,
    };
    let input: SendInput = match parse_body(body, ctx.config.max_json_depth) {
        Ok(input) => input,
        Err(r) => return r,
    };
    let notification = match input.validate_scheduled(now_millis()) {
        Ok(n) => n,
        Err(e) => return invalid_field(&e),
    };
    let result = ctx.store.schedule(notification, key).await;
    match &result {
        Ok(Committed::Fresh(n)) => ctx.record(head, |by| Event::Scheduled {
            id: n.id,
            user_id: n.user_id.clone(),
            scheduled_at: n.scheduled_at.unwrap_or(n.created_at),
            replayed: false,
            by,
        }),
        Ok(Committed::Replayed(Receipt::Scheduled {
            stamp,
            scheduled_at,
            user_id,
        })) => ctx.record(head, |by| Event::Scheduled {
            id: stamp.id,
            user_id: user_id.clone(),
            scheduled_at: *scheduled_at,
            replayed: true,
            by,
        }),
        _ => {}
    }
    committed_answer(
        result,
        |n| {
            let scheduled_at = n.scheduled_at.unwrap_or(n.created_at);
            schedule_answer(Stamp::of(n), n.user_id.as_deref(), scheduled_at)
        },
        |receipt| match receipt {
            Receipt::Scheduled {
                stamp,
                scheduled_at,
                user_id,
            } => Some(schedule_answer(*stamp, user_id.as_deref(), *scheduled_at)),
            _ => None,
        },
    )
}

/// Parses the `:id` of a scheduled notification.
fn schedule_id(raw: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(raw).map_err(|_| {
        Response::error(
            400,
            "invalid_field",
            "id must be a scheduled notification id (UUID)",
        )
    })
}

fn scheduled_not_found() -> Response {
    Response::error(
        404,
        "not_found",
        "no scheduled notification with this id (unknown, cancelled, or fired and since deleted)",
    )
}

/// The answer for a pending schedule: its notification object (whose `id` is the schedule's) with
/// `"state":"pending"` added at the end.
fn pending_answer(n: &Notification) -> Vec<u8> {
    let mut body = n.to_json();
    body.pop(); // the object's closing brace
    body.extend_from_slice(b",\"state\":\"pending\"}");
    body
}

/// The answer for a schedule that fired as `n`: `{"id","state":"fired","notification_id","user_id",
/// "scheduled_at","fired_at"}`. The notification itself is in history under `notification_id`.
fn fired_answer(schedule: Uuid, n: &Notification) -> Vec<u8> {
    let mut body = Vec::with_capacity(200);
    body.extend_from_slice(
        format!(
            "{{\"id\":\"{schedule}\",\"state\":\"fired\",\"notification_id\":\"{}\",\"user_id\":",
            n.id
        )
        .as_bytes(),
    );
    match &n.user_id {
        Some(user) => write_json_str(&mut body, user),
        None => body.extend_from_slice(b"null"),
    }
    body.extend_from_slice(
        format!(
            ",\"scheduled_at\":\"{}\",\"fired_at\":\"{}\"}}",
            format_time(n.scheduled_at.unwrap_or(n.created_at)),
            format_time(n.created_at)
        )
        .as_bytes(),
    );
    body
}

/// `GET /api/v1/notifications/scheduled/:id`: the pending schedule, or where it went once fired.
pub async fn get_scheduled(ctx: &ApiContext<'_>, id: &str) -> Response {
    let id = match schedule_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match ctx.store.scheduled(id).await {
        Ok(Some(n)) if n.schedule_id == Some(id) => Response::json(200, fired_answer(id, &n)),
        Ok(Some(n)) => Response::json(200, pending_answer(&n)),
        Ok(None) => scheduled_not_found(),
        Err(e) => store_unavailable(e),
    }
}

/// `DELETE /api/v1/notifications/scheduled/:id`.
pub async fn cancel_scheduled(ctx: &ApiContext<'_>, head: &RequestHead, id: &str) -> Response {
    let id = match schedule_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match ctx.store.cancel_scheduled(id).await {
        Ok(true) => {
            ctx.record(head, |by| Event::Cancelled { id, by });
            Response::empty(204)
        }
        Ok(false) => Response::error(
            404,
            "not_found",
            "no pending scheduled notification with this id (unknown, cancelled, or already fired)",
        ),
        Err(e) => store_unavailable(e),
    }
}

/// Reads `limit`, `before` and the filters `unread`, `undelivered` and `unseen` from a history query
/// string.
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
    Ok(HistoryQuery {
        user_id,
        limit,
        before,
        unread_only: flag(query, "unread")?,
        undelivered_only: flag(query, "undelivered")?,
        unseen_only: flag(query, "unseen")?,
    })
}

/// A history filter: `true` or `1` on, `false`, `0`, empty or absent off.
fn flag(query: &str, name: &str) -> Result<bool, FieldError> {
    match query_param(query, name).as_deref() {
        None | Some("false") | Some("0") | Some("") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(_) => Err(FieldError::new(name, "must be true or false")),
    }
}

/// `GET /api/v1/notifications/user/:user_id`.
pub async fn history(ctx: &ApiContext<'_>, user_id: String, query: &str) -> Response {
    let q = match history_query(user_id, query) {
        Ok(q) => q,
        Err(e) => return invalid_field(&e),
    };
    let user_id = q.user_id.clone();
    match ctx.store.history(q).await {
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
pub async fn history_by_query(ctx: &ApiContext<'_>, query: &str) -> Response {
    match query_param(query, "user_id") {
        Some(user) => history(ctx, user.into_owned(), query).await,
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
pub async fn read(ctx: &ApiContext<'_>, head: &RequestHead, user_id: String, id: &str) -> Response {
    let id = match notification_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match ctx.store.mark_read(user_id, id).await {
        Ok(Some(n)) => {
            ctx.record(head, |by| Event::Read {
                id,
                user_id: n.user_id.clone().unwrap_or_default(),
                by,
            });
            Response::json(200, n.to_json())
        }
        Ok(None) => not_found(),
        Err(e) => store_unavailable(e),
    }
}

/// `PUT /api/v1/notifications/:user_id/read-all`.
pub async fn read_all(ctx: &ApiContext<'_>, head: &RequestHead, user_id: String) -> Response {
    // Kept for the audit line only when the log is on (the store takes the string).
    let audited_user = ctx.audit.is_on().then(|| user_id.clone());
    match ctx.store.mark_all_read(user_id).await {
        Ok(n) => {
            if let Some(user_id) = audited_user {
                ctx.record(head, |by| Event::ReadAll {
                    user_id,
                    updated: n,
                    by,
                });
            }
            Response::json(200, format!("{{\"updated\":{n}}}").into_bytes())
        }
        Err(e) => store_unavailable(e),
    }
}

/// The body of `PUT …/:user_id/seen`.
#[derive(Debug, Deserialize)]
struct SeenInput {
    /// The notification ids to mark seen.
    ids: Option<Vec<String>>,
}

/// `PUT /api/v1/notifications/:user_id/seen` with `{"ids":[...]}`: `200 {"updated":N}`, N = how many
/// of them were unseen; `404` naming the first id not in the user's inbox, and then nothing is marked.
pub async fn seen(ctx: &ApiContext<'_>, user_id: String, body: &mut [u8]) -> Response {
    if let Err(e) = validate_user_id(&user_id) {
        return invalid_field(&e);
    }
    let input: SeenInput = match parse_body(body, ctx.config.max_json_depth) {
        Ok(input) => input,
        Err(r) => return r,
    };
    let Some(raw) = input.ids else {
        return invalid_field(&FieldError::new("ids", "is required"));
    };
    let ids = match parse_notification_ids("ids", &raw, ctx.config.max_seen_ids) {
        Ok(ids) => ids,
        Err(e) => return invalid_field(&e),
    };
    match ctx.store.mark_seen(user_id, ids).await {
        Ok(MarkedSeen::Updated(n)) => {
            Response::json(200, format!("{{\"updated\":{n}}}").into_bytes())
        }
        Ok(MarkedSeen::NotInInbox(id)) => Response::error(
            404,
            "not_found",
            &format!("{id} is not a notification of this user; nothing was marked seen"),
        ),
        Err(e) => store_unavailable(e),
    }
}

/// `DELETE /api/v1/notifications/:user_id/:notification_id`.
pub async fn delete(
    ctx: &ApiContext<'_>,
    head: &RequestHead,
    user_id: String,
    id: &str,
) -> Response {
    let id = match notification_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let audited_user = ctx.audit.is_on().then(|| user_id.clone());
    match ctx.store.delete(user_id, id).await {
        Ok(true) => {
            if let Some(user_id) = audited_user {
                ctx.record(head, |by| Event::Deleted { id, user_id, by });
            }
            Response::empty(204)
        }
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
