//! The hub: one shard's connections and its indexes user → connections and channel → connections.
//!
//! Everything here belongs to one shard and is touched by one thread, so there are no locks: the shard
//! holds the hub in a `RefCell` and never keeps a borrow across an `.await`.
//!
//! Memory is the design constraint (docs/architecture.md, "Memory per connection": about 1 KiB per idle
//! connection). So:
//! - connections live in a slab and are named by their slot ([`ConnId`], a `u32`), not by pointers;
//! - user ids and channel names are interned once per shard; a connection holds small integer ids and
//!   shares the name with every other connection of the same user or channel;
//! - a channel's member list is a plain `Vec`, and each subscription remembers its position in it, so
//!   unsubscribing (or disconnecting) costs O(1) even for a channel with 100k members;
//! - nothing per connection is allocated until it is needed (the outbound queue, the resume buffer).
//!
//! Targeting ([`Hub::for_each_target`]) walks the user's connections, then each target channel's members,
//! then (for a broadcast) every connection that receives deliveries, and stamps each connection it visits
//! with a per-delivery mark, so a connection reached by several targets gets the notification once, with
//! no allocation per delivery.
//!
//! Connections are of several kinds ([`ConnKind`]); each kind that receives deliveries names the
//! [`Encoding`] it is written in, and gets the delivery's frames in that encoding, made once per
//! delivery (see `crate::delivery`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use smallvec::SmallVec;

use crate::bus::interest::{InterestSink, NodeInterest, Topic, TopicKind};
use crate::delivery::inbox::ConnId;
use crate::delivery::{Content, Delivery, Encoding, Via};
use crate::preferences::{Preferences, Registry, Verdict};
use crate::shard::outbound::Outbox;
use crate::shard::timeouts::Tick;

/// An interned user or channel on one shard.
type NameId = u32;

/// What a connection speaks now. Every connection starts as HTTP; [`Hub::upgrade`] turns it into a kind
/// that receives deliveries. A new kind (docs/architecture.md, "Connection kinds") adds a variant here,
/// its encoding in [`ConnKind::encoding`], and its answers in the shard's sweeps, whose `match`es on
/// the kind are exhaustive so that the compiler lists every decision to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// Speaking HTTP/1.1 (requests and responses); receives no deliveries.
    Http,
    /// Upgraded to the native WebSocket protocol (API.md) and registered for deliveries.
    WebSocket,
    /// A Server-Sent Events stream (`GET /api/v1/notifications/stream`), written in [`Encoding::Sse`].
    Sse,
    /// A parked long-poll request (`GET /api/v1/notifications/poll`). Its deliveries are never written:
    /// a stored one only wakes the request (recording its id in the `LiveMark`), which then answers
    /// from the store (`Shard::deliver_batched`). It names the native encoding, which every delivery
    /// has already, so reaching it costs no encoding.
    LongPoll,
    /// A WebSocket speaking the Pusher Channels protocol (`GET /app/{key}`), registered for
    /// deliveries; it has a user only once signed in or subscribed to its Laravel user channel.
    Pusher,
}

impl ConnKind {
    /// The format this kind's deliveries are written in; `None` for a kind that receives none.
    pub fn encoding(self) -> Option<Encoding> {
        match self {
            ConnKind::Http => None,
            ConnKind::WebSocket | ConnKind::LongPoll => Some(Encoding::NativeWebSocket),
            ConnKind::Sse => Some(Encoding::Sse),
            ConnKind::Pusher => Some(Encoding::Pusher),
        }
    }

    /// Whether connections of this kind are registered for deliveries.
    pub fn receives_deliveries(self) -> bool {
        self.encoding().is_some()
    }
}

/// One channel subscription of a connection.
#[derive(Debug, Clone, Copy)]
struct Subscription {
    /// The interned channel.
    channel: NameId,
    /// This connection's index in the channel's member list, kept current by swap-removes.
    position: u32,
}

