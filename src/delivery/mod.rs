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
//! frames are encoded eagerly, where the delivery is made (the store thread, the bus thread, or the
//! publishing shard), since nearly every delivery goes to a native WebSocket and a shard must never
//! serialize on its delivery path. Any other encoding is made lazily, by the first connection that needs
//! it, once per delivery (a `OnceLock` per encoding), so a deployment without such connections pays
//! nothing for it. docs/architecture.md ("Connection kinds") describes how a new kind plugs in.

pub mod frame;
pub mod inbox;

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
}

/// A wire format deliveries are written in. One per distinct format, not per connection kind: kinds
/// that write the same bytes share one, so a delivery is encoded at most once per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A complete WebSocket text frame of the JSON of API.md: the native protocol, encoded eagerly.
    NativeWebSocket,
}

/// How many encodings are made lazily (every one but the native); the size of [`Delivery`]'s slots.
const LAZY_ENCODINGS: usize = 0;

impl Encoding {
    /// The encoding's slot among the lazy ones; `None` for the native frames, which are eager.
    fn lazy_slot(self) -> Option<usize> {
        match self {
            Encoding::NativeWebSocket => None,
        }
    }

    /// Encodes a delivery's frames in this format.
    fn encode(self, content: &Content, channels: &[String]) -> Frames {
        match self {
            Encoding::NativeWebSocket => Frames::native(content, channels),
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

    /// The native frames of any content (what [`Encoding::encode`] does for the native format).
    fn native(content: &Content, _channels: &[String]) -> Frames {
        match content {
            Content::Notification(n) => Frames::native_of_notification(n),
            Content::ClientMessage(payload) => {
                Frames::native_of_client_message(text_frame(payload.len(), |out| {
                    out.extend_from_slice(payload)
                }))
            }
        }
    }
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
    /// The native WebSocket frames, encoded when the delivery was made.
    pub native: Frames,
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
            native,
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

    /// The delivery of a committed notification, with its native frames encoded once.
    pub fn of_notification(n: Arc<Notification>) -> Delivery {
        let native = Frames::native_of_notification(&n);
        Delivery::new(
            Some(n.id),
            n.user_id.clone(),
            n.channels.clone(),
            n.broadcast,
            Content::Notification(n),
            native,
        )
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

    /// The delivery's frames in `encoding`: the native ones as encoded when the delivery was made;
    /// any other encoded now by the first caller, once (a concurrent caller on another shard waits for
    /// that encoding rather than making a second one).
    pub fn frames(&self, encoding: Encoding) -> &Frames {
        match encoding.lazy_slot() {
            None => &self.native,
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
        let v = payload_json(&d.native.plain);
        assert_eq!(v["message"], "hi");
        assert!(v.get("channel").is_none());
        let v = payload_json(&d.native.per_channel[0]);
        assert_eq!(v["channel"], "news");
        assert_eq!(&frame_payload(&d.native.plain)[..], &n.to_json()[..]);
    }

    #[test]
    fn a_client_message_from_another_node_gets_the_same_frame() {
        let d = Delivery::of_client_message("room", "ann", &format!("\"{}\"", "x".repeat(300)));
        let again = Delivery::of_client_payload("room", &frame_payload(&d.native.plain));
        assert_eq!(again.native.plain, d.native.plain, "16-bit length header");
        assert_eq!(again.channels, d.channels);
    }

    #[test]
    fn the_native_frames_are_the_eager_ones_and_any_content_encodes_to_them() {
        let d = Delivery::of_notification(notification());
        assert!(std::ptr::eq(d.frames(Encoding::NativeWebSocket), &d.native));
        let again = Encoding::NativeWebSocket.encode(&d.content, &d.channels);
        assert_eq!(again.plain, d.native.plain);
        assert_eq!(again.per_channel, d.native.per_channel);
        let m = Delivery::of_client_message("room", "ann", "{}");
        let again = Encoding::NativeWebSocket.encode(&m.content, &m.channels);
        assert_eq!(again.plain, m.native.plain);
        assert_eq!(m.native.get(Via::Channel(0)), &m.native.plain);
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
