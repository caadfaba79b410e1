//! The seam between the store's thread plumbing and a database, and the policy every database shares.
//!
//! The store thread ([`super::writer`]) and the reader threads ([`super::reader`]) own the queues,
//! the id generator, the listener and the replies; a backend only turns requests into SQL. Keeping
//! that split means each backend (SQLite in `sqlite.rs`, PostgreSQL in `postgres/`) implements these
//! two traits and nothing else: group commit, commit-order delivery, flush on shutdown and error
//! mapping stay written once.
//!
//! What the two backends must decide alike is written here once too, so they cannot drift apart: how
//! a history page is cut and where the next one starts ([`history_page`]), the order due schedules
//! fire in ([`fire_in_due_order`]), the list of migrations and what a newer schema means
//! ([`migrations!`], [`warn_if_schema_is_newer`]), and how a count becomes an SQL integer
//! ([`sql_int`]). The verdict on an idempotency key is in [`super::idempotency`].
//!
//! A write backend sees a whole drained batch at once, because what "one transaction" costs and how to
//! write many rows fast is backend-specific (one prepared statement per row on SQLite, a multi-row
//! INSERT or COPY on PostgreSQL). Ids and times are assigned before the backend is called, so every
//! backend stores exactly what the listener and the callers will be told.

use std::sync::Arc;

use uuid::Uuid;

pub(crate) use super::error::BackendError;
use super::idempotency::{IdempotencyRecord, KeyVerdict, Receipt};
use super::{DeliveryReceipt, HistoryPage, HistoryQuery, MarkedSeen, ReplayQuery, UnreadCount};
use crate::model::{IdGenerator, Millis, Notification};
use crate::scheduler::idempotency_expired_before;

/// One write of a batch, with ids and timestamps already assigned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WriteRequest {
    /// Store these notifications (ids fresh from the store thread's generator, ascending).
    ///
    /// With an idempotency record: first look the key up (unexpired: created after
    /// `scheduler::idempotency_expired_before(now)`). Same fingerprint: store nothing, answer
    /// [`WriteOutcome::Replayed`] with the recorded receipt. Other fingerprint: store nothing, answer
    /// [`WriteOutcome::KeyReused`]. Unknown (or expired) key: store the notifications AND the record
    /// (replacing an expired one), answer [`WriteOutcome::Inserted`].
    Insert {
        /// The notifications.
        notifications: Vec<Arc<Notification>>,
        /// The `Idempotency-Key` claim, if the producer sent one.
        idempotency: Option<IdempotencyRecord>,
    },
    /// Store a pending scheduled notification (its id is the schedule's id; `scheduled_at` is set).
    /// Idempotency as for [`WriteRequest::Insert`], answering [`WriteOutcome::Scheduled`] when stored.
    Schedule {
        /// The pending notification.
        notification: Arc<Notification>,
        /// The `Idempotency-Key` claim, if the producer sent one.
        idempotency: Option<IdempotencyRecord>,
    },
    /// Remove a pending scheduled notification: [`WriteOutcome::Cancelled`] says whether it was pending.
    CancelScheduled {
        /// The schedule's id.
        id: Uuid,
    },
    /// Claim up to `limit` pending scheduled notifications due at `now` (oldest `scheduled_at` first;
    /// on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so concurrent nodes never claim the same one),
    /// remove them from the pending table and store each as a notification with a NEW id from `ids`
    /// (so id order stays commit order) and `created_at` = now, keeping its `scheduled_at`. Answers
    /// [`WriteOutcome::Fired`] with the stored notifications in id order. Always the last request of
    /// its batch, so its ids are above every other id of the batch.
    FireDue {
        /// Most to fire in this batch.
        limit: usize,
    },
    /// Retention: delete up to `limit` notifications created before `created_before`, and every
    /// idempotency record older than `scheduler::idempotency_expired_before(now)`. Answers [`WriteOutcome::Purged`] with
    /// the number of notifications deleted.
    Purge {
        /// The cut-off; `None` keeps notifications forever (only idempotency records are purged).
        created_before: Option<Millis>,
        /// Most notifications to delete in this batch, so a purge never holds the write lock long.
        limit: usize,
    },
    /// Set `read_at` if unset, on that notification of that user's inbox.
    MarkRead {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
    },
    /// Set `read_at` on every unread notification of that user.
    MarkAllRead {
        /// Whose inbox.
        user_id: String,
    },
    /// Set `seen_at` where unset on each of `ids`, all or nothing: when one is not in that user's
    /// inbox, change nothing and answer [`MarkedSeen::NotInInbox`] naming the first such id.
    MarkSeen {
        /// Whose inbox.
        user_id: String,
        /// Which notifications, in the client's order.
        ids: Vec<Uuid>,
    },
    /// Set `delivered_at` where unset, in ONE statement for the whole list: the first delivery's time
    /// stays. The store thread applies it in a transaction of its own (see `writer::Receipts`).
    RecordDelivered {
        /// Each id once, in ascending id order (so concurrent writers lock rows in one order).
        receipts: Vec<DeliveryReceipt>,
    },
    /// Remove that notification from that user's inbox.
    Delete {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
    },
    /// Store a user's preferences (`Some`: their stored JSON, see `Preferences::to_stored`), or
    /// forget them (`None`: back to the defaults). Answers [`WriteOutcome::PreferencesSet`].
    SetPreferences {
        /// Whose.
        user_id: String,
        /// The stored JSON, or `None` for the defaults.
        stored: Option<String>,
    },
    /// Remember notifications that quiet hours hold back, to push when they end. Answers
    /// [`WriteOutcome::Held`].
    HoldQuiet {
        /// One row per held notification.
        held: Vec<Held>,
    },
    /// Claim up to `limit` held notifications whose quiet hours ended by the batch's `now` (on
    /// PostgreSQL with `FOR UPDATE SKIP LOCKED`, so concurrent nodes never claim the same one), remove
    /// their rows, and answer [`WriteOutcome::Released`] with the notifications still stored, in id
    /// order.
    ReleaseQuiet {
        /// Most to release in this batch.
        limit: usize,
    },
}

