//! Interest: which users and channels this node's connections want, so the Redis bus subscribes to
//! exactly those and routes each incoming message only to the shards that asked for it.
//!
//! Interest is counted at two levels. Inside a shard the hub already counts connections per user and per
//! channel (its name tables): a name is interned on the first connection and freed with the last. Only
//! those two edges cross threads, as an [`InterestChange`] pushed by the shard's [`InterestSink`] onto the
//! bus's lock-free queue, so a user with thousands of reconnects on a shard that keeps one connection open
//! sends nothing. On the bus thread the [`InterestRegistry`] keeps, per topic, the set of shards that
//! want it ([`ShardMask`]): the Redis SUBSCRIBE goes out when the first shard joins and the UNSUBSCRIBE
//! when the last one leaves. The registry only records the wanted state; the bus compares it with what
//! Redis has, after draining every queued change, so a burst of connects and disconnects becomes one
//! pipelined write of net changes.
//!
//! The same two edges also update the node's [`NodeInterest`], synchronously on the shard's thread:
//! the table every thread that hands deliveries to shards (a client's publish on another shard, the
//! store thread's commits) reads, so that a delivery wakes only the shards that hold a connection it
//! targets. Being updated before the shard answers the subscribe (or the upgrade), it never misses a
//! subscriber whose subscribe completed before the publish.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc::UnboundedSender;

use crate::bus::redis_bus::BusCmd;
use crate::config::MAX_BUS_SHARDS;

/// Something a connection can be interested in, other than broadcasts (every node always listens to
/// those).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Everything addressed to this user.
    User(Box<str>),
    /// Everything published to this channel.
    Channel(Box<str>),
}

impl Topic {
    /// The Redis channel that carries this topic, under the deployment's `REDIS_PREFIX`.
    pub fn redis_channel(&self, prefix: &str) -> String {
        match self {
            Topic::User(u) => format!("{prefix}u:{u}"),
            Topic::Channel(c) => format!("{prefix}c:{c}"),
        }
    }

    /// The topic a Redis channel name carries, or `None` for the broadcast channel and foreign names.
    pub fn from_redis_channel(prefix: &str, name: &str) -> Option<Topic> {
        let rest = name.strip_prefix(prefix)?;
        if let Some(user) = rest.strip_prefix("u:") {
            Some(Topic::User(user.into()))
        } else {
            rest.strip_prefix("c:")
                .map(|channel| Topic::Channel(channel.into()))
        }
    }
}

/// The Redis channel of broadcasts under `prefix`.
pub fn broadcast_channel(prefix: &str) -> String {
    format!("{prefix}b")
}

/// A shard's first connection for a topic arrived (`on`) or its last one left.
#[derive(Debug)]
pub struct InterestChange {
    /// The shard whose interest changed.
    pub shard: usize,
    /// What it is interested in.
    pub topic: Topic,
    /// `true`: the shard now wants the topic; `false`: it no longer does.
    pub on: bool,
    /// The change's number among the shard's (from 1, in the order the shard sent them), for
    /// [`SubscriptionMarks`].
    pub seq: u64,
}

/// How far each shard's interest changes have got into Redis: a shard numbers the changes it sends,
/// and the bus thread, once Redis has confirmed the subscriptions they asked for, records the last it
/// applied. A resume reads the store only when its shard's changes are all confirmed (or Redis is
/// away, when the outage's catch-up covers the gap): otherwise a notification another node commits
/// after the read but publishes before this node listens to the user's topic would be neither
/// replayed nor delivered live.
#[derive(Debug)]
pub struct SubscriptionMarks {
    /// Per shard, the number of its last change sent (written by that shard's thread only).
    sent: [AtomicU64; MAX_BUS_SHARDS],
    /// Per shard, the number of its last change whose subscription Redis confirmed.
    confirmed: [AtomicU64; MAX_BUS_SHARDS],
}

