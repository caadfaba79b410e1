//! The Redis bus: one OS thread per node that joins this node's shards to the other nodes' through Redis
//! Pub/Sub.
//!
//! **Threads and queues.** Shards run glommio and must never wait for Redis, so the bus thread owns the
//! Redis connections (a subscriber and a publisher, see `link.rs`; with `REDIS_CLUSTER`, one of each per
//! master, through sharded Pub/Sub) inside a current-thread tokio runtime, as the PostgreSQL store does. Everything else talks to it through one lock-free queue of [`BusCmd`]: the
//! store thread's commits, shards' client publishes and their interest changes. It hands incoming
//! deliveries to shards through their inboxes, and only to the shards that hold an interested connection
//! (see `interest.rs`). Every message the thread takes from either side, it takes in a batch: all queued
//! publishes go out as one pipeline, all queued interest changes become one pipelined write of
//! SUBSCRIBE/UNSUBSCRIBE, and all messages Redis has sent so far become one inbox message per shard.
//!
//! **Topics.** Each user and each channel is a Redis channel (`<prefix>u:<user>`, `<prefix>c:<channel>`),
//! plus one broadcast channel (`<prefix>b`) every node listens to. A notification is published once per
//! topic it targets (a broadcast only to the broadcast channel); a node that receives it through several
//! of its topics delivers it once (`recent.rs`). Each SUBSCRIBE names one channel: Redis answers a
//! many-channel SUBSCRIBE with one reply per channel, which the `redis` crate's pub/sub sink would match
//! to the wrong requests; one channel per command, all pipelined, costs the same round trip.
//!
//! **No double delivery.** A node delivers its own commits and client publishes to its shards directly
//! (`Fanout`), so each envelope carries the node's random id and the node drops what it hears back.
//!
//! **Outages.** When Redis goes away, sends still commit and local delivery goes on; `/health` says
//! `"redis":"down"`. The thread reconnects with exponential backoff, resubscribes to everything wanted
//! then, and catches its live connections up from the store: it asks for every notification since the
//! outage began (less [`CATCH_UP_MARGIN`], for messages lost in flight) for the users and channels with a
//! local connection and for broadcasts, drops the ids it has delivered already, and delivers the rest in
//! id order. It does so after the subscriptions are confirmed and before reading any newer message, so
//! nothing falls between the catch-up and live delivery. The catch-up reads page by page until it has
//! everything (a catch-up cut at one page would drop the newest notifications of the gap: it did, when
//! an outage held more than `MAX_REPLAY` of them).
//!
//! **The outbox.** Every commit and client message goes into an outbox, in commit order, and leaves it
//! only when Redis has taken the pipeline that carries it. A publish that fails keeps its batch there;
//! while Redis is away commits pile up there (up to [`MAX_UNPUBLISHED`]); when the link is back the
//! outbox goes out first, before anything committed later, so the other nodes receive this node's
//! notifications in id order whichever node reconnects first. For the nodes that did see the outage,
//! those are copies of what their own catch-up found, and are dropped as duplicates.
//!
//! **Presence** (`presence_sync.rs`): a node-level presence change is a write to the node's hash of the
//! channel, then a `J` envelope on the channel's Redis channel (in that order, see `presence_sync.rs`); a presence query reads every live
//! node's hash. Changes and queries are applied in the order they were queued, after the batch's
//! publishes. While Redis is away changes are not queued (the registry has them): each session
//! rewrites the node's hashes, announces its members again and rereads the other nodes'.
//!
//! **Nodes that die** between a commit and its publish: see `peers.rs`. Each node announces on a timer
//! that it is alive and how far its publishing has got; when one stops announcing, the others catch up
//! from the store from that point, the same way as after an outage. In a Redis Cluster, a slot
//! that moves to another master (Redis ends its channels' subscriptions with `sunsubscribe`) or a lost
//! master ends the session the same way: the next one reads the new slot map, subscribes on the new
//! owners and catches up the gap (a session costs one catch-up read per connected user).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::RedisError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::bus::interest::{
    broadcast_channel, InterestChange, InterestRegistry, ShardMask, SubscriptionMarks, Topic,
};
use crate::bus::link::{describe, Incoming, Link};
use crate::bus::peers::{self, GonePeer, PeerState, PeerWatch};
use crate::bus::presence_sync;
use crate::bus::recent::RecentIds;
use crate::bus::survey::Surveys;
use crate::bus::wire::{self, Envelope, NodePresence};
use crate::config::{RedisTarget, MAX_BUS_SHARDS};
use crate::delivery::inbox::{ShardInbox, ShardMsg};
use crate::delivery::{Delivery, PresenceChange};
use crate::model::{now_millis, Millis, Notification};
use crate::preferences::Registry;
use crate::presence::{is_presence_channel, Member, Presence};
use crate::store::{ReplayQuery, Store, StoreError, UnreadCount};

/// First pause after a failed connection; it doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one connection attempt may take, all connections of a session together (a cluster's too).
const CONNECT_GRACE: Duration = Duration::from_secs(6);
/// The catch-up after an outage starts this much before the outage was noticed: a message published
/// just before may have been lost with the connection.
pub const CATCH_UP_MARGIN: Duration = Duration::from_secs(2);
/// Commands or incoming messages handled in one batch before the thread looks at the other side.
const MAX_BATCH: usize = 4096;
/// Catch-up reads sent to the store at once (one per user with a local connection, plus one for the
/// channels and broadcasts).
const CATCH_UP_PARALLEL_READS: usize = 64;
/// Most notifications the outbox keeps while Redis is away; past it the oldest go (the other nodes'
/// catch-up after their own outage, or their clients' resume, still finds them in the store).
pub const MAX_UNPUBLISHED: usize = 100_000;
/// How long a late copy from a node taken for gone is recognised as one (see `peers.rs`).
const LATE_FLOOR_KEPT: Duration = Duration::from_secs(600);

