//! What crosses threads on its way to a connection: the [`Delivery`] (what to deliver, to whom, and its
//! encoded frames), the server text frame it is encoded in ([`frame`]), and the shard inbox that carries
//! it ([`inbox`]).
//!
//! This is the leaf every thread shares: the store thread's fan-out and the bus thread make deliveries
//! and send them to shard inboxes, and the shards route them to their connections; none of them needs
//! another's module for that. It imports nothing of the crate but [`crate::model`] and
//! [`crate::preferences`] (a change of a user's preferences is a shard inbox message).
//!
//! # Encoded once per encoding, never per connection
//!
//! A delivery is encoded once for every wire format a receiving connection needs ([`Encoding`]), and
//! every connection of that format writes the same reference-counted buffer. The native WebSocket
//! frames of an ephemeral delivery are encoded eagerly, where it is made (the publishing shard, the bus
//! thread); a committed notification's are encoded by the first shard that has a connection for it
//! ([`Delivery::native`]), once per node, so that the store thread, which every write waits for, does
//! only store work, and a notification nobody here is connected for costs no encoding. Every other
//! encoding is made lazily too, by the first connection that needs it, once per delivery (a `OnceLock`
//! per encoding), so a deployment without such connections pays nothing for it. docs/architecture.md ("Connection kinds") describes how a new kind plugs in.

pub mod frame;
pub mod inbox;
pub mod sse;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use uuid::Uuid;

use crate::delivery::frame::{frame_payload, text_frame};
use crate::model::{write_json_str, Notification};

/// What a delivery carries, kept for the encodings made after the fact.
#[derive(Debug)]
pub enum Content {
    /// A committed notification (shared with the store thread's batch, not copied).
    Notification(Arc<Notification>),
    /// A client's ephemeral channel message: its JSON object
    /// (`{"event":"message","channel","from","data"}`), the payload of its native frame.
    ClientMessage(Bytes),
    /// The user's unread count changed: the `unread` control event (native
    /// `{"event":"unread","count":N}`). Not stored and without an id; a shard keeps only the newest
    /// (highest `version`) per user and writes it coalesced (`UNREAD_COALESCE_MS`).
    Unread {
        /// The unread count.
        count: u64,
        /// Orders counts of one user whichever way they came (see `store::UnreadCount::version`).
        version: u64,
    },
    /// A Pusher event to one channel (from the Pusher HTTP API or a Pusher client's `client-` event):
    /// ephemeral, like a client message.
    PusherEvent(PusherEvent),
    /// A user joined or left a presence channel (`crate::presence`): natively the `join`/`leave`
    /// event; kept whole so that other encodings (Pusher's `member_added`/`member_removed`) render
    /// the same change.
    Presence(PresenceChange),
}

/// A user's first connection on a presence channel (on any shard of any node) came, or its last one
/// went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The presence channel.
    pub channel: String,
    /// The user who joined or left.
    pub user_id: String,
    /// The member's `user_info` JSON text (Pusher's `channel_data`); `None` for native members.
    pub user_info: Option<String>,
    /// `true`: joined; `false`: left.
    pub joined: bool,
    /// The Pusher socket whose subscription made the user join: Pusher tells a member's arrival to
    /// the channel's other subscribers only (native connections hear their own `join`). Only ever
    /// set on the node of that socket; never carried between nodes.
    pub except_socket: Option<Box<str>>,
}

impl PresenceChange {
    /// The native event's JSON: `{"event":"join"|"leave","channel","user_id"}`.
    fn write_native_json(&self, out: &mut Vec<u8>) {
        let head: &[u8] = if self.joined {
            b"{\"event\":\"join\",\"channel\":"
        } else {
            b"{\"event\":\"leave\",\"channel\":"
        };
        out.extend_from_slice(head);
        write_json_str(out, &self.channel);
        out.extend_from_slice(b",\"user_id\":");
        write_json_str(out, &self.user_id);
        out.push(b'}');
    }