/// The state one shard keeps for one connection.
#[derive(Debug)]
pub struct ConnState {
    /// The socket, for direct non-blocking writes from the delivery path.
    pub fd: RawFd,
    /// What the connection speaks, which decides the frames it gets.
    pub kind: ConnKind,
    /// The interned user plus one (WebSocket connections only): `NonZeroU32` keeps the `Option` in four
    /// bytes, which keeps the entry within its budget (see the size test).
    user: Option<NonZeroU32>,
    /// Channel subscriptions; inline for the common case of a few channels.
    subscriptions: SmallVec<[Subscription; 2]>,
    /// The delivery stamp of the last delivery that reached this connection (dedup across targets).
    mark: u32,
    /// Frames waiting for the socket to accept them, and the resume buffer; `None` when idle.
    pub outbox: Option<Box<Outbox>>,
    /// The connection task's waker: woken when frames are queued, on close requests and at shutdown.
    pub waker: Option<Waker>,
    /// Server pings sent since the last pong; two unanswered close the connection.
    pub missed_pongs: u8,
    /// Set when the connection must close: the close code to send (0 = close without a frame).
    pub close_code: Option<u16>,
    /// Where live delivery stands against replay, so a `resume` sends nothing twice (see [`LiveMark`]).
    pub live_mark: LiveMark,
    /// The greatest id a resume of this connection covered (its `since`, or the last id it replayed
    /// when greater): a live stored delivery at or below it is a late copy of something the client
    /// has (it arrives later through another node's Redis relay than the replay's read), and is
    /// dropped, whatever newer ones passed meanwhile. Exact because ids follow commit order on every
    /// node (the id clock): everything at or below it was committed before the replay read it.
    pub resumed_through: Option<uuid::Uuid>,
    /// When the connection's token expires (seconds since the epoch; 0: no token). The shard's expiry
    /// sweep closes the connection at this time unless a `refresh` moved it.
    pub token_expires_at: u64,
    /// When the connection's current wait times out (see `shard::timeouts`; 0: never).
    pub(crate) deadline: Tick,
    /// The deadline the shard's timeout queue holds an entry for (0: none).
    pub(crate) deadline_queued: Tick,
    /// The socket had data (or EOF) at its last event and no read has found it empty since (see
    /// `shard::reactor`).
    pub(crate) readable: bool,
    /// The socket had room at its last event and no write has been refused since.
    pub(crate) writable: bool,
}

/// A user as one shard's hub knows it (see [`Hub::user_key`]): comparing it with a connection's user
/// is an integer comparison, not a string one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserKey(NonZeroU32);

/// Where a connection's live delivery stands against replay from the store.
///
/// Stored notifications reach a shard in commit (id) order, through the shard's inbox. A replay reaches
/// it through another way (a reader thread's reply), which can overtake the inbox. So:
/// - once a live notification was sent, everything newer was or will be sent live too: a `resume`
///   replays only what is older than the first one ([`LiveMark::FirstLive`]);
/// - right after a replay, a live delivery of something the replay already sent may still be in the
///   inbox: it is dropped ([`LiveMark::ReplayedThrough`]) until a newer one passes, after which, by
///   commit order, no older one can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LiveMark {
    /// Nothing stored was delivered yet.
    #[default]
    Nothing,
    /// A replay sent everything up to this id, and no newer live delivery has passed since.
    ReplayedThrough(uuid::Uuid),
    /// The first stored notification delivered live (since the last replay).
    FirstLive(uuid::Uuid),
}

impl ConnState {
    fn new(fd: RawFd) -> ConnState {
        ConnState {
            fd,
            kind: ConnKind::Http,
            user: None,
            subscriptions: SmallVec::new(),
            mark: 0,
            outbox: None,
            waker: None,
            missed_pongs: 0,
            close_code: None,
            live_mark: LiveMark::Nothing,
            resumed_through: None,
            token_expires_at: 0,
            deadline: 0,
            deadline_queued: 0,
            // A socket just accepted may already hold the request: try it before waiting for an edge.
            readable: true,
            writable: true,
        }
    }

    /// Asks the connection's task to close it with `code` (the first request wins) and wakes it.
    pub fn request_close(&mut self, code: u16) {
        if self.close_code.is_none() {
            self.close_code = Some(code);
        }
        self.wake();
    }

    /// Wakes the connection's task, if it is waiting.
    pub fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Whether this connection is `user`'s (a key from [`Hub::user_key`] of the same hub).
    pub fn is_user(&self, user: UserKey) -> bool {
        self.user == Some(user.0)
    }

    /// How many channels this connection is subscribed to.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }
}

/// An interned name and the connections that share it. Inline room for two members: most users have
/// one or two connections on a shard, and a heap allocation per user would cost more than the entry.
#[derive(Debug)]
struct NameEntry {
    name: Rc<str>,
    members: SmallVec<[ConnId; 2]>,
    /// For a user: the newest unread count this shard knows, as (version, count); (0, 0) before
    /// any. Lives and dies with the user's entry, so a shard keeps it only while it holds one of
    /// the user's connections.
    unread: (u64, u64),
    /// A user's preferences (`None`: the defaults, and always for a channel), kept here so the
    /// delivery path checks them without a lookup: one `None` test for a user who has none.
    preferences: Option<Arc<Preferences>>,
}