/// What the other threads ask of the bus thread.
#[derive(Debug)]
pub enum BusCmd {
    /// A shard's interest in a topic began or ended.
    Interest(InterestChange),
    /// Notifications this node committed, in commit order (already delivered locally).
    Committed(Vec<Arc<Notification>>),
    /// A client's message to `channel` on this node: the payload of its text frame (already delivered
    /// locally).
    Message {
        /// The target channel.
        channel: Box<str>,
        /// The frame's JSON payload.
        payload: Bytes,
    },
    /// Users' new unread counts on this node (already delivered locally), for the other nodes'
    /// connections of those users.
    Unread(Vec<UnreadCount>),
    /// A Pusher event to `channel` on this node (already delivered locally); ephemeral, like a
    /// client message.
    PusherEvent {
        /// The target channel.
        channel: Box<str>,
        /// The event.
        event: crate::delivery::PusherEvent,
    },
    /// A user's first connection on a presence channel came to this node, or its last one went
    /// (already delivered locally): to the other nodes and the node's Redis hash.
    Presence(NodePresence),
    /// The members of a presence channel on every live node, read from Redis (the registry's view
    /// while Redis is away); a dropped `reply` means the read failed.
    PresenceQuery {
        /// The presence channel.
        channel: String,
        /// Where the members go, sorted by user id.
        reply: futures_channel::oneshot::Sender<Vec<Member>>,
    },
    /// A user's preferences changed on this node (already applied here): tell the others.
    Preferences {
        /// Whose.
        user: Arc<str>,
        /// Their stored JSON; `None`: back to the defaults.
        stored: Option<String>,
    },
    /// Notifications this node released at the end of their users' quiet hours (already delivered
    /// locally): to their users' connections on the other nodes.
    Released(Vec<Arc<Notification>>),
    /// A Pusher app terminated a user's connections (done on this node already): to every node.
    Terminate(Box<str>),
    /// The other live nodes' subscribed connections per channel (see [`crate::bus::survey`]):
    /// summed over the nodes that answered within the survey timeout; nothing while Redis is away.
    Survey {
        /// The channel name prefix, or one channel's whole name with `exact`.
        prefix: String,
        /// Whether `prefix` is one channel's whole name.
        exact: bool,
        /// Where the sums go.
        reply: futures_channel::oneshot::Sender<BTreeMap<String, usize>>,
    },
    /// This node's counts for another node's survey, gathered from the shards: publish them.
    SurveyAnswer {
        /// The asking node.
        to: Uuid,
        /// Its survey's id.
        id: u64,
        /// This node's subscribed connections per channel.
        counts: BTreeMap<String, usize>,
    },
    /// The timeout of this node's survey `id` passed: answer with what came.
    SurveyExpired(u64),
    /// Leave Redis and end the thread.
    Stop,
}

/// Presence work of one batch, applied in queue order after the batch's publishes.
enum PresenceOp {
    /// Write a change of this node's members to its hash, then publish it.
    Write(NodePresence),
    /// Answer a member query.
    Query {
        channel: String,
        reply: futures_channel::oneshot::Sender<Vec<Member>>,
    },
}

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// `REDIS_URL` or `REDIS_CLUSTER`, normalized to `redis://...`.
    pub target: RedisTarget,
    /// `REDIS_PREFIX`: the start of every Redis channel name.
    pub prefix: String,
    /// Notifications one catch-up read returns per page (`MAX_REPLAY`); a catch-up reads every page.
    pub max_replay: usize,
    /// `REDIS_NODE_TIMEOUT_MS`: how long a node that stops announcing itself is waited for before the
    /// others catch up what it may not have published (see `peers.rs`).
    pub node_timeout: Duration,
    /// `SURVEY_TIMEOUT_MS`: how long a survey waits for the other nodes' answers.
    pub survey_timeout: Duration,
}

/// The bus thread's counters, for `/metrics`. Only the bus thread writes them (not a shard's hot path).
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Messages published to Redis (one per target topic of a notification).
    published: AtomicU64,
    /// Messages from other nodes handed to this node's shards.
    received: AtomicU64,
    /// Copies of a notification this node had delivered already, dropped.
    duplicates: AtomicU64,
    /// Notifications delivered by catch-ups after Redis outages.
    caught_up: AtomicU64,
    /// Redis sessions lost.
    outages: AtomicU64,
    /// Other nodes taken for gone (stopped announcing themselves without stopping gracefully).
    peers_gone: AtomicU64,
    /// Surveys answered without every live node's counts (see `survey.rs`).
    survey_timeouts: AtomicU64,
}

impl BusCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The handle the rest of the node holds: the command queue and the link state.
#[derive(Debug, Clone)]
pub struct RedisBus {
    /// The bus thread's command queue.
    queue: UnboundedSender<BusCmd>,
    /// Whether the bus is connected and subscribed (for `/health`).
    up: Arc<AtomicBool>,
    /// What the bus thread did.
    counters: Arc<BusCounters>,
    /// How far each shard's interest changes are subscribed in Redis.
    marks: Arc<SubscriptionMarks>,
}

impl RedisBus {
    /// A handle and the receiving side of its queue, for [`spawn_bus_thread`].
    pub fn new() -> (RedisBus, UnboundedReceiver<BusCmd>) {
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            RedisBus {
                queue,
                up: Arc::new(AtomicBool::new(false)),
                counters: Arc::default(),
                marks: Arc::default(),
            },
            rx,
        )
    }

    /// Queues a command for the bus thread. Never blocks; a stopped bus drops it.
    pub fn send_to_bus(&self, cmd: BusCmd) {
        let _ = self.queue.send(cmd);
    }

    /// The queue, for shards' interest sinks.
    pub fn queue(&self) -> UnboundedSender<BusCmd> {
        self.queue.clone()
    }

    /// Whether Redis is connected and every subscription is in place.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The numbering of the shards' interest changes, for their interest sinks.
    pub fn marks(&self) -> Arc<SubscriptionMarks> {
        self.marks.clone()
    }

    /// Whether shard `shard` may read the store for a resume: Redis confirmed every subscription the
    /// shard asked for so far, or Redis is away (its outage's catch-up covers what is missed).
    pub fn subscriptions_settled(&self, shard: usize) -> bool {
        !self.is_up() || self.marks.settled(shard)
    }

    /// Appends the bus's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.counters;
        let value = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let metrics = [
            (
                "notif_redis_up",
                "gauge",
                "1 while Redis is connected and subscribed.",
                u64::from(self.is_up()),
            ),
            (
                "notif_redis_published_total",
                "counter",
                "Messages published to Redis.",
                value(&c.published),
            ),
            (
                "notif_redis_received_total",
                "counter",
                "Messages from other nodes delivered to shards.",
                value(&c.received),
            ),
            (
                "notif_redis_duplicates_total",
                "counter",
                "Copies of already delivered notifications dropped.",
                value(&c.duplicates),
            ),
            (
                "notif_redis_caught_up_total",
                "counter",
                "Notifications delivered from the store after Redis outages.",
                value(&c.caught_up),
            ),
            (
                "notif_redis_outages_total",
                "counter",
                "Redis sessions lost.",
                value(&c.outages),
            ),
            (
                "notif_redis_peers_gone_total",
                "counter",
                "Other nodes that stopped announcing themselves, and were caught up from the store.",
                value(&c.peers_gone),
            ),
            (
                "notif_survey_timeouts_total",
                "counter",
                "Pusher channel queries answered without some live node's counts (SURVEY_TIMEOUT_MS passed).",
                value(&c.survey_timeouts),
            ),
        ];
        for (name, kind, help, v) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