    /// The Pusher event's frame: `pusher_internal:member_added` with `{"user_id","user_info"}` (no
    /// `user_info` for a native member) or `pusher_internal:member_removed` with `{"user_id"}`, the
    /// data as a JSON string, as pusher-js reads it.
    fn pusher_frame(&self) -> Bytes {
        let mut data = Vec::with_capacity(32 + self.user_id.len());
        data.extend_from_slice(b"{\"user_id\":");
        write_json_str(&mut data, &self.user_id);
        if let (true, Some(info)) = (self.joined, &self.user_info) {
            data.extend_from_slice(b",\"user_info\":");
            data.extend_from_slice(info.as_bytes());
        }
        data.push(b'}');
        let name = if self.joined {
            "pusher_internal:member_added"
        } else {
            "pusher_internal:member_removed"
        };
        pusher_frame(name, Some(&self.channel), |out| {
            write_json_str(out, std::str::from_utf8(&data).unwrap_or_default())
        })
    }
}

/// A Pusher-protocol event, as it travels (one per channel: Pusher delivers an event triggered on
/// several channels once per channel, so a client subscribed to two of them gets it twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PusherEvent {
    /// The event name (`my-event`, `client-typing`).
    pub name: String,
    /// The event's `data` as JSON text: a JSON string for the HTTP API's events, whatever the client
    /// sent for client events.
    pub data: String,
    /// The socket id (`"<node>.<connection>"`) that must not receive it: the HTTP API's `socket_id`,
    /// or the sender of a client event.
    pub except_socket: Option<Box<str>>,
}

/// Where a Laravel user's notifications go for Pusher clients (`PUSHER_USER_CHANNEL` split around
/// its `{id}`): set once at start-up, read by the Pusher encoding. A process-wide setting rather than
/// an argument because encodings are made by whichever shard first needs them, from the delivery
/// alone.
static PUSHER_USER_CHANNEL: OnceLock<(String, String)> = OnceLock::new();

/// Sets the Pusher user channel pattern (the part before and after the user id); the first call wins.
pub fn set_pusher_user_channel(prefix: &str, suffix: &str) {
    let _ = PUSHER_USER_CHANNEL.set((prefix.to_owned(), suffix.to_owned()));
}

/// The event a notification sent to a user is to Pusher clients: Laravel's, so that laravel-echo's
/// `.notification(cb)` hands it to `cb`.
pub const LARAVEL_NOTIFICATION_EVENT: &str =
    "Illuminate\\Notifications\\Events\\BroadcastNotificationCreated";

/// A wire format deliveries are written in. One per distinct format, not per connection kind: kinds
/// that write the same bytes share one, so a delivery is encoded at most once per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A complete WebSocket text frame of the JSON of API.md: the native protocol, encoded eagerly.
    NativeWebSocket,
    /// Server-Sent Events ([`sse`]): `event: notification` with `id:` and the same JSON as the native
    /// frame; a client message as `event: message`. Lazy slot 1 (slot 0 is the Pusher protocol's).
    Sse,
    /// A complete WebSocket text frame of a Pusher-protocol event (`{"event","channel","data"}`).
    Pusher,
}

/// How many encodings are made lazily (every one but the native); the size of [`Delivery`]'s slots.
const LAZY_ENCODINGS: usize = 2;

impl Encoding {
    /// The encoding's slot among the lazy ones; `None` for the native frames, which are eager.
    fn lazy_slot(self) -> Option<usize> {
        match self {
            Encoding::NativeWebSocket => None,
            Encoding::Sse => Some(1),
            Encoding::Pusher => Some(0),
        }
    }

    /// Encodes a delivery's frames in this format.
    fn encode(self, content: &Content, channels: &[String]) -> Frames {
        match self {
            Encoding::NativeWebSocket => Frames::native(content, channels),
            Encoding::Sse => Frames::sse(content, channels),
            Encoding::Pusher => Frames::pusher(content, channels),
        }
    }
}

/// Which of a delivery's frames a connection gets, decided by how the delivery reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through its user or a broadcast: the plain frame.
    Plain,
    /// Only through the delivery's `i`-th channel: that channel's frame (with the `"channel"` field).
    Channel(usize),
}

/// A delivery's frames in one encoding.
#[derive(Debug)]
pub struct Frames {
    /// For connections reached through the user or a broadcast.
    pub plain: Bytes,
    /// One per entry of the delivery's `channels`, with the `"channel"` field set to it.
    pub per_channel: Vec<Bytes>,
}

