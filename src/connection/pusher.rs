//! A Pusher Channels session (the connection kind `ConnKind::Pusher`, protocol 7): the WebSocket
//! handshake at `GET /app/{key}`, then the frame loop that turns the client's messages
//! (`crate::pusher::protocol`) into subscriptions in the shard's hub and client events on the
//! fan-out, until the connection closes.
//!
//! It shares everything below the protocol with the native session (`connection::websocket`): the
//! WebSocket handshake and frame codec of `ws`, the socket's waits, the outbound path and its
//! slow-consumer rule, the heartbeat sweep (which sends `pusher:ping` to this kind). Deliveries do not
//! pass through here: the shard writes their Pusher frames (`delivery::Encoding::Pusher`) to the
//! socket, and the session only flushes what the socket could not take at once.
//!
//! A Pusher connection has no user until it signs in (`pusher:signin`) or subscribes, with a valid
//! signature, to its Laravel user channel (`PUSHER_USER_CHANNEL`): from then on notifications sent to
//! that user reach it, as Laravel's `BroadcastNotificationCreated` event.
//!
//! Presence channels (`presence-…`) are the node's presence registry (`crate::presence`), shared
//! with native clients: a signed subscription joins the registry as the `user_id` of its
//! `channel_data`, answers with the member list of every node, and the session leaves on unsubscribe
//! and however it ends. The other subscribers hear `pusher_internal:member_added`/`member_removed`
//! through the registry's presence changes (the Pusher encoding of `delivery::Content::Presence`).
//!
//! Memory: as the native session, the live session is a task of its own spawned after the
//! handshake, and everything rare runs as boxed futures, so an idle connection keeps only
//! [`Session`] and the parked loop.

use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use crate::auth::rate_limit::LocalBucket;
use crate::connection::frames::{next_frames, Frame, Stop};
use crate::connection::respond_and_close;
use crate::delivery::inbox::ShardMsg;
use crate::delivery::{Delivery, PusherEvent};
use crate::http::query::query_param;
use crate::http::request::RequestHead;
use crate::http::response::Response;
use crate::metrics::{Refusal, Route};
use crate::presence::ConnRef;
use crate::pusher::protocol::{
    self, code, is_valid_channel_name, parse_channel_data, parse_client_message, ChannelKind,
    ClientMessage, PROTOCOL_VERSION,
};
use crate::pusher::sign::{channel_auth_valid, signin_auth_valid};
use crate::pusher::socket_id::SocketId;
use crate::pusher::{PusherApp, UserChannelPattern};
use crate::shard::hub::{ConnKind, SubscribeError};
use crate::shard::outbound::{queue_final_frame, send_frame};
use crate::shard::socket::{Connection, CLOSE_FLUSH_TIMEOUT};
use crate::ws::codec::{close_code, encode_close, encode_pong, encode_text, Decoder};
use crate::ws::handshake;

/// Runs the handshake and the session on a connection that asked for `GET /app/{key}`.
pub(crate) async fn run(conn: Connection, head: RequestHead) {
    if let Some(session) = Box::pin(open(conn, head)).await {
        glommio::spawn_local(session.live()).detach();
    }
}

/// The app key of a `/app/{key}` path.
pub(crate) fn app_key_of(path: &str) -> Option<&str> {
    path.strip_prefix("/app/")
        .filter(|key| !key.is_empty() && !key.contains('/'))
}

