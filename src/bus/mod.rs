//! Fan-out: from "this notification is committed" (or "this client published") to every shard that may
//! hold an interested connection.
//!
//! The JSON frame is encoded here, once per notification, into a complete WebSocket text frame held in a
//! reference-counted [`Bytes`]; every shard and every connection writes that same buffer (a notification
//! reached through a channel carries a `"channel"` field, so there is one extra frame per target channel).
//! No connection ever serializes anything.
//!
//! In a single node the bus is in-process: committed notifications arrive from the store thread through
//! [`CommitListener`], in commit order, and go to every shard's inbox; each shard drops what none of its
//! connections wants (a hash lookup). Since one thread (the store thread) feeds every shard in commit order,
//! a connection sees notifications in id order, which is what makes "resume after id X" exact.
//!
//! With `REDIS_URL` (or `REDIS_CLUSTER`, sharded Pub/Sub over a Redis Cluster: [`link`]) several nodes
//! are joined by the Redis bus ([`redis_bus`]): the same [`Fanout`] also
//! hands each commit and each client publish to the bus thread, which publishes it once for the other
//! nodes and routes what they publish to this node's interested shards ([`interest`]), each frame
//! encoded once per node ([`wire`]), each notification delivered once per node ([`recent`]); each node
//! announces itself, so that the others catch up what a node that died had not published ([`peers`]).

pub mod interest;
pub mod link;
pub mod peers;
pub mod recent;
pub mod redis_bus;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::bus::interest::InterestSink;
use crate::bus::redis_bus::{BusCmd, RedisBus};
use crate::model::{write_json_str, Notification};
use crate::shard::inbox::{ShardInbox, ShardMsg};
use crate::store::CommitListener;
use crate::ws::codec::write_text_header;

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
    /// The complete WebSocket frame for connections reached through the user or a broadcast.
    pub frame: Bytes,
    /// One complete frame per entry of `channels`, with the `"channel"` field set to it.
    pub channel_frames: Vec<Bytes>,
}

/// Builds a complete server text frame around a JSON payload written by `write`.
pub fn text_frame(payload_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut payload = Vec::with_capacity(payload_hint);
    write(&mut payload);
    let mut frame = Vec::with_capacity(payload.len() + 10);
    write_text_header(payload.len(), &mut frame);
    frame.extend_from_slice(&payload);
    Bytes::from(frame)
}

impl Delivery {
    /// The delivery of a committed notification, with its frames encoded once.
    pub fn of_notification(n: &Notification) -> Delivery {
        let hint = 320 + n.message.len() + n.title.len() + n.data.len();
        let frame = text_frame(hint, |out| n.write_json(out, None));
        let channel_frames = n
            .channels
            .iter()
            .map(|c| text_frame(hint + c.len(), |out| n.write_json(out, Some(c))))
            .collect();
        Delivery {
            id: Some(n.id),
            user: n.user_id.clone(),
            channels: n.channels.clone(),
            broadcast: n.broadcast,
            frame,
            channel_frames,
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
        Delivery {
            id: None,
            user: None,
            channels: vec![channel.to_owned()],
            broadcast: false,
            // A channel message has the channel in its body already: the same frame either way.
            channel_frames: vec![frame.clone()],
            frame,
        }
    }
}

/// The payload of a complete server text frame built by [`text_frame`] (unmasked, so the header is 2, 4
/// or 10 bytes by the length's size).
fn frame_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}

/// Routes deliveries to shards, and with a Redis bus to the other nodes. Cheap to clone; one copy per
/// shard and one on the store thread.
#[derive(Debug, Clone)]
pub struct Fanout {
    shards: Arc<[ShardInbox]>,
    /// The Redis bus of a multi-node deployment; `None` for a single node.
    bus: Option<RedisBus>,
}

impl Fanout {
    /// A fan-out over these shard inboxes (index = shard number), joined to other nodes through `bus`.
    pub fn new(shards: Vec<ShardInbox>, bus: Option<RedisBus>) -> Fanout {
        Fanout {
            shards: shards.into(),
            bus,
        }
    }

    /// Appends the Redis bus's metrics (nothing on a single node).
    pub fn render_bus_metrics(&self, out: &mut String) {
        if let Some(bus) = &self.bus {
            bus.render_metrics(out);
        }
    }

    /// `None` for a single node; else whether Redis is connected (for `/health`).
    pub fn redis_up(&self) -> Option<bool> {
        self.bus.as_ref().map(RedisBus::is_up)
    }

    /// The interest sink of shard `shard`: `None` for a single node, where interest stays local.
    pub fn interest_sink(&self, shard: usize) -> Option<InterestSink> {
        self.bus
            .as_ref()
            .map(|bus| InterestSink::new(shard, bus.queue()))
    }

    /// A client's channel message, already delivered on shard `from`: to the other shards and, with a
    /// bus, to the other nodes.
    pub fn send_client_message(&self, from: usize, channel: &str, delivery: Arc<Delivery>) {
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Message {
                channel: channel.into(),
                payload: frame_payload(&delivery.frame),
            });
        }
        self.send_to_other_shards(Some(from), Arc::from([delivery]));
    }

    /// Sends deliveries to every shard except `except` (the caller, which delivers locally itself).
    pub fn send_to_other_shards(&self, except: Option<usize>, deliveries: Arc<[Arc<Delivery>]>) {
        for (i, shard) in self.shards.iter().enumerate() {
            if Some(i) != except {
                shard.send_to_shard(ShardMsg::Deliver(deliveries.clone()));
            }
        }
    }

    /// Sends a message to shard `index` (a shard may send to its own inbox).
    pub fn send_to_shard(&self, index: usize, msg: ShardMsg) {
        if let Some(shard) = self.shards.get(index) {
            shard.send_to_shard(msg);
        }
    }

    /// Asks every shard to shut down gracefully.
    pub fn shutdown_all_shards(&self) {
        for shard in self.shards.iter() {
            shard.send_to_shard(ShardMsg::Shutdown);
        }
    }
}

impl CommitListener for Fanout {
    fn committed(&self, inserted: &[Arc<Notification>]) {
        if inserted.is_empty() {
            return;
        }
        let deliveries: Arc<[Arc<Delivery>]> = inserted
            .iter()
            .map(|n| Arc::new(Delivery::of_notification(n)))
            .collect();
        self.send_to_other_shards(None, deliveries);
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Committed(inserted.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_frame_is_one_text_frame_of_its_json() {
        let n = crate::model::SendInput {
            message: Some("hi".into()),
            user_id: Some(crate::model::UserIdInput::Text("u1".into())),
            channels: Some(vec!["news".into()]),
            ..Default::default()
        }
        .validate()
        .unwrap()
        .into_notification(Uuid::now_v7(), 0);
        let d = Delivery::of_notification(&n);
        let v = payload_json(&d.frame);
        assert_eq!(v["message"], "hi");
        assert!(v.get("channel").is_none());
        let v = payload_json(&d.channel_frames[0]);
        assert_eq!(v["channel"], "news");
        assert_eq!(&frame_payload(&d.frame)[..], &n.to_json()[..]);
    }

    #[test]
    fn a_client_message_from_another_node_gets_the_same_frame() {
        let d = Delivery::of_client_message("room", "ann", &format!("\"{}\"", "x".repeat(300)));
        let again = Delivery::of_client_payload("room", &frame_payload(&d.frame));
        assert_eq!(again.frame, d.frame, "16-bit length header");
        assert_eq!(again.channels, d.channels);
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