/// Starts the bus thread. It runs until [`BusCmd::Stop`] (or until every handle is gone).
pub fn spawn_bus_thread(
    config: RedisBusConfig,
    bus: &RedisBus,
    queue: UnboundedReceiver<BusCmd>,
    shards: Vec<ShardInbox>,
    store: Store,
    presence: Presence,
    preferences: Arc<Registry>,
) -> Result<JoinHandle<()>, String> {
    if config.target.tls() {
        check_tls_at_start(&config.target)?;
    }
    // A v7 id carries 74 random bits: enough to tell processes apart.
    let origin = Uuid::now_v7();
    let all_shards = ShardMask::all(shards.len());
    // Every live node reconnects within its largest backoff step (and one connection attempt) after
    // Redis is back; only then is a node that has not announced itself again taken for gone.
    let grace = config.node_timeout + MAX_BACKOFF + CONNECT_GRACE;
    let thread = BusThread {
        surveys: Surveys::new(bus.queue.downgrade(), config.survey_timeout),
        marks: bus.marks.clone(),
        applied: vec![0; MAX_BUS_SHARDS],
        peers: PeerWatch::new(origin, grace),
        published_through: now_millis(),
        caught_up_from: now_millis(),
        late_floors: HashMap::new(),
        broadcast: broadcast_channel(&config.prefix),
        config,
        origin,
        shards,
        all_shards,
        store,
        queue,
        up: bus.up.clone(),
        counters: bus.counters.clone(),
        registry: InterestRegistry::default(),
        subscribed: HashSet::new(),
        recent: RecentIds::default(),
        outage_since: None,
        outbox: VecDeque::new(),
        dropped_unpublished: 0,
        presence,
        presence_ops: Vec::new(),
        presence_read: HashSet::new(),
        stopping: false,
        preferences,
    };
    std::thread::Builder::new()
        .name("redis-bus".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "cannot start the Redis bus runtime: running as a single node");
                    return;
                }
            };
            runtime.block_on(thread.run());
        })
        .map_err(|e| format!("cannot start the Redis bus thread: {e}"))
}

