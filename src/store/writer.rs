//! The store thread: group commit.
//!
//! One OS thread owns the only write connection. It blocks on the write queue, then drains whatever
//! else is already queued (up to `max_batch` rows) and hands the whole batch to the backend as ONE
//! transaction. A commit's fixed cost (lock, WAL frame headers, the sync when there is one) is paid per
//! batch, so throughput grows with load instead of collapsing under it, while a lone request under light
//! load is committed immediately with no timer or linger: batching is free in latency because it only
//! ever groups what was already waiting.
//!
//! Order of events for a batch: assign ids (one generator, on this thread, so id order is commit order;
//! on PostgreSQL the backend may number the batch again above the id clock, see
//! [`super::backend::number_above`]), apply and commit, call the [`CommitListener`] with everything the batch inserted, and only then reply.
//! A caller that got `Ok` therefore knows its notification is durable AND already handed to delivery.
//! The replies to inserts a shard queued through its own handle ([`super::Store::for_shard`]) are
//! handed to the listener instead ([`CommitListener::commit_ended`]), which gives them on that shard in
//! the same inbox message as the commit's deliveries: one hand-off and one wake per shard and commit.
//!
//! Idle, the thread is parked in the kernel until a request rings its [`Doorbell`] or the scheduler's
//! next tick; it never spins.
//! If the transaction fails, every request of the batch gets [`StoreError::Unavailable`] and the
//! listener is not called: nothing is delivered that was not stored.
//!
//! Shutdown: [`super::Store::close`] queues a close request; the loop commits everything queued before
//! it, then exits. (The queue also reports "disconnected" once every sender is gone, which ends the loop
//! the same way.)
//!
//! The same thread runs scheduling and retention, as the [`crate::scheduler`] module decides: at the
//! end of each batch it asks the scheduler what maintenance is due and appends it, a
//! [`WriteRequest::Purge`] (retention, expiry of idempotency records) and, last, a
//! [`WriteRequest::FireDue`], so due scheduled notifications are stored with fresh ids in commit order
//! and delivered like any send. Executing them here keeps one writer per database connection and needs
//! no lock: they are just more requests in the group commit.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;

use crossbeam_channel::{Receiver, TryRecvError};
use futures_channel::oneshot;
use uuid::Uuid;

use super::backend::{BackendError, BatchClock, Held, WriteBackend, WriteOutcome, WriteRequest};
use super::idempotency::{IdempotencyKey, IdempotencyRecord, Receipt};
use super::{
    CommitListener, Committed, Counters, DeliveryReceipt, MarkedSeen, ShardReply, StoreError,
};
use crate::model::{now_millis, IdGenerator, Millis, NewNotification, Notification};
use crate::preferences::{Registry, Verdict};
use crate::scheduler::{Maintenance, Scheduler};

/// The name of the store thread, as shown by `top -H` and in panics.
const THREAD_NAME: &str = "store-writer";

/// Where a request's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write request as shards queue it: the operation and where its answer goes.
pub(crate) enum WriteOp {
    /// See [`super::Store::insert`] and [`super::Store::insert_idempotent`].
    Insert {
        /// The notifications, without ids yet.
        batch: Vec<NewNotification>,
        /// The key, recorded with a receipt of what the insert stored.
        idempotency: Option<IdempotencyKey>,
        /// When the request was queued, for the send → commit latency histogram.
        queued_at: Instant,
        /// The shard that queued it, whose answer goes through the listener (see
        /// [`super::Store::for_shard`]); `None`: answered by this thread.
        shard: Option<usize>,
        /// The stored notifications, in batch order, or the verdict on the key.
        reply: Reply<Committed<Vec<Arc<Notification>>>>,
    },
    /// See [`super::Store::schedule`].
    Schedule {
        /// The notification, with `scheduled_at` set, without id yet.
        notification: NewNotification,
        /// The key, recorded with a receipt of what the schedule stored.
        idempotency: Option<IdempotencyKey>,
        /// The pending notification (id = the schedule's id), or the verdict on the key.
        reply: Reply<Committed<Arc<Notification>>>,
    },
    /// See [`super::Store::cancel_scheduled`].
    CancelScheduled {
        /// The schedule's id.
        id: Uuid,
        /// Whether it was pending.
        reply: Reply<bool>,
    },
    /// See [`super::Store::close`]: commit what is queued before this, then stop.
    Close,
    /// See [`super::Store::mark_read`].
    MarkRead {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
        /// The notification as stored, or `None`.
        reply: Reply<Option<Notification>>,
    },
    /// See [`super::Store::mark_all_read`].
    MarkAllRead {
        /// Whose inbox.
        user_id: String,
        /// How many were unread.
        reply: Reply<u64>,
    },
    /// See [`super::Store::delete`].
    Delete {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
        /// Whether it was there.
        reply: Reply<bool>,
    },
    /// See [`super::Store::mark_seen`].
    MarkSeen {
        /// Whose inbox.
        user_id: String,
        /// Which notifications.
        ids: Vec<Uuid>,
        /// How many were marked, or the id that is not the user's.
        reply: Reply<MarkedSeen>,
    },
    /// See [`super::Store::record_delivered`]: nobody waits for an answer.
    RecordDelivered {
        /// What one shard delivered since its last hand-off.
        receipts: Vec<DeliveryReceipt>,
    },
    /// See [`super::Store::set_preferences`].
    SetPreferences {
        /// Whose.
        user_id: String,
        /// The stored JSON, or `None` for the defaults.
        stored: Option<String>,
        /// When they were set.
        reply: Reply<Millis>,
    },
}

