//! What every connection kind that receives deliveries does the same way, whatever its wire: reading
//! `user_id`, `channels` and `since` from the opening request, joining
//! channels under a token's grant, watching the token's expiry, and resume (the replay from the store
//! with live deliveries held back, docs/architecture.md "Resume exactness"). Each kind says how its
//! bytes look with a [`Wire`]; the native WebSocket session and the SSE stream share the rest.

use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use crate::auth::forbidden;
use crate::auth::jwt::ChannelGrant;
use crate::delivery::frame::text_frame;
use crate::delivery::inbox::ConnId;
use crate::delivery::{sse, unread_frame};
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::model::{now_millis, validate_channel_list, validate_user_id, Notification};
use crate::presence::is_presence_channel;
use crate::shard::hub::{Hub, LiveMark, SubscribeError};
use crate::shard::outbound::{end_resume, send_frame, Sent};
use crate::shard::Shard;
use crate::store::ReplayQuery;
use crate::ws::protocol;

/// What a client asked for in the upgrade request's query string.
pub(crate) struct ConnectParams {
    /// The user: the token's `sub`, or the `user_id` parameter.
    pub user_id: String,
    /// `channels=`, split and validated.
    pub channels: Vec<String>,
    /// `since=`: the last id the client saw.
    pub since: Option<Uuid>,
}

/// `400` with `code`: what the session's opening request got wrong.
pub(crate) fn bad_request(code: &str, message: &str) -> Response {
    Response::error(400, code, message)
}

/// Reads `user_id`, `channels` and `since` from the opening request (a WebSocket upgrade, an SSE
/// stream, a poll). With a token, the user is the
/// token's `sub`, and a `user_id` parameter, if any, must name the same user (403 otherwise).
pub(crate) fn connect_params(
    head: &RequestHead,
    token_user: Option<&str>,
) -> Result<ConnectParams, Response> {
    let query = head.query();
    let user_id = match (token_user, query_param(query, "user_id")) {
        (Some(sub), Some(asked)) if asked != sub => {
            return Err(forbidden("user_id does not match the token's sub"))
        }
        (Some(sub), _) => sub.to_owned(),
        (None, Some(u)) => u.into_owned(),
        (None, None) => return Err(bad_request("invalid_field", "user_id is required")),
    };
    validate_user_id(&user_id).map_err(|e| bad_request("invalid_field", &e.message))?;
    let channels: Vec<String> = query_param(query, "channels")
        .map(|c| {
            c.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    validate_channel_list("channels", &channels)
        .map_err(|e| bad_request("invalid_field", &e.message))?;
    let since =
        match query_param(query, "since") {
            Some(s) => Some(Uuid::parse_str(&s).map_err(|_| {
                bad_request("invalid_field", "since must be a notification id (UUID)")
            })?),
            None => None,
        };
    Ok(ConnectParams {
        user_id,
        channels,
        since,
    })
}

/// How a connection kind writes what this module sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// Native WebSocket text frames.
    Native,
    /// Server-Sent Events (`delivery::sse`).
    Sse,
}

impl Wire {
    /// A control event, given as the native frame `ws::protocol` makes, in this wire.
    pub(crate) fn control(self, native: Bytes) -> Bytes {
        match self {
            Wire::Native => native,
            Wire::Sse => sse::control_of_frame(&native),
        }
    }

    /// A replayed notification as this connection gets it: the same choice of frame as live delivery
    /// (`Hub::for_each_target`): plain when it targets the user, else with `"channel"` when it reached
    /// the connection through a subscribed channel, else plain (a broadcast).
    pub(crate) fn replayed(self, n: &Notification, user: &str, subscribed: &[String]) -> Bytes {
        let via = via_channel(n, user, subscribed);
        let hint = 320 + n.message.len() + n.data.len();
        match self {
            Wire::Native => text_frame(hint, |out| n.write_json(out, via)),
            Wire::Sse => sse::notification(n.id, hint, |out| n.write_json(out, via)),
        }
    }
}

/// The channel a stored notification reached a connection of `user` subscribed to `subscribed`
/// through, as live delivery decides it; `None` when it reached it through the user or a broadcast.
pub(crate) fn via_channel<'a>(
    n: &'a Notification,
    user: &str,
    subscribed: &[String],
) -> Option<&'a str> {
    if n.user_id.as_deref() == Some(user) {
        return None;
    }
    n.channels
        .iter()
        .find(|c| subscribed.contains(c))
        .map(String::as_str)
}

