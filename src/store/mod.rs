//! The store: every notification, its read state, and the reads behind history and resume.
//!
//! Shards are single-threaded async executors and must never block, while a database is blocking I/O. So
//! the database lives on plain OS threads behind queues, and a shard talks to it through [`Store`], a
//! cheap handle whose every method enqueues a request and returns a future of the one-shot reply.
//!
//! **Writes go to one store thread, with group commit.** The thread blocks until a write arrives, then
//! drains everything else already queued (up to [`StoreConfig::max_batch`]) and applies all of it in ONE
//! transaction, then replies to every request. The cost of a commit (the WAL append, the lock, and with
//! `synchronous=FULL` or PostgreSQL the fsync or network round trip) is paid once per batch instead of
//! once per notification: when producers are fast, batches grow on their own and throughput follows,
//! when they are slow, a lone write commits at once and latency stays low. That is how an answer of 2xx
//! can mean "committed" (API.md, Durability) at 100k+ writes/s. The price: one failing write fails its
//! whole batch (every request in it gets [`StoreError::Unavailable`]), which on this path only happens
//! when the database itself is failing. One thread also gives one id generator, so id order is commit
//! order, and the [`CommitListener`] sees commits in that order before any caller hears back, which is
//! what makes delivery order equal commit order and resume gap-free.
//!
//! **Reads go to a small pool of reader threads**, each with its own read-only connection. In WAL mode
//! readers see the last committed snapshot without waiting for the writer, so a history page never
//! waits behind a 4096-op write batch, and a slow read never delays a commit. Reads are independent, so
//! they are simply spread over the pool through one shared queue.
//!
//! The thread loops (`writer.rs`, `reader.rs`) only know the backend traits of `backend.rs`, which two
//! databases implement: SQLite (`sqlite.rs`, embedded, the default) and PostgreSQL (`postgres/`, the
//! shared database of several nodes); what both must decide alike (history paging, due order, the
//! migrations list) is written once in `backend.rs`, and the idempotency records and verdict in
//! `idempotency.rs`. When maintenance runs is the [`crate::scheduler`]'s call; the writer executes it.
//! One test suite (`tests.rs`) runs against both databases through the public API, and one suite of
//! backend tests (`backend/tests.rs`) against both backends directly.
//!
//! Both queues are bounded and sending never blocks: a full queue answers
//! [`StoreError::Unavailable`] (the API's 503, a signal to back off) instead of stalling a shard.

mod backend;
mod error;
mod idempotency;
mod postgres;
mod reader;
mod sqlite;
mod writer;

pub use backend::StoredPreferences;
pub use error::{BackendError, OpenError, StoreError};
pub use idempotency::{IdempotencyKey, Receipt, Stamp};
pub use sqlite::{allocator_bytes as sqlite_allocator_bytes, SqliteSynchronous};

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use futures_channel::oneshot;
use uuid::Uuid;

use crate::metrics::{Exposition, Histogram, Kind, BATCH_SIZE_BOUNDS, LATENCY_BOUNDS_NS};
use crate::model::{Millis, NewNotification, Notification};

use reader::ReadOp;
use writer::WriteOp;

/// Reader threads when the configuration names no number.
pub const DEFAULT_READER_THREADS: usize = 2;
/// Most write operations in one transaction when the configuration names no number (an insert counts
/// one per notification, see [`StoreConfig::max_batch`]).
pub const DEFAULT_MAX_BATCH: usize = 4096;
/// Write requests that may wait for the store thread before new ones are refused with
/// [`StoreError::Unavailable`]. Deep enough to absorb a burst of several full batches, shallow enough
/// that a stuck database turns into 503s within a second or two rather than unbounded memory.
pub const WRITE_QUEUE_CAPACITY: usize = 65_536;
/// Read requests that may wait for a reader thread; same reasoning as [`WRITE_QUEUE_CAPACITY`].
pub const READ_QUEUE_CAPACITY: usize = 16_384;

