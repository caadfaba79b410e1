//! A native WebSocket session (the connection kind `ConnKind::WebSocket`): the handshake, then the frame
//! loop that turns client messages into actions on the shard's hub, the store and the fan-out, until the
//! connection closes.
//!
//! The session is the only place that knows both the protocol ([`crate::ws::protocol`],
//! [`crate::ws::codec`]) and the shard; the `ws` modules stay pure. Deliveries do not pass through here:
//! the shard's delivery path writes shared frames straight to the socket (see `shard::outbound`), and the
//! session only flushes what the socket could not take at once.
//!
//! Resume is exact on one node: live deliveries are held back while the store replays everything after
//! `since`, then the held ones the replay already covered are dropped (ids are commit-ordered UUIDv7), so
//! the client sees no gap and no duplicate.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info};
use uuid::Uuid;

use crate::auth::jwt::ChannelGrant;
use crate::auth::rate_limit::LocalBucket;
use crate::auth::UpgradeIdentity;
use crate::connection::frames::{next_frames, Frame, Stop};
use crate::connection::live::{self, bad_request, connect_params, watch_expiry, Wire};
use crate::connection::{audit_origin, respond_and_close};
use crate::delivery::inbox::ShardMsg;
use crate::delivery::Delivery;
use crate::http::request::RequestHead;
use crate::metrics::{Refusal, Route};
use crate::model::parse_notification_ids;
use crate::presence::{is_presence_channel, ConnRef};
use crate::shard::hub::ConnKind;
use crate::shard::outbound::{begin_resume, queue_final_frame, send_frame};
use crate::shard::socket::{Connection, CLOSE_FLUSH_TIMEOUT};
use crate::store::MarkedSeen;
use crate::ws::codec::{close_code, encode_close, encode_pong, Decoder};
use crate::ws::handshake;
use crate::ws::protocol::{self, parse_action, Action};

/// How a session ended.
enum Ending {
    /// The peer vanished (EOF, reset): nothing to send.
    Gone,
    /// The client kept sending over its message rate after being told: close 1008.
    RateAbuse,
    /// We close with this code (0: without a close frame).
    Server(u16),
    /// The client sent a close frame (with this code); we answer it.
    Client(Option<u16>),
}

/// Runs the handshake and the session on an upgraded connection.
///
/// Memory: a session spends almost all its life parked in `frame_loop`, waiting for the socket, and an
/// async state machine reserves room for its largest state (and for every value moved through nested
/// calls). So the live session runs in a task of its own, spawned fresh once the handshake is done, and
/// everything big and rare (the handshake, each action, resume, close) runs as a boxed future allocated
/// only while it runs. The parked state is the [`Session`] plus the loop's locals, a few hundred bytes
/// (docs/architecture.md, "Memory per connection": the ~1 KiB budget).
pub(crate) async fn run(conn: Connection, head: RequestHead) {
    if let Some(session) = Box::pin(open(conn, head)).await {
        glommio::spawn_local(session.live()).detach();
    }
}

