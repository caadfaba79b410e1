//! A long-poll (the connection kind `ConnKind::LongPoll`, `GET /api/v1/notifications/poll`): answers at
//! once with the stored notifications newer than `since`; when there are none, parks the request in
//! the hub until a stored delivery reaches it or `timeout_s` passes, then answers from the store.
//!
//! The answer always comes from the store, never from the delivery that woke the request: the store
//! holds everything committed in id order, so a notification committed while the request queried or
//! parked is in the next query, and nothing is sent twice (the client passes the answer's `last_id` as
//! its next `since`). A parked request holds no thread and no timer of its own: it is a hub entry whose
//! deadline is in the shard's timeout queue, woken by the delivery path (`Shard::deliver_batched`
//! records the delivery in its `LiveMark`). The response closes the connection: the hub entry is the
//! poll's, and a client polls again on a new connection (or the same pool slot, reconnected).

use std::rc::Rc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::connection::live::{bad_request, via_channel};
use crate::connection::respond_and_close;
use crate::connection::sse::open_request;
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::metrics::Route;
use crate::model::{now_millis, Notification};
use crate::shard::hub::{ConnKind, LiveMark};
use crate::shard::socket::{Connection, Signals, Wake};
use crate::store::ReplayQuery;

/// `timeout_s` when the request names none (bounded by `MAX_POLL_TIMEOUT_S`).
const DEFAULT_TIMEOUT_S: u64 = 30;

/// Reads `timeout_s`: whole seconds from 0 to `MAX_POLL_TIMEOUT_S`.
fn timeout_param(head: &RequestHead, max: u64) -> Result<Duration, Response> {
    let seconds = match query_param(head.query(), "timeout_s") {
        None => DEFAULT_TIMEOUT_S.min(max),
        Some(s) => s.parse::<u64>().ok().filter(|&t| t <= max).ok_or_else(|| {
            bad_request(
                "invalid_field",
                &format!("timeout_s must be a whole number of seconds from 0 to {max}"),
            )
        })?,
    };
    Ok(Duration::from_secs(seconds))
}

/// Answers one long-poll request, then closes the connection.
pub(crate) async fn run(mut conn: Connection, head: RequestHead) {
    let shard = conn.shard.clone();
    let timeout = match timeout_param(&head, shard.config.max_poll_timeout_s) {
        Ok(timeout) => timeout,
        Err(response) => {
            shard.stats().http_response(Route::Poll, response.status);
            respond_and_close(&mut conn, response).await;
            return;
        }
    };
    let opened = match open_request(&conn, &head, Route::Poll) {
        Ok(opened) => opened,
        Err(response) => {
            respond_and_close(&mut conn, response).await;
            return;
        }
    };
    let params = opened.params;
    // A poll cannot tell the client which channels it was refused: it refuses the request instead.
    let denied: Vec<&str> = match &opened.grant {
        Some(grant) => params
            .channels
            .iter()
            .filter(|c| !grant.allows(c))
            .map(String::as_str)
            .collect(),
        None => Vec::new(),
    };
    let max_channels = shard.config.max_channels_per_connection;
    let refusal = if !denied.is_empty() {
        Some(crate::auth::forbidden(&format!(
            "the token does not allow the channels {}",
            denied.join(",")
        )))
    } else if params.channels.len() > max_channels {
        Some(bad_request(
            "too_many_channels",
            &format!("a connection may subscribe to at most {max_channels} channels"),
        ))
    } else {
        None
    };
    if let Some(response) = refusal {
        shard.auth.connections.release_user(&params.user_id);
        shard.stats().http_response(Route::Poll, response.status);
        respond_and_close(&mut conn, response).await;
        return;
    }
    let user = {
        let mut hub = shard.hub.borrow_mut();
        hub.upgrade(conn.id, &params.user_id, ConnKind::LongPoll);
        for c in &params.channels {
            let _ = hub.subscribe(conn.id, c, max_channels);
        }
        hub.user_of(conn.id)
            .cloned()
            .expect("an upgraded connection has a user")
    };
    let mut poll = Poll {
        conn,
        user,
        channels: params.channels,
        since: params.since,
    };
    let response = Box::pin(poll.answer(timeout)).await;
    if let Some(response) = response {
        shard.stats().http_response(Route::Poll, response.status);
        respond_and_close(&mut poll.conn, response).await;
    } else {
        poll.conn.close();
    }
}