/// Where the data lives, parsed from `DATABASE_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://path` or `sqlite:path`: an embedded database file, relative to the working directory
    /// or absolute (`sqlite:///var/lib/ns/notifications.db`).
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`: the shared database of a multi-node deployment, as a
    /// libpq-style URL. The tables live in the first schema of the session's `search_path`; choose one
    /// with `?options=-csearch_path%3D<schema>` (percent-encoded `-c search_path=<schema>`).
    Postgres(String),
}

impl StoreUrl {
    /// Parses a `DATABASE_URL`. A `?query` after an SQLite path (as sqlx-style URLs carry, e.g.
    /// `?mode=rwc`) is ignored: the file is always opened read-write and created if missing.
    pub fn parse(url: &str) -> Result<StoreUrl, OpenError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        let Some(rest) = url.strip_prefix("sqlite:") else {
            return Err(bad_url(
                "DATABASE_URL must start with sqlite:// or postgres://",
            ));
        };
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad_url(
                "DATABASE_URL sqlite:// names no file (e.g. sqlite://data/notifications.db)",
            ));
        }
        if path == ":memory:" {
            // Reader threads need their own connections to the same data, which a private in-memory
            // database cannot give.
            return Err(bad_url(
                "DATABASE_URL sqlite://:memory: is not supported; name a file",
            ));
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(path)))
    }
}

/// A `DATABASE_URL` refused by our own checks: there is no cause to keep.
fn bad_url(reason: &str) -> OpenError {
    OpenError::Url {
        reason: reason.to_owned(),
        cause: None,
    }
}

/// Never prints a PostgreSQL password, neither the one of `user:password@` nor a `password=`
/// parameter: the URL may end up in logs.
impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::Postgres(url) => {
                let (base, query) = url.split_once('?').unwrap_or((url, ""));
                match (base.find("://"), base.rfind('@')) {
                    (Some(scheme_end), Some(at)) if at > scheme_end => {
                        write!(f, "{}://***{}", &base[..scheme_end], &base[at..])?
                    }
                    _ => f.write_str(base)?,
                }
                for (i, param) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
                    f.write_str(if i == 0 { "?" } else { "&" })?;
                    match param.split_once('=') {
                        Some(("password", _)) => f.write_str("password=***")?,
                        _ => f.write_str(param)?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The database.
    pub url: StoreUrl,
    /// Reader threads, each with its own connection (at least one is started even if this is 0).
    pub reader_threads: usize,
    /// Most write operations in one transaction. An insert counts one per notification, so one
    /// transaction stays bounded however the notifications are grouped into requests; a single request
    /// larger than this still commits, alone, as one transaction (it must be all-or-nothing).
    pub max_batch: usize,
    /// `RETENTION_DAYS`: notifications older than this are deleted in small batches; `None` keeps
    /// them forever.
    pub retention: Option<std::time::Duration>,
    /// `SQLITE_SYNCHRONOUS`: what a SQLite commit waits for (ignored by PostgreSQL).
    pub sqlite_synchronous: SqliteSynchronous,
    /// The node's users' preferences: the store thread holds back (and records for later) what a
    /// user's quiet hours hold when it commits (see `crate::preferences`).
    pub preferences: Arc<crate::preferences::Registry>,
}

impl StoreConfig {
    /// The configuration for `url` with the default thread count and batch size.
    pub fn new(url: StoreUrl) -> StoreConfig {
        StoreConfig {
            url,
            reader_threads: DEFAULT_READER_THREADS,
            max_batch: DEFAULT_MAX_BATCH,
            retention: None,
            sqlite_synchronous: SqliteSynchronous::default(),
            preferences: Arc::default(),
        }
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// How many migrations were applied now (0: the schema was already current).
    pub applied: usize,
    /// The newest schema version this binary carries, which the store is now at (or past).
    pub version: i64,
    /// The store as it may be shown (a PostgreSQL URL without its password).
    pub store: String,
}

/// Applies the store's migrations exactly as [`Store::open`] does (SQLite: creates the folder and
/// the file, WAL mode, each migration in an `IMMEDIATE` transaction; PostgreSQL: under the advisory
/// lock, so nodes starting meanwhile wait), then closes every connection. For `notification-service
/// migrate`, run once before nodes of a new version roll out.
pub fn migrate(
    url: &StoreUrl,
    sqlite_synchronous: SqliteSynchronous,
) -> Result<Migrated, OpenError> {
    match url {
        StoreUrl::Sqlite(path) => {
            let writer = sqlite::SqliteWriter::open(path, sqlite_synchronous)?;
            Ok(Migrated {
                applied: writer.migrations_applied(),
                version: newest_version(sqlite::MIGRATIONS),
                store: format!("{url:?}"),
            })
        }
        StoreUrl::Postgres(raw) => {
            let target = postgres::PostgresTarget::parse(raw)?;
            let applied = postgres::migrate(&target)?;
            Ok(Migrated {
                applied,
                version: newest_version(postgres::MIGRATIONS),
                store: target.to_string(),
            })
        }
    }
}

