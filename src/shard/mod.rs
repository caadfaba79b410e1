//! Shards: one glommio `LocalExecutor` per core, each with its own `SO_REUSEPORT` listener, its own
//! connections and its own hub. Shared-nothing (Seastar's model): a shard never touches another shard's
//! memory; everything that crosses shards is a message in a [`ShardInbox`](crate::delivery::inbox::ShardInbox),
//! and the functions that send one say so in their name (`send_to_shard`, `send_to_interested_shards`).
//!
//! The shard holds connections and routes deliveries to them; it does not know what a connection speaks.
//! The task that serves each accepted socket (HTTP, then a session of some connection kind) is the
//! function given to [`spawn_shard`] in [`ShardSetup::serve`] (`crate::connection::serve`), which sits
//! above the shard.
//!
//! Each shard runs these tasks:
//! - the readiness task, which takes the events of the shard's epoll set (every socket of the shard is
//!   in it, see `reactor`) and wakes the connections and the accept loop they concern;
//! - the accept loop, which spawns one task per accepted socket (the `serve` given to [`spawn_shard`]);
//! - the timeout sweep, which ends the waits of connections whose deadline passed (see `timeouts`);
//! - the inbox pump, which routes deliveries from the store thread and other shards to local connections;
//! - the unread flusher, which writes the users' newest unread counts, coalesced (see `unread`);
//! - the heartbeat sweep: one timer per shard, not per connection, pings every WebSocket each
//!   `HEARTBEAT_S` and closes those that missed two pongs, and writes a comment line to every SSE
//!   stream;
//! - with `JWT_SECRET`, the expiry sweep: once a second, closes with 1008 the WebSockets whose token
//!   ran out (see `auth::expiry`);
//! - the receipt hand-off, which passes the delivery receipts the shard noted to the store thread in
//!   batches (see [`receipts`]);
//! - the connection tasks.
//!
//! Shutdown is a message like any other: the pump sets the shard's flag, asks every receiving connection
//! (WebSocket, SSE stream, parked poll) to close with 1001, wakes idle HTTP connections (which then close), and the accept loop stops; the shard exits
//! once its connections are gone or `SHUTDOWN_TIMEOUT_S` has passed.

pub(crate) mod allocator;
pub mod hub;
pub mod outbound;
pub(crate) mod reactor;
pub mod receipts;
pub(crate) mod socket;
pub(crate) mod timeouts;
pub(crate) mod unread;

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, error, info, warn};

use crate::auth::expiry::ExpiryQueue;
use crate::auth::Auth;
use crate::bus::Fanout;
use crate::config::Config;
use crate::delivery::inbox::{ConnId, InboxReceiver, ShardMsg};
use crate::delivery::Delivery;
use crate::metrics::{Delivered, Metrics, ShardCounters};
use crate::shard::hub::{ConnKind, Hub, LiveMark};
use crate::shard::outbound::{send_frame, Sent, WriteBatch};
use crate::shard::reactor::{Reactor, LISTENER};
use crate::shard::receipts::ReceiptBuffer;
use crate::shard::timeouts::{Timeouts, TICK};
use crate::shard::unread::PendingUnread;
use crate::store::Store;
use crate::ws::codec::{close_code, encode_ping, encode_text};

/// Bytes of the per-shard read buffer every connection reads into (see `socket`).
const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// glommio reserves this much registered memory for file I/O per executor; we do no file I/O through
/// glommio, so the minimum it accepts.
const EXECUTOR_IO_MEMORY: usize = 64 * 1024;
/// Inbox messages handled before the pump yields to connection tasks.
const PUMP_BATCH: usize = 256;
/// Frames the pump collects before writing them out (see `outbound::WriteBatch`): enough to turn a
/// burst of messages into one write per subscriber, small enough (about 400 KiB of entries) that the
/// batch's buffer stays a fixed, modest part of the shard's memory.
const WRITE_BATCH_FRAMES: usize = 16 * 1024;
/// Unanswered pings after which a WebSocket is considered dead.
const MAX_MISSED_PONGS: u8 = 2;
/// How often a shutting-down shard checks whether its connections are gone.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often the expiry sweep looks for tokens that ran out (`exp` has a one-second resolution).
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// Pause after an accept error (EMFILE and the like) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Connections accepted per turn of the accept loop before it lets the others run (the listener is
/// level-triggered: what is left is reported again).
const ACCEPT_BATCH: usize = 64;