impl Frames {
    /// The frame for a connection the delivery reached `via` this way.
    pub fn get(&self, via: Via) -> &Bytes {
        match via {
            Via::Plain => &self.plain,
            Via::Channel(i) => self.per_channel.get(i).unwrap_or(&self.plain),
        }
    }

    /// The native WebSocket frames of a notification: the JSON once without and once per channel
    /// with the `"channel"` field.
    fn native_of_notification(n: &Notification) -> Frames {
        let hint = 320 + n.message.len() + n.title.len() + n.data.len();
        let plain = text_frame(hint, |out| n.write_json(out, None));
        let per_channel = n
            .channels
            .iter()
            .map(|c| text_frame(hint + c.len(), |out| n.write_json(out, Some(c))))
            .collect();
        Frames { plain, per_channel }
    }

    /// The native WebSocket frames of a client message around its frame: it names its channel in its
    /// body already, so the same frame either way.
    fn native_of_client_message(frame: Bytes) -> Frames {
        Frames {
            per_channel: vec![frame.clone()],
            plain: frame,
        }
    }

    /// The native frames of a presence change: it names its channel in its body, so one frame.
    fn native_of_presence(change: &PresenceChange) -> Frames {
        let frame = text_frame(64 + change.channel.len() + change.user_id.len(), |out| {
            change.write_native_json(out)
        });
        Frames::native_of_client_message(frame)
    }

    /// The SSE events of any content (see [`sse`]): a notification's events carry its id, so an
    /// `EventSource` resumes from it; a client message is the control-style `event: message`.
    fn sse(content: &Content, channels: &[String]) -> Frames {
        match content {
            Content::Notification(n) => {
                let hint = 320 + n.message.len() + n.title.len() + n.data.len();
                let plain = sse::notification(n.id, hint, |out| n.write_json(out, None));
                let per_channel = n
                    .channels
                    .iter()
                    .map(|c| {
                        sse::notification(n.id, hint + c.len(), |out| n.write_json(out, Some(c)))
                    })
                    .collect();
                Frames { plain, per_channel }
            }
            Content::ClientMessage(payload) => {
                let event = sse::control(payload);
                Frames {
                    per_channel: vec![event.clone()],
                    plain: event,
                }
            }
            // `event: unread`, to the user's streams only, like the native event.
            Content::Unread { count, .. } => Frames {
                plain: sse::control_of_frame(&unread_frame(*count)),
                per_channel: Vec::new(),
            },
            // `event: join` / `event: leave`, with the native event's JSON.
            Content::Presence(change) => {
                let event = sse::control_of_frame(&Frames::native_of_presence(change).plain);
                Frames {
                    per_channel: vec![event.clone()],
                    plain: event,
                }
            }
            // `event: pusher_event`, with the native event's JSON.
            Content::PusherEvent(event) => {
                let channel = channels.first().map_or("", String::as_str);
                let event =
                    sse::control_of_frame(&Frames::native_of_pusher_event(channel, event).plain);
                Frames {
                    per_channel: vec![event.clone()],
                    plain: event,
                }
            }
        }
    }

    /// The native frames of an `unread` event: only the user's connections get it.
    fn native_of_unread(count: u64) -> Frames {
        Frames {
            plain: unread_frame(count),
            per_channel: Vec::new(),
        }
    }

    /// The native frames of any content (what [`Encoding::encode`] does for the native format).
    fn native(content: &Content, channels: &[String]) -> Frames {
        match content {
            Content::Unread { count, .. } => Frames::native_of_unread(*count),
            Content::PusherEvent(event) => {
                Frames::native_of_pusher_event(channels.first().map_or("", String::as_str), event)
            }
            Content::Notification(n) => Frames::native_of_notification(n),
            Content::ClientMessage(payload) => {
                Frames::native_of_client_message(text_frame(payload.len(), |out| {
                    out.extend_from_slice(payload)
                }))
            }
            Content::Presence(change) => Frames::native_of_presence(change),
        }
    }
}