/// A long-poll request, registered in the hub until it answers.
struct Poll {
    conn: Connection,
    /// The request's user.
    user: Rc<str>,
    /// The channels the request listens to besides the user's inbox and broadcasts.
    channels: Vec<String>,
    /// The last id the client saw; `None`: only what arrives from now on.
    since: Option<Uuid>,
}

impl Drop for Poll {
    fn drop(&mut self) {
        // The user's slot taken in `open_request`.
        self.conn.shard.auth.connections.release_user(&self.user);
    }
}

impl Poll {
    /// The answer: what the store holds after `since` as soon as there is any, else an empty list
    /// at the timeout or at shutdown. `None` when the client went away.
    async fn answer(&mut self, timeout: Duration) -> Option<Response> {
        let shard = self.conn.shard.clone();
        let deadline = Instant::now() + timeout;
        let signals = Signals {
            outbox: false,
            shutdown: false,
        };
        // Its store reads come after its node listens to its topics (see `live::until_subscribed`).
        super::live::until_subscribed(&shard).await;
        // Without `since`, the first stored delivery that reaches the request marks where to start.
        let mut first_live: Option<Uuid> = None;
        loop {
            // From here on, a delivery marks the request again (and ends its next wait at once).
            let mark = std::mem::take(&mut shard.hub.borrow_mut().conn_mut(self.conn.id).live_mark);
            if let (LiveMark::FirstLive(id), None) = (mark, first_live) {
                first_live = Some(id);
            }
            // Exclusive, so the first live notification itself is included.
            let from = self
                .since
                .or_else(|| first_live.map(|id| Uuid::from_u128(id.as_u128() - 1)));
            if let Some(from) = from {
                let limit = shard.config.max_replay;
                let query = ReplayQuery {
                    user_id: Some(self.user.to_string()),
                    channels: self.channels.clone(),
                    since: from,
                    limit: limit + 1,
                };
                match shard.store.replay(query).await {
                    Err(e) => {
                        return Some(Response::error(503, "store_unavailable", &e.to_string()))
                    }
                    Ok(list) if !list.is_empty() => return Some(self.found(&list, limit)),
                    Ok(_) => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Some(self.found(&[], 0));
            }
            match self.conn.read_or_signal(signals, Some(left)).await {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Some(self.found(&[], 0))
                }
                Err(_) | Ok(Wake::Eof) => return None,
                // Nothing is expected after the request: dropped, not kept.
                Ok(Wake::Data) => self.conn.inbuf = Vec::new(),
                Ok(Wake::Signal) => {
                    let hub = shard.hub.borrow();
                    if hub.conn(self.conn.id).close_code.is_some() {
                        // Shutdown or token expiry: answer what there is (nothing) now.
                        return Some(self.found(&[], 0));
                    }
                }
            }
        }
    }

    /// `200 {"notifications":[…],"last_id","more"}` with at most `limit` of `list`: each notification
    /// as a WebSocket gets it, `last_id` the id to pass as the next `since` (the request's own `since`
    /// when the list is empty), `more` whether the store holds more after it.
    fn found(&self, list: &[std::sync::Arc<Notification>], limit: usize) -> Response {
        let shown = &list[..list.len().min(limit)];
        // An answer is a delivery: the receipts of what it hands the user from their own inbox.
        let mut receipts = self.conn.shard.receipts.borrow_mut();
        let now = now_millis();
        for n in shown
            .iter()
            .filter(|n| n.user_id.as_deref() == Some(&*self.user))
        {
            receipts.delivered_at(n.id, now);
        }
        drop(receipts);
        let mut body = Vec::with_capacity(64 + shown.len() * 400);
        body.extend_from_slice(b"{\"notifications\":[");
        for (i, n) in shown.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            n.write_json(&mut body, via_channel(n, &self.user, &self.channels));
        }
        body.extend_from_slice(b"],\"last_id\":");
        match shown.last().map(|n| n.id).or(self.since) {
            Some(id) => {
                body.push(b'"');
                body.extend_from_slice(
                    id.hyphenated()
                        .encode_lower(&mut Uuid::encode_buffer())
                        .as_bytes(),
                );
                body.push(b'"');
            }
            None => body.extend_from_slice(b"null"),
        }
        body.extend_from_slice(b",\"more\":");
        body.extend_from_slice(if list.len() > shown.len() {
            b"true"
        } else {
            b"false"
        });
        body.push(b'}');
        Response::json(200, body)
    }
}