/// Everything a shard needs to start, moved into its thread. `S` is the function that serves each
/// accepted socket (see [`spawn_shard`]).
pub struct ShardSetup<S> {
    /// The shard's number, 0-based.
    pub index: usize,
    /// Its `SO_REUSEPORT` listening socket, bound and listening.
    pub listener: OwnedFd,
    /// Its inbox's receiving side.
    pub inbox: InboxReceiver,
    /// Server settings.
    pub config: Arc<Config>,
    /// The store handle.
    pub store: Store,
    /// Fan-out to the other shards (client publishes).
    pub fanout: Fanout,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Credentials, rate limits and connection caps, shared by every shard.
    pub auth: Arc<Auth>,
    /// The CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// Told the shard's index once its executor runs: start-up waits for every shard before it says
    /// "listening" (an executor can fail to start, e.g. when seccomp blocks io_uring).
    pub ready: std::sync::mpsc::Sender<usize>,
    /// Serves one accepted socket until it closes, in a task of its own: `crate::connection::serve`.
    /// A generic parameter (a function item in practice), so each connection's future is spawned as
    /// is: no box, no dynamic call.
    pub serve: S,
}

/// A running shard's thread.
pub struct ShardThread {
    handle: glommio::ExecutorJoinHandle<()>,
}

impl ShardThread {
    /// Waits for the shard to finish its shutdown.
    pub fn join(self) -> Result<(), String> {
        self.handle.join().map_err(|e| e.to_string())
    }
}

/// Starts a shard on its own pinned executor thread; its accept loop runs `setup.serve` on every
/// accepted socket.
pub fn spawn_shard<S, F>(setup: ShardSetup<S>) -> Result<ShardThread, String>
where
    S: Fn(Rc<Shard>, TcpStream, Option<IpAddr>) -> F + Copy + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    let placement = match setup.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let index = setup.index;
    let handle = LocalExecutorBuilder::new(placement)
        .name(&format!("shard-{index}"))
        .io_memory(EXECUTOR_IO_MEMORY)
        .spawn(move || run_shard(setup))
        .map_err(|e| format!("cannot start shard {index}: {e}"))?;
    Ok(ShardThread { handle })
}

/// One shard's state, shared by its tasks through an `Rc` (single thread).
pub struct Shard {
    /// The shard's number.
    pub index: usize,
    /// Server settings.
    pub config: Arc<Config>,
    /// Connections and their indexes.
    pub hub: RefCell<Hub>,
    /// The store handle.
    pub store: Store,
    /// Fan-out to other shards.
    pub fanout: Fanout,
    /// Counters of every shard (this one writes only its own).
    pub metrics: Arc<Metrics>,
    /// Credentials, rate limits and connection caps (node-wide).
    pub auth: Arc<Auth>,
    /// When this shard's WebSockets' tokens expire (see `auth::expiry`).
    pub expiries: RefCell<ExpiryQueue<ConnId>>,
    /// The read buffer every connection of this shard reads into, borrowed only inside `poll`.
    pub(crate) scratch: RefCell<Box<[u8]>>,
    /// The epoll set of the shard's sockets (see `reactor`).
    pub(crate) reactor: RefCell<Reactor>,
    /// The deadlines of the shard's connections (see `timeouts`).
    pub(crate) timeouts: RefCell<Timeouts>,
    /// Set once a shutdown began.
    shutting_down: Cell<bool>,
    /// The listener had connections waiting at the last event.
    listener_ready: Cell<bool>,
    /// The accept loop's waker, woken when connections wait and at shutdown.
    accept_waker: RefCell<Option<Waker>>,
    /// Numbers connection ids (`<shard>-<n>`).
    connection_seq: Cell<u64>,
    /// The server ping frame, shared by every connection.
    ping_frame: Bytes,
    /// The SSE heartbeat comment, shared by every SSE stream.
    sse_ping: Bytes,
    /// The `pusher:ping` text frame the heartbeat sends to Pusher connections, made once per shard.
    pusher_ping_frame: Bytes,
    /// Frames of the inbox burst being routed, written per connection at its end.
    write_batch: RefCell<WriteBatch>,
    /// Delivery receipts noted since the last hand-off to the store (see [`receipts`]).
    pub receipts: RefCell<ReceiptBuffer>,
    /// Users' unread counts waiting for the unread flusher (see `unread`).
    pub(crate) unread: PendingUnread,
}