impl Default for SubscriptionMarks {
    fn default() -> SubscriptionMarks {
        SubscriptionMarks {
            sent: std::array::from_fn(|_| AtomicU64::new(0)),
            confirmed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl SubscriptionMarks {
    /// Numbers shard `shard`'s next change (called on that shard's thread only).
    fn next(&self, shard: usize) -> u64 {
        self.sent[shard].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Redis confirmed the subscriptions of shard `shard`'s changes up to number `seq`.
    pub fn confirm(&self, shard: usize, seq: u64) {
        self.confirmed[shard].fetch_max(seq, Ordering::Release);
    }

    /// Whether every change shard `shard` sent so far is confirmed.
    pub fn settled(&self, shard: usize) -> bool {
        shard >= MAX_BUS_SHARDS
            || self.confirmed[shard].load(Ordering::Acquire)
                >= self.sent[shard].load(Ordering::Relaxed)
    }
}

/// A shard's way to tell the bus about interest changes; `None` in the hub of a single node.
#[derive(Debug, Clone)]
pub struct InterestSink {
    /// This shard's number.
    shard: usize,
    /// The bus thread's command queue.
    bus: UnboundedSender<BusCmd>,
    /// Where the changes are numbered.
    marks: Arc<SubscriptionMarks>,
}

impl InterestSink {
    /// A sink for shard `shard` feeding the bus queue `bus`, numbering its changes in `marks`.
    pub fn new(
        shard: usize,
        bus: UnboundedSender<BusCmd>,
        marks: Arc<SubscriptionMarks>,
    ) -> InterestSink {
        InterestSink { shard, bus, marks }
    }

    /// Tells the bus this shard now wants (`on`) or no longer wants `topic`. Never blocks; a bus that
    /// has stopped (shutdown) is ignored.
    pub fn send_to_bus(&self, topic: Topic, on: bool) {
        let seq = self.marks.next(self.shard);
        let _ = self.bus.send(BusCmd::Interest(InterestChange {
            shard: self.shard,
            topic,
            on,
            seq,
        }));
    }
}

/// A set of shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardMask(
    /// Bit `i` set: shard `i` is in the set.
    pub u64,
);

impl ShardMask {
    /// Every shard of a node with `count` shards.
    pub fn all(count: usize) -> ShardMask {
        if count >= MAX_BUS_SHARDS {
            ShardMask(u64::MAX)
        } else {
            ShardMask((1u64 << count) - 1)
        }
    }

    /// No shard.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The shards in ascending order.
    pub fn shards(self) -> impl Iterator<Item = usize> {
        (0..MAX_BUS_SHARDS).filter(move |i| self.0 & (1 << i) != 0)
    }

    /// Whether shard `shard` is in the set (a shard past [`MAX_BUS_SHARDS`] is only in a full set).
    pub fn contains(self, shard: usize) -> bool {
        if shard >= MAX_BUS_SHARDS {
            self.0 == u64::MAX
        } else {
            self.0 & (1 << shard) != 0
        }
    }
}

impl std::ops::BitOr for ShardMask {
    type Output = ShardMask;
    fn bitor(self, other: ShardMask) -> ShardMask {
        ShardMask(self.0 | other.0)
    }
}

/// The kind of name an interest is for: a user's, or a channel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// A user id (deliveries addressed to the user).
    User,
    /// A channel name.
    Channel,
}

/// How many independently locked parts [`NodeInterest`] is split into: a subscribe edge on one shard
/// blocks the readers of one part only, and the readers of different channels rarely share a lock's
/// cache line.
const SEGMENTS: usize = 64;

/// One part of [`NodeInterest`]: the shards of each name hashed here.
#[derive(Debug, Default)]
struct Segment {
    users: HashMap<Box<str>, ShardMask>,
    channels: HashMap<Box<str>, ShardMask>,
}

impl Segment {
    fn map(&self, kind: TopicKind) -> &HashMap<Box<str>, ShardMask> {
        match kind {
            TopicKind::User => &self.users,
            TopicKind::Channel => &self.channels,
        }
    }

    fn map_mut(&mut self, kind: TopicKind) -> &mut HashMap<Box<str>, ShardMask> {
        match kind {
            TopicKind::User => &mut self.users,
            TopicKind::Channel => &mut self.channels,
        }
    }
}

/// Which of this node's shards hold a connection of each user and a subscriber of each channel,
/// shared by every thread of the node (see the module docs). A shard sets its bit for a name on its
/// first connection for it and clears it on its last, always before it answers the client, so a
/// reader that looks after a subscribe completed sees it. A reader holds one part's read lock for one
/// hash lookup; writers are the first arrivals and last departures only.
///
/// A node with more than [`MAX_BUS_SHARDS`] shards cannot name them all in a [`ShardMask`]: its
/// table records nothing and answers every shard for everything (the fan-out of old).
#[derive(Debug)]
pub struct NodeInterest {
    segments: Box<[RwLock<Segment>]>,
    hasher: RandomState,
    shards: usize,
}

impl NodeInterest {
    /// An empty table for a node of `shards` shards.
    pub fn new(shards: usize) -> NodeInterest {
        NodeInterest {
            segments: (0..SEGMENTS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Whether the table names shards (the node has at most [`MAX_BUS_SHARDS`]).
    fn routes(&self) -> bool {
        self.shards <= MAX_BUS_SHARDS
    }

    fn segment(&self, name: &str) -> &RwLock<Segment> {
        let hash = self.hasher.hash_one(name);
        &self.segments[(hash as usize) % SEGMENTS]
    }

    /// Shard `shard` now holds (`on`) or no longer holds a connection for the `kind` name `name`.
    pub fn set(&self, shard: usize, kind: TopicKind, name: &str, on: bool) {
        if !self.routes() || shard >= MAX_BUS_SHARDS {
            return;
        }
        let bit = 1u64 << shard;
        // A poisoned lock only means a panic elsewhere while holding it; the masks are still whole.
        let mut segment = self
            .segment(name)
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let map = segment.map_mut(kind);
        if on {
            match map.get_mut(name) {
                Some(mask) => mask.0 |= bit,
                None => {
                    map.insert(name.into(), ShardMask(bit));
                }
            }
        } else if let Some(mask) = map.get_mut(name) {
            mask.0 &= !bit;
            if mask.is_empty() {
                map.remove(name);
            }
        }
    }

    /// The shards holding a connection for the `kind` name `name` (every shard when the table does
    /// not route).
    pub fn shards_for(&self, kind: TopicKind, name: &str) -> ShardMask {
        if !self.routes() {
            return ShardMask::all(self.shards);
        }
        let segment = self
            .segment(name)
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        segment.map(kind).get(name).copied().unwrap_or_default()
    }

    /// The shards that a delivery to `user`, `channels` (and with `broadcast`, every connection)
    /// has to reach.
    pub fn targets<'a>(
        &self,
        user: Option<&str>,
        channels: impl IntoIterator<Item = &'a str>,
        broadcast: bool,
    ) -> ShardMask {
        if broadcast || !self.routes() {
            return ShardMask::all(self.shards);
        }
        let mut mask =
            user.map_or_else(ShardMask::default, |u| self.shards_for(TopicKind::User, u));
        for channel in channels {
            mask = mask | self.shards_for(TopicKind::Channel, channel);
        }
        mask
    }
}

/// The bus thread's view of the node's interest: for each topic, the shards that want it. See the
/// module docs.
#[derive(Debug, Default)]
pub struct InterestRegistry {
    wanted: HashMap<Topic, ShardMask>,
    /// Topics changed since the last [`InterestRegistry::take_changes`]: what a subscription update
    /// has to look at, so its cost follows the changes, not the number of wanted topics.
    touched: HashSet<Topic>,
}

impl InterestRegistry {
    /// Applies one change.
    pub fn apply(&mut self, change: InterestChange) {
        let bit = 1u64 << change.shard;
        if !self.touched.contains(&change.topic) {
            self.touched.insert(change.topic.clone());
        }
        if change.on {
            self.wanted.entry(change.topic).or_default().0 |= bit;
        } else if let Some(mask) = self.wanted.get_mut(&change.topic) {
            mask.0 &= !bit;
            if mask.is_empty() {
                self.wanted.remove(&change.topic);
            }
        }
    }

    /// The shards that want `topic` (empty when none).
    pub fn shards_for(&self, topic: &Topic) -> ShardMask {
        self.wanted.get(topic).copied().unwrap_or_default()
    }

    /// Whether some shard wants `topic`.
    pub fn is_wanted(&self, topic: &Topic) -> bool {
        self.wanted.contains_key(topic)
    }

    /// Every wanted topic.
    pub fn topics(&self) -> impl Iterator<Item = &Topic> {
        self.wanted.keys()
    }

    /// Like [`InterestRegistry::diff`], but looking only at the topics changed since the last call
    /// (which it forgets): the update after each batch of commands. Valid while `subscribed` followed
    /// every earlier result; after a reconnect (nothing subscribed) use `diff`.
    pub fn take_changes(&mut self, subscribed: &HashSet<Topic>) -> (Vec<Topic>, Vec<Topic>) {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for topic in self.touched.drain() {
            match (
                self.wanted.contains_key(&topic),
                subscribed.contains(&topic),
            ) {
                (true, false) => add.push(topic),
                (false, true) => remove.push(topic),
                _ => {}
            }
        }
        if self.touched.capacity() > 1024 {
            // A burst of arrivals is over: give its room back.
            self.touched.shrink_to(64);
        }
        add.sort();
        remove.sort();
        (add, remove)
    }

    /// What to subscribe to and unsubscribe from so that `subscribed` (what Redis has) matches what is
    /// wanted; both sorted, for stable commands and tests. Looks at every topic (a whole resync, at the
    /// start of a session); it also forgets the changes [`InterestRegistry::take_changes`] would see.
    pub fn diff(&mut self, subscribed: &HashSet<Topic>) -> (Vec<Topic>, Vec<Topic>) {
        self.touched.clear();
        let mut add: Vec<Topic> = self
            .wanted
            .keys()
            .filter(|t| !subscribed.contains(*t))
            .cloned()
            .collect();
        let mut remove: Vec<Topic> = subscribed
            .iter()
            .filter(|t| !self.wanted.contains_key(*t))
            .cloned()
            .collect();
        add.sort();
        remove.sort();
        (add, remove)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(shard: usize, topic: &Topic, on: bool) -> InterestChange {
        InterestChange {
            shard,
            topic: topic.clone(),
            on,
            seq: 0,
        }
    }

    #[test]
    fn a_shard_is_settled_once_its_last_change_is_confirmed_and_stays_so() {
        let marks = SubscriptionMarks::default();
        assert!(marks.settled(3));
        let (first, second) = (marks.next(3), marks.next(3));
        assert!(!marks.settled(3));
        marks.confirm(3, first);
        assert!(!marks.settled(3), "the second change is not confirmed yet");
        marks.confirm(3, second);
        assert!(marks.settled(3));
        marks.confirm(3, first);
        assert!(
            marks.settled(3),
            "a late, older confirmation does not go back"
        );
        assert!(marks.settled(1), "other shards are their own");
    }

    #[test]
    fn an_update_looks_only_at_what_changed_and_agrees_with_a_full_diff() {
        let mut registry = InterestRegistry::default();
        let mut subscribed = HashSet::new();
        for i in 0..100 {
            registry.apply(change(0, &Topic::User(format!("u{i}").into()), true));
        }
        let (add, remove) = registry.take_changes(&subscribed);
        assert_eq!((add.len(), remove.len()), (100, 0));
        subscribed.extend(add);
        assert!(registry.touched.is_empty(), "forgotten once taken");
        let u7 = Topic::User("u7".into());
        let new = Topic::User("new".into());
        registry.apply(change(0, &u7, false));
        registry.apply(change(1, &new, true));
        assert_eq!(
            registry.touched.len(),
            2,
            "only the changed topics are looked at"
        );
        let mut full = InterestRegistry {
            wanted: registry.wanted.clone(),
            touched: HashSet::new(),
        };
        let taken = registry.take_changes(&subscribed);
        assert_eq!(taken, (vec![new], vec![u7]));
        assert_eq!(taken, full.diff(&subscribed));
    }

    #[test]
    fn a_topic_is_wanted_from_the_first_shard_until_the_last_leaves() {
        let alice = Topic::User("alice".into());
        let news = Topic::Channel("news".into());
        let mut registry = InterestRegistry::default();
        registry.apply(change(0, &alice, true));
        registry.apply(change(3, &alice, true));
        registry.apply(change(1, &news, true));
        assert_eq!(registry.shards_for(&alice), ShardMask(0b1001));
        let mut subscribed = HashSet::new();
        let (add, remove) = registry.diff(&subscribed);
        assert_eq!(add, vec![alice.clone(), news.clone()]);
        assert!(remove.is_empty());
        subscribed.extend(add);

        registry.apply(change(0, &alice, false));
        assert_eq!(
            registry.diff(&subscribed),
            (vec![], vec![]),
            "shard 3 stays"
        );
        registry.apply(change(3, &alice, false));
        registry.apply(change(1, &news, false));
        registry.apply(change(1, &news, true));
        assert_eq!(
            registry.diff(&subscribed),
            (vec![], vec![alice.clone()]),
            "a leave and a rejoin net out"
        );
        assert!(registry.shards_for(&alice).is_empty());
    }

    #[test]
    fn the_node_table_names_the_shards_holding_a_name_until_their_last_leaves() {
        let table = NodeInterest::new(4);
        table.set(0, TopicKind::Channel, "news", true);
        table.set(3, TopicKind::Channel, "news", true);
        table.set(2, TopicKind::User, "news", true);
        assert_eq!(
            table.shards_for(TopicKind::Channel, "news"),
            ShardMask(0b1001)
        );
        assert_eq!(table.targets(Some("news"), ["x"], false), ShardMask(0b0100));
        assert_eq!(
            table.targets(Some("nobody"), ["news", "x"], false),
            ShardMask(0b1001)
        );
        assert_eq!(table.targets(None, [], true), ShardMask::all(4));
        table.set(0, TopicKind::Channel, "news", false);
        table.set(0, TopicKind::Channel, "news", false);
        assert_eq!(
            table.shards_for(TopicKind::Channel, "news"),
            ShardMask(0b1000)
        );
        table.set(3, TopicKind::Channel, "news", false);
        assert!(table.shards_for(TopicKind::Channel, "news").is_empty());
        assert!(table
            .segments
            .iter()
            .all(|s| s.read().unwrap().channels.is_empty()));

        let wide = NodeInterest::new(MAX_BUS_SHARDS + 1);
        wide.set(1, TopicKind::Channel, "news", true);
        assert_eq!(
            wide.targets(None, ["other"], false),
            ShardMask(u64::MAX),
            "too many shards to name: every shard"
        );
        assert!(ShardMask(u64::MAX).contains(MAX_BUS_SHARDS + 3));
        assert!(!ShardMask(1).contains(MAX_BUS_SHARDS + 3));
    }

    #[test]
    fn redis_channel_names_round_trip_under_the_prefix() {
        for topic in [Topic::User("u:1".into()), Topic::Channel("a.b".into())] {
            let name = topic.redis_channel("notif:");
            assert_eq!(Topic::from_redis_channel("notif:", &name), Some(topic));
        }
        assert_eq!(Topic::from_redis_channel("notif:", "notif:b"), None);
        assert_eq!(Topic::from_redis_channel("other:", "notif:u:x"), None);
        assert_eq!(
            ShardMask::all(3).shards().collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }
}
