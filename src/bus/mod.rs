//! Fan-out: from "this notification is committed" (or "this client published") to every shard that may
//! hold an interested connection.
//!
//! The JSON frame is encoded once per notification and node (by the first shard that has a connection
//! for it, see [`Delivery::of_notification`]), into a complete WebSocket text frame held in a
//! reference-counted `Bytes`; every shard and every connection writes that same buffer (a notification
//! reached through a channel carries a `"channel"` field, so there is one extra frame per target
//! channel). No connection ever serializes anything.
//!
//! In a single node the bus is in-process: committed notifications arrive from the store thread through
//! [`CommitListener`] ([`CommitFanout`]), in commit order, and go to the inboxes of the shards that hold
//! a connection they target, as the node's [`interest::NodeInterest`] table says (every shard for a
//! broadcast): one message per commit and shard, with the replies to that shard's sends; each shard then
//! finds its connections in its own indexes. Client publishes, Pusher events and presence changes go the
//! same way, so a publish to a channel wakes only the shards with a subscriber of it. Since one thread
//! (the store thread) feeds every shard in commit order,
//! a connection sees notifications in id order, which is what makes "resume after id X" exact.
//!
//! With `REDIS_URL` (or `REDIS_CLUSTER`, sharded Pub/Sub over a Redis Cluster: [`link`]) several nodes
//! are joined by the Redis bus ([`redis_bus`]): the same [`Fanout`] also
//! hands each commit and each client publish to the bus thread, which publishes it once for the other
//! nodes and routes what they publish to this node's interested shards ([`interest`]), each frame
//! encoded once per node ([`wire`]), each notification delivered once per node ([`recent`]); each node
//! announces itself, so that the others catch up what a node that died had not published ([`peers`]).
//!
//! Presence changes (`crate::presence`) go the same ways: a change on this node goes to every shard's
//! inbox as a `join`/`leave` delivery and, with a bus, to the other nodes as a `J` envelope, with the
//! node's members kept in Redis under an expiry ([`presence_sync`]).
//!
//! The Pusher HTTP API's channel counts are every node's: a survey over the bus ([`survey`]) asks the
//! other live nodes and waits for them up to `SURVEY_TIMEOUT_MS`.

pub mod interest;
pub mod link;
pub mod peers;
pub mod presence_sync;
pub mod recent;
pub mod redis_bus;
pub mod survey;
pub mod wire;

use std::sync::Arc;

use crate::audit::Audit;
use crate::bus::interest::{InterestSink, NodeInterest, ShardMask};
use crate::bus::redis_bus::{BusCmd, RedisBus};
use crate::bus::wire::NodePresence;
use crate::delivery::frame::frame_payload;
use crate::delivery::inbox::{Completion, ShardInbox, ShardMsg};
use crate::delivery::Delivery;
use crate::model::Notification;
use crate::preferences::{Preferences, Registry};
use crate::presence::{ConnRef, Member, Outcome, Presence};
use crate::store::{CommitListener, ShardReply, UnreadCount};

/// How much longer than `SURVEY_TIMEOUT_MS` a channel query waits for the bus thread before the local
/// counts answer alone (the bus thread is busy, a catch-up).
const SURVEY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a presence query waits for the bus thread before the registry's view answers.
const PRESENCE_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Routes deliveries to shards, and with a Redis bus to the other nodes. Cheap to clone; one copy per
/// shard and one on the store thread.
#[derive(Debug, Clone)]
pub struct Fanout {
    shards: Arc<[ShardInbox]>,
    /// Which shards hold which users and channels, kept by the shards' hubs: a delivery goes only to
    /// the shards it concerns.
    interest: Arc<NodeInterest>,
    /// The Redis bus of a multi-node deployment; `None` for a single node.
    bus: Option<RedisBus>,
    /// Told of every commit (`stored` and `fired` lines), on the store thread before delivery.
    audit: Audit,
    /// Who is on each presence channel: the node's one registry, shared with the bus thread.
    presence: Presence,
    /// The node's users' preferences, which this fan-out keeps current (see
    /// [`Fanout::preferences_changed`]).
    preferences: Arc<Registry>,
}