impl WriteOp {
    /// How much of a batch's `max_batch` budget this request uses: one per row it writes, so a
    /// transaction's size is bounded by rows, not by how producers grouped them.
    fn weight(&self) -> usize {
        match self {
            WriteOp::Insert { batch, .. } => batch.len().max(1),
            _ => 1,
        }
    }
}

/// The reply half of a [`WriteOp`], kept while its request is in the backend.
enum Replier {
    /// Of a [`WriteOp::Insert`], with the shard that queued it, if its answer goes through the
    /// listener.
    Insert(Reply<Committed<Vec<Arc<Notification>>>>, Option<usize>),
    /// Of a [`WriteOp::Schedule`].
    Schedule(Reply<Committed<Arc<Notification>>>),
    /// Of a [`WriteOp::CancelScheduled`].
    Cancel(Reply<bool>),
    /// Of a request the store thread added itself (scheduler, retention): nobody waits.
    Internal,
    /// Of a [`WriteOp::MarkRead`].
    MarkRead(Reply<Option<Notification>>),
    /// Of a [`WriteOp::MarkAllRead`].
    MarkAllRead(Reply<u64>),
    /// Of a [`WriteOp::Delete`].
    Delete(Reply<bool>),
    /// Of a [`WriteOp::MarkSeen`].
    MarkSeen(Reply<MarkedSeen>),
    /// [`WriteOutcome::PreferencesSet`], answered with the batch's time.
    PreferencesSet(Reply<Millis>, Millis),
}

impl Replier {
    /// Answers with the outcome of a committed request, or for an insert queued by a shard adds
    /// the answer to `deferred`, for the listener to give on that shard. A send error only means the
    /// caller stopped waiting, which is not the store's concern.
    fn complete(
        self,
        request: WriteRequest,
        outcome: Option<WriteOutcome>,
        deferred: &mut Vec<ShardReply>,
    ) {
        match (self, request, outcome) {
            (Replier::Insert(tx, shard), request, outcome) => {
                let answer = match (request, outcome) {
                    (WriteRequest::Insert { notifications, .. }, Some(WriteOutcome::Inserted)) => {
                        Ok(Committed::Fresh(notifications))
                    }
                    (_, Some(WriteOutcome::Replayed(receipt))) => Ok(Committed::Replayed(receipt)),
                    (_, Some(WriteOutcome::KeyReused)) => Ok(Committed::KeyReused),
                    _ => Err(StoreError::internal(
                        "store backend answered a different request than it was given",
                    )),
                };
                match shard {
                    Some(shard) => deferred.push(ShardReply::new(shard, move || {
                        let _ = tx.send(answer);
                    })),
                    None => drop(tx.send(answer)),
                }
            }
            (
                Replier::Schedule(tx),
                WriteRequest::Schedule { notification, .. },
                Some(WriteOutcome::Scheduled),
            ) => {
                let _ = tx.send(Ok(Committed::Fresh(notification)));
            }
            (Replier::Schedule(tx), _, Some(WriteOutcome::Replayed(receipt))) => {
                let _ = tx.send(Ok(Committed::Replayed(receipt)));
            }
            (Replier::Schedule(tx), _, Some(WriteOutcome::KeyReused)) => {
                let _ = tx.send(Ok(Committed::KeyReused));
            }
            (Replier::Cancel(tx), _, Some(WriteOutcome::Cancelled(found))) => {
                let _ = tx.send(Ok(found));
            }
            (Replier::Internal, _, _) => {}
            (Replier::MarkRead(tx), _, Some(WriteOutcome::MarkedRead(n))) => {
                let _ = tx.send(Ok(n.map(|n| *n)));
            }
            (Replier::MarkAllRead(tx), _, Some(WriteOutcome::MarkedAllRead(n))) => {
                let _ = tx.send(Ok(n));
            }
            (Replier::Delete(tx), _, Some(WriteOutcome::Deleted(found))) => {
                let _ = tx.send(Ok(found));
            }
            (Replier::MarkSeen(tx), _, Some(WriteOutcome::MarkedSeen(marked))) => {
                let _ = tx.send(Ok(marked));
            }
            (Replier::PreferencesSet(tx, at), _, Some(WriteOutcome::PreferencesSet)) => {
                let _ = tx.send(Ok(at));
            }
            // A backend bug, never data: answer rather than panic the only write thread.
            (replier, _, _) => replier.fail(StoreError::internal(
                "store backend answered a different request than it was given",
            )),
        }
    }

    /// Answers with an error (the batch failed).
    fn fail(self, error: StoreError) {
        match self {
            Replier::Insert(tx, _) => drop(tx.send(Err(error))),
            Replier::Schedule(tx) => drop(tx.send(Err(error))),
            Replier::Cancel(tx) => drop(tx.send(Err(error))),
            Replier::Internal => {}
            Replier::MarkRead(tx) => drop(tx.send(Err(error))),
            Replier::MarkAllRead(tx) => drop(tx.send(Err(error))),
            Replier::Delete(tx) => drop(tx.send(Err(error))),
            Replier::MarkSeen(tx) => drop(tx.send(Err(error))),
            Replier::PreferencesSet(tx, _) => drop(tx.send(Err(error))),
        }
    }
}