/// A notification held back by its user's quiet hours.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Held {
    /// The notification.
    pub id: Uuid,
    /// Its user (whose quiet hours hold it).
    pub user_id: String,
    /// When the quiet hours end.
    pub release_at: Millis,
}

/// What one [`WriteRequest`] did, in the same position of the batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WriteOutcome {
    /// The notifications of an [`WriteRequest::Insert`] were stored.
    Inserted,
    /// The notification after [`WriteRequest::MarkRead`], or `None` if not in that inbox. Boxed: a
    /// batch holds one outcome per request, most of them small.
    MarkedRead(Option<Box<Notification>>),
    /// How many were unread before [`WriteRequest::MarkAllRead`].
    MarkedAllRead(u64),
    /// What [`WriteRequest::MarkSeen`] did.
    MarkedSeen(MarkedSeen),
    /// How many notifications [`WriteRequest::RecordDelivered`] set `delivered_at` on.
    RecordedDelivered(u64),
    /// Whether [`WriteRequest::Delete`] found the notification.
    Deleted(bool),
    /// [`WriteRequest::Insert`] or [`WriteRequest::Schedule`] with a key already used for the same
    /// request: nothing was written; this is what the first request committed.
    Replayed(Receipt),
    /// [`WriteRequest::Insert`] or [`WriteRequest::Schedule`] with a key already used for a different
    /// request: nothing was written.
    KeyReused,
    /// The notification of a [`WriteRequest::Schedule`] is pending.
    Scheduled,
    /// Whether [`WriteRequest::CancelScheduled`] found it pending.
    Cancelled(bool),
    /// What [`WriteRequest::FireDue`] stored, in id order.
    Fired(Vec<Arc<Notification>>),
    /// How many notifications [`WriteRequest::Purge`] deleted.
    Purged(u64),
    /// [`WriteRequest::SetPreferences`] was applied.
    PreferencesSet,
    /// [`WriteRequest::HoldQuiet`] was applied.
    Held,
    /// What [`WriteRequest::ReleaseQuiet`] claimed, in id order.
    Released(Vec<Arc<Notification>>),
}

impl From<KeyVerdict> for WriteOutcome {
    fn from(verdict: KeyVerdict) -> WriteOutcome {
        match verdict {
            KeyVerdict::Replayed(receipt) => WriteOutcome::Replayed(receipt),
            KeyVerdict::KeyReused => WriteOutcome::KeyReused,
        }
    }
}