/// The native frame of the `unread` event: `{"event":"unread","count":N}` (also what a connection gets
/// at connect, written by its session).
pub fn unread_frame(count: u64) -> Bytes {
    text_frame(40, |out| {
        out.extend_from_slice(b"{\"event\":\"unread\",\"count\":");
        out.extend_from_slice(count.to_string().as_bytes());
        out.push(b'}');
    })
}

impl Frames {
    /// The native frame of a Pusher event: `{"event":"pusher_event","channel","name","data"}`.
    fn native_of_pusher_event(channel: &str, event: &PusherEvent) -> Frames {
        let frame = text_frame(
            64 + channel.len() + event.name.len() + event.data.len(),
            |out| {
                out.extend_from_slice(b"{\"event\":\"pusher_event\",\"channel\":");
                write_json_str(out, channel);
                out.extend_from_slice(b",\"name\":");
                write_json_str(out, &event.name);
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(event.data.as_bytes());
                out.push(b'}');
            },
        );
        Frames::native_of_client_message(frame)
    }

    /// The Pusher frames of any content (what [`Encoding::encode`] does for the Pusher format):
    /// - a Pusher event: itself, on its channel;
    /// - a notification: through a channel, the event `notification` on that channel with the
    ///   notification's JSON (as a string) for data; through its user, Laravel's
    ///   `BroadcastNotificationCreated` on the user's channel (`PUSHER_USER_CHANNEL`) with the same
    ///   data, which holds `id` and `type` as `.notification(cb)` wants; a broadcast, the event
    ///   `notification` with no channel;
    /// - a native client message: the event `message` on its channel, with the native message's JSON
    ///   (`{"event","channel","from","data"}`) as a string for data.
    fn pusher(content: &Content, channels: &[String]) -> Frames {
        match content {
            Content::PusherEvent(event) => {
                let channel = channels.first().map_or("", String::as_str);
                let frame = pusher_frame(&event.name, Some(channel), |out| {
                    out.extend_from_slice(event.data.as_bytes())
                });
                Frames::native_of_client_message(frame)
            }
            Content::Notification(n) => {
                let as_string = |channel: Option<&str>| {
                    let mut json = Vec::with_capacity(320 + n.message.len() + n.data.len());
                    n.write_json(&mut json, channel);
                    String::from_utf8(json).unwrap_or_default()
                };
                let plain = match (&n.user_id, PUSHER_USER_CHANNEL.get()) {
                    (Some(user), Some((prefix, suffix))) => {
                        let channel = format!("{prefix}{user}{suffix}");
                        pusher_frame(LARAVEL_NOTIFICATION_EVENT, Some(&channel), |out| {
                            write_json_str(out, &as_string(None))
                        })
                    }
                    _ => pusher_frame("notification", None, |out| {
                        write_json_str(out, &as_string(None))
                    }),
                };
                let per_channel = n
                    .channels
                    .iter()
                    .map(|c| {
                        pusher_frame("notification", Some(c), |out| {
                            write_json_str(out, &as_string(Some(c)))
                        })
                    })
                    .collect();
                Frames { plain, per_channel }
            }
            Content::ClientMessage(payload) => {
                let channel = channels.first().map_or("", String::as_str);
                let frame = pusher_frame("message", Some(channel), |out| {
                    write_json_str(out, std::str::from_utf8(payload).unwrap_or_default())
                });
                Frames::native_of_client_message(frame)
            }
            Content::Presence(change) => Frames::native_of_client_message(change.pusher_frame()),
            // Never written: the Pusher protocol has no unread event, and the shard's unread flusher
            // writes only to native and SSE connections.
            Content::Unread { .. } => Frames {
                plain: Bytes::new(),
                per_channel: Vec::new(),
            },
        }
    }
}

/// A text frame of the Pusher event `{"event":<name>,"channel":<channel>,"data":<written>}`.
fn pusher_frame(name: &str, channel: Option<&str>, data: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    text_frame(64 + name.len(), |out| {
        out.extend_from_slice(b"{\"event\":");
        write_json_str(out, name);
        if let Some(channel) = channel {
            out.extend_from_slice(b",\"channel\":");
            write_json_str(out, channel);
        }
        out.extend_from_slice(b",\"data\":");
        data(out);
        out.push(b'}');
    })
}