impl Fanout {
    /// A fan-out over these shard inboxes (index = shard number), joined to other nodes through `bus`.
    pub fn new(shards: Vec<ShardInbox>, bus: Option<RedisBus>) -> Fanout {
        Fanout {
            interest: Arc::new(NodeInterest::new(shards.len())),
            shards: shards.into(),
            bus,
            audit: Audit::off(),
            presence: Presence::new(),
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

    /// A Pusher app terminated `user`'s connections: every shard of this node closes them, and with a
    /// bus every other node's too.
    pub fn terminate_user(&self, user: &str) {
        let name: Box<str> = user.into();
        for shard in self.shards.iter() {
            shard.send_to_shard(ShardMsg::TerminateUser(name.clone()));
        }
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Terminate(name));
        }
    }

    /// The node's table of which shards hold which users and channels, for the shards' hubs to keep.
    pub fn node_interest(&self) -> &Arc<NodeInterest> {
        &self.interest
    }

    /// The node's presence registry.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Connection `conn` of `user_id` subscribed to presence channel `channel` (`user_info`: the JSON
    /// text its kind carries, if any): the registry records it, and if the user joined, every shard's
    /// subscribers of the channel hear it; if it is the user's first connection on this node, the other
    /// nodes too.
    pub fn presence_join(
        &self,
        channel: &str,
        user_id: &str,
        user_info: Option<&str>,
        conn: ConnRef,
    ) {
        self.presence_join_except(channel, user_id, user_info, conn, None);
    }

    /// [`Fanout::presence_join`] for a Pusher connection, whose socket id `except_socket` is not told
    /// of its own arrival (Pusher's `member_added` goes to the other subscribers only).
    pub fn presence_join_except(
        &self,
        channel: &str,
        user_id: &str,
        user_info: Option<&str>,
        conn: ConnRef,
        except_socket: Option<&str>,
    ) {
        let mut outcome = self.presence.join(channel, user_id, user_info, conn);
        if let (Some(event), Some(socket)) = (&mut outcome.event, except_socket) {
            event.except_socket = Some(socket.into());
        }
        self.presence_changed(channel, user_id, user_info, true, outcome);
    }

    /// Connection `conn` of `user_id` left presence channel `channel` (unsubscribed, or closed): as
    /// [`Fanout::presence_join`], for the user's last connection.
    pub fn presence_leave(&self, channel: &str, user_id: &str, conn: ConnRef) {
        let outcome = self.presence.leave(channel, user_id, conn);
        self.presence_changed(channel, user_id, None, false, outcome);
    }

    fn presence_changed(
        &self,
        channel: &str,
        user_id: &str,
        user_info: Option<&str>,
        present: bool,
        outcome: Outcome,
    ) {
        if let Some(event) = outcome.event {
            let delivery = Arc::new(Delivery::of_presence_change(event));
            self.send_to_interested_shards(None, Arc::from([delivery]));
        }
        if let (true, Some(bus)) = (outcome.node_changed, &self.bus) {
            bus.send_to_bus(BusCmd::Presence(NodePresence {
                channel: channel.to_owned(),
                user_id: user_id.to_owned(),
                user_info: user_info.map(str::to_owned),
                present,
            }));
        }
    }

    /// The members of presence channel `channel` on every node, sorted by user id: on a single node
    /// the registry's; with a bus, read from Redis by the bus thread (every live node's members), or the
    /// registry's view while Redis is away.
    pub async fn presence_members(&self, channel: &str) -> Vec<Member> {
        if let Some(bus) = &self.bus {
            let (reply, answer) = futures_channel::oneshot::channel();
            bus.send_to_bus(BusCmd::PresenceQuery {
                channel: channel.to_owned(),
                reply,
            });
            // Called on a shard: wait on glommio's timer, and answer from the registry if the bus
            // thread is busy for longer (a catch-up) or the read failed.
            let answer = std::pin::pin!(answer);
            let deadline = std::pin::pin!(glommio::timer::sleep(PRESENCE_QUERY_TIMEOUT));
            if let futures_util::future::Either::Left((Ok(members), _)) =
                futures_util::future::select(answer, deadline).await
            {
                return members;
            }
        }
        self.presence.members(channel)
    }