/// Records a connection's token expiry in the hub and the shard's expiry queue.
pub(crate) fn watch_expiry(shard: &Shard, hub: &mut Hub, id: ConnId, expires_at: u64) {
    hub.conn_mut(id).token_expires_at = expires_at;
    shard.expiries.borrow_mut().push(expires_at, id);
}

/// Subscribes connection `id` to the channels its token's `grant` allows (all without a token), and
/// returns the native control events to send, in API.md's order: `error` `forbidden` naming the
/// channels the grant refuses, `subscribed` with the ones joined, `error` `too_many_channels` if the
/// connection's cap cut the list; and the presence channels among them that the connection was not on
/// before (for the caller to join, once the events are sent).
pub(crate) fn subscribe(
    shard: &Shard,
    id: ConnId,
    grant: Option<&ChannelGrant>,
    mut channels: Vec<String>,
) -> (Vec<Bytes>, Vec<String>) {
    let mut events = Vec::new();
    if let Some(grant) = grant {
        let denied: Vec<String> = channels
            .iter()
            .filter(|c| !grant.allows(c))
            .cloned()
            .collect();
        if !denied.is_empty() {
            channels.retain(|c| grant.allows(c));
            events.push(protocol::error_event(
                "forbidden",
                &format!("the token does not allow the channels {}", denied.join(",")),
            ));
        }
    }
    let mut hub = shard.hub.borrow_mut();
    let mut subscribed = Vec::with_capacity(channels.len());
    let mut refused = false;
    let mut joined = Vec::new();
    for c in channels {
        match hub.subscribe(id, &c, shard.config.max_channels_per_connection) {
            Ok(new) => {
                if new && is_presence_channel(&c) {
                    joined.push(c.clone());
                }
                subscribed.push(c)
            }
            Err(SubscribeError::TooManyChannels) => refused = true,
        }
    }
    drop(hub);
    if !subscribed.is_empty() {
        events.push(protocol::channels_event("subscribed", &subscribed));
    }
    if refused {
        let limit = shard.config.max_channels_per_connection;
        events.push(protocol::error_event(
            "too_many_channels",
            &format!("a connection may subscribe to at most {limit} channels"),
        ));
    }
    (events, joined)
}

/// How a resume ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// Everything missed was replayed (`"complete":true`).
    Complete,
    /// More than `MAX_REPLAY` were missed: the client continues from the `resumed` event's `last_id`.
    Cut,
    /// The store could not answer; an `error` event `store_unavailable` was sent.
    Failed,
}

/// The `unread` event that follows `connected`, in `wire`: the user's count read from the store's
/// counters, or a newer one the shard has seen meanwhile. The connection is registered already, so a
/// change committed after the read reaches it live. `None` when the read failed: the next change of
/// the count sends one; the connection goes on.
pub(crate) async fn unread_at_connect(shard: &Shard, user: &str, wire: Wire) -> Option<Bytes> {
    match shard.store.unread(user.to_string()).await {
        Ok(read) => {
            let count = shard
                .hub
                .borrow_mut()
                .unread_at_connect(user, read.version, read.unread);
            Some(wire.control(unread_frame(count)))
        }
        Err(e) => {
            tracing::warn!(user, error = %e, "cannot read the unread count at connect");
            None
        }
    }
}