/// Checks that the store can be used, changing nothing (no file, no folder, no table is created):
/// SQLite's file is opened read-only when it exists, else its folder must be writable; PostgreSQL is
/// connected to and asked for its schema version. Returns one line saying what was found. For
/// `notification-service check-config`.
pub fn probe(url: &StoreUrl) -> Result<String, String> {
    match url {
        StoreUrl::Sqlite(path) => sqlite::probe(path),
        StoreUrl::Postgres(raw) => {
            postgres::probe(&postgres::PostgresTarget::parse(raw).map_err(|e| e.to_string())?)
        }
    }
}

/// The newest version among `migrations`.
fn newest_version(migrations: &[backend::Migration]) -> i64 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Told about every successful commit that inserted notifications.
pub trait CommitListener: Send + 'static {
    /// Called on the store thread after each successful commit with the notifications that commit
    /// inserted, in id order, BEFORE any reply of that batch is sent. The server fans out deliveries
    /// here, so delivery order is commit order. Not called for a commit that inserted nothing, nor for
    /// a failed batch. It runs on the store thread: it must hand work off (push to queues), not do it.
    fn committed(&self, inserted: &[Arc<Notification>]);

    /// Called on the store thread after a commit that may have changed users' unread counts (an
    /// insert or fire for a user, a read, read-all or delete), after [`CommitListener::committed`] and
    /// before any reply: one entry per user, whatever the number of changes the batch made for them
    /// (so a burst of sends in one batch is one count). Retention's deletes are not reported. The
    /// default ignores them.
    fn unread_changed(&self, counts: &[UnreadCount]) {
        let _ = counts;
    }

    /// Called on the store thread after a commit that claimed notifications whose quiet hours ended
    /// (API.md, "Preferences"), in id order: push each to its user's connections. Like
    /// [`CommitListener::committed`], it must hand the work off.
    fn released(&self, released: &[Arc<Notification>]) {
        let _ = released;
    }

    /// Called on the store thread once at the end of every successful commit, after the methods
    /// above, with the answers to the commit's writes that a shard queued through its own handle
    /// ([`Store::for_shard`]), instead of the store thread giving them itself: the listener hands
    /// each shard the commit's deliveries and its answers in ONE hand-off, so a lone send wakes its
    /// shard once, not once for the delivery and once more for the answer. The default gives them
    /// at once.
    fn commit_ended(&self, replies: Vec<ShardReply>) {
        for reply in replies {
            reply.give();
        }
    }
}

/// The answer to a write a shard queued through [`Store::for_shard`], for the [`CommitListener`] to
/// hand to that shard (see [`CommitListener::commit_ended`]).
pub struct ShardReply {
    /// The shard that queued the write.
    pub shard: usize,
    /// Gives the answer (sends it on the write's reply channel).
    give: Box<dyn FnOnce() + Send>,
}

impl ShardReply {
    /// The answer to a write of shard `shard`, given by `give`.
    pub(crate) fn new(shard: usize, give: impl FnOnce() + Send + 'static) -> ShardReply {
        ShardReply {
            shard,
            give: Box::new(give),
        }
    }

    /// Gives the answer, on whichever thread calls this: best on the shard's own, where waking the
    /// waiting task is a local wake.
    pub fn give(self) {
        (self.give)()
    }

    /// The answer as a closure, for a queue that carries closures.
    pub fn into_fn(self) -> Box<dyn FnOnce() + Send> {
        self.give
    }
}

impl fmt::Debug for ShardReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardReply")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// A user's unread count at some commit, ordered by `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadCount {
    /// Whose inbox.
    pub user_id: String,
    /// Unread notifications in it.
    pub unread: u64,
    /// How many changes the user's counters have seen (migration 4): counts of one user read at
    /// different commits, on any node, are ordered by it, so the newest wins whichever way it came.
    pub version: u64,
}

/// The outcome of a write that may carry an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed<T> {
    /// Written now.
    Fresh(T),
    /// A retry: the key was used for the same request within 24 h. Nothing was written; this is
    /// what the first request committed, for the API to answer as it answered then.
    Replayed(Receipt),
    /// The key was used for a different request within 24 h; nothing was written (API: 422).
    KeyReused,
}

/// A page of a user's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Whose inbox.
    pub user_id: String,
    /// Most notifications in the page (the API caps it; the store does not).
    pub limit: usize,
    /// Only notifications older than this id (exclusive): the previous page's `next_before`.
    pub before: Option<Uuid>,
    /// Only unread notifications (`read_at` unset).
    pub unread_only: bool,
    /// Only notifications never written to a live connection of the user (`delivered_at` unset):
    /// what never reached a device.
    pub undelivered_only: bool,
    /// Only notifications no client reported seen (`seen_at` unset).
    pub unseen_only: bool,
}