/// How a [`super::Store`] wakes the store thread. The thread waits for its queue parked in the kernel
/// (one futex wait), not in crossbeam's blocking receive, which spins and then calls `sched_yield`
/// several times before it parks: after every lone request, a core burnt for nothing. A sender rings
/// only when the thread said it sleeps, so a busy thread is never woken twice.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    /// Set by the thread before it parks; taken by the first sender after that.
    sleeping: AtomicBool,
    /// The store thread, once it runs.
    thread: OnceLock<Thread>,
}

impl Doorbell {
    /// Wakes the store thread if it sleeps: after a request was queued.
    pub(crate) fn ring(&self) {
        // SeqCst, against the thread's store of `sleeping` before its last look at the queue:
        // either it sees this request, or this swap sees it sleeping.
        if self.sleeping.swap(false, Ordering::SeqCst) {
            if let Some(thread) = self.thread.get() {
                thread.unpark();
            }
        }
    }
}

/// Starts the store thread over `backend`; the [`super::Store`] handles ring `doorbell` after
/// queueing on `queue`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn<B: WriteBackend>(
    backend: B,
    queue: Receiver<WriteOp>,
    doorbell: Arc<Doorbell>,
    listener: Box<dyn CommitListener>,
    max_batch: usize,
    retention: Option<Duration>,
    counters: Arc<Counters>,
    preferences: Arc<Registry>,
) -> std::io::Result<JoinHandle<()>> {
    let writer = Writer {
        backend,
        queue,
        doorbell,
        listener,
        ids: IdGenerator::new(),
        max_batch: max_batch.max(1),
        counters,
        carried: None,
        closing: false,
        scheduler: Scheduler::new(retention, Instant::now()),
        outage: None,
        receipts: Receipts::default(),
        preferences,
    };
    std::thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || writer.run())
}

/// The store thread's state.
struct Writer<B> {
    /// The database.
    backend: B,
    /// Requests from every shard.
    queue: Receiver<WriteOp>,
    /// How the senders wake this thread (see [`Writer::wait_for_request`]).
    doorbell: Arc<Doorbell>,
    /// Told about every commit, before the replies.
    listener: Box<dyn CommitListener>,
    /// The only id generator for stored notifications: ids are assigned here, in commit order.
    ids: IdGenerator,
    /// Most rows in one transaction (see [`WriteOp::weight`]).
    max_batch: usize,
    /// Shared with every [`super::Store`] for [`super::Store::stats`].
    counters: Arc<Counters>,
    /// A request drained that did not fit the previous batch; it opens the next one.
    carried: Option<WriteOp>,
    /// Set once a [`WriteOp::Close`] was drained: this batch is the last.
    closing: bool,
    /// Decides when scheduled notifications fire and retention runs.
    scheduler: Scheduler,
    /// Set while batches keep failing, so an outage is logged once and then summarized.
    outage: Option<Outage>,
    /// Delivery receipts waiting to be recorded.
    receipts: Receipts,
    /// Whose quiet hours hold back what this thread commits (see [`Writer::hold_quiet`]).
    preferences: Arc<Registry>,
}

/// Most delivery receipts the store thread keeps waiting (about 24 MiB). They wait only while their
/// transaction fails (the database is down, and so every send fails too); past this, new ones are
/// dropped and the drop is logged, rather than the thread's memory growing without end.
const MAX_PENDING_RECEIPTS: usize = 1 << 20;

/// Delivery receipts the shards handed in, waiting to be recorded after the batch being committed.
///
/// They are coalesced by id (a user with connections on several shards, or a replay, reports the
/// same notification more than once; the earliest time is kept) and recorded in ONE statement per
/// batch, in a transaction of their own: a receipt never shares the fate of a send (on PostgreSQL,
/// another node recording the same rows could otherwise deadlock a batch of sends), and a failed
/// recording keeps the receipts for the next batch instead of losing them.
#[derive(Default)]
struct Receipts {
    /// Notification id → when it was first delivered.
    pending: HashMap<Uuid, Millis>,
    /// Set while recordings keep failing (logged like a store outage).
    outage: Option<Outage>,
    /// When a drop past [`MAX_PENDING_RECEIPTS`] was last logged.
    drop_logged_at: Option<Instant>,
}

impl Receipts {
    /// Takes in a shard's receipts.
    fn add(&mut self, receipts: Vec<DeliveryReceipt>) {
        let mut dropped = 0usize;
        for (id, at) in receipts {
            if self.pending.len() >= MAX_PENDING_RECEIPTS && !self.pending.contains_key(&id) {
                dropped += 1;
                continue;
            }
            self.pending
                .entry(id)
                .and_modify(|first| *first = (*first).min(at))
                .or_insert(at);
        }
        if dropped > 0
            && self
                .drop_logged_at
                .is_none_or(|t| t.elapsed() >= OUTAGE_LOG_INTERVAL)
        {
            self.drop_logged_at = Some(Instant::now());
            tracing::warn!(
                dropped,
                pending = self.pending.len(),
                "delivery receipts dropped: the store has not recorded any for a long time"
            );
        }
    }

    /// Everything waiting, in id order (see [`WriteRequest::RecordDelivered`]).
    fn take(&mut self) -> Vec<DeliveryReceipt> {
        let mut list: Vec<DeliveryReceipt> = self.pending.drain().collect();
        list.sort_unstable_by_key(|(id, _)| *id);
        list
    }
}