/// Connects once before the bus thread starts, when the target uses TLS: a certificate that is
/// refused (signed by another CA, naming another host) is a wrong setting, not an outage, and
/// retrying it forever would only hide it, so it stops the start-up with the reason. Any other
/// failure (Redis not reachable yet) is left to the bus thread, which reconnects with backoff as it
/// does without TLS.
fn check_tls_at_start(target: &RedisTarget) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start a runtime to check Redis TLS: {e}"))?;
    let attempt = runtime
        .block_on(async { tokio::time::timeout(CONNECT_GRACE, Link::connect(target)).await });
    match attempt {
        Ok(Err(e)) if crate::tls::explain(&e, "REDIS_CA_FILE").is_some() => Err(format!(
            "cannot connect to Redis ({}) over TLS: {}",
            target.setting(),
            describe(&e)
        )),
        Ok(Err(e)) => {
            debug!(error = %describe(&e), "Redis TLS not checked at start-up: Redis is not reachable yet");
            Ok(())
        }
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

/// Why a session with Redis ended.
enum Ended {
    /// The connection failed; reconnect.
    Lost(RedisError),
    /// Shutdown.
    Stop,
}

impl From<RedisError> for Ended {
    fn from(e: RedisError) -> Ended {
        Ended::Lost(e)
    }
}

/// One message waiting in the outbox.
struct Outgoing {
    /// The notification's id, or `None` for a client message (ephemeral: dropped when Redis is lost).
    id: Option<Uuid>,
    /// The Redis channels it goes to.
    channels: Vec<String>,
    /// The envelope, shared by every channel.
    envelope: Bytes,
}

/// The bus thread's state.
struct BusThread {
    /// Where the bus records which interest changes Redis confirmed.
    marks: Arc<SubscriptionMarks>,
    /// Per shard, the number of the last interest change applied to the registry.
    applied: Vec<u64>,
    config: RedisBusConfig,
    /// This process's id in envelopes.
    origin: Uuid,
    /// The broadcast Redis channel's name.
    broadcast: String,
    /// Every shard's inbox, by shard number.
    shards: Vec<ShardInbox>,
    /// The mask of every shard (where broadcasts go).
    all_shards: ShardMask,
    /// For the catch-up after an outage.
    store: Store,
    queue: UnboundedReceiver<BusCmd>,
    /// Shared with [`RedisBus::is_up`].
    up: Arc<AtomicBool>,
    /// Shared with [`RedisBus::render_metrics`].
    counters: Arc<BusCounters>,
    /// Which shards want which topics.
    registry: InterestRegistry,
    /// What the current subscriber connection is subscribed to (broadcast aside).
    subscribed: HashSet<Topic>,
    /// Ids delivered lately (duplicates through several topics, and the catch-up).
    recent: RecentIds,
    /// When Redis was lost (wall clock, for the catch-up read) and when (monotonic, for `recent`).
    outage_since: Option<(Millis, Instant)>,
    /// What this node committed or its clients published and Redis has not taken yet, in order.
    outbox: VecDeque<Outgoing>,
    /// How many notifications left the outbox unpublished because there were more than
    /// [`MAX_UNPUBLISHED`].
    dropped_unpublished: u64,
    /// The other nodes, and how far each has published (see `peers.rs`).
    peers: PeerWatch,
    /// This node's publish watermark: everything it committed before this wall-clock millisecond is
    /// published (announced to the other nodes).
    published_through: Millis,
    /// Where the last catch-up read started (wall clock): everything committed before it, for every
    /// topic wanted then, was delivered. A catch-up for a gone peer need not read further back.
    caught_up_from: Millis,
    /// Per node taken for gone: ids below this were in the catch-up made for it, so a late copy of one
    /// (the node was only cut off, and publishes its outbox when it is back) is a duplicate.
    late_floors: HashMap<Uuid, (Uuid, Instant)>,
    /// The node's presence registry (`crate::presence`), shared with the shards.
    presence: Presence,
    /// Presence writes and queries of the current batch, in queue order.
    presence_ops: Vec<PresenceOp>,
    /// Presence channels whose other nodes' members were read since this node began listening to
    /// them: a reread (after a reconnect) announces what changed meanwhile; a first read does not.
    presence_read: HashSet<Box<str>>,
    /// Set by [`BusCmd::Stop`].
    stopping: bool,
    /// The node's users' preferences, which other nodes' changes update.
    preferences: Arc<Registry>,
    /// This node's surveys waiting for answers.
    surveys: Surveys,
}

impl BusThread {
    async fn run(mut self) {
        let mut backoff = INITIAL_BACKOFF;
        let mut failures = 0u64;
        loop {
            match self.connect().await {
                Ok(link) => {
                    backoff = INITIAL_BACKOFF;
                    failures = 0;
                    match self.serve(link).await {
                        Ended::Stop => return,
                        Ended::Lost(e) => {
                            BusCounters::add(&self.counters.outages, 1);
                            warn!(error = %e, "lost Redis: local delivery goes on; reconnecting");
                            self.lost();
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let e = describe(&e);
                    if failures == 1 {
                        warn!(error = %e, "cannot reach Redis: local delivery goes on; retrying with backoff");
                    } else {
                        debug!(error = %e, failures, "cannot reach Redis");
                    }
                    self.lost();
                }
            }
            // Keep taking commands while waiting: interest is recorded, commits wait in the outbox.
            let pause = tokio::time::sleep(jittered(backoff));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    cmd = self.queue.recv() => match cmd {
                        Some(cmd) => self.apply_offline(cmd),
                        None => self.stopping = true,
                    },
                }
                if self.stopping {
                    return;
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Records the start of an outage (the first failure only). Client messages still in the outbox
    /// are dropped: they are ephemeral, and late ones would only confuse.
    fn lost(&mut self) {
        self.up.store(false, Ordering::Relaxed);
        self.outbox.retain(|o| o.id.is_some());
        // Queries in flight fail over to the registry's view; writes are redone by the next session.
        self.presence_ops.clear();
        // No answer can come now: surveys under way answer with what came.
        self.surveys.finish_all();
        if self.outage_since.is_none() {
            let now = Instant::now();
            self.outage_since = Some((now_millis(), now));
            self.recent.pin(now - CATCH_UP_MARGIN);
        }
    }

    async fn connect(&self) -> Result<Link, RedisError> {
        Link::connect(&self.config.target).await
    }

    /// One session with Redis: publish the outbox, resubscribe, catch up, then relay both ways until
    /// the link breaks.
    async fn serve(&mut self, mut link: Link) -> Ended {
        self.subscribed.clear();
        self.peers.session_began(Instant::now());
        if let Err(e) = link.subscribe(self.broadcast.clone()).await {
            return Ended::Lost(e);
        }
        // What was committed while the link was down (or while it was being opened) goes out first
        // and in commit order, before anything committed from now on (see the module docs).
        while let Ok(cmd) = self.queue.try_recv() {
            self.apply_offline(cmd);
        }
        if self.stopping {
            return self.stop(&mut link).await;
        }
        if let Err(e) = self.flush_outbox(&mut link).await {
            return Ended::Lost(e);
        }
        if let Err(e) = self.announce(&mut link).await {
            return self.ended(e, &mut link).await;
        }
        if let Err(e) = self.republish_presence(&mut link).await {
            return Ended::Lost(e);
        }
        if let Err(e) = self.sync_subscriptions(&mut link, Resync::Full).await {
            return Ended::Lost(e);
        }
        if let Some((since_ms, _)) = self.outage_since {
            if let Err(e) = self.catch_up(&mut link, since_ms, None).await {
                return self.ended(e, &mut link).await;
            }
            info!(
                outage_ms = now_millis().saturating_sub(since_ms),
                "Redis is back: resubscribed and caught up"
            );
        } else {
            info!("connected to Redis");
        }
        self.outage_since = None;
        self.recent.unpin();
        self.up.store(true, Ordering::Relaxed);
        let mut announce = tokio::time::interval(self.config.node_timeout / 3);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        announce.reset();
        loop {
            tokio::select! {
                cmd = self.queue.recv() => {
                    let Some(cmd) = cmd else { return self.stop(&mut link).await };
                    if let Err(e) = self.apply_batch(cmd, &mut link).await {
                        return self.ended(e, &mut link).await;
                    }
                }
                _ = announce.tick() => {
                    if let Err(e) = self.announce(&mut link).await {
                        return self.ended(e, &mut link).await;
                    }
                }
                first = link.next() => {
                    let mut batch = Vec::new();
                    let mut next = Some(first);
                    while let Some(incoming) = next.take() {
                        match incoming {
                            Incoming::Message(msg) => batch.push(msg),
                            Incoming::Unsubscribed(name) if self.wants(&name) => {
                                // Its slot moved: reconnect to the new owner and catch up the gap.
                                self.route_incoming(&batch);
                                return Ended::Lost(RedisError::from(std::io::Error::other(
                                    format!("Redis ended the subscription to {name} (slot moved)"),
                                )));
                            }
                            Incoming::Lost(e) => {
                                self.route_incoming(&batch);
                                return Ended::Lost(e);
                            }
                            Incoming::Unsubscribed(_) | Incoming::Nothing => {}
                        }
                        if batch.len() < MAX_BATCH {
                            next = link.next_ready();
                        }
                    }
                    self.route_incoming(&batch);
                }
            }
        }
    }

    /// How a session ends: a lost link as it is; a stop through [`BusThread::stop`].
    async fn ended(&mut self, e: Ended, link: &mut Link) -> Ended {
        match e {
            Ended::Stop => self.stop(link).await,
            lost => lost,
        }
    }

    /// Shutdown with the link up: everything this node committed is in the outbox (the store thread
    /// stopped before the bus was told to), so publish it and tell the other nodes there is nothing to
    /// catch up for this one.
    async fn stop(&mut self, link: &mut Link) -> Ended {
        self.stopping = true;
        match self.flush_outbox(link).await {
            Ok(()) => {
                let key = peers::node_key(&self.config.prefix, self.origin);
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(key)
                    .arg(peers::STOPPED)
                    .arg("PX")
                    .arg(peers::stopped_marker_ttl(self.config.node_timeout).as_millis() as u64)
                    .ignore();
                if let Err(e) = link.query::<()>(&pipe).await {
                    debug!(error = %e, "could not tell the other nodes this one stopped");
                }
            }
            Err(e) => warn!(
                error = %e,
                unpublished = self.outbox.len(),
                "stopping with notifications Redis did not take; the other nodes catch them up \
                 from the store once this node's announcement expires"
            ),
        }
        Ended::Stop
    }

    /// Applies every command queued now, with the link up.
    async fn take_queued(&mut self, link: &mut Link) -> Result<(), Ended> {
        match self.queue.try_recv() {
            Ok(cmd) => self.apply_batch(cmd, link).await,
            Err(_) => self
                .sync_subscriptions(link, Resync::Changes)
                .await
                .map_err(Ended::Lost),
        }
    }

    /// Applies `first` and whatever else is queued (up to [`MAX_BATCH`]): one publish pipeline, then
    /// one subscription update.
    async fn apply_batch(&mut self, first: BusCmd, link: &mut Link) -> Result<(), Ended> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            taken += 1;
            match cmd {
                BusCmd::Interest(change) => self.apply_interest(change),
                BusCmd::Committed(list) => self.push_committed(list),
                BusCmd::Message { channel, payload } => {
                    let name = Topic::Channel(channel).redis_channel(&self.config.prefix);
                    self.outbox.push_back(Outgoing {
                        id: None,
                        channels: vec![name],
                        envelope: Bytes::from(wire::encode_message(self.origin, &payload)),
                    });
                }
                BusCmd::Unread(counts) => {
                    for c in counts {
                        let name = Topic::User(c.user_id.as_str().into())
                            .redis_channel(&self.config.prefix);
                        self.outbox.push_back(Outgoing {
                            id: None,
                            channels: vec![name],
                            envelope: Bytes::from(wire::encode_unread(
                                self.origin,
                                &c.user_id,
                                c.unread,
                                c.version,
                            )),
                        });
                    }
                }
                BusCmd::PusherEvent { channel, event } => {
                    let envelope = wire::encode_pusher_event(self.origin, &channel, &event);
                    let name = Topic::Channel(channel).redis_channel(&self.config.prefix);
                    self.outbox.push_back(Outgoing {
                        id: None,
                        channels: vec![name],
                        envelope: Bytes::from(envelope),
                    });
                }
                BusCmd::Presence(change) => self.presence_ops.push(PresenceOp::Write(change)),
                BusCmd::PresenceQuery { channel, reply } => {
                    self.presence_ops.push(PresenceOp::Query { channel, reply })
                }
                cmd @ (BusCmd::Preferences { .. } | BusCmd::Released(_)) => {
                    self.push_preferences_matter(cmd)
                }
                BusCmd::Terminate(user) => self.push_terminate(&user),
                BusCmd::Survey {
                    prefix,
                    exact,
                    reply,
                } => {
                    if let Some(id) = self.surveys.begin(self.peers.known().collect(), reply) {
                        self.outbox.push_back(Outgoing {
                            id: None,
                            channels: vec![self.broadcast.clone()],
                            envelope: Bytes::from(wire::encode_survey(
                                self.origin,
                                id,
                                &prefix,
                                exact,
                            )),
                        });
                    }
                }
                BusCmd::SurveyAnswer { to, id, counts } => self.outbox.push_back(Outgoing {
                    id: None,
                    channels: vec![self.broadcast.clone()],
                    envelope: Bytes::from(wire::encode_survey_reply(self.origin, to, id, &counts)),
                }),
                BusCmd::SurveyExpired(id) => self.survey_expired(id),
                BusCmd::Stop => self.stopping = true,
            }
            if taken < MAX_BATCH {
                next = self.queue.try_recv().ok();
            }
        }
        self.flush_outbox(link).await.map_err(Ended::Lost)?;
        self.run_presence_ops(link).await.map_err(Ended::Lost)?;
        if self.stopping {
            return Err(Ended::Stop);
        }
        self.sync_subscriptions(link, Resync::Changes)
            .await
            .map_err(Ended::Lost)
    }

    /// A command while Redis is away: interest is recorded; commits wait in the outbox.
    fn apply_offline(&mut self, cmd: BusCmd) {
        match cmd {
            BusCmd::Interest(change) => self.apply_interest(change),
            BusCmd::Committed(list) => self.push_committed(list),
            // Ephemeral by contract: a client message while Redis is away reaches this node only.
            BusCmd::Message { .. } | BusCmd::PusherEvent { .. } => {}
            // A count is as ephemeral: the next change of the user's count (or a reconnect, which
            // reads it) brings other nodes' badges back in line.
            BusCmd::Unread(_) => {}
            // The registry keeps it; the next session writes and announces every member again.
            BusCmd::Presence(_) => {}
            BusCmd::PresenceQuery { channel, reply } => {
                let _ = reply.send(self.presence.members(&channel));
            }
            // Kept like a client message until the outage is recorded, then dropped with them: a
            // node that misses a change reads every user's preferences again at its next start.
            cmd @ (BusCmd::Preferences { .. } | BusCmd::Released(_)) => {
                self.push_preferences_matter(cmd)
            }
            // Kept like a change of preferences, for the same short outage.
            BusCmd::Terminate(user) => self.push_terminate(&user),
            // No other node can be asked: the local counts answer alone.
            BusCmd::Survey { reply, .. } => {
                let _ = reply.send(BTreeMap::new());
            }
            // The asking node gave up on it when its own timeout passed.
            BusCmd::SurveyAnswer { .. } => {}
            BusCmd::SurveyExpired(id) => self.survey_expired(id),
            BusCmd::Stop => self.stopping = true,
        }
    }

    /// Puts a Pusher `terminate_connections` in the outbox, on the broadcast channel: it is rare, and
    /// every node must hear it whatever interest it declared.
    fn push_terminate(&mut self, user: &str) {
        self.outbox.push_back(Outgoing {
            id: None,
            channels: vec![self.broadcast.clone()],
            envelope: Bytes::from(wire::encode_terminate(self.origin, user)),
        });
    }

    /// Survey `id`'s timeout passed: it answers with what came, counted if some node is missing.
    fn survey_expired(&mut self, id: u64) {
        if self.surveys.expire(id) {
            BusCounters::add(&self.counters.survey_timeouts, 1);
        }
    }

    /// Puts a change of preferences (to every node, on the broadcast channel) or released
    /// notifications (to their users' channels) in the outbox.
    fn push_preferences_matter(&mut self, cmd: BusCmd) {
        match cmd {
            BusCmd::Preferences { user, stored } => self.outbox.push_back(Outgoing {
                id: None,
                channels: vec![self.broadcast.clone()],
                envelope: Bytes::from(wire::encode_preferences(
                    self.origin,
                    &user,
                    stored.as_deref(),
                )),
            }),
            BusCmd::Released(list) => {
                for n in list {
                    let Some(user) = &n.user_id else { continue };
                    self.outbox.push_back(Outgoing {
                        id: None,
                        channels: vec![
                            Topic::User(user.as_str().into()).redis_channel(&self.config.prefix)
                        ],
                        envelope: Bytes::from(wire::encode_released(self.origin, &n)),
                    });
                }
            }
            _ => {}
        }
    }

    /// Puts this node's commits (delivered locally already) in the outbox, in commit order.
    fn push_committed(&mut self, list: Vec<Arc<Notification>>) {
        for n in list {
            self.recent.insert(n.id, Instant::now());
            if self.outbox.len() >= MAX_UNPUBLISHED {
                self.outbox.pop_front();
                self.dropped_unpublished += 1;
            }
            let channels = self.publish_channels(&n);
            self.outbox.push_back(Outgoing {
                id: Some(n.id),
                channels,
                envelope: Bytes::from(wire::encode_notification(self.origin, &n)),
            });
        }
    }

    /// Publishes the outbox in order, one pipeline per [`MAX_BATCH`] messages; what Redis took leaves
    /// it, a failed pipeline stays for the next session.
    async fn flush_outbox(&mut self, link: &mut Link) -> Result<(), RedisError> {
        if self.dropped_unpublished > 0 {
            warn!(
                dropped = self.dropped_unpublished,
                "more notifications were committed during the Redis outage than the outbox keeps; \
                 other nodes' clients get the oldest ones by their own catch-up or by resuming"
            );
            self.dropped_unpublished = 0;
        }
        while !self.outbox.is_empty() {
            let take = self.outbox.len().min(MAX_BATCH);
            let publishes: Vec<(String, Bytes)> = self
                .outbox
                .range(..take)
                .flat_map(|o| o.channels.iter().map(|c| (c.clone(), o.envelope.clone())))
                .collect();
            link.publish(&publishes).await?;
            BusCounters::add(&self.counters.published, publishes.len() as u64);
            if let Some(id) = self.outbox.range(..take).rev().find_map(|o| o.id) {
                self.published_through = self.published_through.max(id_millis(id));
            }
            self.outbox.drain(..take);
        }
        Ok(())
    }

    /// Announces this node and its publish watermark, and looks at the other nodes': catches up for
    /// any that is gone (see `peers.rs`).
    async fn announce(&mut self, link: &mut Link) -> Result<(), Ended> {
        self.take_queued(link).await?;
        // Everything queued before this instant is published, unless the queue refilled meanwhile
        // or the outbox still holds something (then the watermark stays at the last id published).
        let now = now_millis();
        if self.outbox.is_empty() && self.queue.is_empty() {
            self.published_through = self.published_through.max(now);
        }
        let prefix = &self.config.prefix;
        let set = peers::nodes_set_key(prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(peers::node_key(prefix, self.origin))
            .arg(self.published_through.to_string())
            .arg("PX")
            .arg(self.config.node_timeout.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg(&set)
            .arg(self.origin.simple().to_string())
            .ignore()
            .cmd("SMEMBERS")
            .arg(&set);
        let (members,): (Vec<String>,) = link.query(&pipe).await?;
        let mut ids: Vec<Uuid> = members
            .iter()
            .filter_map(|m| Uuid::try_parse(m).ok())
            .collect();
        // A peer another node already took out of the set (it saw it stopped first) is still judged
        // by its key: `stopped` is a graceful stop, a missing key a death.
        let listed = ids.len();
        for known in self.peers.known() {
            if !ids[..listed].contains(&known) {
                ids.push(known);
            }
        }
        let values: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let mut mget = redis::cmd("MGET");
            for id in &ids {
                mget.arg(peers::node_key(prefix, *id));
            }
            link.query_cmd(&mget).await?
        };
        let reading = ids
            .iter()
            .zip(values.iter().map(|v| PeerState::parse(v.as_deref())));
        let known_before: HashSet<Uuid> = self.peers.known().collect();
        let (gone, forget) = self
            .peers
            .observe(Instant::now(), reading.map(|(id, s)| (*id, s)));
        let new_peer = self.peers.known().any(|id| !known_before.contains(&id));
        if !forget.is_empty() {
            let mut srem = redis::cmd("SREM");
            srem.arg(&set);
            for id in &forget {
                srem.arg(id.simple().to_string());
            }
            link.query_cmd::<()>(&srem).await?;
        }
        // Gone or stopped: its users leave here (a stopped node's left already, one by one).
        let mut left = Vec::new();
        for id in &forget {
            left.extend(self.presence.node_gone(*id));
        }
        self.deliver_presence(left);
        presence_sync::refresh(
            link,
            prefix,
            self.origin,
            self.config.node_timeout,
            &self.presence.local_channels(),
        )
        .await?;
        if new_peer {
            // A node that started with this one may have had members before it was seen.
            let channels: Vec<Box<str>> = self.presence_read.iter().cloned().collect();
            for channel in channels {
                self.read_presence(link, &channel).await?;
            }
        }
        let now = Instant::now();
        self.late_floors
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < LATE_FLOOR_KEPT);
        for peer in gone {
            BusCounters::add(&self.counters.peers_gone, 1);
            warn!(
                node = %peer.id.simple(),
                watermark = peer.watermark,
                "another node stopped announcing itself: catching up what it may not have published"
            );
            let since = peer.watermark.max(self.caught_up_from);
            self.catch_up(link, since, Some(peer)).await?;
        }
        Ok(())
    }

    /// The Redis channels a notification is published to: the broadcast channel alone for a
    /// broadcast (it reaches everyone), else its user's and each of its channels'.
    fn publish_channels(&self, n: &Notification) -> Vec<String> {
        let prefix = &self.config.prefix;
        if n.broadcast {
            return vec![self.broadcast.clone()];
        }
        n.user_id
            .iter()
            .map(|u| Topic::User(u.as_str().into()).redis_channel(prefix))
            .chain(
                n.channels
                    .iter()
                    .map(|c| Topic::Channel(c.as_str().into()).redis_channel(prefix)),
            )
            .collect()
    }

    /// Brings Redis's subscriptions in line with the registry: one pipelined write (see module docs).
    /// `Resync::Changes` looks only at the topics changed since the last update (after every batch of
    /// commands: its cost must not grow with the number of connected users), `Resync::Full` at all
    /// of them (a new session, where nothing is subscribed yet).
    async fn sync_subscriptions(
        &mut self,
        link: &mut Link,
        resync: Resync,
    ) -> Result<(), RedisError> {
        let (add, remove) = match resync {
            Resync::Full => self.registry.diff(&self.subscribed),
            Resync::Changes => self.registry.take_changes(&self.subscribed),
        };
        if add.is_empty() && remove.is_empty() {
            self.confirm_applied();
            return Ok(());
        }
        let prefix = &self.config.prefix;
        let mut changes: Vec<_> = add
            .iter()
            .map(|t| link.subscribe(t.redis_channel(prefix)))
            .collect();
        changes.extend(
            remove
                .iter()
                .map(|t| link.unsubscribe(t.redis_channel(prefix))),
        );
        futures_util::future::try_join_all(changes).await?;
        debug!(
            subscribed = add.len(),
            unsubscribed = remove.len(),
            "Redis subscriptions updated"
        );
        for t in remove {
            if let Topic::Channel(c) = &t {
                if self.presence_read.remove(c) {
                    self.presence.forget_remote(c);
                }
            }
            self.subscribed.remove(&t);
        }
        // Subscribed first, read then: a change published after the read arrives live.
        for t in &add {
            if let Topic::Channel(c) = t {
                if is_presence_channel(c) {
                    self.read_presence(link, c).await?;
                }
            }
        }
        self.subscribed.extend(add);
        self.confirm_applied();
        Ok(())
    }

    /// Records a shard's interest change in the registry (Redis follows at the next sync).
    fn apply_interest(&mut self, change: InterestChange) {
        if let Some(applied) = self.applied.get_mut(change.shard) {
            *applied = (*applied).max(change.seq);
        }
        self.registry.apply(change);
    }

    /// Redis now holds every subscription the applied interest changes asked for: tells the shards'
    /// waiting resumes (see [`SubscriptionMarks`]).
    fn confirm_applied(&self) {
        for (shard, &seq) in self.applied.iter().enumerate() {
            if seq > 0 {
                self.marks.confirm(shard, seq);
            }
        }
    }

    /// Puts this node's presence change in the outbox, for the nodes listening to its channel.
    fn push_presence(&mut self, change: &NodePresence) {
        let name =
            Topic::Channel(change.channel.as_str().into()).redis_channel(&self.config.prefix);
        self.outbox.push_back(Outgoing {
            id: None,
            channels: vec![name],
            envelope: Bytes::from(wire::encode_presence(self.origin, change)),
        });
    }

    /// Applies the batch's presence writes and queries, in queue order.
    async fn run_presence_ops(&mut self, link: &mut Link) -> Result<(), RedisError> {
        let prefix = self.config.prefix.clone();
        for op in std::mem::take(&mut self.presence_ops) {
            match op {
                PresenceOp::Write(change) => {
                    // The hash first: a node that subscribes to the channel after this publish reads
                    // the hash after its subscription, so it sees the change one way or the other.
                    presence_sync::write_change(
                        link,
                        &prefix,
                        self.origin,
                        self.config.node_timeout,
                        &change,
                    )
                    .await?;
                    self.push_presence(&change);
                    self.flush_outbox(link).await?;
                }
                PresenceOp::Query { channel, reply } => {
                    let peers = self.presence_peers(link).await?;
                    let remote = presence_sync::read(link, &prefix, &channel, &peers).await?;
                    let mut all: BTreeMap<String, Option<String>> = self
                        .presence
                        .members(&channel)
                        .into_iter()
                        .map(|m| (m.user_id, m.user_info))
                        .collect();
                    for m in remote.into_iter().flat_map(|(_, members)| members) {
                        all.entry(m.user_id).or_insert(m.user_info);
                    }
                    let members = all
                        .into_iter()
                        .map(|(user_id, user_info)| Member { user_id, user_info })
                        .collect();
                    let _ = reply.send(members);
                }
            }
        }
        Ok(())
    }

    /// Reads the other live nodes' members of presence channel `channel` into the registry; on a
    /// reread, this node's subscribers hear of what changed since the last read.
    async fn read_presence(&mut self, link: &mut Link, channel: &str) -> Result<(), RedisError> {
        let peers = self.presence_peers(link).await?;
        let remote = presence_sync::read(link, &self.config.prefix, channel, &peers).await?;
        let reread = !self.presence_read.insert(channel.into());
        let events = self.presence.replace_remote(channel, &remote, reread);
        self.deliver_presence(events);
        Ok(())
    }

    /// The other nodes whose presence hashes a read looks at: those in the nodes set (a node that
    /// started a moment ago is there before this node's next announcement sees it) and those this node
    /// saw alive. A dead node's hashes expire with its key, and its members read meanwhile leave with
    /// it (`Presence::node_gone` when it is taken for gone or out of the set).
    async fn presence_peers(&self, link: &mut Link) -> Result<Vec<Uuid>, RedisError> {
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(peers::nodes_set_key(&self.config.prefix));
        let listed: Vec<String> = link.query_cmd(&smembers).await?;
        let mut ids: Vec<Uuid> = listed
            .iter()
            .filter_map(|m| Uuid::try_parse(m).ok())
            .chain(self.peers.known())
            .filter(|id| *id != self.origin)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// A new session: this node's hashes written again whole, and each of its members announced again
    /// to the nodes listening (those that took this node for gone meanwhile had them leave).
    async fn republish_presence(&mut self, link: &mut Link) -> Result<(), RedisError> {
        let local = self.presence.local_members();
        if local.is_empty() {
            return Ok(());
        }
        presence_sync::rewrite_all(
            link,
            &self.config.prefix,
            self.origin,
            self.config.node_timeout,
            &local,
        )
        .await?;
        for (channel, m) in local {
            self.push_presence(&NodePresence {
                channel,
                user_id: m.user_id,
                user_info: m.user_info,
                present: true,
            });
        }
        self.flush_outbox(link).await
    }

    /// Sends presence events to the shards with subscribers on their channels.
    fn deliver_presence(&self, events: Vec<PresenceChange>) {
        let mut per_shard: Vec<Vec<Arc<Delivery>>> = vec![Vec::new(); self.shards.len()];
        for event in events {
            let mask = self
                .registry
                .shards_for(&Topic::Channel(event.channel.as_str().into()));
            if mask.is_empty() {
                continue;
            }
            let delivery = Arc::new(Delivery::of_presence_change(event));
            for shard in mask.shards() {
                per_shard[shard].push(delivery.clone());
            }
        }
        self.send_to_shards(per_shard);
    }

    /// Whether the current session should be subscribed to Redis channel `name`.
    fn wants(&self, name: &str) -> bool {
        name == self.broadcast
            || Topic::from_redis_channel(&self.config.prefix, name)
                .is_some_and(|t| self.subscribed.contains(&t))
    }

    /// The shards a notification goes to on this node.
    fn shards_for(&self, n: &Notification) -> ShardMask {
        if n.broadcast {
            return self.all_shards;
        }
        let mut mask = ShardMask::default();
        if let Some(u) = &n.user_id {
            mask = mask | self.registry.shards_for(&Topic::User(u.as_str().into()));
        }
        for c in &n.channels {
            mask = mask | self.registry.shards_for(&Topic::Channel(c.as_str().into()));
        }
        mask
    }

    /// Routes messages from Redis to the interested shards: one inbox message per shard per batch.
    fn route_incoming(&mut self, batch: &[redis::Msg]) {
        let mut per_shard: Vec<Vec<Arc<Delivery>>> = vec![Vec::new(); self.shards.len()];
        for msg in batch {
            let bytes = msg.get_payload_bytes();
            if wire::origin_of(bytes) == Some(self.origin) {
                continue;
            }
            let (delivery, mask) = match wire::decode(bytes) {
                Ok(Envelope::Notification(n)) => {
                    let late = wire::origin_of(bytes)
                        .and_then(|origin| self.late_floors.get(&origin))
                        .is_some_and(|(floor, _)| n.id < *floor);
                    if late || !self.recent.insert(n.id, Instant::now()) {
                        BusCounters::add(&self.counters.duplicates, 1);
                        continue;
                    }
                    let mask = self.shards_for(&n);
                    if mask.is_empty() {
                        continue;
                    }
                    (Delivery::of_notification(n), mask)
                }
                Ok(Envelope::Presence(change)) => {
                    let Some(origin) = wire::origin_of(bytes) else {
                        continue;
                    };
                    let event = self.presence.apply_remote(
                        origin,
                        &change.channel,
                        &change.user_id,
                        change.user_info.as_deref(),
                        change.present,
                    );
                    let Some(event) = event else { continue };
                    let mask = self
                        .registry
                        .shards_for(&Topic::Channel(change.channel.as_str().into()));
                    if mask.is_empty() {
                        continue;
                    }
                    (Delivery::of_presence_change(event), mask)
                }
                Ok(Envelope::Message(payload)) => {
                    let Some(topic @ Topic::Channel(_)) =
                        Topic::from_redis_channel(&self.config.prefix, msg.get_channel_name())
                    else {
                        continue;
                    };
                    let mask = self.registry.shards_for(&topic);
                    let Topic::Channel(channel) = topic else {
                        continue;
                    };
                    if mask.is_empty() {
                        continue;
                    }
                    (Delivery::of_client_payload(&channel, payload), mask)
                }
                Ok(Envelope::Unread {
                    user_id,
                    count,
                    version,
                }) => {
                    let mask = self.registry.shards_for(&Topic::User(user_id.into()));
                    if mask.is_empty() {
                        continue;
                    }
                    (
                        Delivery::of_unread(user_id.to_owned(), count, version),
                        mask,
                    )
                }
                Ok(Envelope::PusherEvent { channel, event }) => {
                    let mask = self
                        .registry
                        .shards_for(&Topic::Channel(channel.as_str().into()));
                    if mask.is_empty() {
                        continue;
                    }
                    (Delivery::of_pusher_event(&channel, event), mask)
                }
                Ok(Envelope::Preferences(user, preferences)) => {
                    let preferences = preferences.map(Arc::new);
                    self.preferences.set(&user, preferences.clone());
                    let name: Arc<str> = Arc::from(user);
                    for shard in &self.shards {
                        shard.send_to_shard(ShardMsg::Preferences(
                            name.clone(),
                            preferences.clone(),
                        ));
                    }
                    continue;
                }
                Ok(Envelope::Terminate(user)) => {
                    let user: Box<str> = user.into();
                    for shard in &self.shards {
                        shard.send_to_shard(ShardMsg::TerminateUser(user.clone()));
                    }
                    continue;
                }
                Ok(Envelope::Survey { id, prefix, exact }) => {
                    let Some(origin) = wire::origin_of(bytes) else {
                        continue;
                    };
                    self.surveys
                        .answer(&self.shards, origin, id, prefix.to_owned(), exact);
                    continue;
                }
                Ok(Envelope::SurveyReply { to, id, counts }) => {
                    if let (true, Some(from)) = (to == self.origin, wire::origin_of(bytes)) {
                        self.surveys.answered(id, from, counts);
                    }
                    continue;
                }
                Ok(Envelope::Released(n)) => {
                    let Some(user) = n.user_id.as_deref() else {
                        continue;
                    };
                    let mask = self.registry.shards_for(&Topic::User(user.into()));
                    if mask.is_empty() {
                        continue;
                    }
                    (Delivery::release_of(n), mask)
                }
                Err(e) => {
                    debug!(
                        channel = msg.get_channel_name(),
                        error = e.0,
                        "dropped a malformed Redis message"
                    );
                    continue;
                }
            };
            BusCounters::add(&self.counters.received, 1);
            let delivery = Arc::new(delivery);
            for shard in mask.shards() {
                per_shard[shard].push(delivery.clone());
            }
        }
        self.send_to_shards(per_shard);
    }

    fn send_to_shards(&self, per_shard: Vec<Vec<Arc<Delivery>>>) {
        for (shard, list) in per_shard.into_iter().enumerate() {
            if !list.is_empty() {
                self.shards[shard].send_to_shard(ShardMsg::Deliver(list.into()));
            }
        }
    }

    /// Delivers from the store what live connections may have missed since `since_ms` (less
    /// [`CATCH_UP_MARGIN`]): after this node's own outage (`gone` is `None`), or for a peer that is
    /// gone. Reads every page; drops what was delivered already; delivers the rest in id order.
    async fn catch_up(
        &mut self,
        link: &mut Link,
        since_ms: Millis,
        gone: Option<GonePeer>,
    ) -> Result<(), Ended> {
        let read_from = now_millis();
        let from = since_ms.saturating_sub(CATCH_UP_MARGIN.as_millis() as Millis);
        let since = uuid_floor(from);
        let limit = self.config.max_replay.max(1);
        let mut users = Vec::new();
        let mut channels = Vec::new();
        for topic in self.registry.topics() {
            match topic {
                Topic::User(u) => users.push(u.to_string()),
                Topic::Channel(c) => channels.push(c.to_string()),
            }
        }
        // One read for the channels and the broadcasts, one per user.
        let mut queries = vec![ReplayQuery {
            user_id: None,
            channels,
            since,
            limit,
        }];
        queries.extend(users.into_iter().map(|u| ReplayQuery {
            user_id: Some(u),
            channels: Vec::new(),
            since,
            limit,
        }));
        let mut found: BTreeMap<Uuid, Arc<Notification>> = BTreeMap::new();
        let mut failed = 0;
        let mut queries = queries.into_iter().peekable();
        while queries.peek().is_some() {
            let reads: Vec<_> = queries
                .by_ref()
                .take(CATCH_UP_PARALLEL_READS)
                .map(|q| replay_every_page(self.store.clone(), q))
                .collect();
            for result in futures_util::future::join_all(reads).await {
                match result {
                    Ok(list) => found.extend(list.into_iter().map(|n| (n.id, n))),
                    Err(_) => failed += 1,
                }
            }
        }
        if failed > 0 {
            warn!(
                failed,
                "the store could not answer every catch-up read; those clients get the rest by \
                 resuming"
            );
        }
        // Commits of this node that happened while the reads ran are in the queue: take them first, so
        // their ids are known and not delivered a second time.
        self.take_queued(link).await?;
        let mut per_shard: Vec<Vec<Arc<Delivery>>> = vec![Vec::new(); self.shards.len()];
        let mut delivered = 0;
        for (id, n) in found {
            let mask = self.shards_for(&n);
            if mask.is_empty() || !self.recent.insert(id, Instant::now()) {
                continue;
            }
            delivered += 1;
            let delivery = Arc::new(Delivery::of_notification(n));
            for shard in mask.shards() {
                per_shard[shard].push(delivery.clone());
            }
        }
        self.send_to_shards(per_shard);
        BusCounters::add(&self.counters.caught_up, delivered);
        self.caught_up_from = self.caught_up_from.max(read_from);
        if let Some(peer) = gone {
            let floor = uuid_floor(read_from.saturating_sub(CATCH_UP_MARGIN.as_millis() as Millis));
            self.late_floors.insert(peer.id, (floor, Instant::now()));
        }
        info!(delivered, "caught up live connections from the store");
        Ok(())
    }
}

/// Every notification a catch-up query finds, page by page (`query.limit` each).
async fn replay_every_page(
    store: Store,
    mut query: ReplayQuery,
) -> Result<Vec<Arc<Notification>>, StoreError> {
    let mut all = Vec::new();
    loop {
        let page = store.replay(query.clone()).await?;
        let more = page.len() >= query.limit;
        if let Some(last) = page.last() {
            query.since = last.id;
        }
        all.extend(page);
        if !more {
            return Ok(all);
        }
    }
}

/// The wall-clock millisecond in a UUIDv7 (its first 48 bits).
fn id_millis(id: Uuid) -> Millis {
    (id.as_u128() >> 80) as Millis
}

/// `backoff` less a random part of up to half of it, so that nodes that lost Redis together do not
/// all come back in the same millisecond.
fn jittered(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos() ^ now_millis() as u128);
    let half = backoff / 2;
    half + half.mul_f64((hasher.finish() % 1_000_000) as f64 / 1_000_000.0)
}

/// The smallest UUIDv7 of millisecond `ms`: every id created from then on sorts after it.
fn uuid_floor(ms: Millis) -> Uuid {
    let ms = (ms.max(0) as u128) & ((1 << 48) - 1);
    Uuid::from_u128((ms << 80) | (0x7 << 76) | (0b10 << 62))
}

/// How much of the interest registry a subscription update looks at (see `sync_subscriptions`).
#[derive(Debug, Clone, Copy)]
enum Resync {
    /// Every wanted topic: a new session, with nothing subscribed yet.
    Full,
    /// Only the topics changed since the last update.
    Changes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_id_sorts_before_every_id_of_its_millisecond_and_after_older_ones() {
        let now = now_millis();
        let id = crate::model::IdGenerator::default().next_id().0;
        assert!(uuid_floor(now - 5) < id);
        assert!(uuid_floor(now + 5) > id);
        assert_eq!(uuid_floor(now).get_version_num(), 7);
    }
}