/// A delivery receipt as a shard reports it: the notification, and when it was first written to a
/// live connection of its user.
pub type DeliveryReceipt = (Uuid, Millis);

/// What [`Store::mark_seen`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkedSeen {
    /// Every id is in the user's inbox; this many were unseen and now carry `seen_at`.
    Updated(u64),
    /// This id (the first of the request's that is) is not in the user's inbox: nothing was marked.
    NotInInbox(Uuid),
}

/// One page of history, newest first, with the inbox's counts.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The page, newest first.
    pub notifications: Vec<Notification>,
    /// Notifications in the user's whole inbox (not just this page, and regardless of `unread_only`).
    pub total: u64,
    /// Unread notifications in the user's whole inbox.
    pub unread: u64,
    /// The id of the page's last notification when older ones exist: pass it as `before` for the next
    /// page. `None` on the last page.
    pub next_before: Option<Uuid>,
}

/// What a resuming connection missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayQuery {
    /// The connection's user, whose inbox is replayed; `None` for an anonymous connection.
    pub user_id: Option<String>,
    /// The channels the connection subscribes to.
    pub channels: Vec<String>,
    /// The last id the client saw (exclusive); `Uuid::nil()` replays from the start.
    pub since: Uuid,
    /// Most notifications returned; the client resumes again from the last one for more.
    pub limit: usize,
}

/// Counters of the store thread, for `/metrics` and for tests that check grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Transactions committed (one per group-committed batch).
    pub commits: u64,
    /// Batches whose transaction failed and was rolled back.
    pub failed_batches: u64,
    /// Write requests received and committed (an insert of 1,000 notifications is one request).
    pub write_ops: u64,
    /// Notifications inserted by committed transactions.
    pub inserted: u64,
    /// Read requests answered (history, replay, ping), successfully or not.
    pub reads: u64,
}

/// The live counters behind [`StoreStats`] and the store's histograms, shared by the store threads
/// and every [`Store`] clone. Only the store thread writes most of them, so their atomics are never
/// contended.
#[derive(Debug)]
pub(crate) struct Counters {
    /// See [`StoreStats::commits`].
    commits: AtomicU64,
    /// See [`StoreStats::failed_batches`].
    failed_batches: AtomicU64,
    /// See [`StoreStats::write_ops`].
    write_ops: AtomicU64,
    /// See [`StoreStats::inserted`].
    inserted: AtomicU64,
    /// See [`StoreStats::reads`].
    reads: AtomicU64,
    /// Scheduled notifications this node's store thread fired.
    scheduled_fired: AtomicU64,
    /// Write requests per committed transaction (only the transactions that carried any).
    batch_size: Histogram,
    /// From a send or batch being queued (`Store::insert*`) to its transaction's commit.
    send_to_commit: Histogram,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            commits: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            write_ops: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            scheduled_fired: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_SIZE_BOUNDS),
            send_to_commit: Histogram::new(LATENCY_BOUNDS_NS),
        }
    }
}

impl Counters {
    /// Adds `n` to one of the counters.
    fn add(counter: &AtomicU64, n: u64) {
        // Relaxed: these are statistics; nothing is ordered by them.
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    fn snapshot(&self) -> StoreStats {
        StoreStats {
            commits: self.commits.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            write_ops: self.write_ops.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }
}

/// The reply of one store request: a future that resolves when the store thread (or a reader thread)
/// has answered.
///
/// The request is queued when the [`Store`] method is called, not when this future is first polled, and
/// the future borrows nothing: it can be kept in a `'static` task. Dropping it does not cancel a write
/// (the write still commits; only the answer is lost); a read whose future was dropped before a reader
/// took it is skipped.
#[must_use = "the request is already queued; await the future for its outcome"]
pub struct StoreFuture<T> {
    /// Whether the answer is still to come.
    state: FutureState<T>,
}

/// Where a [`StoreFuture`]'s answer comes from.
enum FutureState<T> {
    /// Waiting for the thread's answer.
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    /// Answered without a trip to a thread (queue full or closed, or nothing to do); `None` once taken.
    Ready(Option<Result<T, StoreError>>),
}

impl<T> StoreFuture<T> {
    /// A future already answered, with no trip to a thread.
    fn ready(result: Result<T, StoreError>) -> StoreFuture<T> {
        StoreFuture {
            state: FutureState::Ready(Some(result)),
        }
    }

    /// A future answered by whoever holds the sender of `rx`.
    pub(crate) fn waiting(rx: oneshot::Receiver<Result<T, StoreError>>) -> StoreFuture<T> {
        StoreFuture {
            state: FutureState::Waiting(rx),
        }
    }
}

// Nothing in a StoreFuture is ever pinned in place (the receiver is a pointer to shared state), so it
// is Unpin whatever T is.
impl<T> Unpin for StoreFuture<T> {}

impl<T> Future for StoreFuture<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            FutureState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(result)) => Poll::Ready(result),
                // The thread dropped the reply without answering: it has exited.
                Poll::Ready(Err(oneshot::Canceled)) => Poll::Ready(Err(StoreError::Closed)),
            },
            FutureState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StoreError::Closed)))
            }
        }
    }
}