impl Shard {
    /// This shard's counters.
    pub fn stats(&self) -> &ShardCounters {
        self.metrics.shard(self.index)
    }

    /// Whether a graceful shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// The next connection number on this shard.
    pub fn next_connection_seq(&self) -> u64 {
        let n = self.connection_seq.get() + 1;
        self.connection_seq.set(n);
        n
    }

    /// Writes a delivery to every interested connection of this shard (`skip`: the sender of a client
    /// message), collecting the frames in the shard's write batch; they are written by [`Shard::flush_deliveries`], which must run before the caller yields.
    fn deliver_batched(&self, delivery: &Delivery, skip: Option<ConnId>) {
        let max_outbound = self.config.max_outbound_bytes;
        let mut delivered = [0, 0]; // [plain frame, a channel's frame], for the kinds in /metrics
        let mut batch = self.write_batch.borrow_mut();
        // A notification released at the end of quiet hours is older than what was delivered live
        // since: it must not become the connection's first live id (`LiveMark`), which would keep a
        // resume from replaying what came between.
        let live_id = if delivery.released { None } else { delivery.id };
        let mut hub = self.hub.borrow_mut();
        // A stored notification's receipt: only a connection of its own user counts (not a channel
        // subscriber or a broadcast listener), and one per shard is enough.
        let receipt_for = match (delivery.id, delivery.user.as_deref()) {
            (Some(id), Some(user)) => hub.user_key(user).map(|key| (id, key)),
            _ => None,
        };
        let mut reached_user = false;
        hub.for_each_target(delivery, skip, |id, conn, frame| {
            if conn.kind == ConnKind::LongPoll {
                // A parked poll answers from the store (`connection::poll`): a stored delivery
                // only records that something arrived, and wakes it. Its answer notes the receipts.
                if let Some(stored) = delivery.id {
                    if !matches!(conn.live_mark, LiveMark::FirstLive(_)) {
                        conn.live_mark = LiveMark::FirstLive(stored);
                    }
                    conn.wake();
                }
                return;
            }
            if batch.deliver(id, conn, live_id, frame, max_outbound) == Sent::Accepted {
                delivered[usize::from(!std::ptr::eq(frame, &delivery.native().plain))] += 1;
                reached_user |= receipt_for.is_some_and(|(_, key)| conn.is_user(key));
            }
        });
        drop(hub);
        if let (true, Some((id, _))) = (reached_user, receipt_for) {
            self.receipts.borrow_mut().delivered(id);
        }
        self.stats().delivered(Delivered {
            stored: delivery.id.is_some(),
            broadcast: delivery.broadcast,
            plain: delivered[0],
            via_channel: delivered[1],
            made_at: delivery.made_at,
        });
        let total = delivered[0] + delivered[1];
        if total > 0 {
            self.auth.audit().delivered(delivery.id, total, self.index);
        }
        let full = batch.len() >= WRITE_BATCH_FRAMES;
        drop(batch);
        if full {
            self.flush_deliveries();
        }
    }

    /// The connection of this shard a delivery must skip: the one a Pusher event's `socket_id` names,
    /// when it lives here (it may live on any shard of any node; elsewhere it is nobody).
    fn excluded_here(&self, delivery: &Delivery) -> Option<ConnId> {
        let socket = crate::pusher::socket_id::SocketId::parse(delivery.excluded_socket()?)?;
        (socket.is_local() && usize::from(socket.shard) == self.index).then_some(socket.slot)
    }

    /// Writes what [`Shard::deliver_batched`] collected.
    fn flush_deliveries(&self) {
        let mut batch = self.write_batch.borrow_mut();
        if !batch.is_empty() {
            batch.flush(&mut self.hub.borrow_mut(), self.config.max_outbound_bytes);
        }
    }

