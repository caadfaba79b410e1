//! Fan-out: from "this notification is committed" (or "this client published") to every shard that may
//! hold an interested connection.
//!
//! The JSON frame is encoded here, once per notification ([`Delivery::of_notification`]), into a complete
//! WebSocket text frame held in a reference-counted `Bytes`; every shard and every connection writes that
//! same buffer (a notification reached through a channel carries a `"channel"` field, so there is one
//! extra frame per target channel). No connection ever serializes anything.
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

use crate::audit::Audit;
use crate::bus::interest::InterestSink;
use crate::bus::redis_bus::{BusCmd, RedisBus};
use crate::delivery::frame::frame_payload;
use crate::delivery::inbox::{ShardInbox, ShardMsg};
use crate::delivery::Delivery;
use crate::model::Notification;
use crate::store::{CommitListener, UnreadCount};

/// Routes deliveries to shards, and with a Redis bus to the other nodes. Cheap to clone; one copy per
/// shard and one on the store thread.
#[derive(Debug, Clone)]
pub struct Fanout {
    shards: Arc<[ShardInbox]>,
    /// The Redis bus of a multi-node deployment; `None` for a single node.
    bus: Option<RedisBus>,
    /// Told of every commit (`stored` and `fired` lines), on the store thread before delivery.
    audit: Audit,
}

impl Fanout {
    /// A fan-out over these shard inboxes (index = shard number), joined to other nodes through `bus`.
    pub fn new(shards: Vec<ShardInbox>, bus: Option<RedisBus>) -> Fanout {
        Fanout {
            shards: shards.into(),
            bus,
            audit: Audit::off(),
        }
    }

    /// The same fan-out, recording every commit it is told of in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Fanout {
        self.audit = audit;
        self
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
                payload: frame_payload(&delivery.native.plain),
            });
        }
        self.send_to_other_shards(Some(from), Arc::from([delivery]));
    }

    /// Pusher events (one delivery per channel, made by `Delivery::of_pusher_event`): to every shard
    /// but `except` (a Pusher client's shard, which delivers its client event locally itself) and,
    /// with a bus, to the other nodes. Ephemeral: not stored, and dropped for the other nodes while
    /// Redis is away.
    pub fn send_pusher_events(&self, except: Option<usize>, deliveries: Vec<Arc<Delivery>>) {
        if let Some(bus) = &self.bus {
            for d in &deliveries {
                if let (crate::delivery::Content::PusherEvent(event), Some(channel)) =
                    (&d.content, d.channels.first())
                {
                    bus.send_to_bus(BusCmd::PusherEvent {
                        channel: channel.as_str().into(),
                        event: event.clone(),
                    });
                }
            }
        }
        self.send_to_other_shards(except, deliveries.into());
    }

    /// How many shards this node runs.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
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
        // Before the shards get it, so a notification's `stored` line comes before its `delivered`.
        self.audit.committed(inserted);
        let deliveries: Arc<[Arc<Delivery>]> = inserted
            .iter()
            .map(|n| Arc::new(Delivery::of_notification(n.clone())))
            .collect();
        self.send_to_other_shards(None, deliveries);
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Committed(inserted.to_vec()));
        }
    }

    fn unread_changed(&self, counts: &[UnreadCount]) {
        if counts.is_empty() {
            return;
        }
        let deliveries: Arc<[Arc<Delivery>]> = counts
            .iter()
            .map(|c| Arc::new(Delivery::of_unread(c.user_id.clone(), c.unread, c.version)))
            .collect();
        self.send_to_other_shards(None, deliveries);
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Unread(counts.to_vec()));
        }
    }
}