/// The handle shards use. Cheap to clone (two queue senders and a counter pointer); one per shard.
/// Every method queues a request without blocking and returns a [`StoreFuture`] of the reply.
///
/// The store threads run until [`Store::close`], or until every clone is dropped.
#[derive(Clone)]
pub struct Store {
    /// To the store thread.
    writes: Sender<WriteOp>,
    /// Wakes the store thread after a request is queued.
    doorbell: Arc<writer::Doorbell>,
    /// To the reader pool (one queue; whichever reader is free takes the next request).
    reads: Sender<ReadOp>,
    /// The counters the threads update.
    counters: Arc<Counters>,
    /// How many reader threads [`Store::close`] must stop.
    reader_count: usize,
    /// The shard this handle belongs to, if any: the answers to its inserts come back through the
    /// [`CommitListener`] (see [`Store::for_shard`]).
    shard: Option<usize>,
}

/// The store's threads. [`StoreThreads::join`] waits for them to finish.
pub struct StoreThreads {
    /// The store thread.
    writer: JoinHandle<()>,
    /// The reader threads.
    readers: Vec<JoinHandle<()>>,
    /// Backend-specific threads (SQLite's checkpointer), stopped by the store thread's exit.
    helpers: Vec<JoinHandle<()>>,
}

impl StoreThreads {
    /// Waits for the store thread and the reader threads to exit, which they do once every [`Store`]
    /// clone is dropped. The store thread first commits everything still queued ("flush on
    /// shutdown"), so a request queued before the last clone was dropped is durable when this returns.
    /// Blocks forever if a clone is still alive.
    pub fn join(self) {
        if self.writer.join().is_err() {
            tracing::error!("store thread panicked");
        }
        for reader in self.readers {
            if reader.join().is_err() {
                tracing::error!("store reader thread panicked");
            }
        }
        for helper in self.helpers {
            if helper.join().is_err() {
                tracing::error!("store helper thread panicked");
            }
        }
    }
}

impl Store {
    /// Opens the store: for SQLite, creates the file's folder if missing, opens the file in WAL mode,
    /// applies the migrations; for PostgreSQL, applies the migrations (under an advisory lock, so
    /// several nodes may start at once) and connects the writer and every reader, so an unreachable
    /// server or a wrong URL fails here, with the URL shown without its password. Then starts the store
    /// thread and the reader threads.
    pub fn open(
        config: &StoreConfig,
        listener: Box<dyn CommitListener>,
    ) -> Result<(Store, StoreThreads), OpenError> {
        let readers = config.reader_threads.max(1);
        let max_batch = config.max_batch.max(1);
        match &config.url {
            StoreUrl::Sqlite(path) => {
                let mut write_backend =
                    sqlite::SqliteWriter::open(path, config.sqlite_synchronous)?;
                let read_backends = (0..readers)
                    .map(|_| sqlite::SqliteReader::open(path))
                    .collect::<Result<Vec<_>, _>>()?;
                let checkpointer = write_backend.spawn_checkpointer(path)?;
                // The effective synchronous setting, read back from the connection: what an
                // operator (and tests/durability.rs) checks to know which durability is in force.
                let synchronous = write_backend.synchronous();
                tracing::info!(path = %path.display(), readers, max_batch, %synchronous, "store opened (sqlite)");
                Store::start(
                    write_backend,
                    read_backends,
                    vec![checkpointer],
                    config,
                    listener,
                )
            }
            StoreUrl::Postgres(url) => {
                let target = postgres::PostgresTarget::parse(url)?;
                let applied = postgres::migrate(&target)?;
                let write_backend = postgres::PostgresWriter::open(&target)?;
                let read_backends = (0..readers)
                    .map(|i| postgres::PostgresReader::open(&target, i))
                    .collect::<Result<Vec<_>, _>>()?;
                tracing::info!(%target, readers, max_batch, migrations_applied = applied, "store opened (postgres)");
                Store::start(write_backend, read_backends, Vec::new(), config, listener)
            }
        }
    }