/// How long a resume waits for Redis to confirm its node's subscriptions before reading the store
/// anyway (Redis slow to answer; while Redis is away nothing waits, the outage's catch-up covers it).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// Waits until Redis has confirmed every subscription this shard asked for so far (at once on a
/// single node): a resume's store read must come after its node listens to the user's and the
/// channels' topics, or a notification another node commits after the read, and publishes before
/// this node listens, would be neither replayed nor delivered live (see
/// `bus::interest::SubscriptionMarks`).
pub(crate) async fn until_subscribed(shard: &Shard) {
    let started = Instant::now();
    while !shard.fanout.subscriptions_settled(shard.index) {
        if started.elapsed() > SUBSCRIBE_WAIT {
            tracing::warn!(
                shard = shard.index,
                "Redis has not confirmed this node's subscriptions; resuming from the store anyway"
            );
            return;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Replays stored notifications after `since` to connection `id` of `user`, then releases the live
/// ones held back meanwhile, and ends with `resumed`, all in `wire`. The caller has already called
/// `begin_resume`, at the instant from which live deliveries must be held.
pub(crate) async fn resume(
    shard: &Shard,
    id: ConnId,
    user: &str,
    since: Uuid,
    wire: Wire,
) -> Resumed {
    let limit = shard.config.max_replay;
    let channels: Vec<String> = shard
        .hub
        .borrow()
        .channels_of(id)
        .iter()
        .map(|c| c.to_string())
        .collect();
    let query = ReplayQuery {
        user_id: Some(user.to_owned()),
        channels: channels.clone(),
        since,
        limit: limit + 1,
    };
    until_subscribed(shard).await;
    let replayed = shard.store.replay(query).await;
    let mut hub = shard.hub.borrow_mut();
    let conn = hub.conn_mut(id);
    let max_outbound = shard.config.max_outbound_bytes;
    match replayed {
        Ok(mut list) => {
            // What this connection already got live is not replayed (see `LiveMark`).
            let mut reached_live = false;
            if let LiveMark::FirstLive(first_live) = conn.live_mark {
                reached_live = list.iter().any(|n| n.id >= first_live);
                list.retain(|n| n.id < first_live);
            }
            let complete = reached_live || list.len() <= limit;
            list.truncate(limit);
            let last = list.last().map(|n| n.id).unwrap_or(since);
            conn.resumed_through = conn.resumed_through.max(Some(last));
            let mut receipts = shard.receipts.borrow_mut();
            let now = now_millis();
            for n in &list {
                let sent = send_frame(conn, &wire.replayed(n, user, &channels), max_outbound);
                // A replay is a delivery too: the receipt of what reached the user's own inbox.
                if sent == Sent::Accepted && n.user_id.as_deref() == Some(user) {
                    receipts.delivered_at(n.id, now);
                }
            }
            drop(receipts);
            let held = end_resume(conn);
            let mut newer_live = None;
            if complete || matches!(conn.live_mark, LiveMark::FirstLive(_)) {
                for (id, frame) in held {
                    // Held deliveries at or before the last replayed id were in the replay already.
                    if id.is_none_or(|id| id > last) {
                        send_frame(conn, &frame, max_outbound);
                        newer_live = newer_live.or(id);
                    }
                }
            } else {
                // Cut short, with nothing sent live before: the held stored deliveries (newer than
                // the cut) stay in the store for the client's next resume from `last_id`, so it gets
                // them in order after the part it is still missing. Ephemeral ones go now.
                for (id, frame) in held {
                    if id.is_none() {
                        send_frame(conn, &frame, max_outbound);
                    }
                }
            }
            conn.live_mark = match (conn.live_mark, newer_live) {
                (LiveMark::FirstLive(first), _) => LiveMark::FirstLive(first),
                (_, Some(id)) => LiveMark::FirstLive(id),
                (_, None) if !list.is_empty() => LiveMark::ReplayedThrough(last),
                (mark, None) => mark,
            };
            let last_id = list.last().map(|n| n.id);
            let event = protocol::resumed_event(list.len(), complete, last_id);
            send_frame(conn, &wire.control(event), max_outbound);
            if complete {
                Resumed::Complete
            } else {
                Resumed::Cut
            }
        }
        Err(e) => {
            for (_, frame) in end_resume(conn) {
                send_frame(conn, &frame, max_outbound);
            }
            let event = protocol::error_event("store_unavailable", &e.to_string());
            send_frame(conn, &wire.control(event), max_outbound);
            Resumed::Failed
        }
    }
}