    /// Subscribed connections per channel on the other live nodes (channels starting with `prefix`,
    /// or the one channel `prefix` names with `exact`), by a survey over the bus
    /// ([`survey`]) that waits up to `timeout` for them: nothing on a single node or while Redis is
    /// away.
    pub async fn other_nodes_channel_counts(
        &self,
        prefix: &str,
        exact: bool,
        timeout: std::time::Duration,
    ) -> survey::Counts {
        let Some(bus) = &self.bus else {
            return survey::Counts::new();
        };
        let (reply, answer) = futures_channel::oneshot::channel();
        bus.send_to_bus(BusCmd::Survey {
            prefix: prefix.to_owned(),
            exact,
            reply,
        });
        // Called on a shard: wait on glommio's timer. The bus thread answers by the timeout itself;
        // this bound is for a bus thread held up by other work.
        let answer = std::pin::pin!(answer);
        let deadline = std::pin::pin!(glommio::timer::sleep(timeout + SURVEY_GRACE));
        match futures_util::future::select(answer, deadline).await {
            futures_util::future::Either::Left((Ok(counts), _)) => counts,
            _ => survey::Counts::new(),
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

    /// Whether shard `shard` may read the store for a resume: a single node always may; with Redis,
    /// once Redis confirmed every subscription the shard asked for (see
    /// [`interest::SubscriptionMarks`]), or while Redis is away.
    pub fn subscriptions_settled(&self, shard: usize) -> bool {
        self.bus
            .as_ref()
            .is_none_or(|bus| bus.subscriptions_settled(shard))
    }

    /// The interest sink of shard `shard`: `None` for a single node, where interest stays local.
    pub fn interest_sink(&self, shard: usize) -> Option<InterestSink> {
        self.bus
            .as_ref()
            .map(|bus| InterestSink::new(shard, bus.queue(), bus.marks()))
    }

    /// A client's channel message, already delivered on shard `from`: to the other shards with a
    /// subscriber of the channel and, with a bus, to the other nodes.
    pub fn send_client_message(&self, from: usize, channel: &str, delivery: Arc<Delivery>) {
        if let Some(bus) = &self.bus {
            bus.send_to_bus(BusCmd::Message {
                channel: channel.into(),
                payload: frame_payload(&delivery.native().plain),
            });
        }
        self.send_to_interested_shards(Some(from), Arc::from([delivery]));
    }

    /// Pusher events (one delivery per channel, made by `Delivery::of_pusher_event`): to every shard
    /// with a subscriber of the channel but `except` (a Pusher client's shard, which delivers its client event locally itself) and,
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
        self.send_to_interested_shards(except, deliveries.into());
    }

    /// How many shards this node runs.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shards holding a connection that `delivery` targets.
    fn targets(&self, delivery: &Delivery) -> ShardMask {
        self.interest.targets(
            delivery.user.as_deref(),
            delivery.channels.iter().map(String::as_str),
            delivery.broadcast,
        )
    }

    /// Sends deliveries to the shards, except `except` (the caller, which delivers locally itself),
    /// holding a connection one of them targets: each such shard gets those that concern it, in
    /// order (the whole shared list when all concern it), and the others are not woken.
    pub fn send_to_interested_shards(
        &self,
        except: Option<usize>,
        deliveries: Arc<[Arc<Delivery>]>,
    ) {
        let lists = self.per_shard(&deliveries);
        for (i, (shard, list)) in self.shards.iter().zip(lists).enumerate() {
            if let Some(list) = list.filter(|_| Some(i) != except) {
                shard.send_to_shard(ShardMsg::Deliver(list));
            }
        }
    }

    /// Which of `deliveries` each shard is to get, as the node's interest table says: `None` for a
    /// shard holding no connection that any of them targets. A burst whose deliveries all want the
    /// same shards is shared whole, not copied per shard.
    fn per_shard(&self, deliveries: &Arc<[Arc<Delivery>]>) -> Vec<Option<Arc<[Arc<Delivery>]>>> {
        let shards = self.shards.len();
        if let [one] = &**deliveries {
            let mask = self.targets(one);
            return (0..shards)
                .map(|i| mask.contains(i).then(|| deliveries.clone()))
                .collect();
        }
        let masks: Vec<ShardMask> = deliveries.iter().map(|d| self.targets(d)).collect();
        let union = masks.iter().fold(ShardMask::default(), |a, &m| a | m);
        let all_alike = masks.iter().all(|&m| m == union);
        (0..shards)
            .map(|i| {
                if !union.contains(i) {
                    None
                } else if all_alike {
                    Some(deliveries.clone())
                } else {
                    Some(
                        deliveries
                            .iter()
                            .zip(&masks)
                            .filter(|(_, m)| m.contains(i))
                            .map(|(d, _)| d.clone())
                            .collect(),
                    )
                }
            })
            .collect()
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

/// The store thread's side of the fan-out ([`Fanout::commit_listener`]): it gathers what one commit
/// has for the shards (its notifications, the unread counts it changed, what quiet hours released)
/// and, at the commit's end, hands each shard ONE inbox message with all of it and the answers to
/// that shard's writes, so a lone send costs each shard one wake (docs/architecture.md, "A lone
/// send's wake-ups"). The deliveries are made here without their frames, which the shards encode
/// (see [`Delivery::of_notification`]): this thread does only store work.
#[derive(Debug)]
pub struct CommitFanout {
    /// Where the deliveries go.
    fanout: Fanout,
    /// The deliveries of the commit under way, in order. Only the store thread touches it.
    pending: std::cell::RefCell<Vec<Arc<Delivery>>>,
}

impl Fanout {
    /// The listener of the store thread's commits, over this fan-out.
    pub fn commit_listener(&self) -> CommitFanout {
        CommitFanout {
            fanout: self.clone(),
            pending: std::cell::RefCell::new(Vec::new()),
        }
    }
}

impl CommitListener for CommitFanout {
    fn committed(&self, inserted: &[Arc<Notification>]) {
        if inserted.is_empty() {
            return;
        }
        // Before the shards get it, so a notification's `stored` line comes before its `delivered`.
        self.fanout.audit.committed(inserted);
        self.pending.borrow_mut().extend(
            inserted
                .iter()
                .map(|n| Arc::new(Delivery::of_notification(n.clone()))),
        );
        if let Some(bus) = &self.fanout.bus {
            bus.send_to_bus(BusCmd::Committed(inserted.to_vec()));
        }
    }

    fn unread_changed(&self, counts: &[UnreadCount]) {
        if counts.is_empty() {
            return;
        }
        self.pending.borrow_mut().extend(
            counts
                .iter()
                .map(|c| Arc::new(Delivery::of_unread(c.user_id.clone(), c.unread, c.version))),
        );
        if let Some(bus) = &self.fanout.bus {
            bus.send_to_bus(BusCmd::Unread(counts.to_vec()));
        }
    }

    fn released(&self, released: &[Arc<Notification>]) {
        if released.is_empty() {
            return;
        }
        self.pending.borrow_mut().extend(
            released
                .iter()
                .map(|n| Arc::new(Delivery::release_of(n.clone()))),
        );
        if let Some(bus) = &self.fanout.bus {
            bus.send_to_bus(BusCmd::Released(released.to_vec()));
        }
    }

    fn commit_ended(&self, replies: Vec<ShardReply>) {
        let deliveries = std::mem::take(&mut *self.pending.borrow_mut());
        if deliveries.is_empty() && replies.is_empty() {
            return;
        }
        let shards = &self.fanout.shards;
        let mut answers: Vec<Vec<Completion>> = shards.iter().map(|_| Vec::new()).collect();
        for reply in replies {
            match answers.get_mut(reply.shard) {
                Some(list) => list.push(Completion::new(reply.into_fn())),
                // Not a shard of this fan-out (a handle made for a number it does not have):
                // answered here rather than lost.
                None => reply.give(),
            }
        }
        let deliveries: Arc<[Arc<Delivery>]> = deliveries.into();
        let lists = self.fanout.per_shard(&deliveries);
        for ((shard, replies), list) in shards.iter().zip(answers).zip(lists) {
            // A shard that none of the commit targets hears of it only if it has a reply waiting.
            if list.is_none() && replies.is_empty() {
                continue;
            }
            shard.send_to_shard(ShardMsg::Commit {
                deliveries: list.unwrap_or_else(|| Arc::from([])),
                replies,
            });
        }
    }
}