    /// Starts the threads around already-open backends: the part every backend shares. `helpers` are
    /// threads of the backend's own (SQLite's checkpointer) that end after the write backend is dropped;
    /// [`StoreThreads::join`] waits for them too.
    fn start<W: backend::WriteBackend, R: backend::ReadBackend>(
        write_backend: W,
        read_backends: Vec<R>,
        helpers: Vec<JoinHandle<()>>,
        config: &StoreConfig,
        listener: Box<dyn CommitListener>,
    ) -> Result<(Store, StoreThreads), OpenError> {
        let counters = Arc::new(Counters::default());
        let (write_tx, write_rx) = crossbeam_channel::bounded(WRITE_QUEUE_CAPACITY);
        let (read_tx, read_rx) = crossbeam_channel::bounded(READ_QUEUE_CAPACITY);
        let spawn_err = |cause: std::io::Error| OpenError::Io {
            context: "cannot start a store thread".to_owned(),
            cause,
        };
        // Readers first: if spawning one fails, dropping the senders (on return) ends the ones started.
        let readers = read_backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| reader::spawn(i, b, read_rx.clone(), counters.clone()).map_err(spawn_err))
            .collect::<Result<Vec<_>, _>>()?;
        let reader_count = readers.len();
        let doorbell = Arc::new(writer::Doorbell::default());
        let writer = writer::spawn(
            write_backend,
            write_rx,
            doorbell.clone(),
            listener,
            config.max_batch.max(1),
            config.retention,
            counters.clone(),
            config.preferences.clone(),
        )
        .map_err(spawn_err)?;
        let store = Store {
            writes: write_tx,
            doorbell,
            reads: read_tx,
            counters,
            reader_count,
            shard: None,
        };
        Ok((
            store,
            StoreThreads {
                writer,
                readers,
                helpers,
            },
        ))
    }

    /// This handle for shard `shard`: the answers to the inserts it queues are handed to the
    /// [`CommitListener`] with the shard's number ([`CommitListener::commit_ended`]), which gives them
    /// on the shard together with the commit's deliveries, in one hand-off. Only for a handle used on
    /// that shard's executor, whose inbox the listener reaches.
    pub fn for_shard(&self, shard: usize) -> Store {
        Store {
            shard: Some(shard),
            ..self.clone()
        }
    }

    /// Assigns ids and timestamps (on the store thread, so id order is commit order) and commits all
    /// of `batch` in the current group-commit transaction, all-or-nothing. Resolves to the stored
    /// notifications, in `batch` order (which is id order), only after COMMIT returned and the
    /// [`CommitListener`] was called. An empty batch resolves at once to an empty list.
    pub fn insert(
        &self,
        batch: Vec<NewNotification>,
    ) -> impl Future<Output = Result<Vec<Arc<Notification>>, StoreError>> + 'static {
        // Queued now, not at the first poll (see StoreFuture).
        let committed = if batch.is_empty() {
            StoreFuture::ready(Ok(Committed::Fresh(Vec::new())))
        } else {
            self.write(|reply| WriteOp::Insert {
                batch,
                idempotency: None,
                queued_at: Instant::now(),
                shard: self.shard,
                reply,
            })
        };
        async move {
            match committed.await? {
                Committed::Fresh(stored) => Ok(stored),
                // Only a keyed insert can be replayed or refused.
                Committed::Replayed(_) | Committed::KeyReused => Err(StoreError::internal(
                    "store answered a keyed outcome to an insert without a key",
                )),
            }
        }
    }

    /// Like [`Store::insert`], with an `Idempotency-Key`: in the same transaction the key is looked up
    /// and, if new, recorded with a [`Receipt::Inserted`] of the stored notifications. A retry within
    /// 24 h resolves to [`Committed::Replayed`] with that receipt and stores nothing; the same key with
    /// another fingerprint resolves to [`Committed::KeyReused`]. Retries racing each other on different
    /// shards are serialized by the store thread, so exactly one stores.
    pub fn insert_idempotent(
        &self,
        batch: Vec<NewNotification>,
        key: IdempotencyKey,
    ) -> StoreFuture<Committed<Vec<Arc<Notification>>>> {
        self.write(|reply| WriteOp::Insert {
            batch,
            idempotency: Some(key),
            queued_at: Instant::now(),
            shard: self.shard,
            reply,
        })
    }

    /// Stores a pending scheduled notification (`scheduled_at` set), optionally under an
    /// `Idempotency-Key` as for [`Store::insert_idempotent`] (recorded with a [`Receipt::Scheduled`]).
    /// Resolves to the pending notification: its
    /// id is the schedule's id (for [`Store::scheduled`] and [`Store::cancel_scheduled`]) and its
    /// `created_at` the time it was scheduled. When due, the store thread stores it as a notification
    /// with a new id (commit order) and delivers it like a send.
    pub fn schedule(
        &self,
        notification: NewNotification,
        key: Option<IdempotencyKey>,
    ) -> StoreFuture<Committed<Arc<Notification>>> {
        self.write(|reply| WriteOp::Schedule {
            notification,
            idempotency: key,
            reply,
        })
    }

    /// Cancels a pending scheduled notification; resolves to `false` if unknown or already fired.
    pub fn cancel_scheduled(&self, id: Uuid) -> StoreFuture<bool> {
        self.write(|reply| WriteOp::CancelScheduled { id, reply })
    }

    /// A scheduled notification by its schedule id: the pending one (its `schedule_id` is `None` and
    /// its `id` is the schedule's), or the notification it fired as (its `schedule_id` is `id`);
    /// `None` if unknown, cancelled, or fired and since deleted from the inbox or by retention.
    pub fn scheduled(&self, id: Uuid) -> StoreFuture<Option<Notification>> {
        self.read(|reply| ReadOp::Scheduled { id, reply })
    }

    /// Stops the store explicitly: the store thread commits everything queued before this call, then
    /// exits, and the reader threads exit. Later requests (from handles still alive) answer
    /// [`StoreError::Closed`]. Shutdown uses this rather than waiting for every handle to be dropped,
    /// so a task that outlived its shard cannot keep the process from exiting.
    pub fn close(&self) {
        // Blocking sends: this runs on the main thread at shutdown, behind whatever is queued.
        let _ = self.writes.send(WriteOp::Close);
        self.doorbell.ring();
        for _ in 0..self.reader_count {
            let _ = self.reads.send(ReadOp::Close);
        }
    }

    /// Sets `read_at` to now if the notification is unread (a second call keeps the first `read_at`).
    /// Resolves to the notification as stored, or `None` if that id is not in that user's inbox.
    pub fn mark_read(&self, user_id: String, id: Uuid) -> StoreFuture<Option<Notification>> {
        self.write(|reply| WriteOp::MarkRead { user_id, id, reply })
    }

    /// Marks every unread notification of the user read; resolves to how many were unread.
    pub fn mark_all_read(&self, user_id: String) -> StoreFuture<u64> {
        self.write(|reply| WriteOp::MarkAllRead { user_id, reply })
    }

    /// Sets `seen_at` to now on each of `ids` that is unseen (a second call keeps the first `seen_at`),
    /// all or nothing: when one of them is not in the user's inbox, nothing is marked and the answer
    /// names it. Seen is not read: `read_at` is left alone.
    pub fn mark_seen(&self, user_id: String, ids: Vec<Uuid>) -> StoreFuture<MarkedSeen> {
        self.write(|reply| WriteOp::MarkSeen {
            user_id,
            ids,
            reply,
        })
    }

    /// Hands delivery receipts to the store thread, which records them in batches (see
    /// `writer::Receipts`): nobody waits for them, and a shard calls this once per
    /// `shard::receipts` interval, not per delivery. It does not wake the store thread: they are
    /// recorded after its next batch, or at its next scheduler tick at the latest. When the write queue is full the receipts
    /// come back, for the caller to keep and offer again later.
    pub fn record_delivered(
        &self,
        receipts: Vec<DeliveryReceipt>,
    ) -> Result<(), Vec<DeliveryReceipt>> {
        match self.writes.try_send(WriteOp::RecordDelivered { receipts }) {
            Err(TrySendError::Full(WriteOp::RecordDelivered { receipts })) => Err(receipts),
            // Sent; or the store is closed (shutdown), and nothing could record them any more.
            _ => Ok(()),
        }
    }

    /// Deletes the notification from the user's inbox; resolves to `false` if it was not there.
    pub fn delete(&self, user_id: String, id: Uuid) -> StoreFuture<bool> {
        self.write(|reply| WriteOp::Delete { user_id, id, reply })
    }

    /// A page of the user's history, newest first, with the inbox's total and unread counts, all read
    /// from one snapshot.
    pub fn history(&self, query: HistoryQuery) -> StoreFuture<HistoryPage> {
        self.read(|reply| ReadOp::History { query, reply })
    }

    /// For resume: notifications with an id above `since` that belong to the user, OR were sent to any
    /// of the channels, OR were broadcast; ascending id order, each once, at most `limit`.
    pub fn replay(&self, query: ReplayQuery) -> StoreFuture<Vec<Arc<Notification>>> {
        self.read(|reply| ReadOp::Replay { query, reply })
    }

    /// The user's unread count and its version (zero for a user never written to), read on a reader
    /// connection from the counters the store thread keeps: one row, whatever the inbox's size.
    pub fn unread(&self, user_id: String) -> StoreFuture<UnreadCount> {
        self.read(|reply| ReadOp::Unread { user_id, reply })
    }

    /// Stores `user_id`'s preferences (`Some`: their stored JSON), or with `None` forgets them (the
    /// defaults); resolves to when they were set.
    pub fn set_preferences(&self, user_id: String, stored: Option<String>) -> StoreFuture<Millis> {
        self.write(|reply| WriteOp::SetPreferences {
            user_id,
            stored,
            reply,
        })
    }

    /// `user_id`'s stored preferences, `None` for a user who has the defaults.
    pub fn preferences(&self, user_id: String) -> StoreFuture<Option<StoredPreferences>> {
        self.read(|reply| ReadOp::Preferences { user_id, reply })
    }

    /// Every user's stored preferences (start-up fills the node's registry with them).
    pub fn all_preferences(&self) -> StoreFuture<Vec<(String, StoredPreferences)>> {
        self.read(|reply| ReadOp::AllPreferences { reply })
    }

    /// Liveness: a trivial query on a reader connection.
    pub fn ping(&self) -> StoreFuture<()> {
        self.read(|reply| ReadOp::Ping { reply })
    }

    /// A snapshot of the store's counters. Public for `/metrics`; tests use `commits` to check that
    /// concurrent writes share transactions.
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// How many scheduled notifications wait to fire, over the whole database (every node's), read on
    /// a reader connection. Not counted in `reads`: Prometheus asks it at every scrape.
    pub fn scheduled_pending(&self) -> StoreFuture<u64> {
        self.read(|reply| ReadOp::PendingScheduled { reply })
    }

    /// Appends the store's families to a `/metrics` exposition: its counters and its histograms.
    pub fn render_metrics(&self, out: &mut Exposition) {
        let s = self.stats();
        let counters: [(&str, &str, u64); 6] = [
            (
                "notif_store_commits_total",
                "Store transactions committed (group commits).",
                s.commits,
            ),
            (
                "notif_store_failed_batches_total",
                "Store batches rolled back.",
                s.failed_batches,
            ),
            (
                "notif_store_write_requests_total",
                "Write requests committed.",
                s.write_ops,
            ),
            (
                "notif_store_inserted_total",
                "Notifications inserted, fired schedules included.",
                s.inserted,
            ),
            (
                "notif_store_reads_total",
                "Read requests answered.",
                s.reads,
            ),
            (
                "notif_scheduled_fired_total",
                "Scheduled notifications fired (stored and delivered) by this node.",
                self.counters.scheduled_fired.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            out.single(name, Kind::Counter, help, value);
        }
        out.histogram(
            "notif_store_batch_size",
            "Write requests per committed store transaction (group commit).",
            &self.counters.batch_size.snapshot(),
            1.0,
        );
        out.histogram(
            "notif_send_to_commit_seconds",
            "From a send or batch request being queued for the store to its transaction's commit.",
            &self.counters.send_to_commit.snapshot(),
            1e9,
        );
    }

    /// Queues a write request built around a fresh reply channel.
    fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        match self.writes.try_send(op(tx)) {
            Ok(()) => {
                self.doorbell.ring();
                StoreFuture::waiting(rx)
            }
            Err(TrySendError::Full(_)) => StoreFuture::ready(Err(StoreError::Overloaded(
                "write queue full: the store cannot keep up",
            ))),
            Err(TrySendError::Disconnected(_)) => StoreFuture::ready(Err(StoreError::Closed)),
        }
    }

    /// Queues a read request built around a fresh reply channel.
    fn read<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> ReadOp,
    ) -> StoreFuture<T> {
        let (tx, rx) = oneshot::channel();
        match self.reads.try_send(op(tx)) {
            Ok(()) => StoreFuture::waiting(rx),
            Err(TrySendError::Full(_)) => StoreFuture::ready(Err(StoreError::Overloaded(
                "read queue full: the store cannot keep up",
            ))),
            Err(TrySendError::Disconnected(_)) => StoreFuture::ready(Err(StoreError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests;