/// How often a continuing store outage is logged again (the scheduler alone tries 10 times a second).
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A run of failed batches, between the first failure and the next commit.
struct Outage {
    /// When the first batch of the run failed.
    since: Instant,
    /// When the run was last logged.
    logged_at: Instant,
    /// Batches that failed since then.
    failed_since_log: u64,
}

impl Outage {
    /// Logs a failed batch: the first of a run at once, the rest summarized every
    /// [`OUTAGE_LOG_INTERVAL`], so a database outage is a few lines, not ten a second.
    fn failed(outage: &mut Option<Outage>, error: &BackendError, requests: usize) {
        let now = Instant::now();
        match outage {
            None => {
                tracing::error!(error = %error, requests, "store batch rolled back");
                *outage = Some(Outage {
                    since: now,
                    logged_at: now,
                    failed_since_log: 0,
                });
            }
            Some(o) => {
                o.failed_since_log += 1;
                if now.duration_since(o.logged_at) >= OUTAGE_LOG_INTERVAL {
                    tracing::error!(
                        error = %error,
                        failed_batches = o.failed_since_log,
                        down_for_s = now.duration_since(o.since).as_secs(),
                        "store batches still failing"
                    );
                    o.logged_at = now;
                    o.failed_since_log = 0;
                }
            }
        }
    }

    /// Logs the end of a run of failures, if there was one.
    fn ended(outage: &mut Option<Outage>) {
        if let Some(o) = outage.take() {
            tracing::info!(
                down_for_ms = o.since.elapsed().as_millis() as u64,
                "store batches commit again"
            );
        }
    }
}

impl<B: WriteBackend> Writer<B> {
    /// Batches and commits until every sender is gone and the queue is empty.
    fn run(mut self) {
        let _ = self.doorbell.thread.set(std::thread::current());
        let mut batch = Vec::new();
        while self.next_batch(&mut batch) {
            self.commit(std::mem::take(&mut batch));
            self.record_receipts();
            if self.closing {
                break;
            }
        }
        tracing::debug!("store thread: queue closed and drained, exiting");
    }

    /// Fills `batch` with the next group: blocks for the first request, then takes what is already
    /// queued while it fits in `max_batch`. The first request is always taken, however large, since an
    /// insert request must commit whole. Returns false once the queue is closed and empty.
    ///
    /// While idle it wakes at the next scheduler tick and returns an empty batch, which `commit` fills
    /// with the scheduler's and retention's own requests.
    fn next_batch(&mut self, batch: &mut Vec<WriteOp>) -> bool {
        let first = match self.carried.take() {
            Some(op) => op,
            None => match self.wait_for_request() {
                Ok(Some(op)) => op,
                Ok(None) => return true,
                Err(TryRecvError::Disconnected) | Err(TryRecvError::Empty) => return false,
            },
        };
        if matches!(first, WriteOp::Close) {
            self.closing = true;
            return true;
        }
        let mut weight = first.weight();
        batch.push(first);
        while weight < self.max_batch {
            let Ok(op) = self.queue.try_recv() else { break };
            if matches!(op, WriteOp::Close) {
                self.closing = true;
                break;
            }
            if weight + op.weight() > self.max_batch {
                self.carried = Some(op);
                break;
            }
            weight += op.weight();
            batch.push(op);
        }
        true
    }