/// Validates the handshake, answers 101 with `pusher:connection_established` and registers the
/// connection in the hub. `None` when the handshake or the app was refused (an unknown key or an
/// unsupported protocol gets the 101, then `pusher:error` and a close with the protocol's code, as
/// pusher-js expects, so it does not retry).
async fn open(mut conn: Connection, head: RequestHead) -> Option<Session> {
    let shard = conn.shard.clone();
    let accept = match handshake::validate(
        true,
        head.websocket_upgrade,
        head.header("sec-websocket-key"),
        head.header("sec-websocket-version"),
    ) {
        Ok(accept) => accept,
        Err(e) => {
            let mut response = Response::error(400, "bad_handshake", e.message());
            if e == handshake::HandshakeError::BadVersion {
                response = response.with_header("Sec-WebSocket-Version", "13");
            }
            shard.stats().http_response(Route::Pusher, response.status);
            respond_and_close(&mut conn, response).await;
            return None;
        }
    };
    let mut out = handshake::switching_protocols(&accept, None);
    shard.stats().http_response(Route::Pusher, 101);
    let app_index = app_key_of(head.path()).and_then(|key| shard.config.pusher.index_of_key(key));
    let protocol_ok = query_param(head.query(), "protocol")
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == PROTOCOL_VERSION);
    let refusal = match app_index {
        None => Some((code::APP_NOT_FOUND, "no app with this key on this server")),
        Some(_) if !protocol_ok => Some((
            code::UNSUPPORTED_PROTOCOL,
            "this server speaks Pusher protocol version 7 (?protocol=7)",
        )),
        Some(_) => None,
    };
    let handshake_timeout = std::time::Duration::from_secs(shard.config.header_timeout_s);
    if let Some((code, message)) = refusal {
        out.extend_from_slice(&encode_text(&protocol::error(Some(code), message)));
        out.extend_from_slice(&encode_close(code, message));
        let _ = conn.write_all(&out, Some(CLOSE_FLUSH_TIMEOUT)).await;
        conn.close();
        return None;
    }
    let app_index = app_index?;
    let connection_seq = shard.next_connection_seq();
    let socket_id = SocketId::local(shard.index, conn.id, connection_seq).render();
    out.extend_from_slice(&encode_text(&protocol::connection_established(
        &socket_id,
        shard.config.heartbeat_s,
    )));
    if conn.write_all(&out, Some(handshake_timeout)).await.is_err() {
        return None;
    }
    shard
        .hub
        .borrow_mut()
        .upgrade_without_user(conn.id, ConnKind::Pusher);
    debug!(shard = shard.index, socket_id, "Pusher client connected");
    Some(Session {
        conn,
        app_index,
        connection_seq,
        bucket: LocalBucket::default(),
        rate_strikes: 0,
        presence: None,
    })
}

/// How a session ended.
enum Ending {
    /// The peer vanished (EOF, reset): nothing to send.
    Gone,
    /// We close with this code (0: without a close frame).
    Server(u16),
    /// The client sent a close frame (with this code); we answer it.
    Client(Option<u16>),
}

/// A live Pusher session: what an idle connection keeps (its subscriptions and user are in the hub).
struct Session {
    conn: Connection,
    /// The app, as its index in `Config::pusher` (the config outlives every connection).
    app_index: u32,
    /// The connection's number on its shard, part of its socket id.
    connection_seq: u64,
    /// This connection's client-event rate (`RATE_LIMIT_WS`).
    bucket: LocalBucket,
    /// Client events refused for rate in a row.
    rate_strikes: u32,
    /// The presence channels the connection is on, each with the user id it joined as (a Pusher
    /// connection may be a different member on each); boxed, since most connections have none.
    presence: Option<Box<[PresenceSeat]>>,
}

/// A presence channel a Pusher connection is on, and the user id it is there as.
type PresenceSeat = (Box<str>, Box<str>);

impl Drop for Session {
    fn drop(&mut self) {
        // However the session ends, it leaves its presence channels (the hub entry goes after this,
        // with the connection).
        for (channel, user) in self.presence.take().into_iter().flat_map(Vec::from) {
            self.conn
                .shard
                .fanout
                .presence_leave(&channel, &user, self.conn_ref());
        }
    }
}

impl Session {
    /// The session's life: the frame loop, then the close. Not an `async fn`, for the reason given on
    /// the native session's `live`: the `Session` would be held twice.
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

    fn app(&self) -> &PusherApp {
        self.conn.shard.config.pusher.get(self.app_index)
    }

    fn socket_id(&self) -> String {
        SocketId::local(self.conn.shard.index, self.conn.id, self.connection_seq).render()
    }

    /// Sends a protocol message (a JSON payload) through the normal outbound path.
    fn send(&self, payload: &[u8]) {
        let shard = &self.conn.shard;
        let mut hub = shard.hub.borrow_mut();
        send_frame(
            hub.conn_mut(self.conn.id),
            &Bytes::from(encode_text(payload)),
            shard.config.max_outbound_bytes,
        );
    }