/// One thing to deliver, shared by every shard and connection that receives it.
#[derive(Debug)]
pub struct Delivery {
    /// The stored notification's id (ordering and resume dedup); `None` for ephemeral client messages.
    pub id: Option<Uuid>,
    /// The targeted user, if any.
    pub user: Option<String>,
    /// Targeted channels.
    pub channels: Vec<String>,
    /// Every connection.
    pub broadcast: bool,
    /// What is delivered, for the encodings made lazily.
    pub content: Content,
    /// The native WebSocket frames: encoded when the delivery was made, except a committed
    /// notification's, which the first shard that has a connection for it encodes (see
    /// [`Delivery::native`]).
    native: OnceLock<Frames>,
    /// The other encodings' frames, each made by the first connection that needs it.
    lazy: [OnceLock<Frames>; LAZY_ENCODINGS],
    /// When the delivery was made: right after its commit (or on arrival from Redis, or at a client's
    /// publish). Shards time their first write from it (`notif_commit_to_write_seconds`).
    pub made_at: Instant,
    /// A notification its user's quiet hours held back, pushed now that they ended: to the user's
    /// connections only, and quiet hours no longer hold it (see `crate::preferences`).
    pub released: bool,
}

impl Delivery {
    /// A delivery to these targets, with its native frames already encoded.
    pub fn new(
        id: Option<Uuid>,
        user: Option<String>,
        channels: Vec<String>,
        broadcast: bool,
        content: Content,
        native: Frames,
    ) -> Delivery {
        Delivery {
            id,
            user,
            channels,
            broadcast,
            content,
            native: OnceLock::from(native),
            lazy: Default::default(),
            made_at: Instant::now(),
            released: false,
        }
    }

    /// The delivery of a notification whose quiet hours ended: to its user only (its channels'
    /// subscribers got it, or not, when it was committed), with its plain native frame.
    pub fn release_of(n: Arc<Notification>) -> Delivery {
        let plain = Frames::native_of_notification(&n).plain;
        let mut d = Delivery::new(
            Some(n.id),
            n.user_id.clone(),
            Vec::new(),
            false,
            Content::Notification(n),
            Frames {
                plain,
                per_channel: Vec::new(),
            },
        );
        d.released = true;
        d
    }

    /// The delivery of a committed notification. Its native frames are encoded once, by the first
    /// caller of [`Delivery::native`] (the first shard that has a connection for it), not here: this
    /// runs on the store thread (and the bus thread), which must do only what needs it, and a
    /// notification nobody on this node is connected for is never encoded.
    pub fn of_notification(n: Arc<Notification>) -> Delivery {
        Delivery {
            id: Some(n.id),
            user: n.user_id.clone(),
            channels: n.channels.clone(),
            broadcast: n.broadcast,
            content: Content::Notification(n),
            native: OnceLock::new(),
            lazy: Default::default(),
            made_at: Instant::now(),
            released: false,
        }
    }

    /// The native WebSocket frames: made with the delivery, or for a committed notification by the
    /// first caller, once (a concurrent caller on another shard waits for that encoding rather than
    /// making a second one).
    pub fn native(&self) -> &Frames {
        self.native
            .get_or_init(|| Frames::native(&self.content, &self.channels))
    }

    /// The `unread` event of `user`'s connections: the count at `version`.
    pub fn of_unread(user: String, count: u64, version: u64) -> Delivery {
        Delivery::new(
            None,
            Some(user),
            Vec::new(),
            false,
            Content::Unread { count, version },
            Frames::native_of_unread(count),
        )
    }

    /// The count and version of an `unread` delivery; `None` for any other.
    pub fn unread(&self) -> Option<(u64, u64)> {
        match self.content {
            Content::Unread { count, version } => Some((count, version)),
            _ => None,
        }
    }