/// Validates the handshake, answers 101 with the `connected` event, registers the connection in the
/// hub, applies `channels=` and replays `since=`. `None` when the handshake was refused.
async fn open(mut conn: Connection, head: RequestHead) -> Option<Session> {
    let accept = match handshake::validate(
        true,
        head.websocket_upgrade,
        head.header("sec-websocket-key"),
        head.header("sec-websocket-version"),
    ) {
        Ok(accept) => accept,
        Err(e) => {
            let mut response = bad_request("bad_handshake", e.message());
            if e == handshake::HandshakeError::BadVersion {
                response = response.with_header("Sec-WebSocket-Version", "13");
            }
            conn.shard
                .stats()
                .http_response(Route::WebSocket, response.status);
            respond_and_close(&mut conn, response).await;
            return None;
        }
    };
    let shard = conn.shard.clone();
    let identity = match shard
        .auth
        .authenticate_upgrade(&head, audit_origin::peer_ip(&conn))
    {
        Ok(identity) => identity,
        Err(response) => {
            shard
                .stats()
                .http_response(Route::WebSocket, response.status);
            respond_and_close(&mut conn, response).await;
            return None;
        }
    };
    let token_user = identity.as_ref().map(|i| i.claims.user_id.as_str());
    let params = match connect_params(&head, token_user) {
        Ok(p) => p,
        Err(response) => {
            shard
                .stats()
                .http_response(Route::WebSocket, response.status);
            respond_and_close(&mut conn, response).await;
            return None;
        }
    };
    let protocol = identity.as_ref().and_then(|i| i.protocol);
    if !shard.auth.connections.admit_user(&params.user_id) {
        // Upgrade, then close 1013 at once: a browser sees a close code, never an HTTP status.
        let mut out = handshake::switching_protocols(&accept, protocol);
        out.extend_from_slice(&encode_close(
            close_code::TRY_AGAIN_LATER,
            "too many connections for this user",
        ));
        shard
            .stats()
            .websocket_upgraded_then_closed(close_code::TRY_AGAIN_LATER);
        let _ = conn.write_all(&out, Some(CLOSE_FLUSH_TIMEOUT)).await;
        conn.close();
        return None;
    }
    let connection_seq = shard.next_connection_seq();
    let mut out = handshake::switching_protocols(&accept, protocol);
    out.extend_from_slice(&protocol::connected_event(
        &format!("{}-{connection_seq}", shard.index),
        &params.user_id,
        shard.config.heartbeat_s,
    ));
    let handshake_timeout = std::time::Duration::from_secs(shard.config.header_timeout_s);
    if conn.write_all(&out, Some(handshake_timeout)).await.is_err() {
        shard.auth.connections.release_user(&params.user_id);
        return None;
    }
    let user = {
        let mut hub = shard.hub.borrow_mut();
        hub.upgrade(conn.id, &params.user_id, ConnKind::WebSocket);
        if params.since.is_some() {
            // Hold live deliveries from this instant on, so none slips between the replay and live.
            begin_resume(hub.conn_mut(conn.id));
        }
        if let Some(identity) = &identity {
            watch_expiry(&shard, &mut hub, conn.id, identity.claims.expires_at);
        }
        // Share the hub's interned name rather than keeping a second copy per connection.
        hub.user_of(conn.id)
            .cloned()
            .expect("an upgraded connection has a user")
    };
    shard.stats().websocket_opened();
    info!(user = %params.user_id, shard = shard.index, connection = connection_seq, "connected");
    let mut session = Session {
        conn,
        user,
        connection_seq,
        started: Instant::now(),
        grant: identity.map(|UpgradeIdentity { claims, .. }| Box::new(claims.grant)),
        bucket: LocalBucket::default(),
        rate_strikes: 0,
    };
    Box::pin(session.send_unread_at_connect()).await;
    if !params.channels.is_empty() {
        session.subscribe(params.channels);
    }
    if let Some(since) = params.since {
        Box::pin(session.resume(since)).await;
    }
    Some(session)
}

/// A live WebSocket session.
struct Session {
    conn: Connection,
    /// The connection's user.
    user: Rc<str>,
    /// The connection's number on its shard (the id clients see is `<shard>-<seq>`).
    connection_seq: u64,
    /// When the session opened, for the disconnect log.
    started: Instant,
    /// The channels the token allows; `None` without `JWT_SECRET` (every channel).
    grant: Option<Box<ChannelGrant>>,
    /// This connection's message rate (`RATE_LIMIT_WS`).
    bucket: LocalBucket,
    /// Messages refused for rate in a row; past the burst the connection is closed with 1008.
    rate_strikes: u32,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The user's slot taken in `open` (see `ConnectionCounts::admit_user`).
        self.conn.shard.auth.connections.release_user(&self.user);
        // However the session ends, it leaves its presence channels (the hub entry goes after this,
        // with the connection).
        let presence: Vec<Rc<str>> = {
            let hub = self.conn.shard.hub.borrow();
            hub.channels_of(self.conn.id)
                .into_iter()
                .filter(|c| is_presence_channel(c))
                .collect()
        };
        for channel in presence {
            self.left_presence(&channel);
        }
    }
}