/// A table of interned names (users or channels) with their member connections.
#[derive(Debug, Default)]
struct NameTable {
    by_name: HashMap<Rc<str>, NameId>,
    entries: slab::Slab<NameEntry>,
}

impl NameTable {
    fn lookup(&self, name: &str) -> Option<NameId> {
        self.by_name.get(name).copied()
    }

    /// The name's id, and whether it is new (its first member is about to join).
    fn intern(&mut self, name: &str) -> (NameId, bool) {
        if let Some(id) = self.lookup(name) {
            return (id, false);
        }
        let name: Rc<str> = Rc::from(name);
        let id = self.entries.insert(NameEntry {
            name: name.clone(),
            members: SmallVec::new(),
            unread: (0, 0),
            preferences: None,
        }) as NameId;
        self.by_name.insert(name, id);
        (id, true)
    }

    /// Adds a member and returns its position.
    fn add(&mut self, id: NameId, conn: ConnId) -> u32 {
        let members = &mut self.entries[id as usize].members;
        members.push(conn);
        (members.len() - 1) as u32
    }

    /// Swap-removes position `pos`; returns the connection that moved into it, if any, and the name
    /// if this was its last member (the name is then freed).
    fn remove_at(&mut self, id: NameId, pos: u32) -> (Option<ConnId>, Option<Rc<str>>) {
        let entry = &mut self.entries[id as usize];
        entry.members.swap_remove(pos as usize);
        let moved = entry.members.get(pos as usize).copied();
        if entry.members.is_empty() {
            let entry = self.entries.remove(id as usize);
            self.by_name.remove(&entry.name);
            return (moved, Some(entry.name));
        }
        (moved, None)
    }

    fn members(&self, id: NameId) -> &[ConnId] {
        &self.entries[id as usize].members
    }