    /// Reads and handles client messages until the connection must close.
    async fn frame_loop(&mut self) -> Ending {
        let mut decoder = Decoder::new();
        let max_depth = self.conn.shard.config.max_json_depth;
        loop {
            let events = match next_frames(&mut self.conn, &mut decoder, |text| {
                parse_client_message(text, max_depth)
            })
            .await
            {
                Ok(events) => events,
                Err(Stop::Gone) => return Ending::Gone,
                Err(Stop::Server(code)) => return Ending::Server(code),
                Err(Stop::Violation(violation)) => return Ending::Server(violation.close_code()),
            };
            // Any message shows the client is alive, as a pong would.
            self.conn
                .shard
                .hub
                .borrow_mut()
                .conn_mut(self.conn.id)
                .missed_pongs = 0;
            for event in events {
                match event {
                    Frame::Text(Ok(ClientMessage::Subscribe {
                        channel,
                        auth,
                        channel_data,
                    })) if ChannelKind::of(&channel) == ChannelKind::Presence => {
                        Box::pin(self.subscribe_presence(channel, auth, channel_data)).await
                    }
                    Frame::Text(Ok(message)) => self.handle(message),
                    Frame::Text(Err(e)) => self.send(&protocol::error(e.code, &e.message)),
                    Frame::Ping(payload) => {
                        let shard = &self.conn.shard;
                        let mut hub = shard.hub.borrow_mut();
                        send_frame(
                            hub.conn_mut(self.conn.id),
                            &Bytes::from(encode_pong(&payload)),
                            shard.config.max_outbound_bytes,
                        );
                    }
                    Frame::Pong => {}
                    Frame::Close(code) => return Ending::Client(code),
                }
            }
        }
    }