    /// A client's ephemeral publish: `{"event":"message","channel","from","data"}` to one channel.
    pub fn of_client_message(channel: &str, from: &str, data_json: &str) -> Delivery {
        let frame = text_frame(64 + channel.len() + from.len() + data_json.len(), |out| {
            out.extend_from_slice(b"{\"event\":\"message\",\"channel\":");
            write_json_str(out, channel);
            out.extend_from_slice(b",\"from\":");
            write_json_str(out, from);
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data_json.as_bytes());
            out.push(b'}');
        });
        Delivery::of_channel_message_frame(channel, frame)
    }

    /// A client message that arrived from another node: `payload` is its frame's JSON, as sent.
    pub fn of_client_payload(channel: &str, payload: &[u8]) -> Delivery {
        let frame = text_frame(payload.len(), |out| out.extend_from_slice(payload));
        Delivery::of_channel_message_frame(channel, frame)
    }

    fn of_channel_message_frame(channel: &str, frame: Bytes) -> Delivery {
        Delivery::new(
            None,
            None,
            vec![channel.to_owned()],
            false,
            Content::ClientMessage(frame_payload(&frame)),
            Frames::native_of_client_message(frame),
        )
    }

    /// A Pusher event to `channel` (ephemeral: no id, not stored).
    pub fn of_pusher_event(channel: &str, event: PusherEvent) -> Delivery {
        let native = Frames::native_of_pusher_event(channel, &event);
        Delivery::new(
            None,
            None,
            vec![channel.to_owned()],
            false,
            Content::PusherEvent(event),
            native,
        )
    }

    /// The socket id a Pusher event (or a Pusher member's own arrival) must not reach, if any.
    pub fn excluded_socket(&self) -> Option<&str> {
        match &self.content {
            Content::PusherEvent(event) => event.except_socket.as_deref(),
            Content::Presence(change) => change.except_socket.as_deref(),
            _ => None,
        }
    }

    /// A presence change, to the subscribers of its channel. Not stored, like a client message: a
    /// client that reconnects asks for the member list rather than a replay of changes.
    pub fn of_presence_change(change: PresenceChange) -> Delivery {
        let native = Frames::native_of_presence(&change);
        Delivery::new(
            None,
            None,
            vec![change.channel.clone()],
            false,
            Content::Presence(change),
            native,
        )
    }

    /// The delivery's frames in `encoding`: the native ones as encoded when the delivery was made;
    /// any other encoded now by the first caller, once (a concurrent caller on another shard waits for
    /// that encoding rather than making a second one).
    pub fn frames(&self, encoding: Encoding) -> &Frames {
        match encoding.lazy_slot() {
            None => self.native(),
            Some(slot) => {
                self.lazy[slot].get_or_init(|| encoding.encode(&self.content, &self.channels))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification() -> Arc<Notification> {
        Arc::new(
            crate::model::SendInput {
                message: Some("hi".into()),
                user_id: Some(crate::model::UserIdInput::Text("u1".into())),
                channels: Some(vec!["news".into()]),
                ..Default::default()
            }
            .validate()
            .unwrap()
            .into_notification(Uuid::now_v7(), 0),
        )
    }

    #[test]
    fn a_notification_frame_is_one_text_frame_of_its_json() {
        let n = notification();
        let d = Delivery::of_notification(n.clone());
        let v = payload_json(&d.native().plain);
        assert_eq!(v["message"], "hi");
        assert!(v.get("channel").is_none());
        let v = payload_json(&d.native().per_channel[0]);
        assert_eq!(v["channel"], "news");
        assert_eq!(&frame_payload(&d.native().plain)[..], &n.to_json()[..]);
    }

    #[test]
    fn a_client_message_from_another_node_gets_the_same_frame() {
        let d = Delivery::of_client_message("room", "ann", &format!("\"{}\"", "x".repeat(300)));
        let again = Delivery::of_client_payload("room", &frame_payload(&d.native().plain));
        assert_eq!(
            again.native().plain,
            d.native().plain,
            "16-bit length header"
        );
        assert_eq!(again.channels, d.channels);
    }

    #[test]
    fn the_native_frames_are_the_eager_ones_and_any_content_encodes_to_them() {
        let d = Delivery::of_notification(notification());
        assert!(std::ptr::eq(
            d.frames(Encoding::NativeWebSocket),
            d.native()
        ));
        let again = Encoding::NativeWebSocket.encode(&d.content, &d.channels);
        assert_eq!(again.plain, d.native().plain);
        assert_eq!(again.per_channel, d.native().per_channel);
        let m = Delivery::of_client_message("room", "ann", "{}");
        let again = Encoding::NativeWebSocket.encode(&m.content, &m.channels);
        assert_eq!(again.plain, m.native().plain);
        assert_eq!(m.native().get(Via::Channel(0)), &m.native().plain);
    }

    #[test]
    fn the_sse_events_are_made_once_and_carry_the_native_json() {
        let d = Delivery::of_notification(notification());
        let sse = d.frames(Encoding::Sse);
        assert!(std::ptr::eq(sse, d.frames(Encoding::Sse)), "made once");
        let text = std::str::from_utf8(&sse.per_channel[0]).unwrap();
        let payload = frame_payload(&d.native().per_channel[0]);
        let json = std::str::from_utf8(&payload).unwrap();
        assert_eq!(
            text,
            format!(
                "event: notification\nid: {}\ndata: {json}\n\n",
                d.id.unwrap()
            )
        );
        let m = Delivery::of_client_message("room", "ann", "{}");
        assert!(m
            .frames(Encoding::Sse)
            .plain
            .starts_with(b"event: message\ndata: {"));
    }

    #[test]
    fn an_unread_delivery_is_the_unread_event_to_its_user_only() {
        let d = Delivery::of_unread("u1".into(), 42, 7);
        assert_eq!(
            payload_json(&d.native().plain),
            serde_json::json!({"event": "unread", "count": 42})
        );
        assert_eq!(d.unread(), Some((42, 7)));
        assert_eq!(
            (d.id, d.user.as_deref(), d.broadcast),
            (None, Some("u1"), false)
        );
        assert!(d.channels.is_empty());
        let again = Encoding::NativeWebSocket.encode(&d.content, &d.channels);
        assert_eq!(again.plain, d.native().plain);
        assert_eq!(Delivery::of_notification(notification()).unread(), None);
    }

    #[test]
    fn a_presence_change_is_the_join_or_leave_event_for_its_channel() {
        let change = PresenceChange {
            channel: "presence-room".into(),
            user_id: "u\"7".into(),
            user_info: Some(r#"{"name":"Ann"}"#.into()),
            joined: true,
            except_socket: None,
        };
        let d = Delivery::of_presence_change(change.clone());
        let v = payload_json(&d.native().plain);
        assert_eq!(
            v,
            serde_json::json!({"event":"join","channel":"presence-room","user_id":"u\"7"})
        );
        assert_eq!(d.native().get(Via::Channel(0)), &d.native().plain);
        assert_eq!(d.channels, ["presence-room"]);
        let left = Delivery::of_presence_change(PresenceChange {
            joined: false,
            ..change
        });
        assert_eq!(payload_json(&left.native().plain)["event"], "leave");
        let again = Encoding::NativeWebSocket.encode(&left.content, &left.channels);
        assert_eq!(again.plain, left.native().plain);
        // Pusher's encoding: member_added with the user_info, member_removed without.
        let added = payload_json(&d.frames(Encoding::Pusher).plain);
        assert_eq!(added["event"], "pusher_internal:member_added");
        assert_eq!(added["channel"], "presence-room");
        let data: serde_json::Value =
            serde_json::from_str(added["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"user_id":"u\"7","user_info":{"name":"Ann"}})
        );
        let removed = payload_json(&left.frames(Encoding::Pusher).plain);
        assert_eq!(removed["event"], "pusher_internal:member_removed");
        let data: serde_json::Value =
            serde_json::from_str(removed["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, serde_json::json!({"user_id":"u\"7"}));
    }

    /// Parses an unmasked server text frame's payload as JSON, checking the header on the way.
    fn payload_json(frame: &[u8]) -> serde_json::Value {
        assert_eq!(frame[0], 0x81, "FIN + text opcode");
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => panic!("test frames are small"),
            n => (n as usize, 2),
        };
        assert_eq!(
            frame.len(),
            start + len,
            "the frame is exactly header + payload"
        );
        serde_json::from_slice(&frame[start..]).unwrap()
    }
}