    fn name(&self, id: NameId) -> &Rc<str> {
        &self.entries[id as usize].name
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Shrinks the tables to what is in use (the slab only up to its last used slot).
    fn shrink(&mut self) {
        self.by_name.shrink_to_fit();
        self.entries.shrink_to_fit();
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// The connection already has the configured maximum of channels.
    TooManyChannels,
}

/// One shard's connections and indexes. See the module docs.
#[derive(Debug, Default)]
pub struct Hub {
    conns: slab::Slab<ConnState>,
    users: NameTable,
    channels: NameTable,
    /// How many connections are native WebSockets (the slab also holds HTTP connections).
    websockets: usize,
    /// The stamp of the current delivery; see the module docs.
    delivery_mark: u32,
    /// Told when the shard's first connection of a user or channel arrives and its last one leaves
    /// (the Redis bus subscribes to exactly those); `None` on a single node.
    interest: Option<InterestSink>,
    /// The node's table of which shards hold which users and channels, and this shard's number in
    /// it: told of the same edges, before the client hears of its subscribe. `None`: a hub alone
    /// (tests), reached by every delivery.
    node: Option<(Arc<NodeInterest>, usize)>,
    /// Below this many connections the tables are shrunk (see [`Hub::shrink_if_sparse`]).
    shrink_below: usize,
    /// The node's users' preferences, read when a user's first connection arrives on this shard;
    /// later changes arrive as [`Hub::preferences_changed`]. `None`: nobody has preferences (tests).
    preferences: Option<Arc<Registry>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Hub {
        Hub::default()
    }

    /// An empty hub that reports its interest changes to `interest` (first arrivals and last
    /// departures of users and channels).
    pub fn with_interest(interest: Option<InterestSink>) -> Hub {
        Hub {
            interest,
            ..Hub::default()
        }
    }

    /// The same hub, keeping shard `shard`'s bits in the node's interest table `table` current.
    pub fn with_node_interest(mut self, table: Arc<NodeInterest>, shard: usize) -> Hub {
        self.node = Some((table, shard));
        self
    }

    /// The same hub, reading its users' preferences from `registry`.
    pub fn with_preferences(mut self, registry: Arc<Registry>) -> Hub {
        self.preferences = Some(registry);
        self
    }

    /// A user's preferences changed: the shard's copy follows, if the user is connected here.
    pub fn preferences_changed(&mut self, user: &str, preferences: Option<Arc<Preferences>>) {
        if let Some(id) = self.users.lookup(user) {
            self.users.entries[id as usize].preferences = preferences;
        }
    }

    /// Reports a first arrival (`on`) or a last departure of the `kind` name `name` to the node's
    /// table and to the bus, if there is one.
    fn interest_changed(&self, kind: TopicKind, name: &str, on: bool) {
        if let Some((table, shard)) = &self.node {
            table.set(*shard, kind, name, on);
        }
        if let Some(sink) = &self.interest {
            let topic = match kind {
                TopicKind::User => Topic::User(name.into()),
                TopicKind::Channel => Topic::Channel(name.into()),
            };
            sink.send_to_bus(topic, on);
        }
    }

    /// Registers a new (HTTP) connection.
    pub fn add(&mut self, fd: RawFd) -> ConnId {
        let id = self.conns.insert(ConnState::new(fd)) as ConnId;
        self.shrink_below = self.shrink_below.max(self.conns.capacity() / 4);
        id
    }

    /// Gives back the room of the connection tables once they are mostly empty (after a burst of
    /// connections closed): the slab up to its last used slot, and the name tables. Tables grow by
    /// doubling and never shrink by themselves, so without this a node keeps the peak's memory forever.
    /// Tried again only after the count halves once more, so the cost is amortized whatever the slab's
    /// last slot holds. Returns whether it shrank anything, for the caller to tell the allocator.
    pub fn shrink_if_sparse(&mut self) -> bool {
        const SMALLEST: usize = 1024;
        if self.conns.len() >= self.shrink_below || self.conns.capacity() < SMALLEST {
            return false;
        }
        self.shrink_below = self.conns.len() / 2;
        self.conns.shrink_to_fit();
        self.users.shrink();
        self.channels.shrink();
        true
    }

    /// All connections, HTTP and WebSocket.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when the shard holds no connection.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// WebSocket connections only.
    pub fn websocket_count(&self) -> usize {
        self.websockets
    }

    /// Distinct users with a WebSocket connection on this shard.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Distinct channels with a subscriber on this shard.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The connection in slot `id`. Panics if `id` is not registered: ids are only held by their own
    /// connection task, which removes its slot last.
    pub fn conn(&self, id: ConnId) -> &ConnState {
        &self.conns[id as usize]
    }

    /// The connection in slot `id`, if one is registered there (sweeps that hold ids across time).
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut ConnState> {
        self.conns.get_mut(id as usize)
    }

    /// Mutable access to the connection in slot `id` (see [`Hub::conn`]).
    pub fn conn_mut(&mut self, id: ConnId) -> &mut ConnState {
        &mut self.conns[id as usize]
    }

    /// Every connection, for sweeps (heartbeat, shutdown).
    pub fn conns_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut ConnState)> {
        self.conns.iter_mut().map(|(id, c)| (id as ConnId, c))
    }

    /// Turns an HTTP connection into a connection of `kind` (one that receives deliveries) for `user`,
    /// indexed for deliveries.
    pub fn upgrade(&mut self, id: ConnId, user: &str, kind: ConnKind) {
        debug_assert!(
            kind.receives_deliveries(),
            "{kind:?} receives no deliveries"
        );
        let (user_id, new) = self.users.intern(user);
        if new {
            self.interest_changed(TopicKind::User, user, true);
            if let Some(registry) = &self.preferences {
                self.users.entries[user_id as usize].preferences = registry.get(user);
            }
        }
        self.users.add(user_id, id);
        let conn = &mut self.conns[id as usize];
        conn.kind = kind;
        conn.user = NonZeroU32::new(user_id + 1);
        if kind == ConnKind::WebSocket {
            self.websockets += 1;
        }
    }

    /// The key of `user` when one of this shard's connections is that user's, to tell cheaply which
    /// connections are (see [`ConnState::is_user`]).
    pub fn user_key(&self, user: &str) -> Option<UserKey> {
        self.users
            .lookup(user)
            .and_then(|id| NonZeroU32::new(id + 1))
            .map(UserKey)
    }

    /// Turns an HTTP connection into a connection of `kind` that has no user yet (a Pusher connection
    /// before it signs in): reached through its channels and broadcasts only.
    pub fn upgrade_without_user(&mut self, id: ConnId, kind: ConnKind) {
        debug_assert!(
            kind.receives_deliveries(),
            "{kind:?} receives no deliveries"
        );
        self.conns[id as usize].kind = kind;
    }

    /// Gives a connection without a user the user `user`, so deliveries to the user reach it from now
    /// on. Returns false (and changes nothing) when it already has another user.
    pub fn attach_user(&mut self, id: ConnId, user: &str) -> bool {
        if let Some(current) = self.user_of(id) {
            return **current == *user;
        }
        let (user_id, new) = self.users.intern(user);
        if new {
            self.interest_changed(TopicKind::User, user, true);
        }
        self.users.add(user_id, id);
        self.conns[id as usize].user = NonZeroU32::new(user_id + 1);
        true
    }

    /// Every channel with a subscriber on this shard whose name starts with `prefix`, with its count
    /// of subscribed connections (of every kind: native and Pusher clients share channel names).
    pub fn channels_with_prefix(&self, prefix: &str) -> Vec<(Rc<str>, usize)> {
        self.channels
            .entries
            .iter()
            .filter(|(_, e)| e.name.starts_with(prefix))
            .map(|(_, e)| (e.name.clone(), e.members.len()))
            .collect()
    }

    /// How many connections of this shard are subscribed to `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.channels
            .lookup(channel)
            .map_or(0, |ch| self.channels.members(ch).len())
    }

