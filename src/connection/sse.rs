//! A Server-Sent Events stream (the connection kind `ConnKind::Sse`, `GET
//! /api/v1/notifications/stream`): the checks of the opening request, the response head, then a
//! session that only waits, since deliveries, the heartbeat comment and replays are all written by the
//! shard's delivery path, until the stream ends.
//!
//! The response has no length and no chunked framing: it is delimited by the close of the connection
//! (the stream is the connection's last response), so a delivery is the same `Bytes` for every SSE
//! stream of every shard, written as is (`delivery::Encoding::Sse`). The stream ends, and the client's
//! `EventSource` reconnects after the `retry:` delay with `Last-Event-ID`, when the server shuts down,
//! the client is too slow (`MAX_OUTBOUND_BYTES`), its token expires, or a resume was cut at `MAX_REPLAY`
//! (the reconnect continues the replay from the last id sent, so nothing is skipped).

use std::rc::Rc;

use tracing::info;
use uuid::Uuid;

use crate::auth::StreamIdentity;
use crate::connection::audit_origin;
use crate::connection::live::{self, bad_request, connect_params, watch_expiry, Resumed, Wire};
use crate::connection::respond_and_close;
use crate::delivery::sse;
use crate::http::request::RequestHead;
use crate::http::response::{write_stream_head, Response};
use crate::metrics::Route;
use crate::presence::{is_presence_channel, ConnRef};
use crate::shard::hub::ConnKind;
use crate::shard::outbound::{begin_resume, send_frame};
use crate::shard::socket::{Connection, Signals, Wake, CLOSE_FLUSH_TIMEOUT};
use crate::ws::codec::close_code;
use crate::ws::protocol;

/// Milliseconds an `EventSource` waits before reconnecting (the stream's `retry:` line).
pub(crate) const RETRY_MS: u64 = 1000;

/// The identity a stream or poll runs under: its user, and the channels its token allows (`None`:
/// every channel).
pub(crate) struct Opened {
    /// The checked query: user, channels, resume point.
    pub params: live::ConnectParams,
    /// The token's channel grant; `None` with an API key or on an open server.
    pub grant: Option<crate::auth::jwt::ChannelGrant>,
    /// When the token expires (seconds since the epoch), if a token was used.
    pub expires_at: Option<u64>,
}

/// Authenticates the opening request of a stream or poll and reads its parameters; the answer to send
/// instead when refused (401, 403, 400, or 503 over the per-user cap). On success the user's slot in the
/// per-user cap is taken; the caller gives it back.
pub(crate) fn open_request(
    conn: &Connection,
    head: &RequestHead,
    route: Route,
) -> Result<Opened, Response> {
    let shard = &conn.shard;
    let refused = |response: Response| {
        shard.stats().http_response(route, response.status);
        response
    };
    let identity = shard
        .auth
        .authenticate_stream(head, audit_origin::peer_ip(conn))
        .map_err(refused)?;
    let (token_user, grant, expires_at) = match identity {
        StreamIdentity::Key(_) => (None, None, None),
        StreamIdentity::Token(claims) => {
            let expires_at = claims.expires_at;
            (Some(claims.user_id), Some(claims.grant), Some(expires_at))
        }
    };
    let mut params = connect_params(head, token_user.as_deref()).map_err(refused)?;
    if let Some(since) = last_event_id(head).map_err(refused)? {
        params.since = Some(since);
    }
    if !shard.auth.connections.admit_user(&params.user_id) {
        return Err(refused(Response::error(
            503,
            "too_many_connections",
            "too many connections for this user",
        )));
    }
    Ok(Opened {
        params,
        grant,
        expires_at,
    })
}

/// Where a reconnecting client resumes: the `Last-Event-ID` header an `EventSource` sends, else the
/// `last_event_id` parameter (for clients that cannot set headers either); both win over `since`, which
/// an `EventSource` repeats unchanged in the URL of every reconnect.
fn last_event_id(head: &RequestHead) -> Result<Option<Uuid>, Response> {
    let given = head
        .header_str("last-event-id")
        .map(|s| s.trim().to_owned())
        .or_else(|| {
            crate::http::query::query_param(head.query(), "last_event_id").map(|s| s.into_owned())
        })
        .filter(|s| !s.is_empty());
    match given {
        None => Ok(None),
        Some(s) => Uuid::parse_str(&s).map(Some).map_err(|_| {
            bad_request(
                "invalid_field",
                "Last-Event-ID must be a notification id (UUID)",
            )
        }),
    }
}

/// Opens the stream (response head, `retry:`, `connected`, `subscribed`, the replay and `resumed`),
/// then waits until it ends. Runs in a task of its own once open, as the WebSocket session does, so
/// the parked state is the [`Stream`] alone.
pub(crate) async fn run(conn: Connection, head: RequestHead) {
    if let Some(stream) = Box::pin(open(conn, head)).await {
        glommio::spawn_local(stream.live()).detach();
    }
}

