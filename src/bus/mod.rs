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
use crate::preferences::{Preferences, Registry};
use crate::store::CommitListener;

/// Routes deliveries to shards, and with a Redis bus to the other nodes. Cheap to clone; one copy per
/// shard and one on the store thread.
#[derive(Debug, Clone)]
pub struct Fanout {
    shards: Arc<[ShardInbox]>,
    /// The Redis bus of a multi-node deployment; `None` for a single node.
    bus: Option<RedisBus>,
    /// Told of every commit (`stored` and `fired` lines), on the store thread before delivery.
    audit: Audit,
    /// The node's users' preferences, which this fan-out keeps current (see
    /// [`Fanout::preferences_changed`]).
    preferences: Arc<Registry>,
}

impl Fanout {
    /// A fan-out over these shard inboxes (index = shard number), joined to other nodes through `bus`.
    pub fn new(shards: Vec<ShardInbox>, bus: Option<RedisBus>) -> Fanout {
        Fanout {
            shards: shards.into(),
            bus,
            audit: Audit::off(),
            preferences: Arc::default(),
        }
    }

    /// The same fan-out, keeping `registry` current with every user's preferences.
    pub fn with_preferences(mut self, registry: Arc<Registry>) -> Fanout {
        self.preferences = registry;
        self
    }

    /// The node's users' preferences.
    pub fn preferences(&self) -> &Arc<Registry> {
        &self.preferences
    }

    /// `user`'s preferences changed (`stored` is their stored JSON; `None`: back to the defaults):
    /// here, and with `from_bus` false also on the other nodes, through the bus. The registry
    /// first, then every shard's copy, so a connection arriving meanwhile reads the new ones.
    pub fn preferences_changed(
        &self,
        user: &str,
        preferences: Option<Preferences>,
        stored: Option<String>,
        from_bus: bool,
    ) {
        let preferences = preferences.map(Arc::new);
        self.preferences.set(user, preferences.clone());
        let name: Arc<str> = Arc::from(user);
        for shard in self.shards.iter() {
            shard.send_to_shard(ShardMsg::Preferences(name.clone(), preferences.clone()));
        }
        if let (Some(bus), false) = (&self.bus, from_bus) {
            bus.send_to_bus(BusCmd::Preferences { user: name, stored });
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

    fn released(&self, released: &[Arc<Notification>]) {
        let deliveries: Arc<[Arc<Delivery>]> = released
            .iter()
            .map(|n| Arc::new(Delivery::release_of(n.clone())))
            .collect();
        self.send_to_other_shards(None, deliveries);
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Released(released.to_vec()));
        }
    }
}