    /// The connections of `user` on this shard.
    pub fn connections_of_user(&self, user: &str) -> Vec<ConnId> {
        self.users
            .lookup(user)
            .map_or_else(Vec::new, |u| self.users.members(u).to_vec())
    }

    /// The user of a WebSocket connection.
    pub fn user_of(&self, id: ConnId) -> Option<&Rc<str>> {
        self.conns[id as usize]
            .user
            .map(|u| self.users.name(u.get() - 1))
    }

    /// Whether the connection is subscribed to `channel`.
    pub fn is_subscribed(&self, id: ConnId, channel: &str) -> bool {
        match self.channels.lookup(channel) {
            Some(ch) => self.conns[id as usize]
                .subscriptions
                .iter()
                .any(|s| s.channel == ch),
            None => false,
        }
    }

    /// The channels a connection is subscribed to, in subscription order.
    pub fn channels_of(&self, id: ConnId) -> Vec<Rc<str>> {
        self.conns[id as usize]
            .subscriptions
            .iter()
            .map(|s| self.channels.name(s.channel).clone())
            .collect()
    }

    /// Subscribes a connection to `channel`. Subscribing twice is harmless. Returns whether it is new.
    pub fn subscribe(
        &mut self,
        id: ConnId,
        channel: &str,
        max_channels: usize,
    ) -> Result<bool, SubscribeError> {
        if self.is_subscribed(id, channel) {
            return Ok(false);
        }
        if self.conns[id as usize].subscriptions.len() >= max_channels {
            return Err(SubscribeError::TooManyChannels);
        }
        let (ch, new) = self.channels.intern(channel);
        if new {
            self.interest_changed(TopicKind::Channel, channel, true);
        }
        let position = self.channels.add(ch, id);
        self.conns[id as usize].subscriptions.push(Subscription {
            channel: ch,
            position,
        });
        Ok(true)
    }