async fn open(mut conn: Connection, head: RequestHead) -> Option<Stream> {
    let opened = match open_request(&conn, &head, Route::Stream) {
        Ok(opened) => opened,
        Err(response) => {
            respond_and_close(&mut conn, response).await;
            return None;
        }
    };
    let shard = conn.shard.clone();
    let params = opened.params;
    let connection_seq = shard.next_connection_seq();
    let mut out = Vec::with_capacity(512);
    write_stream_head(
        &mut out,
        "text/event-stream",
        &[("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")],
    );
    out.extend_from_slice(&sse::retry(RETRY_MS));
    out.extend_from_slice(&Wire::Sse.control(protocol::connected_event(
        &format!("{}-{connection_seq}", shard.index),
        &params.user_id,
        shard.config.heartbeat_s,
    )));
    shard.stats().http_response(Route::Stream, 200);
    let head_timeout = std::time::Duration::from_secs(shard.config.header_timeout_s);
    if conn.write_all(&out, Some(head_timeout)).await.is_err() {
        shard.auth.connections.release_user(&params.user_id);
        return None;
    }
    let user = {
        let mut hub = shard.hub.borrow_mut();
        hub.upgrade(conn.id, &params.user_id, ConnKind::Sse);
        if params.since.is_some() {
            // Hold live deliveries from this instant on, so none slips between the replay and live.
            begin_resume(hub.conn_mut(conn.id));
        }
        if let Some(expires_at) = opened.expires_at {
            watch_expiry(&shard, &mut hub, conn.id, expires_at);
        }
        hub.user_of(conn.id)
            .cloned()
            .expect("an upgraded connection has a user")
    };
    info!(user = %user, shard = shard.index, connection = connection_seq, "sse stream opened");
    let stream = Stream { conn, user };
    if let Some(event) = live::unread_at_connect(&shard, &stream.user, Wire::Sse).await {
        stream.send(event);
    }
    if !params.channels.is_empty() {
        let (events, joined) = live::subscribe(
            &shard,
            stream.conn.id,
            opened.grant.as_ref(),
            params.channels,
        );
        for event in events {
            stream.send(Wire::Sse.control(event));
        }
        // A stream is a member of its presence channels, like a WebSocket subscription, for as long
        // as it is open ([`Stream`]'s drop leaves them). After `subscribed`, so the stream's own
        // `join` (through the inbox) comes after it.
        for channel in joined {
            shard
                .fanout
                .presence_join(&channel, &stream.user, None, stream.conn_ref());
        }
    }
    if let Some(since) = params.since {
        let resumed = live::resume(&shard, stream.conn.id, &stream.user, since, Wire::Sse).await;
        if resumed != Resumed::Complete {
            // The client continues from the last id it got: end the stream so its `EventSource`
            // reconnects with that `Last-Event-ID` (the `resumed` event says `"complete":false`).
            let mut hub = shard.hub.borrow_mut();
            hub.conn_mut(stream.conn.id)
                .request_close(close_code::NORMAL);
        }
    }
    Some(stream)
}

/// An open SSE stream, parked between deliveries.
struct Stream {
    conn: Connection,
    /// The stream's user, shared with the hub's interned name.
    user: Rc<str>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // The user's slot taken in `open_request`.
        self.conn.shard.auth.connections.release_user(&self.user);
        // However the stream ends (the client closed, a slow consumer dropped, the token expired, a
        // cut resume, shutdown), it leaves its presence channels; the hub entry goes after this, with
        // the connection.
        let presence: Vec<Rc<str>> = {
            let hub = self.conn.shard.hub.borrow();
            hub.channels_of(self.conn.id)
                .into_iter()
                .filter(|c| is_presence_channel(c))
                .collect()
        };
        for channel in presence {
            self.conn
                .shard
                .fanout
                .presence_leave(&channel, &self.user, self.conn_ref());
        }
    }
}

impl Stream {
    /// This stream, node-wide, for the presence registry.
    fn conn_ref(&self) -> ConnRef {
        ConnRef {
            shard: self.conn.shard.index,
            conn: self.conn.id,
        }
    }

    /// Sends an event through the normal outbound path.
    fn send(&self, event: bytes::Bytes) {
        let shard = &self.conn.shard;
        let mut hub = shard.hub.borrow_mut();
        send_frame(
            hub.conn_mut(self.conn.id),
            &event,
            shard.config.max_outbound_bytes,
        );
    }

    /// The stream's life: flush what the delivery path queued, until a close is requested or the peer
    /// goes; then the end of the response.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold the Stream twice for the connection's whole life"
    )]
    fn live(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            let code = self.wait().await;
            Box::pin(self.end(code)).await;
        }
    }

    /// Waits until the stream must end; the close code that ends it (0: the peer is gone).
    async fn wait(&mut self) -> u16 {
        let signals = Signals {
            outbox: true,
            shutdown: false,
        };
        loop {
            match self.conn.read_or_signal(signals, None).await {
                Err(_) | Ok(Wake::Eof) => return 0,
                Ok(Wake::Data) => {
                    // A stream's client has nothing to say: what it sends is dropped, not kept.
                    self.conn.inbuf = Vec::new();
                }
                Ok(Wake::Signal) => {
                    if let Some(code) = self.conn.shard.hub.borrow().conn(self.conn.id).close_code {
                        return code;
                    }
                    if self.conn.flush_outbox(false).await.is_err() {
                        return 0;
                    }
                }
            }
        }
    }

    /// Ends the response: what is queued is flushed (a slow consumer's queue was dropped already), and
    /// the connection closes, which is the end of a close-delimited response.
    async fn end(mut self, code: u16) {
        if code != 0 {
            self.conn.set_deadline(Some(CLOSE_FLUSH_TIMEOUT));
            let _ = self.conn.flush_outbox(true).await;
        }
        self.conn.close();
        info!(user = %self.user, shard = self.conn.shard.index, close_code = code, "sse stream ended");
    }
}