    /// Handles one client message.
    fn handle(&mut self, message: ClientMessage) {
        match message {
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => self.subscribe(&channel, auth.as_deref(), channel_data.as_deref()),
            ClientMessage::Unsubscribe { channel } => {
                self.conn
                    .shard
                    .hub
                    .borrow_mut()
                    .unsubscribe(self.conn.id, &channel);
                self.leave_presence(&channel);
            }
            ClientMessage::Ping => self.send(&protocol::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Signin { auth, user_data } => self.signin(&auth, &user_data),
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => self.client_event(event, &channel, data),
        }
    }

    fn subscribe(&mut self, channel: &str, auth: Option<&str>, channel_data: Option<&str>) {
        let shard = self.conn.shard.clone();
        let config = &shard.config;
        if !is_valid_channel_name(channel, config.pusher_max_channel_name) {
            let error = format!(
                "channel names are 1 to {} bytes of A-Z a-z 0-9 _ - = @ , . ;",
                config.pusher_max_channel_name
            );
            return self.send(&protocol::subscription_error(
                channel,
                "InvalidChannel",
                &error,
                400,
            ));
        }
        let kind = ChannelKind::of(channel);
        match kind {
            ChannelKind::Public => {}
            // Not reached: the frame loop hands presence subscriptions to `subscribe_presence`.
            ChannelKind::Presence => return,
            ChannelKind::Private | ChannelKind::PrivateEncrypted => {
                let valid = auth.is_some_and(|auth| {
                    channel_auth_valid(self.app(), &self.socket_id(), channel, channel_data, auth)
                });
                if !valid {
                    return self.send(&protocol::subscription_error(
                        channel,
                        "AuthError",
                        "the subscription's auth signature is not valid for this socket and channel",
                        401,
                    ));
                }
            }
        }
        let mut hub = shard.hub.borrow_mut();
        match hub.subscribe(self.conn.id, channel, config.max_channels_per_connection) {
            Ok(_) => {}
            Err(SubscribeError::TooManyChannels) => {
                drop(hub);
                let limit = config.max_channels_per_connection;
                let error = format!("a connection may subscribe to at most {limit} channels");
                self.send(&protocol::error(Some(code::OVER_QUOTA), &error));
                return self.send(&protocol::subscription_error(
                    channel,
                    "LimitReached",
                    &error,
                    429,
                ));
            }
        }
        // The Laravel user channel, signed by the app: the connection is reached through the user
        // from now on, which is how a native send to the user reaches it (see the module docs).
        if kind == ChannelKind::Private {
            if let Ok(pattern) = UserChannelPattern::parse(&config.pusher_user_channel) {
                if let Some(user) = pattern.user_of(channel) {
                    hub.attach_user(self.conn.id, user);
                }
            }
        }
        drop(hub);
        self.send(&protocol::subscription_succeeded(channel));
    }

    /// This connection, node-wide, for the presence registry.
    fn conn_ref(&self) -> ConnRef {
        ConnRef {
            shard: self.conn.shard.index,
            conn: self.conn.id,
        }
    }

    /// The connection left `channel` (unsubscribed): if it was on it as a presence member, it
    /// leaves the registry (the others hear `member_removed` if it was the user's last connection).
    fn leave_presence(&mut self, channel: &str) {
        let Some(pos) = self
            .presence
            .as_ref()
            .and_then(|list| list.iter().position(|(c, _)| &**c == channel))
        else {
            return;
        };
        let mut list = Vec::from(self.presence.take().unwrap_or_default());
        let (channel, user) = list.swap_remove(pos);
        self.presence = (!list.is_empty()).then(|| list.into_boxed_slice());
        self.conn
            .shard
            .fanout
            .presence_leave(&channel, &user, self.conn_ref());
    }

    /// A presence subscription: checked as Pusher defines it (`auth` over
    /// `socket_id:channel:channel_data`, `channel_data` with the member's `user_id` and optional
    /// `user_info`, the channel's member cap), then joined to the registry and answered with the
    /// members of every node.
    async fn subscribe_presence(
        &mut self,
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    ) {
        let shard = self.conn.shard.clone();
        let config = &shard.config;
        if !is_valid_channel_name(&channel, config.pusher_max_channel_name) {
            // The same answer as any other bad name.
            return self.subscribe(&channel, None, None);
        }
        let (Some(auth), Some(channel_data)) = (auth, channel_data) else {
            return self.send(&protocol::subscription_error(
                &channel,
                "AuthError",
                "a presence subscription carries auth and channel_data from the app's auth endpoint",
                401,
            ));
        };
        if !channel_auth_valid(
            self.app(),
            &self.socket_id(),
            &channel,
            Some(&channel_data),
            &auth,
        ) {
            return self.send(&protocol::subscription_error(
                &channel,
                "AuthError",
                "the subscription's auth signature is not valid for this socket, channel and \
                 channel_data",
                401,
            ));
        }
        let member = match parse_channel_data(
            &channel_data,
            config.max_json_depth,
            config.pusher_max_presence_info_bytes,
        ) {
            Ok(member) => member,
            Err(error) => {
                return self.send(&protocol::subscription_error(
                    &channel,
                    "InvalidChannelData",
                    &error,
                    400,
                ))
            }
        };
        let already = self
            .presence
            .as_ref()
            .and_then(|list| list.iter().find(|(c, _)| **c == *channel))
            .map(|(_, user)| user.clone());
        match already {
            // Subscribed already: answer with the members again, as Pusher does for a repeat.
            Some(user) if *user == *member.user_id => {}
            Some(_) => {
                return self.send(&protocol::subscription_error(
                    &channel,
                    "InvalidChannelData",
                    "this connection is on the channel as another user already: unsubscribe first",
                    400,
                ))
            }
            None => {
                let members = shard.fanout.presence().members(&channel);
                let limit = config.pusher_max_presence_members;
                if members.len() >= limit && !members.iter().any(|m| m.user_id == member.user_id) {
                    return self.send(&protocol::subscription_error(
                        &channel,
                        "LimitReached",
                        &format!(
                            "the presence channel has {limit} members already \
                             (PUSHER_MAX_PRESENCE_MEMBERS)"
                        ),
                        code::OVER_CAPACITY,
                    ));
                }
                let subscribed = shard.hub.borrow_mut().subscribe(
                    self.conn.id,
                    &channel,
                    config.max_channels_per_connection,
                );
                if let Err(SubscribeError::TooManyChannels) = subscribed {
                    let limit = config.max_channels_per_connection;
                    let error = format!("a connection may subscribe to at most {limit} channels");
                    self.send(&protocol::error(Some(code::OVER_QUOTA), &error));
                    return self.send(&protocol::subscription_error(
                        &channel,
                        "LimitReached",
                        &error,
                        429,
                    ));
                }
                let mut list = Vec::from(self.presence.take().unwrap_or_default());
                list.push((channel.as_str().into(), member.user_id.as_str().into()));
                self.presence = Some(list.into_boxed_slice());
                let socket_id = self.socket_id();
                shard.fanout.presence_join_except(
                    &channel,
                    &member.user_id,
                    member.user_info.as_deref(),
                    self.conn_ref(),
                    Some(&socket_id),
                );
            }
        }
        let mut members = shard.fanout.presence_members(&channel).await;
        if !self
            .presence
            .as_ref()
            .is_some_and(|list| list.iter().any(|(c, _)| **c == *channel))
        {
            // Unsubscribed (or closed) while the list was read.
            return;
        }
        // The list may be read from Redis a moment before this node's own write lands there.
        if !members.iter().any(|m| m.user_id == member.user_id) {
            members.push(crate::presence::Member {
                user_id: member.user_id.clone(),
                user_info: member.user_info.clone(),
            });
        }
        self.send(&protocol::presence_subscription_succeeded(
            &channel,
            members
                .iter()
                .map(|m| (m.user_id.as_str(), m.user_info.as_deref())),
        ));
    }

    fn signin(&mut self, auth: &str, user_data: &str) {
        if !signin_auth_valid(self.app(), &self.socket_id(), user_data, auth) {
            return self.send(&protocol::error(
                Some(code::UNAUTHORIZED),
                "the sign-in's auth signature is not valid for this socket and user_data",
            ));
        }
        let Some(user) = protocol::user_id_of(user_data) else {
            return self.send(&protocol::error(
                None,
                "user_data must be a JSON object with a non-empty \"id\"",
            ));
        };
        let shard = &self.conn.shard;
        if !shard.hub.borrow_mut().attach_user(self.conn.id, &user) {
            return self.send(&protocol::error(
                Some(code::UNAUTHORIZED),
                "this connection belongs to another user already",
            ));
        }
        self.send(&protocol::signin_success(user_data));
    }

    /// A `client-` event: to the channel's other subscribers on every shard and node, not stored.
    fn client_event(&mut self, name: String, channel: &str, data: String) {
        let shard = self.conn.shard.clone();
        if !matches!(
            ChannelKind::of(channel),
            ChannelKind::Private | ChannelKind::Presence
        ) {
            return self.send(&protocol::error(
                Some(code::UNAUTHORIZED),
                "client events go only to private channels (not encrypted ones)",
            ));
        }
        if !shard.hub.borrow().is_subscribed(self.conn.id, channel) {
            return self.send(&protocol::error(
                Some(code::UNAUTHORIZED),
                "subscribe to the channel before sending client events to it",
            ));
        }
        if data.len() > shard.config.pusher_max_event_bytes {
            let limit = shard.config.pusher_max_event_bytes;
            return self.send(&protocol::error(
                None,
                &format!("an event's data is at most {limit} bytes"),
            ));
        }
        if !self.within_rate() {
            return;
        }
        let delivery = Arc::new(Delivery::of_pusher_event(
            channel,
            PusherEvent {
                name,
                data,
                except_socket: Some(self.socket_id().into()),
            },
        ));
        // This shard's subscribers get it through its own inbox, as a native publish does.
        shard.fanout.send_to_shard(
            shard.index,
            ShardMsg::DeliverExcept(delivery.clone(), self.conn.id),
        );
        shard
            .fanout
            .send_pusher_events(Some(shard.index), vec![delivery]);
    }

    /// Takes one client event from the connection's rate (`RATE_LIMIT_WS`); the first over it is
    /// answered with `pusher:error` 4301, the rest of the streak are dropped.
    fn within_rate(&mut self) -> bool {
        let auth = self.conn.shard.auth.clone();
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
            self.send(&protocol::error(
                Some(code::CLIENT_EVENT_RATE),
                "too many client events: slow down",
            ));
        }
        false
    }