    /// Unsubscribes a connection from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&mut self, id: ConnId, channel: &str) -> bool {
        let Some(ch) = self.channels.lookup(channel) else {
            return false;
        };
        let subs = &mut self.conns[id as usize].subscriptions;
        let Some(index) = subs.iter().position(|s| s.channel == ch) else {
            return false;
        };
        let sub = subs.swap_remove(index);
        self.remove_member(ch, sub.position);
        true
    }

    /// Removes a channel membership by position and fixes the position of the member that moved in.
    fn remove_member(&mut self, ch: NameId, position: u32) {
        let (moved, freed) = self.channels.remove_at(ch, position);
        if let Some(name) = freed {
            self.interest_changed(TopicKind::Channel, &name, false);
        }
        if let Some(moved) = moved {
            if let Some(s) = self.conns[moved as usize]
                .subscriptions
                .iter_mut()
                .find(|s| s.channel == ch)
            {
                s.position = position;
            }
        }
    }

    /// Unregisters a connection and drops all its index entries. Returns its final state.
    pub fn remove(&mut self, id: ConnId) -> ConnState {
        let conn = self.conns.remove(id as usize);
        for sub in &conn.subscriptions {
            self.remove_member(sub.channel, sub.position);
        }
        if let Some(user) = conn.user.map(|u| u.get() - 1) {
            let members = self.users.members(user);
            if let Some(pos) = members.iter().position(|&c| c == id) {
                if let (_, Some(name)) = self.users.remove_at(user, pos as u32) {
                    self.interest_changed(TopicKind::User, &name, false);
                }
            }
        }
        if conn.kind == ConnKind::WebSocket {
            self.websockets -= 1;
        }
        conn
    }

    /// Records `user`'s unread `count` at `version` if it is newer than what this shard knows.
    /// Returns whether it was: `false` for an older or repeated count (it came a slower way, e.g.
    /// through Redis after a newer local one) or a user without a connection here, which must not
    /// be written.
    pub fn note_unread(&mut self, user: &str, version: u64, count: u64) -> bool {
        let Some(id) = self.users.lookup(user) else {
            return false;
        };
        let known = &mut self.users.entries[id as usize].unread;
        if version <= known.0 && known.0 != 0 {
            return false;
        }
        *known = (version, count);
        true
    }

    /// The count a new connection of `user` starts with, given the count its session read from the
    /// store at `version`: that one, or a newer one this shard already knows (it may have been
    /// written to the user's other connections while the read was on its way).
    pub fn unread_at_connect(&mut self, user: &str, version: u64, count: u64) -> u64 {
        let Some(id) = self.users.lookup(user) else {
            return count;
        };
        let known = &mut self.users.entries[id as usize].unread;
        if known.0 > version {
            return known.1;
        }
        *known = (version, count);
        count
    }

    /// Calls `deliver` once for every connection that `delivery` targets (union of its user, its
    /// channels and broadcast), with the frame that connection should get, in its kind's encoding: a
    /// connection reached through its user or a broadcast gets the plain frame; one reached only through a
    /// channel gets that channel's frame (with the `"channel"` field). `skip` is a connection not to
    /// deliver to (the sender of a client publish).
    pub fn for_each_target(
        &mut self,
        delivery: &Delivery,
        skip: Option<ConnId>,
        mut deliver: impl FnMut(ConnId, &mut ConnState, &bytes::Bytes),
    ) {
        self.delivery_mark = self.delivery_mark.wrapping_add(1);
        if self.delivery_mark == 0 {
            // The mark wrapped: clear stale stamps so no connection looks already visited.
            for (_, c) in self.conns.iter_mut() {
                c.mark = 0;
            }
            self.delivery_mark = 1;
        }
        let mark = self.delivery_mark;
        if let Some(skip) = skip {
            if let Some(c) = self.conns.get_mut(skip as usize) {
                c.mark = mark;
            }
        }
        // A broadcast reaches every connection that receives deliveries; collect them before the
        // visitor borrows the slab.
        let broadcast_to: Vec<ConnId> = if delivery.broadcast {
            self.conns
                .iter()
                .filter(|(_, c)| c.kind.receives_deliveries())
                .map(|(id, _)| id as ConnId)
                .collect()
        } else {
            Vec::new()
        };
        let conns = &mut self.conns;
        let users = &self.users;
        // Preferences apply to stored notifications only (not to a client's ephemeral messages).
        let stored = match &delivery.content {
            Content::Notification(n) => Some(&**n),
            Content::ClientMessage(_)
            | Content::Unread { .. }
            | Content::PusherEvent(_)
            | Content::Presence(_) => None,
        };
        // `native` is the frame the target chose in the native encoding, picked once per target as
        // before kinds existed; another kind's frame is fetched (made once per delivery) only for it.
        let mut visit = |id: ConnId, native: &bytes::Bytes, via: Via| {
            let c = &mut conns[id as usize];
            if c.mark != mark {
                c.mark = mark;
                let Some(encoding) = c.kind.encoding() else {
                    return;
                };
                if let (Some(n), Some(user)) = (stored, c.user) {
                    let entry = &users.entries[(user.get() - 1) as usize];
                    if let Some(prefs) = &entry.preferences {
                        if prefs.verdict(&entry.name, n, delivery.released) != Verdict::Push {
                            return;
                        }
                    }
                }
                if encoding == Encoding::NativeWebSocket {
                    deliver(id, c, native);
                } else {
                    deliver(id, c, delivery.frames(encoding).get(via));
                }
            }
        };
        if let Some(user) = delivery.user.as_deref().and_then(|u| self.users.lookup(u)) {
            for &id in self.users.members(user) {
                visit(id, &delivery.native().plain, Via::Plain);
            }
        }
        for (i, channel) in delivery.channels.iter().enumerate() {
            if let Some(ch) = self.channels.lookup(channel) {
                let via = Via::Channel(i);
                let frame = delivery.native().get(via);
                for &id in self.channels.members(ch) {
                    visit(id, frame, via);
                }
            }
        }
        for id in broadcast_to {
            visit(id, &delivery.native().plain, Via::Plain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Frames;
    use bytes::Bytes;

    fn delivery(user: Option<&str>, channels: &[&str], broadcast: bool) -> Delivery {
        Delivery::new(
            None,
            user.map(str::to_owned),
            channels.iter().map(|c| c.to_string()).collect(),
            broadcast,
            Content::ClientMessage(Bytes::from_static(b"{}")),
            Frames {
                plain: Bytes::from_static(b"plain"),
                per_channel: channels
                    .iter()
                    .map(|c| Bytes::from(format!("via {c}")))
                    .collect(),
            },
        )
    }

    fn targets(hub: &mut Hub, d: &Delivery, skip: Option<ConnId>) -> Vec<(ConnId, String)> {
        let mut out = Vec::new();
        hub.for_each_target(d, skip, |id, _, frame| {
            out.push((id, String::from_utf8(frame.to_vec()).unwrap()))
        });
        out.sort();
        out
    }

    #[test]
    fn a_pusher_connection_is_reached_by_channel_then_by_the_user_it_is_given() {
        // Pusher frames are made from the content (not the test's fake native frames): count the
        // connections reached.
        fn reached(hub: &mut Hub, d: &Delivery) -> Vec<ConnId> {
            let mut ids = Vec::new();
            hub.for_each_target(d, None, |id, _, _| ids.push(id));
            ids
        }
        let mut hub = Hub::new();
        let p = hub.add(-1);
        hub.upgrade_without_user(p, ConnKind::Pusher);
        hub.subscribe(p, "news", 10).unwrap();
        assert!(reached(&mut hub, &delivery(Some("7"), &[], false)).is_empty());
        assert_eq!(
            reached(&mut hub, &delivery(None, &["news"], false)),
            vec![p]
        );
        assert!(hub.attach_user(p, "7"));
        assert!(hub.attach_user(p, "7"), "the same user again is fine");
        assert!(!hub.attach_user(p, "8"), "one user per connection");
        assert_eq!(reached(&mut hub, &delivery(Some("7"), &[], false)), vec![p]);
        assert_eq!(hub.connections_of_user("7"), vec![p]);
        assert_eq!(hub.subscriber_count("news"), 1);
        assert_eq!(hub.channels_with_prefix("ne").len(), 1);
        assert!(hub.channels_with_prefix("x").is_empty());
        hub.remove(p);
        assert_eq!(hub.user_count(), 0);
        assert_eq!(hub.channel_count(), 0);
    }

    fn ws(hub: &mut Hub, user: &str) -> ConnId {
        let id = hub.add(-1);
        hub.upgrade(id, user, ConnKind::WebSocket);
        id
    }

    #[test]
    fn a_user_with_two_connections_gets_it_on_both() {
        let mut hub = Hub::new();
        let a = ws(&mut hub, "alice");
        let a2 = ws(&mut hub, "alice");
        let _b = ws(&mut hub, "bob");
        let got = targets(&mut hub, &delivery(Some("alice"), &[], false), None);
        assert_eq!(got, vec![(a, "plain".into()), (a2, "plain".into())]);
    }

    #[test]
    fn union_of_targets_reaches_each_connection_once() {
        let mut hub = Hub::new();
        let a = ws(&mut hub, "alice");
        let b = ws(&mut hub, "bob");
        let c = ws(&mut hub, "carol");
        hub.subscribe(a, "news", 10).unwrap();
        hub.subscribe(a, "sport", 10).unwrap();
        hub.subscribe(b, "sport", 10).unwrap();
        let got = targets(
            &mut hub,
            &delivery(Some("alice"), &["news", "sport"], false),
            None,
        );
        // alice through her user id (plain), bob through "sport"; carol not at all.
        assert_eq!(got, vec![(a, "plain".into()), (b, "via sport".into())]);
        let all = targets(&mut hub, &delivery(None, &["sport"], true), None);
        assert_eq!(all.len(), 3, "broadcast reaches everyone once: {all:?}");
        assert!(all.contains(&(c, "plain".into())));
        assert!(all.contains(&(b, "via sport".into())));
    }

    #[test]
    fn http_connections_get_nothing_and_skip_is_honoured() {
        let mut hub = Hub::new();
        let _http = hub.add(-1);
        let a = ws(&mut hub, "alice");
        let b = ws(&mut hub, "bob");
        hub.subscribe(a, "room", 10).unwrap();
        hub.subscribe(b, "room", 10).unwrap();
        assert_eq!(
            targets(&mut hub, &delivery(None, &["room"], false), Some(a)),
            vec![(b, "via room".into())]
        );
        assert_eq!(targets(&mut hub, &delivery(None, &[], true), None).len(), 2);
    }

    #[test]
    fn unsubscribe_and_disconnect_leave_no_trace() {
        let mut hub = Hub::new();
        let ids: Vec<ConnId> = (0..50).map(|i| ws(&mut hub, &format!("u{i}"))).collect();
        for &id in &ids {
            hub.subscribe(id, "big", 10).unwrap();
        }
        // Remove from the middle, the start and the end; positions must stay consistent.
        for &id in ids.iter().step_by(3) {
            assert!(hub.unsubscribe(id, "big"));
        }
        assert!(
            !hub.unsubscribe(ids[0], "big"),
            "second unsubscribe is a no-op"
        );
        let expected: Vec<ConnId> = ids
            .iter()
            .copied()
            .filter(|id| (ids.iter().position(|x| x == id).unwrap()) % 3 != 0)
            .collect();
        let got: Vec<ConnId> = targets(&mut hub, &delivery(None, &["big"], false), None)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(got, expected);
        for &id in &ids {
            hub.remove(id);
        }
        assert_eq!(hub.len(), 0);
        assert_eq!(hub.channel_count(), 0, "channel freed with its last member");
        assert_eq!(
            hub.user_count(),
            0,
            "users freed with their last connection"
        );
        assert_eq!(hub.websocket_count(), 0);
        assert!(targets(&mut hub, &delivery(Some("u1"), &["big"], true), None).is_empty());
    }

    #[test]
    fn channel_limit_is_enforced_and_double_subscribe_is_harmless() {
        let mut hub = Hub::new();
        let a = ws(&mut hub, "alice");
        assert_eq!(hub.subscribe(a, "one", 2), Ok(true));
        assert_eq!(hub.subscribe(a, "one", 2), Ok(false));
        assert_eq!(hub.subscribe(a, "two", 2), Ok(true));
        assert_eq!(
            hub.subscribe(a, "three", 2),
            Err(SubscribeError::TooManyChannels)
        );
        assert_eq!(hub.channels_of(a).len(), 2);
    }

    #[test]
    fn the_bus_hears_of_first_arrivals_and_last_departures_only() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut hub = Hub::with_interest(Some(InterestSink::new(1, tx, Default::default())));
        let a = ws(&mut hub, "alice");
        let a2 = ws(&mut hub, "alice");
        hub.subscribe(a, "news", 10).unwrap();
        hub.subscribe(a2, "news", 10).unwrap();
        hub.unsubscribe(a, "news");
        hub.remove(a);
        hub.remove(a2);
        let mut heard = Vec::new();
        while let Ok(crate::bus::redis_bus::BusCmd::Interest(c)) = rx.try_recv() {
            assert_eq!(c.shard, 1);
            heard.push((c.topic, c.on));
        }
        assert_eq!(
            heard,
            vec![
                (Topic::User("alice".into()), true),
                (Topic::Channel("news".into()), true),
                (Topic::Channel("news".into()), false),
                (Topic::User("alice".into()), false),
            ]
        );
    }

    #[test]
    fn only_a_newer_unread_count_is_written_and_a_new_connection_starts_from_the_newest() {
        let mut hub = Hub::new();
        assert!(!hub.note_unread("u1", 1, 5), "no connection of u1 here");
        ws(&mut hub, "u1");
        assert!(hub.note_unread("u1", 3, 5));
        assert!(!hub.note_unread("u1", 2, 4), "older: came a slower way");
        assert!(!hub.note_unread("u1", 3, 5), "repeated");
        assert!(hub.note_unread("u1", 4, 6));
        assert_eq!(
            hub.unread_at_connect("u1", 3, 5),
            6,
            "the store read was older"
        );
        assert_eq!(
            hub.unread_at_connect("u1", 9, 1),
            1,
            "the store read is newer"
        );
        assert!(!hub.note_unread("u1", 8, 2));
    }

    #[test]
    fn connection_state_stays_small() {
        // The per-connection budget (docs/architecture.md, "Memory per connection") leaves ~150 bytes
        // beside the socket and the task. 104 since the readiness flags and deadlines moved here from
        // glommio's per-socket source (~870 bytes); 120 since `resumed_through` (16 bytes: without it
        // a copy relayed late from another node duplicates what a resume replayed).
        assert!(
            std::mem::size_of::<ConnState>() <= 120,
            "{}",
            std::mem::size_of::<ConnState>()
        );
    }
}