#[cfg(test)]
impl WriteRequest {
    /// An insert without an idempotency key (tests).
    pub(crate) fn plain_insert(notifications: Vec<Arc<Notification>>) -> WriteRequest {
        WriteRequest::Insert {
            notifications,
            idempotency: None,
        }
    }
}

/// The clock of one batch, as the store thread hands it to a backend: the time every request of the
/// batch is applied at, what follows from it, and the generator that numbers what a fire stores.
pub(crate) struct BatchClock<'a> {
    /// Written as `read_at` and as the creation of idempotency records; what is due is due by it.
    pub now: Millis,
    /// An idempotency record created at or before this has expired (the scheduler's 24 hours).
    pub keys_expired_before: Millis,
    /// Numbers the notifications [`WriteRequest::FireDue`] stores.
    pub ids: &'a mut IdGenerator,
}

impl<'a> BatchClock<'a> {
    /// The clock of a batch applied at `now`, numbering with `ids`.
    pub(crate) fn at(now: Millis, ids: &'a mut IdGenerator) -> BatchClock<'a> {
        BatchClock {
            now,
            keys_expired_before: idempotency_expired_before(now),
            ids,
        }
    }
}

/// What applying a batch gives: one outcome per request, in order, or the error that rolled it back.
pub(crate) type Applied = Result<Vec<WriteOutcome>, BackendError>;

/// A user's counters row (migration 4), as history and the live `unread` event read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct InboxCounters {
    /// Notifications in the inbox.
    pub total: u64,
    /// Of those, unread.
    pub unread: u64,
    /// Changes of the row so far (see [`UnreadCount::version`]).
    pub version: u64,
}

/// The counters the store thread reads back after a commit, for the live `unread` event. Its own trait
/// (a supertrait of [`WriteBackend`]) so the batch code stays as it was.
pub(crate) trait CountersBackend {
    /// The unread count and version of each of `users` (zeros for one without a row), read on the
    /// write connection right after a commit: what that commit left, or a later commit's (another
    /// node's, on PostgreSQL), never an earlier one's.
    fn unread_counts(&mut self, users: &[&str]) -> Result<Vec<UnreadCount>, BackendError>;
}

/// The store thread's connection to a database.
pub(crate) trait WriteBackend: CountersBackend + Send + 'static {
    /// Applies every request in ONE transaction, in order (a later request sees an earlier one's
    /// effect), and commits. On success returns one outcome per request, in order; on any failure rolls
    /// everything back and returns the error: all-or-nothing for the whole batch. `clock` is the
    /// batch's time (scheduling, retention and idempotency go by it) and numbers what
    /// [`WriteRequest::FireDue`] stores.
    ///
    /// `requests` is mutable for one reason: a backend shared by several nodes may learn, once it
    /// holds its id clock, that another node committed ids above this batch's; it then numbers the
    /// batch's notifications again ([`number_above`]), and the store thread tells the listener and
    /// the callers the ids as stored.
    fn apply_batch(&mut self, requests: &mut [WriteRequest], clock: BatchClock<'_>) -> Applied;
}

/// Gives the notifications of every [`WriteRequest::Insert`] of `requests` new ids from `ids`, all
/// above `floor` (the last id any node committed, read under the id clock's lock), keeping their
/// order, and re-encodes the receipts of their `Idempotency-Key`s. Does nothing when the batch's
/// first id is above `floor` already (the usual case: this node committed last, or the others' ids
/// are older), since the batch's ids ascend. Returns whether it renumbered.
pub(crate) fn number_above(
    requests: &mut [WriteRequest],
    floor: Uuid,
    ids: &mut IdGenerator,
) -> bool {
    ids.skip_past(floor);
    let first = requests.iter().find_map(|r| match r {
        WriteRequest::Insert { notifications, .. } => notifications.first().map(|n| n.id),
        _ => None,
    });
    if first.is_none_or(|id| id > floor) {
        return false;
    }
    for request in requests.iter_mut() {
        let WriteRequest::Insert {
            notifications,
            idempotency,
        } = request
        else {
            continue;
        };
        for n in notifications.iter_mut() {
            let (id, created_at) = ids.next_id();
            *n = Arc::new(Notification {
                id,
                created_at,
                ..(**n).clone()
            });
        }
        if let Some(record) = idempotency {
            let (status, body) = Receipt::inserted(notifications).encode();
            record.status = status;
            record.body = body;
        }
    }
    true
}