    /// The next request, waiting for one until the scheduler's next tick (`Ok(None)` then), parked
    /// without a spin (see [`Doorbell`]); `Err` once every sender is gone and the queue is empty.
    /// A request that needs no answer soon (delivery receipts) does not ring: it waits for the next
    /// batch or tick, and a last handle dropped without [`super::Store::close`] is noticed at the
    /// next tick.
    fn wait_for_request(&mut self) -> Result<Option<WriteOp>, TryRecvError> {
        let deadline = self.scheduler.next_tick();
        loop {
            match self.queue.try_recv() {
                Ok(op) => return Ok(Some(op)),
                Err(TryRecvError::Disconnected) => return Err(TryRecvError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Say so, then look once more: a request queued before this store is seen by the
            // look, one queued after it finds `sleeping` set and unparks (see `Doorbell::ring`).
            self.doorbell.sleeping.store(true, Ordering::SeqCst);
            if self.queue.is_empty() {
                std::thread::park_timeout(deadline - now);
            }
            self.doorbell.sleeping.store(false, Ordering::SeqCst);
        }
    }

    /// The maintenance the scheduler says is due, as requests to append to this batch.
    fn housekeeping(&mut self, now: Millis) -> Vec<WriteRequest> {
        let Maintenance { purge, fire_due } = self.scheduler.due(Instant::now(), now, self.closing);
        let mut requests = Vec::new();
        if let Some(purge) = purge {
            requests.push(WriteRequest::Purge {
                created_before: purge.created_before,
                limit: purge.limit,
            });
        }
        if fire_due.is_some() {
            // With the scheduler's tick: quiet hours that ended release what they held. Before
            // FireDue, which must stay last; it assigns no ids.
            requests.push(WriteRequest::ReleaseQuiet {
                limit: RELEASE_PER_BATCH,
            });
        }
        if let Some(limit) = fire_due {
            // Last in the batch: its ids must be above every other id the batch assigned.
            requests.push(WriteRequest::FireDue { limit });
        }
        requests
    }

    /// Records the delivery receipts waiting, in a transaction of their own; on failure keeps them
    /// for the next round (the loop wakes at least every scheduler tick).
    fn record_receipts(&mut self) {
        if self.receipts.pending.is_empty() {
            return;
        }
        let mut requests = [WriteRequest::RecordDelivered {
            receipts: self.receipts.take(),
        }];
        match self
            .backend
            .apply_batch(&mut requests, BatchClock::at(now_millis(), &mut self.ids))
        {
            Ok(outcomes) => {
                Outage::ended(&mut self.receipts.outage);
                if let Some(WriteOutcome::RecordedDelivered(n)) = outcomes.first() {
                    tracing::trace!(recorded = n, "delivery receipts recorded");
                }
            }
            Err(e) => {
                let [WriteRequest::RecordDelivered { receipts }] = requests else {
                    return;
                };
                Outage::failed(&mut self.receipts.outage, &e, receipts.len());
                self.receipts.add(receipts);
            }
        }
    }

    /// Tells the listener the unread counts of the users whose unread count this committed batch may
    /// have changed, each user once (so a burst committed in one batch is one count per user).
    fn report_unread(
        &mut self,
        requests: &[WriteRequest],
        outcomes: &[WriteOutcome],
        inserted: &[Arc<Notification>],
        now: Millis,
    ) {
        let mut users: Vec<&str> = inserted
            .iter()
            .filter_map(|n| n.user_id.as_deref())
            .collect();
        for (request, outcome) in requests.iter().zip(outcomes) {
            match (request, outcome) {
                // Read by this batch, not before (a second read keeps the first `read_at`).
                (WriteRequest::MarkRead { user_id, .. }, WriteOutcome::MarkedRead(Some(n)))
                    if n.read_at == Some(now) =>
                {
                    users.push(user_id)
                }
                (WriteRequest::MarkAllRead { user_id }, WriteOutcome::MarkedAllRead(n))
                    if *n > 0 =>
                {
                    users.push(user_id)
                }
                (WriteRequest::Delete { user_id, .. }, WriteOutcome::Deleted(true)) => {
                    users.push(user_id)
                }
                _ => {}
            }
        }
        if users.is_empty() {
            return;
        }
        users.sort_unstable();
        users.dedup();
        match self.backend.unread_counts(&users) {
            Ok(counts) => {
                let listener = &self.listener;
                if catch_unwind(AssertUnwindSafe(|| listener.unread_changed(&counts))).is_err() {
                    tracing::error!(users = counts.len(), "unread listener panicked");
                }
            }
            // The batch is committed; only the live badge misses this change, and the next change
            // (or a reconnect) brings it back in line.
            Err(e) => tracing::warn!(error = %e, users = users.len(), "cannot read unread counts"),
        }
    }

    /// Applies one batch in one transaction, tells the listener, then answers every request.
    fn commit(&mut self, ops: Vec<WriteOp>) {
        let now = now_millis();
        let mut requests = Vec::with_capacity(ops.len());
        let mut repliers = Vec::with_capacity(ops.len());
        let mut sends_queued_at = Vec::new();
        for op in ops {
            let (request, replier) = match op {
                WriteOp::Insert {
                    batch,
                    idempotency,
                    queued_at,
                    shard,
                    reply,
                } => {
                    sends_queued_at.push(queued_at);
                    let notifications: Vec<Arc<Notification>> = batch
                        .into_iter()
                        .map(|n| {
                            let (id, created_at) = self.ids.next_id();
                            Arc::new(n.into_notification(id, created_at))
                        })
                        .collect();
                    let idempotency = idempotency
                        .map(|key| IdempotencyRecord::new(key, &Receipt::inserted(&notifications)));
                    (
                        WriteRequest::Insert {
                            notifications,
                            idempotency,
                        },
                        Replier::Insert(reply, shard),
                    )
                }
                WriteOp::Schedule {
                    notification,
                    idempotency,
                    reply,
                } => {
                    let (id, created_at) = self.ids.next_id();
                    let notification = Arc::new(notification.into_notification(id, created_at));
                    let idempotency = idempotency
                        .map(|key| IdempotencyRecord::new(key, &Receipt::scheduled(&notification)));
                    (
                        WriteRequest::Schedule {
                            notification,
                            idempotency,
                        },
                        Replier::Schedule(reply),
                    )
                }
                WriteOp::CancelScheduled { id, reply } => {
                    (WriteRequest::CancelScheduled { id }, Replier::Cancel(reply))
                }
                WriteOp::Close => continue,
                WriteOp::MarkRead { user_id, id, reply } => (
                    WriteRequest::MarkRead { user_id, id },
                    Replier::MarkRead(reply),
                ),
                WriteOp::MarkAllRead { user_id, reply } => (
                    WriteRequest::MarkAllRead { user_id },
                    Replier::MarkAllRead(reply),
                ),
                WriteOp::Delete { user_id, id, reply } => {
                    (WriteRequest::Delete { user_id, id }, Replier::Delete(reply))
                }
                WriteOp::MarkSeen {
                    user_id,
                    ids,
                    reply,
                } => (
                    WriteRequest::MarkSeen { user_id, ids },
                    Replier::MarkSeen(reply),
                ),
                WriteOp::RecordDelivered { receipts } => {
                    // Recorded after this batch, in a transaction of their own (see `Receipts`).
                    self.receipts.add(receipts);
                    continue;
                }
                WriteOp::SetPreferences {
                    user_id,
                    stored,
                    reply,
                } => (
                    WriteRequest::SetPreferences { user_id, stored },
                    Replier::PreferencesSet(reply, now),
                ),
            };
            requests.push(request);
            repliers.push(replier);
        }
        for request in self.housekeeping(now) {
            requests.push(request);
            repliers.push(Replier::Internal);
        }
        if requests.is_empty() {
            return;
        }

        let outcomes = match self
            .backend
            .apply_batch(&mut requests, BatchClock::at(now, &mut self.ids))
        {
            Ok(outcomes) => outcomes,
            Err(e) => {
                Counters::add(&self.counters.failed_batches, 1);
                Outage::failed(&mut self.outage, &e, repliers.len());
                let e = Arc::new(e);
                for replier in repliers {
                    replier.fail(StoreError::Unavailable(e.clone()));
                }
                return;
            }
        };

        // What this commit stored, in id order: inserts in request order, then what the scheduler fired
        // (always the last request). Inserts answered from an idempotency record stored nothing.
        let inserted: Vec<Arc<Notification>> = requests
            .iter()
            .zip(&outcomes)
            .flat_map(|(request, outcome)| match (request, outcome) {
                (WriteRequest::Insert { notifications, .. }, WriteOutcome::Inserted) => {
                    notifications.as_slice()
                }
                (_, WriteOutcome::Fired(fired)) => fired.as_slice(),
                _ => &[],
            })
            .cloned()
            .collect();
        let committed_at = Instant::now();
        for queued_at in sends_queued_at {
            self.counters
                .send_to_commit
                .observe_duration(committed_at.saturating_duration_since(queued_at));
        }
        for (request, outcome) in requests.iter().zip(&outcomes) {
            match (request, outcome) {
                (_, WriteOutcome::Fired(fired)) if !fired.is_empty() => {
                    Counters::add(&self.counters.scheduled_fired, fired.len() as u64);
                    tracing::debug!(count = fired.len(), "scheduled notifications fired");
                }
                (WriteRequest::Purge { .. }, WriteOutcome::Purged(n)) if *n > 0 => {
                    tracing::info!(deleted = n, "retention deleted old notifications");
                    self.scheduler.purged(*n, Instant::now());
                }
                _ => {}
            }
        }
        Outage::ended(&mut self.outage);
        let client_requests = requests
            .iter()
            .filter(|r| {
                !matches!(
                    r,
                    WriteRequest::FireDue { .. }
                        | WriteRequest::Purge { .. }
                        | WriteRequest::ReleaseQuiet { .. }
                )
            })
            .count();
        // An idle scheduler tick that found nothing is a transaction, but not a commit anyone
        // waited for: counting it would show ten commits a second on an idle server.
        let stored_or_deleted = !inserted.is_empty()
            || outcomes
                .iter()
                .any(|o| matches!(o, WriteOutcome::Purged(n) if *n > 0));
        if client_requests > 0 || stored_or_deleted {
            Counters::add(&self.counters.commits, 1);
        }
        if client_requests > 0 {
            self.counters.batch_size.observe(client_requests as u64);
        }
        Counters::add(&self.counters.write_ops, client_requests as u64);
        Counters::add(&self.counters.inserted, inserted.len() as u64);

        self.hold_quiet(&inserted);
        let released: Vec<Arc<Notification>> = outcomes
            .iter()
            .flat_map(|o| match o {
                WriteOutcome::Released(list) => list.as_slice(),
                _ => &[],
            })
            .cloned()
            .collect();
        if !released.is_empty() {
            let listener = &self.listener;
            if catch_unwind(AssertUnwindSafe(|| listener.released(&released))).is_err() {
                tracing::error!(
                    count = released.len(),
                    "commit listener panicked on a release"
                );
            }
        }

        if !inserted.is_empty() {
            // The data is committed whatever the listener does. A panic in it is a bug elsewhere; it
            // must not take down the only write thread (every later write would fail), nor keep this
            // batch's callers from hearing that their writes are durable.
            let listener = &self.listener;
            if catch_unwind(AssertUnwindSafe(|| listener.committed(&inserted))).is_err() {
                tracing::error!(count = inserted.len(), "commit listener panicked");
            }
        }

        self.report_unread(&requests, &outcomes, &inserted, now);

        let mut outcomes = outcomes.into_iter();
        let mut deferred = Vec::new();
        for (request, replier) in requests.into_iter().zip(repliers) {
            replier.complete(request, outcomes.next(), &mut deferred);
        }
        // Always, even with nothing inserted: the listener hands the commit's deliveries and the
        // shards' answers over here, in one hand-off per shard. If it panics, the answers it had
        // not handed over are dropped, and their callers see the store closed rather than waiting
        // forever.
        let listener = &self.listener;
        if catch_unwind(AssertUnwindSafe(|| listener.commit_ended(deferred))).is_err() {
            tracing::error!("commit listener panicked at the end of a commit");
        }
    }
}

impl<B: WriteBackend> Writer<B> {
    /// Records, in a transaction of its own right after the commit and before the listener hears
    /// of it, the notifications of `inserted` that their users' quiet hours hold back, so they are
    /// pushed when the quiet hours end, after a restart too (API.md, "Preferences"). The shards make
    /// the same decision from the same preferences and the notification's own timestamp, and hold
    /// back its live push. Nothing is written when no user has preferences. If this write fails,
    /// the notifications stay stored (history, unread) but are not pushed when the quiet hours end:
    /// logged, as the one loss a database failure between two commits can cause.
    fn hold_quiet(&mut self, inserted: &[Arc<Notification>]) {
        if inserted.is_empty() || self.preferences.is_empty() {
            return;
        }
        let held: Vec<Held> = inserted
            .iter()
            .filter_map(|n| {
                let user = n.user_id.as_deref()?;
                let prefs = self.preferences.get(user)?;
                match prefs.verdict(user, n, false) {
                    Verdict::HoldUntil(release_at) => Some(Held {
                        id: n.id,
                        user_id: user.to_owned(),
                        release_at,
                    }),
                    _ => None,
                }
            })
            .collect();
        if held.is_empty() {
            return;
        }
        let count = held.len();
        let mut request = [WriteRequest::HoldQuiet { held }];
        if let Err(e) = self
            .backend
            .apply_batch(&mut request, BatchClock::at(now_millis(), &mut self.ids))
        {
            tracing::error!(error = %e, count, "could not record notifications held by quiet hours; they will not be pushed when the quiet hours end");
        }
    }
}

/// Most held notifications one scheduler tick releases (the rest follow at the next ticks).
const RELEASE_PER_BATCH: usize = 1000;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_executor::block_on;

    use super::*;
    use crate::store::backend::{Applied, CountersBackend};
    use crate::store::StoreFuture;
    use crate::store::UnreadCount;

    /// A backend that records the size of each batch and fails the batches it is told to.
    struct FakeBackend {
        batches: Arc<Mutex<Vec<usize>>>,
        fail_batches: Vec<usize>,
    }

    impl WriteBackend for FakeBackend {
        fn apply_batch(
            &mut self,
            requests: &mut [WriteRequest],
            _clock: BatchClock<'_>,
        ) -> Applied {
            // Only the callers' requests count; the scheduler's and retention's ride along.
            let client = requests
                .iter()
                .filter(|r| {
                    !matches!(
                        r,
                        WriteRequest::FireDue { .. }
                            | WriteRequest::Purge { .. }
                            | WriteRequest::ReleaseQuiet { .. }
                    )
                })
                .count();
            if client == 0 {
                return Ok(requests.iter().map(|_| WriteOutcome::Purged(0)).collect());
            }
            let mut batches = self.batches.lock().unwrap();
            let index = batches.len();
            batches.push(client);
            if self.fail_batches.contains(&index) {
                return Err(BackendError::Data("disk on fire".to_owned()));
            }
            Ok(requests
                .iter()
                .map(|r| match r {
                    WriteRequest::Insert { .. } => WriteOutcome::Inserted,
                    WriteRequest::Schedule { .. } => WriteOutcome::Scheduled,
                    WriteRequest::CancelScheduled { .. } => WriteOutcome::Cancelled(true),
                    WriteRequest::FireDue { .. } => WriteOutcome::Fired(Vec::new()),
                    WriteRequest::Purge { .. } => WriteOutcome::Purged(0),
                    WriteRequest::MarkRead { .. } => WriteOutcome::MarkedRead(None),
                    WriteRequest::MarkAllRead { .. } => WriteOutcome::MarkedAllRead(7),
                    WriteRequest::Delete { .. } => WriteOutcome::Deleted(true),
                    WriteRequest::MarkSeen { .. } => {
                        WriteOutcome::MarkedSeen(MarkedSeen::Updated(1))
                    }
                    WriteRequest::RecordDelivered { receipts } => {
                        WriteOutcome::RecordedDelivered(receipts.len() as u64)
                    }
                    WriteRequest::SetPreferences { .. } => WriteOutcome::PreferencesSet,
                    WriteRequest::HoldQuiet { .. } => WriteOutcome::Held,
                    WriteRequest::ReleaseQuiet { .. } => WriteOutcome::Released(Vec::new()),
                })
                .collect())
        }
    }

    impl CountersBackend for FakeBackend {
        fn unread_counts(&mut self, users: &[&str]) -> Result<Vec<UnreadCount>, BackendError> {
            Ok(users
                .iter()
                .map(|u| UnreadCount {
                    user_id: (*u).to_owned(),
                    unread: 0,
                    version: 0,
                })
                .collect())
        }
    }

    struct RecordingListener(Arc<Mutex<Vec<Uuid>>>);

    impl CommitListener for RecordingListener {
        fn committed(&self, inserted: &[Arc<Notification>]) {
            self.0.lock().unwrap().extend(inserted.iter().map(|n| n.id));
        }
    }

    fn new_notification(message: &str) -> NewNotification {
        NewNotification {
            kind: "info".into(),
            title: String::new(),
            message: message.into(),
            user_id: Some("u1".into()),
            channels: Vec::new(),
            broadcast: false,
            data: "{}".into(),
            scheduled_at: None,
            urgent: false,
        }
    }

    fn insert_op(n: usize) -> (WriteOp, StoreFuture<Committed<Vec<Arc<Notification>>>>) {
        let (reply, rx) = oneshot::channel();
        let batch = (0..n).map(|i| new_notification(&format!("m{i}"))).collect();
        let op = WriteOp::Insert {
            batch,
            idempotency: None,
            queued_at: Instant::now(),
            shard: None,
            reply,
        };
        (op, StoreFuture::waiting(rx))
    }

    /// The stored notifications of a committed insert.
    fn done(
        committed: Result<Committed<Vec<Arc<Notification>>>, StoreError>,
    ) -> Result<Vec<Arc<Notification>>, StoreError> {
        match committed? {
            Committed::Fresh(stored) => Ok(stored),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Queues `ops` BEFORE the thread starts and closes the queue, so batching is deterministic.
    fn run_writer(
        ops: Vec<WriteOp>,
        max_batch: usize,
        fail_batches: Vec<usize>,
    ) -> (Vec<usize>, Vec<Uuid>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        for op in ops {
            tx.send(op).unwrap();
        }
        drop(tx);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeBackend {
            batches: batches.clone(),
            fail_batches,
        };
        let listener = Box::new(RecordingListener(seen.clone()));
        spawn(
            backend,
            rx,
            Arc::default(),
            listener,
            max_batch,
            None,
            Arc::default(),
            Arc::default(),
        )
        .unwrap()
        .join()
        .unwrap();
        let batches = batches.lock().unwrap().clone();
        let seen = seen.lock().unwrap().clone();
        (batches, seen)
    }

    #[test]
    fn queued_requests_are_grouped_up_to_max_batch_and_flushed_on_shutdown() {
        let (ops, futures): (Vec<_>, Vec<_>) = (0..7).map(|_| insert_op(1)).unzip();
        let (batches, seen) = run_writer(ops, 3, Vec::new());
        assert_eq!(batches, vec![3, 3, 1], "7 queued singles with max_batch 3");
        let ids: Vec<Uuid> = futures
            .into_iter()
            .map(|f| done(block_on(f)).unwrap()[0].id)
            .collect();
        assert_eq!(seen, ids, "listener saw every id, in reply order");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids increase in queue order"
        );
    }

    #[test]
    fn an_insert_larger_than_max_batch_commits_whole_and_alone() {
        let (a, fa) = insert_op(1);
        let (b, fb) = insert_op(5);
        let (c, fc) = insert_op(1);
        let (batches, _) = run_writer(vec![a, b, c], 3, Vec::new());
        // a fits; b (weight 5) does not fit beside a, so it opens the next batch alone; c follows.
        assert_eq!(batches, vec![1, 1, 1]);
        assert_eq!(done(block_on(fb)).unwrap().len(), 5);
        assert!(done(block_on(fa)).is_ok() && done(block_on(fc)).is_ok());
    }

    #[test]
    fn a_failed_batch_fails_every_request_in_it_and_is_not_delivered() {
        let (i1, f1) = insert_op(2);
        let (read_tx, read_rx) = oneshot::channel();
        let mark = WriteOp::MarkRead {
            user_id: "u1".into(),
            id: Uuid::nil(),
            reply: read_tx,
        };
        let (all_tx, all_rx) = oneshot::channel();
        let all = WriteOp::MarkAllRead {
            user_id: "u1".into(),
            reply: all_tx,
        };
        let (i2, f2) = insert_op(1);
        // max_batch 4: [i1 (2), mark, all] fails as one; [i2] commits.
        let (batches, seen) = run_writer(vec![i1, mark, all, i2], 4, vec![0]);
        assert_eq!(batches, vec![3, 1]);
        assert!(
            matches!(block_on(f1), Err(StoreError::Unavailable(e)) if e.to_string() == "disk on fire")
        );
        assert!(matches!(
            block_on(read_rx).unwrap(),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            block_on(all_rx).unwrap(),
            Err(StoreError::Unavailable(_))
        ));
        let committed = done(block_on(f2)).unwrap();
        assert_eq!(
            seen,
            vec![committed[0].id],
            "only the committed batch reached the listener"
        );
    }

    #[test]
    fn a_shards_insert_is_answered_by_the_listener_at_the_commits_end() {
        struct Deferring(Arc<Mutex<Vec<usize>>>);
        impl CommitListener for Deferring {
            fn committed(&self, _: &[Arc<Notification>]) {}
            fn commit_ended(&self, replies: Vec<ShardReply>) {
                for reply in replies {
                    self.0.lock().unwrap().push(reply.shard);
                    reply.give();
                }
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reply, answer) = oneshot::channel();
        tx.send(WriteOp::Insert {
            batch: vec![new_notification("m")],
            idempotency: None,
            queued_at: Instant::now(),
            shard: Some(3),
            reply,
        })
        .unwrap();
        let (direct, direct_future) = insert_op(1);
        tx.send(direct).unwrap();
        drop(tx);
        let handed = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeBackend {
            batches: Arc::default(),
            fail_batches: Vec::new(),
        };
        spawn(
            backend,
            rx,
            Arc::default(),
            Box::new(Deferring(handed.clone())),
            8,
            None,
            Arc::default(),
            Arc::default(),
        )
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(
            *handed.lock().unwrap(),
            vec![3],
            "only the shard's insert went through the listener, with its shard"
        );
        assert_eq!(
            done(block_on(StoreFuture::waiting(answer))).unwrap().len(),
            1
        );
        assert_eq!(done(block_on(direct_future)).unwrap().len(), 1);
    }

    #[test]
    fn a_panicking_listener_does_not_lose_the_reply() {
        struct Panics;
        impl CommitListener for Panics {
            fn committed(&self, _: &[Arc<Notification>]) {
                panic!("listener bug");
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let (op, fut) = insert_op(1);
        tx.send(op).unwrap();
        drop(tx);
        let backend = FakeBackend {
            batches: Arc::default(),
            fail_batches: Vec::new(),
        };
        let handle = spawn(
            backend,
            rx,
            Arc::default(),
            Box::new(Panics),
            8,
            None,
            Arc::default(),
            Arc::default(),
        )
        .unwrap();
        assert_eq!(done(block_on(fut)).unwrap().len(), 1);
        assert!(handle.join().is_ok(), "the store thread survived");
    }
}