    /// Starts the graceful shutdown (see the module docs).
    fn begin_shutdown(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        info!(shard = self.index, "shutting down");
        for (_, conn) in self.hub.borrow_mut().conns_mut() {
            // A live kind is asked to close (its task says goodbye in its own protocol); an HTTP
            // connection is woken to finish its request or close between requests.
            match conn.kind {
                ConnKind::WebSocket | ConnKind::Sse | ConnKind::LongPoll => {
                    conn.request_close(close_code::GOING_AWAY)
                }
                // Pusher clients reconnect at once on 4200 (to another node, behind a balancer).
                ConnKind::Pusher => conn.request_close(crate::pusher::protocol::code::RECONNECT),
                ConnKind::Http => conn.wake(),
            }
        }
        if let Some(w) = self.accept_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves with `true` once the listener has connections waiting, `false` once a shutdown began.
    async fn connections_waiting(&self) -> bool {
        poll_fn(|cx| {
            if self.is_shutting_down() {
                Poll::Ready(false)
            } else if self.listener_ready.replace(false) {
                Poll::Ready(true)
            } else {
                *self.accept_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// The shard's main task.
async fn run_shard<S, F>(setup: ShardSetup<S>)
where
    S: Fn(Rc<Shard>, TcpStream, Option<IpAddr>) -> F + Copy,
    F: Future<Output = ()> + 'static,
{
    let listener = TcpListener::from(setup.listener);
    let reactor = match Reactor::new().and_then(|r| {
        listener.set_nonblocking(true)?;
        r.register_listener(listener.as_raw_fd())?;
        Ok(r)
    }) {
        Ok(reactor) => reactor,
        Err(e) => {
            // Start-up sees this shard never report ready, and fails.
            error!(shard = setup.index, error = %e, "cannot set up the shard's epoll set");
            return;
        }
    };
    let _ = setup.ready.send(setup.index);
    crate::metrics::bind_shard_thread(setup.metrics.clone(), setup.index);
    let shard = Rc::new(Shard {
        index: setup.index,
        config: setup.config,
        hub: RefCell::new(
            Hub::with_interest(setup.fanout.interest_sink(setup.index))
                .with_node_interest(setup.fanout.node_interest().clone(), setup.index)
                .with_preferences(setup.fanout.preferences().clone()),
        ),
        store: setup.store,
        fanout: setup.fanout,
        metrics: setup.metrics,
        auth: setup.auth,
        expiries: RefCell::new(ExpiryQueue::new()),
        scratch: RefCell::new(vec![0u8; READ_SCRATCH_BYTES].into_boxed_slice()),
        reactor: RefCell::new(reactor),
        timeouts: RefCell::new(Timeouts::new()),
        shutting_down: Cell::new(false),
        listener_ready: Cell::new(false),
        accept_waker: RefCell::new(None),
        connection_seq: Cell::new(0),
        ping_frame: Bytes::from(encode_ping(b"")),
        sse_ping: Bytes::from_static(crate::delivery::sse::PING),
        pusher_ping_frame: Bytes::from(encode_text(&crate::pusher::protocol::ping())),
        write_batch: RefCell::new(WriteBatch::default()),
        receipts: RefCell::new(ReceiptBuffer::default()),
        unread: PendingUnread::default(),
    });
    let readiness = glommio::spawn_local(readiness(shard.clone())).detach();
    let sweep = glommio::spawn_local(timeout_sweep(shard.clone())).detach();
    let pump = glommio::spawn_local(pump_inbox(shard.clone(), setup.inbox)).detach();
    let heartbeat = glommio::spawn_local(heartbeat(shard.clone())).detach();
    let receipts = glommio::spawn_local(receipts::hand_off(shard.clone())).detach();
    let unread = glommio::spawn_local(unread::run_flusher(
        shard.clone(),
        shard.config.unread_coalesce(),
    ))
    .detach();
    let expiry = shard
        .auth
        .jwt_enabled()
        .then(|| glommio::spawn_local(expiry_sweep(shard.clone())).detach());
    debug!(shard = shard.index, "accepting");
    accept_loop(&shard, &listener, setup.serve).await;
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(shard.config.shutdown_timeout_s);
    while !shard.hub.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(DRAIN_POLL).await;
    }
    let left = shard.hub.borrow().len();
    if left > 0 {
        warn!(
            shard = shard.index,
            connections = left,
            "shutdown timeout: closing the rest"
        );
    }
    // glommio does not drop detached tasks when the executor's main future returns: cancel the
    // shard's own tasks so nothing of the shard outlives it.
    pump.cancel();
    unread.cancel();
    heartbeat.cancel();
    receipts.cancel();
    // Ahead of the store's close, which the main thread queues once every shard has ended.
    receipts::hand_off_now(&shard);
    sweep.cancel();
    readiness.cancel();
    if let Some(expiry) = expiry {
        expiry.cancel();
    }
}

/// Accepts connections until shutdown, each served by `serve` in a task of its own.
async fn accept_loop<S, F>(shard: &Rc<Shard>, listener: &TcpListener, serve: S)
where
    S: Fn(Rc<Shard>, TcpStream, Option<IpAddr>) -> F,
    F: Future<Output = ()> + 'static,
{
    while shard.connections_waiting().await {
        for _ in 0..ACCEPT_BATCH {
            match accept(listener) {
                Ok((stream, peer)) => {
                    glommio::spawn_local(serve(shard.clone(), stream, peer)).detach();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(shard = shard.index, error = %e, "accept failed");
                    glommio::timer::sleep(ACCEPT_ERROR_BACKOFF).await;
                    break;
                }
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// One `accept4(2)`: the connection comes non-blocking, with its peer's address, in one call.
fn accept(listener: &TcpListener) -> io::Result<(TcpStream, Option<IpAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage; the kernel writes at most `len` bytes into it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the listener is open; storage and len are valid for the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh connected socket that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: the kernel initialized `len` bytes of a sockaddr_storage.
    let peer = unsafe { socket2::SockAddr::new(storage, len) }
        .as_socket()
        .map(|a| a.ip());
    Ok((stream, peer))
}

/// Hands the events of the shard's epoll set to the connections (their readiness flags and wakers) and
/// to the accept loop (see `reactor`).
async fn readiness(shard: Rc<Shard>) {
    loop {
        let ready = shard.reactor.borrow().ready();
        ready.await;
        let mut listener = false;
        {
            let mut hub = shard.hub.borrow_mut();
            shard.reactor.borrow_mut().drain(|token, ready| {
                if token == LISTENER {
                    listener = true;
                    return;
                }
                // A slot whose connection is gone has no socket in the set any more; a stale event
                // from the same drain only wakes a task that finds nothing to do.
                if let Some(conn) = hub.get_mut(token as ConnId) {
                    conn.readable |= ready.readable;
                    conn.writable |= ready.writable;
                    conn.wake();
                }
            });
        }
        if listener {
            shard.listener_ready.set(true);
            if let Some(w) = shard.accept_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// Wakes the connections whose deadline passed (see `timeouts`): every tick while any deadline is set,
/// parked while none is.
async fn timeout_sweep(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if shard.timeouts.borrow_mut().park_sweep(cx.waker()) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        loop {
            glommio::timer::sleep(TICK).await;
            let more = shard
                .timeouts
                .borrow_mut()
                .sweep(&mut shard.hub.borrow_mut());
            if !more {
                break;
            }
        }
    }
}

impl Shard {
    /// Routes deliveries from the inbox to this shard's connections: unread counts to the unread
    /// flusher, the rest batched per connection.
    fn route(&self, deliveries: &[Arc<Delivery>]) {
        for d in deliveries {
            if d.unread().is_some() {
                self.unread.offer(&mut self.hub.borrow_mut(), d);
            } else {
                self.deliver_batched(d, self.excluded_here(d));
            }
        }
    }
}

/// Routes inbox messages: deliveries to local connections, shutdown to `begin_shutdown`. The deliveries
/// of one burst are written per connection at its end (and before every yield), so N queued messages
/// cost each subscriber one write, not N.
async fn pump_inbox(shard: Rc<Shard>, inbox: InboxReceiver) {
    loop {
        inbox.ready().await;
        shard.stats().inbox_wakeup();
        let mut handled = 0;
        while let Some(msg) = inbox.try_next() {
            match msg {
                ShardMsg::Deliver(deliveries) => shard.route(&deliveries),
                ShardMsg::Commit {
                    deliveries,
                    replies,
                } => {
                    shard.route(&deliveries);
                    // Each answer wakes its request's task here, a local wake; that task runs after
                    // this burst, whose deliveries are written at its end, so a producer hears back
                    // after its notification is on this shard's sockets.
                    for reply in replies {
                        reply.run();
                    }
                }
                ShardMsg::DeliverExcept(delivery, sender) => {
                    shard.deliver_batched(&delivery, Some(sender));
                }
                ShardMsg::ChannelCounts {
                    prefix,
                    exact,
                    reply,
                } => {
                    let hub = shard.hub.borrow();
                    let counts = if exact {
                        match hub.subscriber_count(&prefix) {
                            0 => Vec::new(),
                            n => vec![(prefix, n)],
                        }
                    } else {
                        hub.channels_with_prefix(&prefix)
                            .into_iter()
                            .map(|(name, n)| (name.to_string(), n))
                            .collect()
                    };
                    let _ = reply.send(counts);
                }
                ShardMsg::TerminateUser(user) => {
                    let mut hub = shard.hub.borrow_mut();
                    for id in hub.connections_of_user(&user) {
                        let conn = hub.conn_mut(id);
                        if conn.kind == ConnKind::Pusher {
                            conn.request_close(crate::pusher::protocol::code::UNAUTHORIZED);
                        }
                    }
                }
                ShardMsg::Shutdown => {
                    shard.flush_deliveries();
                    shard.begin_shutdown();
                }
                ShardMsg::Preferences(user, preferences) => {
                    shard
                        .hub
                        .borrow_mut()
                        .preferences_changed(&user, preferences);
                }
            }
            handled += 1;
            if handled % PUMP_BATCH == 0 {
                shard.flush_deliveries();
                glommio::yield_if_needed().await;
            }
        }
        shard.flush_deliveries();
    }
}

/// Closes with 1008 the WebSockets whose token expired (`exp` plus the leeway) without a `refresh`.
async fn expiry_sweep(shard: Rc<Shard>) {
    let leeway = shard.auth.leeway_s();
    loop {
        glommio::timer::sleep(EXPIRY_SWEEP).await;
        if shard.is_shutting_down() {
            return;
        }
        let now = crate::auth::jwt::unix_now().saturating_sub(leeway);
        let mut hub = shard.hub.borrow_mut();
        let mut expiries = shard.expiries.borrow_mut();
        let mut closed = 0;
        while let Some((at, id)) = expiries.pop_due(now) {
            if let Some(conn) = hub.get_mut(id) {
                if conn.kind.receives_deliveries() && conn.token_expires_at == at {
                    conn.request_close(close_code::POLICY);
                    closed += 1;
                }
            }
        }
        if closed > 0 {
            info!(
                shard = shard.index,
                connections = closed,
                "closed connections whose token expired"
            );
        }
    }
}

/// Pings every WebSocket each heartbeat and closes the ones that missed two pongs.
async fn heartbeat(shard: Rc<Shard>) {
    let period = shard.config.heartbeat();
    loop {
        glommio::timer::sleep(period).await;
        if shard.is_shutting_down() {
            return;
        }
        let max_outbound = shard.config.max_outbound_bytes;
        let mut dead = 0;
        for (_, conn) in shard.hub.borrow_mut().conns_mut() {
            // Each kind that lives long decides its keep-alive here (docs/architecture.md,
            // "Connection kinds"); an HTTP connection has its keep-alive timeout instead.
            // (frame, whether the client answers it)
            let (ping, answered) = match conn.kind {
                ConnKind::Http | ConnKind::LongPoll => continue,
                ConnKind::WebSocket => (&shard.ping_frame, true),
                // A comment line: nothing answers it; a dead peer shows as a send error.
                ConnKind::Sse => (&shard.sse_ping, false),
                // The protocol's own ping, which pusher-js answers with `pusher:pong` (any client
                // message counts as one).
                ConnKind::Pusher => (&shard.pusher_ping_frame, true),
            };
            if answered {
                if conn.missed_pongs >= MAX_MISSED_PONGS {
                    dead += 1;
                    conn.request_close(0);
                    continue;
                }
                conn.missed_pongs += 1;
            }
            send_frame(conn, ping, max_outbound);
        }
        if dead > 0 {
            info!(
                shard = shard.index,
                connections = dead,
                "closed connections that missed two pongs"
            );
        }
    }
}