impl Session {
    /// The session's life: the frame loop, then the close.
    ///
    /// Not an `async fn`: rustc copies an async fn's by-value arguments into a second slot of the state
    /// machine, which would hold the whole `Session` twice for the connection's lifetime. An `async move`
    /// block that uses `self` in place keeps one copy.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold the Session twice for the connection's whole life"
    )]
    fn live(mut self) -> impl std::future::Future<Output = ()> {
        async move {
            let ending = self.frame_loop().await;
            Box::pin(self.close(ending)).await;
        }
    }

    /// Sends a control frame (or replayed notification) through the normal outbound path.
    fn send(&self, frame: &Bytes) {
        let shard = &self.conn.shard;
        let mut hub = shard.hub.borrow_mut();
        send_frame(
            hub.conn_mut(self.conn.id),
            frame,
            shard.config.max_outbound_bytes,
        );
    }

    /// Sends the `unread` event that follows `connected` (see [`live::unread_at_connect`]).
    async fn send_unread_at_connect(&self) {
        let shard = self.conn.shard.clone();
        if let Some(frame) = live::unread_at_connect(&shard, &self.user, Wire::Native).await {
            self.send(&frame);
        }
    }

    fn send_error(&self, code: &str, message: &str) {
        self.send(&protocol::error_event(code, message));
    }

    /// Reads and handles client messages until the connection must close.
    async fn frame_loop(&mut self) -> Ending {
        let mut decoder = Decoder::new();
        let max_depth = self.conn.shard.config.max_json_depth;
        loop {
            let events = match next_frames(&mut self.conn, &mut decoder, |text| {
                parse_action(text, max_depth)
            })
            .await
            {
                Ok(events) => events,
                Err(Stop::Gone) => return Ending::Gone,
                Err(Stop::Server(code)) => return Ending::Server(code),
                Err(Stop::Violation(violation)) => {
                    debug!(user = %self.user, reason = violation.reason(), "protocol violation");
                    return Ending::Server(violation.close_code());
                }
            };
            for event in events {
                if matches!(event, Frame::Text(_) | Frame::Ping(_)) && !self.within_rate() {
                    if self.rate_strikes > self.rate_burst() {
                        return Ending::RateAbuse;
                    }
                    continue;
                }
                match event {
                    Frame::Text(Ok(action)) => Box::pin(self.handle(action)).await,
                    Frame::Text(Err(e)) => self.send_error(e.code, &e.message),
                    Frame::Ping(payload) => self.send(&Bytes::from(encode_pong(&payload))),
                    Frame::Pong => {
                        self.conn
                            .shard
                            .hub
                            .borrow_mut()
                            .conn_mut(self.conn.id)
                            .missed_pongs = 0
                    }
                    Frame::Close(code) => return Ending::Client(code),
                }
            }
        }
    }

    /// Takes one message from the connection's rate (`RATE_LIMIT_WS`). The first message over it is
    /// answered with `rate_limited`; the later ones of the same streak are dropped silently.
    fn within_rate(&mut self) -> bool {
        let auth = &self.conn.shard.auth;
        let Some(rate) = auth.ws_rate() else {
            return true;
        };
        if self.bucket.take(rate, auth.clock().now_ns()).is_ok() {
            self.rate_strikes = 0;
            return true;
        }
        self.rate_strikes += 1;
        auth.refusals().count(Refusal::MessageRateLimited);
        if self.rate_strikes == 1 {
            audit_origin::rate_limited(&self.conn, &self.user, self.grant.is_some());
            self.send_error(
                "rate_limited",
                "too many messages: slow down, or the connection is closed with 1008",
            );
        }
        false
    }

    /// Refused messages in a row tolerated before 1008: the burst of `RATE_LIMIT_WS`.
    fn rate_burst(&self) -> u32 {
        self.conn
            .shard
            .auth
            .ws_rate()
            .map_or(u32::MAX, |rate| rate.burst())
    }

    /// Handles one client action.
    async fn handle(&mut self, action: Action) {
        match action {
            Action::Subscribe(channels) => self.subscribe(channels),
            Action::Unsubscribe(channels) => {
                let mut hub = self.conn.shard.hub.borrow_mut();
                let left: Vec<&String> = channels
                    .iter()
                    .filter(|c| hub.unsubscribe(self.conn.id, c) && is_presence_channel(c))
                    .collect();
                drop(hub);
                for c in left {
                    self.left_presence(c);
                }
                debug!(user = %self.user, ?channels, "unsubscribed");
                self.send(&protocol::channels_event("unsubscribed", &channels));
            }
            Action::Publish { channel, data } => self.publish(&channel, &data),
            Action::Ping => self.send(&protocol::pong_event()),
            Action::Read(id) => {
                let store = self.conn.shard.store.clone();
                match store.mark_read(self.user.to_string(), id).await {
                    Ok(Some(_)) => {
                        audit_origin::read(&self.conn, &self.user, self.grant.is_some(), id)
                    }
                    Ok(None) => self.send_error("not_found", "no such notification for this user"),
                    Err(e) => self.send_error("store_unavailable", &e.to_string()),
                }
            }
            Action::Seen(ids) => {
                let max = self.conn.shard.config.max_seen_ids;
                let ids = match parse_notification_ids("ids", &ids, max) {
                    Ok(ids) => ids,
                    Err(e) => return self.send_error("invalid_field", &e.message),
                };
                let store = self.conn.shard.store.clone();
                match store.mark_seen(self.user.to_string(), ids).await {
                    Ok(MarkedSeen::Updated(_)) => {}
                    Ok(MarkedSeen::NotInInbox(id)) => self.send_error(
                        "not_found",
                        &format!(
                            "{id} is not a notification of this user; nothing was marked seen"
                        ),
                    ),
                    Err(e) => self.send_error("store_unavailable", &e.to_string()),
                }
            }
            Action::Resume(since) => {
                begin_resume(self.conn.shard.hub.borrow_mut().conn_mut(self.conn.id));
                Box::pin(self.resume(since)).await;
            }
            Action::Refresh(token) => self.refresh(&token),
            Action::Presence(channel) => Box::pin(self.presence(channel)).await,
        }
    }

    /// This connection, node-wide, for the presence registry.
    fn conn_ref(&self) -> ConnRef {
        ConnRef {
            shard: self.conn.shard.index,
            conn: self.conn.id,
        }
    }

    /// The connection left presence channel `channel` (unsubscribed, revoked, or closing).
    fn left_presence(&self, channel: &str) {
        self.conn
            .shard
            .fanout
            .presence_leave(channel, &self.user, self.conn_ref());
    }

    /// Answers `{"action":"presence","channel"}` with the channel's members on every node. The channel
    /// must be a presence channel the connection is subscribed to (so a token's grant bounds it).
    async fn presence(&mut self, channel: String) {
        if !is_presence_channel(&channel) {
            return self.send_error(
                "invalid_field",
                "channel must be a presence channel (a name starting with presence-)",
            );
        }
        let shard = self.conn.shard.clone();
        if !shard.hub.borrow().is_subscribed(self.conn.id, &channel) {
            return self.send_error(
                "not_subscribed",
                "subscribe to the presence channel before asking who is on it",
            );
        }
        let members = shard.fanout.presence_members(&channel).await;
        let users: Vec<String> = members.into_iter().map(|m| m.user_id).collect();
        self.send(&protocol::presence_event(&channel, &users));
    }

    /// Replaces the connection's token: a later expiry, and the new token's channel grant (channels it
    /// no longer allows are unsubscribed). A bad token changes nothing; the old one still runs out.
    fn refresh(&mut self, token: &str) {
        let shard = self.conn.shard.clone();
        let claims = match shard.auth.verify_token(token, || {
            audit_origin::session_origin(&self.conn, &self.user, true)
        }) {
            None => {
                return self.send_error(
                    "invalid_field",
                    "this server does not use tokens (JWT_SECRET is not set)",
                )
            }
            Some(Err(e)) => return self.send_error("unauthorized", e.message()),
            Some(Ok(claims)) => claims,
        };
        if *claims.user_id != *self.user {
            return self.send_error("forbidden", "the new token is for another user");
        }
        let revoked: Vec<String> = {
            let mut hub = shard.hub.borrow_mut();
            watch_expiry(&shard, &mut hub, self.conn.id, claims.expires_at);
            let revoked: Vec<String> = hub
                .channels_of(self.conn.id)
                .iter()
                .filter(|c| !claims.grant.allows(c))
                .map(|c| c.to_string())
                .collect();
            for c in &revoked {
                hub.unsubscribe(self.conn.id, c);
            }
            revoked
        };
        for c in revoked.iter().filter(|c| is_presence_channel(c)) {
            self.left_presence(c);
        }
        self.grant = Some(Box::new(claims.grant));
        if !revoked.is_empty() {
            self.send(&protocol::channels_event("unsubscribed", &revoked));
        }
        self.send(&protocol::refreshed_event(claims.expires_at));
    }

    fn subscribe(&mut self, channels: Vec<String>) {
        let (events, joined) = live::subscribe(
            &self.conn.shard,
            self.conn.id,
            self.grant.as_deref(),
            channels,
        );
        debug!(user = %self.user, "subscribed");
        for event in &events {
            self.send(event);
        }
        // After `subscribed`, so the connection's own `join` (through the inbox) comes after it.
        let shard = self.conn.shard.clone();
        for channel in joined {
            shard
                .fanout
                .presence_join(&channel, &self.user, None, self.conn_ref());
        }
    }

    /// A client publish: to the channel's other subscribers on every shard, not stored.
    fn publish(&self, channel: &str, data: &str) {
        let shard = &self.conn.shard;
        if !shard.hub.borrow().is_subscribed(self.conn.id, channel) {
            self.send_error(
                "not_subscribed",
                "subscribe to the channel before publishing to it",
            );
            return;
        }
        let delivery = Arc::new(Delivery::of_client_message(channel, &self.user, data));
        // This shard's subscribers get it through its own inbox too, so that a burst of publishes is
        // written in the pump's per-connection batches (shard::outbound::WriteBatch).
        shard.fanout.send_to_shard(
            shard.index,
            ShardMsg::DeliverExcept(delivery.clone(), self.conn.id),
        );
        shard
            .fanout
            .send_client_message(shard.index, channel, delivery);
    }

    /// Replays stored notifications after `since`, then releases the live ones held back meanwhile.
    /// The caller has already called `begin_resume`.
    async fn resume(&mut self, since: Uuid) {
        let shard = self.conn.shard.clone();
        live::resume(&shard, self.conn.id, &self.user, since, Wire::Native).await;
    }

    /// Sends the close frame the ending calls for, flushes, closes, and logs the disconnect.
    async fn close(mut self, ending: Ending) {
        let code = match ending {
            Ending::Gone => 0,
            Ending::RateAbuse => close_code::POLICY,
            Ending::Server(code) => code,
            Ending::Client(code) => code.unwrap_or(close_code::NORMAL),
        };
        self.conn.shard.stats().websocket_close_code(code);
        if code != 0 {
            let reason = match code {
                close_code::GOING_AWAY => "server shutting down",
                close_code::TRY_AGAIN_LATER => "slow consumer: reconnect and resume",
                close_code::POLICY if matches!(ending, Ending::RateAbuse) => "rate limit exceeded",
                close_code::POLICY => "token expired",
                _ => "",
            };
            {
                let mut hub = self.conn.shard.hub.borrow_mut();
                queue_final_frame(
                    hub.conn_mut(self.conn.id),
                    Bytes::from(encode_close(code, reason)),
                );
            }
            self.conn.set_deadline(Some(CLOSE_FLUSH_TIMEOUT));
            let _ = self.conn.flush_outbox(true).await;
        }
        self.conn.close();
        info!(
            user = %self.user,
            shard = self.conn.shard.index,
            connection = self.connection_seq,
            duration_ms = self.started.elapsed().as_millis() as u64,
            close_code = code,
            "disconnected"
        );
    }
}