/// The greatest id of a notification `requests` and `outcomes` stored (inserts and fired
/// schedules), to record in the id clock; `None` when the batch stored none.
pub(crate) fn last_stored_id(requests: &[WriteRequest], outcomes: &[WriteOutcome]) -> Option<Uuid> {
    let inserted = requests
        .iter()
        .zip(outcomes)
        .flat_map(|(r, o)| match (r, o) {
            (WriteRequest::Insert { notifications, .. }, WriteOutcome::Inserted) => {
                notifications.as_slice()
            }
            _ => &[],
        });
    let fired = outcomes.iter().flat_map(|o| match o {
        WriteOutcome::Fired(fired) => fired.as_slice(),
        _ => &[],
    });
    inserted.chain(fired).map(|n| n.id).max()
}

/// A reader thread's connection to a database. Each method reads from one consistent snapshot.
pub(crate) trait ReadBackend: Send + 'static {
    /// A page of a user's history and the inbox's counts (see [`super::Store::history`]).
    fn history(&mut self, query: &HistoryQuery) -> Result<HistoryPage, BackendError>;
    /// What a resuming connection missed (see [`super::Store::replay`]).
    fn replay(&mut self, query: &ReplayQuery) -> Result<Vec<Notification>, BackendError>;
    /// A scheduled notification by its schedule id, pending or fired (see [`super::Store::scheduled`]):
    /// the pending row (its `schedule_id` is `None`), or else the notification it fired as (its
    /// `schedule_id` is `id`), both read in one statement so a schedule firing meanwhile is found
    /// one way or the other.
    fn scheduled(&mut self, id: Uuid) -> Result<Option<Notification>, BackendError>;
    /// The user's counters (zeros for a user never written to), for the `unread` event at connect.
    fn counters(&mut self, user: &str) -> Result<InboxCounters, BackendError>;
    /// A trivial query, to prove the connection works.
    fn ping(&mut self) -> Result<(), BackendError>;
    /// How many scheduled notifications are pending (for `/metrics`).
    fn scheduled_pending(&mut self) -> Result<u64, BackendError>;
    /// A user's stored preferences (see [`super::Store::preferences`]).
    fn preferences(&mut self, user_id: &str) -> Result<Option<StoredPreferences>, BackendError>;
    /// Every user's stored preferences, to fill a node's registry at start-up.
    fn all_preferences(&mut self) -> Result<Vec<(String, StoredPreferences)>, BackendError>;
}

/// A user's preferences as stored: their JSON (`Preferences::to_stored`) and when they were set.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPreferences {
    /// The JSON object.
    pub json: String,
    /// When they were set (milliseconds since the epoch).
    pub updated_at: Millis,
}

/// A due scheduled notification as it is stored when it fires: a new id (commit order) and creation
/// time, the same content and `scheduled_at`, and the schedule's id in `schedule_id` (what
/// `GET /scheduled/:id` finds it by once fired).
fn fired_notification(pending: Notification, ids: &mut IdGenerator) -> Notification {
    let (id, created_at) = ids.next_id();
    Notification {
        id,
        created_at,
        schedule_id: Some(pending.id),
        ..pending
    }
}

/// The claimed due notifications `due` (in any order: `DELETE … RETURNING` gives none) as they fire:
/// oldest `scheduled_at` first (ties by schedule id), each with a new id from `ids`, so the order of
/// their ids is their due order.
pub(crate) fn fire_in_due_order(
    mut due: Vec<Notification>,
    ids: &mut IdGenerator,
) -> Vec<Arc<Notification>> {
    due.sort_by_key(|n| (n.scheduled_at, n.id));
    due.into_iter()
        .map(|n| Arc::new(fired_notification(n, ids)))
        .collect()
}

/// The `before` of a history page's range scan: the query's, or for a first page an id above every
/// stored id, so the page query is one statement with a plain range condition an index can use.
pub(crate) fn history_before(query: &HistoryQuery) -> Uuid {
    query.before.unwrap_or(Uuid::max())
}

/// How many rows a history page query fetches: one more than asked, because whether that one exists
/// says whether there is a next page.
pub(crate) fn history_fetch(query: &HistoryQuery) -> i64 {
    sql_int(query.limit).saturating_add(1)
}