    /// Sends the close the ending calls for (in the protocol's codes), flushes and closes.
    async fn close(mut self, ending: Ending) {
        let (code, reason) = match ending {
            Ending::Gone | Ending::Server(0) => (0, ""),
            Ending::Server(close_code::GOING_AWAY) | Ending::Server(code::RECONNECT) => {
                (code::RECONNECT, "server shutting down: reconnect")
            }
            Ending::Server(close_code::TRY_AGAIN_LATER) => {
                (4100, "slow consumer: reconnect with a backoff")
            }
            Ending::Server(code::UNAUTHORIZED) => (
                code::UNAUTHORIZED,
                "the app terminated this user's connections",
            ),
            Ending::Server(code) => (code, ""),
            Ending::Client(code) => (code.unwrap_or(close_code::NORMAL), ""),
        };
        if code != 0 {
            {
                let mut hub = self.conn.shard.hub.borrow_mut();
                let conn = hub.conn_mut(self.conn.id);
                if code == code::UNAUTHORIZED {
                    queue_final_frame(
                        conn,
                        Bytes::from(encode_text(&protocol::error(Some(code), reason))),
                    );
                }
                queue_final_frame(conn, Bytes::from(encode_close(code, reason)));
            }
            self.conn.set_deadline(Some(CLOSE_FLUSH_TIMEOUT));
            let _ = self.conn.flush_outbox(true).await;
        }
        self.conn.close();
        debug!(
            shard = self.conn.shard.index,
            close_code = code,
            "Pusher client disconnected"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_key_is_the_last_segment_of_app_paths() {
        assert_eq!(app_key_of("/app/abc"), Some("abc"));
        assert_eq!(app_key_of("/app/"), None);
        assert_eq!(app_key_of("/app/a/b"), None);
        assert_eq!(app_key_of("/apps/1"), None);
    }
}