/// A history page from the (up to [`history_fetch`]) newest-first rows a backend read and the inbox's
/// counts: the page holds `query.limit` of them, and `next_before` is set only when a row beyond it
/// exists, so the last page says so without an extra query.
pub(crate) fn history_page(
    query: &HistoryQuery,
    mut notifications: Vec<Notification>,
    total: u64,
    unread: u64,
) -> HistoryPage {
    let more = notifications.len() > query.limit;
    notifications.truncate(query.limit);
    let next_before = if more {
        notifications.last().map(|n| n.id)
    } else {
        None
    };
    HistoryPage {
        notifications,
        total,
        unread,
        next_before,
    }
}

/// Which filters a history page asks for, as an index into a backend's table of eight statements:
/// bit 0 `unread`, bit 1 `undelivered`, bit 2 `unseen`.
pub(crate) fn history_filters(query: &HistoryQuery) -> usize {
    usize::from(query.unread_only)
        | usize::from(query.undelivered_only) << 1
        | usize::from(query.unseen_only) << 2
}

/// The verdict of a [`WriteRequest::MarkSeen`] once a backend knows which of `ids` are in the
/// user's inbox (`in_inbox`): the first id that is not, or `None` when all are and the update may run.
pub(crate) fn first_not_in_inbox(
    ids: &[Uuid],
    in_inbox: &std::collections::HashSet<Uuid>,
) -> Option<MarkedSeen> {
    ids.iter()
        .find(|id| !in_inbox.contains(id))
        .map(|id| MarkedSeen::NotInInbox(*id))
}

/// A row count or limit as an SQL integer (both databases' are i64); a `usize` beyond `i64` means "no
/// limit" anyway.
pub(crate) fn sql_int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One numbered schema change, applied once.
pub(crate) struct Migration {
    /// Recorded in `schema_migrations.version`; applied in ascending order.
    pub version: i64,
    /// The SQL, possibly several statements.
    pub sql: &'static str,
}

/// Every migration of the backend whose SQL files are in `migrations/<dialect>/`, in order, embedded
/// in the binary so a deployment is one file. Both backends have the same numbered steps (a schema
/// change is made to both), so the list is written once and only the dialect differs.
macro_rules! migrations {
    ($dialect:literal) => {
        &[
            $crate::store::backend::Migration {
                version: 1,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0001_init.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 2,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0002_scheduling_idempotency.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 3,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0003_schedule_id.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 4,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0004_user_counters.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 5,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0005_receipts.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 6,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0006_preferences.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 7,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0007_id_clock.sql"
                )),
            },
            $crate::store::backend::Migration {
                version: 8,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/migrations/",
                    $dialect,
                    "/0008_urgent.sql"
                )),
            },
        ]
    };
}
pub(crate) use migrations;

/// After migrating: warns when the database records a migration newer than any of `known`. A newer
/// binary ran here before (a rollback); its changes are additive by convention, so the store carries
/// on, but says so: it explains any surprise.
pub(crate) fn warn_if_schema_is_newer(newest: Option<i64>, known: &[Migration]) {
    let known = known.last().map_or(0, |m| m.version);
    if newest.is_some_and(|v| v > known) {
        tracing::warn!(newest, known, "database schema is newer than this binary");
    }
}

/// The smallest UUIDv7 of millisecond `ms`: every id created before `ms` sorts below it.
pub(crate) fn first_id_of(ms: Millis) -> [u8; 16] {
    let ms = u128::from(ms.max(0) as u64) & ((1 << 48) - 1);
    (ms << 80).to_be_bytes()
}

#[cfg(test)]
pub(crate) mod tests;

/// One line on a schema's version against the migrations this binary carries (shared by both
/// backends' probes).
pub(crate) fn describe_version(
    store: &str,
    version: Option<i64>,
    migrations: &[Migration],
) -> String {
    let known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    match version {
        None => format!("{store} is reachable and not migrated yet (start-up or `migrate` will migrate it)"),
        Some(v) if v < known => format!(
            "{store} is at schema version {v}; this binary would migrate it to {known}"
        ),
        Some(v) if v > known => format!(
            "{store} is at schema version {v}, newer than this binary's {known} (a newer node migrated it)"
        ),
        Some(v) => format!("{store} is reachable, schema version {v} (current)"),
    }
}
