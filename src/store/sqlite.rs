//! The SQLite backend: the embedded default (`DATABASE_URL=sqlite://path`).
//!
//! One file, WAL mode, one write connection (the store thread's) and one read-only connection per
//! reader thread. WAL is what makes that split work: the writer appends to the log while readers keep
//! reading the last committed snapshot, so neither waits for the other, and a commit is a sequential
//! append rather than a rewrite of pages in place.
//!
//! Writes are a drained batch in one `BEGIN IMMEDIATE` transaction, one cached prepared statement per
//! kind of row, executed row by row. SQLite has no network round trip, so a per-row `execute` of a
//! prepared statement costs a few microseconds and the commit is the most expensive single step. Each
//! row's `INSERT` still pays a statement journal (the counters' trigger makes it a statement that
//! changes two rows), 12 % of the writer under batched ingest (docs/benchmarks.md, "Batched ingest");
//! multi-row `INSERT`s would pay it once a statement, at the price of harder per-row error handling. `IMMEDIATE` takes the write
//! lock up front, so a batch never fails half-way on a lock upgrade; a second process holding the lock
//! (an admin's `sqlite3` shell) is waited for up to [`BUSY_TIMEOUT`], then the batch fails as a whole.
//!
//! Checkpoints (copying the WAL back into the database file, with an fsync of each) run on a small
//! checkpointer thread of their own, on its own connection, every [`CHECKPOINT_INTERVAL`], instead of
//! SQLite's default of the committing connection doing it every 1000 pages. On a disk with slow fsync
//! that default stalls the store thread for the length of two fsyncs every few MB written; measured
//! here, it cut insert throughput by more than half. A `PASSIVE` checkpoint runs alongside the writer
//! and the readers without blocking either. The writer keeps a far higher auto-checkpoint threshold
//! ([`WRITER_AUTOCHECKPOINT_PAGES`]) only as a safety net, so the WAL stays bounded even if the
//! checkpointer cannot keep up.
//!
//! Durability is the operator's choice ([`SqliteSynchronous`], `SQLITE_SYNCHRONOUS`). The default,
//! `synchronous=NORMAL` in WAL mode, means a commit appends to the WAL without an fsync; the WAL is
//! fsynced by each checkpoint. A committed transaction survives a crash or kill of the process (the OS
//! has the write), which is the failure a 2xx must survive in practice. After a power loss or kernel
//! crash, the transactions committed since the last checkpoint, so about the last
//! [`CHECKPOINT_INTERVAL`] of writes, may be rolled back; the database itself stays consistent, never
//! corrupt. `FULL` fsyncs the WAL at every commit (once per batch, thanks to group commit), closing
//! that window at the price of one fsync of latency on every batch.
//!
//! Data read back is never trusted to be well-formed: a malformed row (a wrong-sized id, a `channels`
//! that is not a JSON array of strings) is an error for that read, never a panic.

use std::collections::HashSet;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::types::Type;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
};
use uuid::Uuid;

use std::sync::Arc;

use super::backend::{
    fire_in_due_order, first_id_of, first_not_in_inbox, history_before, history_fetch,
    history_filters, history_page, migrations, sql_int, warn_if_schema_is_newer, Applied,
    BackendError, BatchClock, CountersBackend, Held, InboxCounters, Migration, ReadBackend,
    StoredPreferences, WriteBackend, WriteOutcome, WriteRequest,
};
use super::idempotency::{verdict, FoundRecord, IdempotencyRecord};
use super::{HistoryPage, HistoryQuery, MarkedSeen, OpenError, ReplayQuery, UnreadCount};
use crate::model::{now_millis, Millis, Notification};

/// How long a statement waits for a lock held by another connection (another process, or briefly a
/// checkpoint) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache per connection, in KiB (SQLite's default is 2 MiB). A user's recent history and the
/// right edge of the indexes stay hot.
const CACHE_KIB: i64 = 16 * 1024;
/// Prepared statements kept per connection; the backend uses about ten.
const STATEMENT_CACHE_CAPACITY: usize = 32;
/// After a checkpoint, truncate the WAL file to at most this many bytes, so one burst does not leave a
/// huge log file behind forever.
const JOURNAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;
/// How often the checkpointer copies the WAL into the database file (and fsyncs both). Also the bound
/// on what a power loss can take back under `synchronous=NORMAL` (see the module doc).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// WAL length (in 4 KiB frames: 32 MiB) past which the checkpointer rewinds the WAL; see
/// [`run_checkpointer`].
const CHECKPOINT_RESTART_FRAMES: i64 = 8_192;
/// How long a rewinding checkpoint waits for the writer's transaction in progress.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// The writer's own auto-checkpoint threshold, in pages (4 KiB each: 256 MiB of WAL). Normally never
/// reached because the checkpointer runs first; it bounds the WAL if the checkpointer falls behind.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 65_536;
/// The checkpointer thread's name.
const CHECKPOINTER_THREAD_NAME: &str = "store-checkpoint";

/// The `synchronous` setting of the writer's connection (`SQLITE_SYNCHRONOUS`): what a commit waits
/// for before the 2xx. Only these two: `OFF` would let a process crash lose commits too, and `EXTRA`
/// adds nothing in WAL mode that a notification needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SqliteSynchronous {
    /// No fsync at commit; checkpoints fsync. Survives a process crash; a power loss or kernel crash
    /// may take back about the last [`CHECKPOINT_INTERVAL`] of commits.
    #[default]
    Normal,
    /// The WAL is fsynced at every commit (one per group-commit batch): a 2xx survives a power loss too.
    Full,
}

impl SqliteSynchronous {
    /// The name used in `SQLITE_SYNCHRONOUS`, in the logs, and by `PRAGMA synchronous`.
    pub fn as_str(self) -> &'static str {
        match self {
            SqliteSynchronous::Normal => "normal",
            SqliteSynchronous::Full => "full",
        }
    }

    /// The value `PRAGMA synchronous` reads back for this setting.
    fn pragma_number(self) -> i64 {
        match self {
            SqliteSynchronous::Normal => 1,
            SqliteSynchronous::Full => 2,
        }
    }
}

impl std::str::FromStr for SqliteSynchronous {
    type Err = String;

    /// `normal` or `full`, in any case.
    fn from_str(s: &str) -> Result<SqliteSynchronous, String> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(SqliteSynchronous::Normal),
            "full" => Ok(SqliteSynchronous::Full),
            _ => Err(format!(
                "{s:?} is not a synchronous mode: use normal or full"
            )),
        }
    }
}

impl std::fmt::Display for SqliteSynchronous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every migration, in order (see [`migrations!`]).
pub(crate) const MIGRATIONS: &[Migration] = migrations!("sqlite");

/// The bookkeeping table of the migration runner.
const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER NOT NULL PRIMARY KEY,
    applied_at INTEGER NOT NULL
)";

/// The columns of a notification row, in the order [`notification_from_row`] reads them.
macro_rules! columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data, created_at, read_at, \
         delivered_at, seen_at, scheduled_at, schedule_id, urgent"
    };
}

/// One notification row; `created_at` comes from the id, assigned by the store thread.
const INSERT_NOTIFICATION: &str = concat!(
    "INSERT INTO notifications (",
    columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
);
/// `OR IGNORE`: a producer may list the same channel twice; it is one channel.
const INSERT_CHANNEL: &str =
    "INSERT OR IGNORE INTO notification_channels (channel, id) VALUES (?1, ?2)";
/// `COALESCE` keeps the first `read_at`; `RETURNING` gives the row back without a second lookup.
const MARK_READ: &str = concat!(
    "UPDATE notifications SET read_at = COALESCE(read_at, ?3) WHERE id = ?1 AND user_id = ?2 RETURNING ",
    columns!()
);
/// Walks only the unread entries of the user.
const MARK_ALL_READ: &str =
    "UPDATE notifications INDEXED BY notifications_unread SET read_at = ?2 \
     WHERE user_id = ?1 AND read_at IS NULL";
/// The trigger of migration 1 removes the notification's channel rows.
const DELETE: &str = "DELETE FROM notifications WHERE id = ?1 AND user_id = ?2";
/// The ids of a seen request (`?2`, a JSON array of 32-digit hex ids) that are in the user's inbox.
const SEEN_IN_INBOX: &str = "SELECT id FROM notifications \
     WHERE user_id = ?1 AND id IN (SELECT unhex(value) FROM json_each(?2))";
/// Marks them seen where not seen yet, so the first `seen_at` stays.
const MARK_SEEN: &str = "UPDATE notifications SET seen_at = ?3 \
     WHERE user_id = ?1 AND seen_at IS NULL AND id IN (SELECT unhex(value) FROM json_each(?2))";
/// A whole batch of delivery receipts in one statement: `?1` is a JSON array of `[hex id, ms]`
/// pairs, each id once. Only where `delivered_at` is unset, so the first delivery's time stays.
const RECORD_DELIVERED: &str = "UPDATE notifications SET delivered_at = receipts.at \
     FROM (SELECT unhex(value ->> 0) AS id, value ->> 1 AS at FROM json_each(?1)) AS receipts \
     WHERE notifications.id = receipts.id AND notifications.delivered_at IS NULL";

/// An unexpired idempotency record.
const IDEMPOTENCY_LOOKUP: &str =
    "SELECT fingerprint, status, body FROM idempotency_keys WHERE key = ?1 AND created_at > ?2";
/// `OR REPLACE`: an expired record with the same key is superseded.
const IDEMPOTENCY_RECORD: &str = "INSERT OR REPLACE INTO idempotency_keys \
     (key, fingerprint, status, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)";
/// Expiry of idempotency records.
const IDEMPOTENCY_EXPIRE: &str = "DELETE FROM idempotency_keys WHERE created_at <= ?1";

/// The columns of a scheduled row, in the order of [`columns!`] (the fields a pending notification
/// cannot have yet are NULL), so [`notification_from_row`] decodes both tables.
macro_rules! scheduled_columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data, created_at, NULL, NULL, NULL, \
         scheduled_at, NULL, urgent"
    };
}
/// A pending scheduled notification.
const SCHEDULE: &str = "INSERT INTO scheduled_notifications \
     (id, user_id, type, title, message, channels, broadcast, data, created_at, scheduled_at, \
     urgent) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
/// Cancels one.
const CANCEL_SCHEDULED: &str = "DELETE FROM scheduled_notifications WHERE id = ?1";
/// Claims the due ones (the store thread is the only writer, so no other claim can race this one).
const CLAIM_DUE: &str = concat!(
    "DELETE FROM scheduled_notifications WHERE id IN (SELECT id FROM scheduled_notifications ",
    "WHERE scheduled_at <= ?1 ORDER BY scheduled_at, id LIMIT ?2) RETURNING ",
    scheduled_columns!()
);
/// A scheduled notification by its schedule id: the pending row, or else the notification it fired
/// as (found through the partial index `notifications_schedule`). One statement, so one snapshot: a
/// schedule that fires while this runs is found in one table or the other.
const SCHEDULED: &str = concat!(
    "SELECT ",
    scheduled_columns!(),
    " FROM scheduled_notifications WHERE id = ?1 UNION ALL SELECT ",
    columns!(),
    " FROM notifications WHERE schedule_id = ?1 LIMIT 1"
);
/// Retention: ids are UUIDv7, so "created before t" is "id below the smallest id of t", a range scan
/// of the primary key from its old end. The trigger of migration 1 removes the channel rows.
const PURGE: &str = "DELETE FROM notifications WHERE id IN \
     (SELECT id FROM notifications WHERE id < ?1 ORDER BY id LIMIT ?2)";

/// A history page: a backwards range scan of `notifications_user` from `before`.
const HISTORY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM notifications WHERE user_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
);
/// The unread queries name their index: without statistics the planner rates the wider
/// `notifications_user` as good, though it holds every read row too. `INDEXED BY` is also a tripwire:
/// if a schema change made the index unusable, preparing fails loudly instead of silently scanning.
/// `read_at IS NULL` must be spelled out for the partial index to apply.
const HISTORY_UNREAD: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM notifications INDEXED BY notifications_unread \
     WHERE user_id = ?1 AND id < ?2 AND read_at IS NULL ORDER BY id DESC LIMIT ?3"
);
/// A history page with the receipt filters (`undelivered`, `unseen`, with or without `unread`).
/// Each names the partial index of the receipt it filters on, for the reason given at
/// [`HISTORY_UNREAD`]; with both receipt filters, the undelivered one (most notifications reach a
/// device, so it is the shortest).
macro_rules! history_filtered {
    ($index:literal, $filter:literal) => {
        concat!(
            "SELECT ",
            columns!(),
            " FROM notifications INDEXED BY ",
            $index,
            " WHERE user_id = ?1 AND id < ?2",
            $filter,
            " ORDER BY id DESC LIMIT ?3"
        )
    };
}
/// Every history page statement, indexed by [`history_filters`] (bit 0 unread, 1 undelivered,
/// 2 unseen).
const HISTORY_BY_FILTERS: [&str; 8] = [
    HISTORY,
    HISTORY_UNREAD,
    history_filtered!("notifications_undelivered", " AND delivered_at IS NULL"),
    history_filtered!(
        "notifications_undelivered",
        " AND delivered_at IS NULL AND read_at IS NULL"
    ),
    history_filtered!("notifications_unseen", " AND seen_at IS NULL"),
    history_filtered!(
        "notifications_unseen",
        " AND seen_at IS NULL AND read_at IS NULL"
    ),
    history_filtered!(
        "notifications_undelivered",
        " AND delivered_at IS NULL AND seen_at IS NULL"
    ),
    history_filtered!(
        "notifications_undelivered",
        " AND delivered_at IS NULL AND seen_at IS NULL AND read_at IS NULL"
    ),
];
/// The inbox's counts, kept by the triggers of migration 4 (no count over the index per page); no
/// row: an inbox never written to.
const COUNTERS: &str = "SELECT total, unread, version FROM user_counters WHERE user_id = ?1";
/// Three indexed range scans (the user's inbox, broadcasts, each channel), each cut to the limit before
/// they are combined, so a replay costs O(limit) rows whatever the history's size; `id IN (...)`
/// removes the duplicates of a notification that matches several ways. Channels come as one JSON array
/// parameter so one cached statement serves any number of channels.
const REPLAY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM notifications WHERE id IN (
        SELECT id FROM (SELECT id FROM notifications
                        WHERE user_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3)
        UNION ALL
        SELECT id FROM (SELECT id FROM notifications
                        WHERE broadcast = 1 AND id > ?2 ORDER BY id LIMIT ?3)
        UNION ALL
        SELECT id FROM (SELECT id FROM notification_channels
                        WHERE channel IN (SELECT value FROM json_each(?4)) AND id > ?2
                        ORDER BY id LIMIT ?3)
    ) ORDER BY id LIMIT ?3"
);
/// Touches the database file (not just the connection), so a vanished or unreadable file shows.
const PING: &str = "SELECT COUNT(*) FROM schema_migrations";
/// Pending scheduled notifications: a fired one leaves the table.
const SCHEDULED_PENDING: &str = "SELECT COUNT(*) FROM scheduled_notifications";

/// Every SQLite failure becomes a backend error (a 503 for the caller), with SQLite's own message.
fn sqlite_error(e: rusqlite::Error) -> BackendError {
    BackendError::Sqlite(e)
}

/// Decodes one row selected with [`columns!`].
fn notification_from_row(row: &Row<'_>) -> rusqlite::Result<Notification> {
    let id: [u8; 16] = row.get(0)?;
    let channels: String = row.get(5)?;
    let channels = serde_json::from_str::<Vec<String>>(&channels)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(5, Type::Text, Box::new(e)))?;
    Ok(Notification {
        id: Uuid::from_bytes(id),
        user_id: row.get(1)?,
        kind: row.get(2)?,
        title: row.get(3)?,
        message: row.get(4)?,
        channels,
        broadcast: row.get(6)?,
        data: row.get(7)?,
        created_at: row.get(8)?,
        read_at: row.get(9)?,
        delivered_at: row.get(10)?,
        seen_at: row.get(11)?,
        scheduled_at: row.get(12)?,
        schedule_id: row.get::<_, Option<[u8; 16]>>(13)?.map(Uuid::from_bytes),
        urgent: row.get(14)?,
    })
}

/// Bytes SQLite's allocator holds now, over every connection of the process: page caches (up to
/// [`CACHE_KIB`] each), prepared statements, schema. Part of the resident memory that is neither
/// connections nor queues; `/metrics` shows it so a growing RSS can be told apart from a full cache.
pub fn allocator_bytes() -> i64 {
    let (mut current, mut highwater) = (0i64, 0i64);
    // SAFETY: sqlite3_status64 only writes the two integers we own; SQLITE_STATUS_MEMORY_USED is
    // a valid operation and the library is initialised by its first use (0 before that).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_status64(
            rusqlite::ffi::SQLITE_STATUS_MEMORY_USED,
            &mut current,
            &mut highwater,
            0,
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        current
    } else {
        0
    }
}

/// Settings every connection gets.
fn configure_common(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    // Replay's combining and sorting use small temporary b-trees; keep them off the disk.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}

/// Applies the migrations not yet recorded in `schema_migrations`, each in its own `IMMEDIATE`
/// transaction together with its record: a crash leaves it applied and recorded, or neither, and two
/// processes starting at once apply it once. Returns how many were applied (0 on every later start).
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<usize> {
    conn.execute_batch(CREATE_MIGRATIONS_TABLE)?;
    let mut applied = 0;
    for migration in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [migration.version],
            |row| row.get(0),
        )?;
        if done {
            continue; // dropping `tx` ends it; it changed nothing
        }
        tx.execute_batch(migration.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![migration.version, now_millis()],
        )?;
        tx.commit()?;
        applied += 1;
        tracing::info!(version = migration.version, "applied sqlite migration");
    }
    let newest: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })?;
    warn_if_schema_is_newer(newest, MIGRATIONS);
    Ok(applied)
}

/// Whether the database at `path` can be used, without creating or changing anything: an existing
/// file is opened read-only and its schema version read, and it and its folder must be writable
/// (WAL mode writes `-wal` and `-shm` files beside it); a missing file needs its nearest existing
/// folder to be writable, since start-up creates the missing folders and the file. Returns what was
/// found, as one line for `check-config`.
pub(crate) fn probe(path: &Path) -> Result<String, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(format!("{shown} exists but is not a file")),
        Ok(_) => {
            writable(path).map_err(|e| format!("{shown} is not writable: {e}"))?;
            let dir = folder_of(path);
            writable(dir).map_err(|e| {
                format!(
                    "the folder {} of {shown} is not writable (WAL mode writes files beside the database): {e}",
                    dir.display()
                )
            })?;
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(path, flags)
                .map_err(|e| format!("cannot open {shown}: {e}"))?;
            let has_table: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')",
                    [],
                    |row| row.get(0),
                )
                .map_err(|e| format!("cannot read {shown}: {e}"))?;
            if !has_table {
                return Ok(format!(
                    "{shown} is writable and not migrated yet (start-up or `migrate` will migrate it)"
                ));
            }
            let version: Option<i64> = conn
                .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
                    row.get(0)
                })
                .map_err(|e| format!("cannot read {shown}: {e}"))?;
            Ok(super::backend::describe_version(
                &shown.to_string(),
                version,
                MIGRATIONS,
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The nearest folder that exists is where start-up's create_dir_all begins.
            let mut dir = folder_of(path);
            while !dir.exists() {
                match dir.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
                    _ => {
                        dir = Path::new(".");
                        break;
                    }
                }
            }
            if !dir.is_dir() {
                return Err(format!(
                    "{shown} cannot be created: {} is not a folder",
                    dir.display()
                ));
            }
            writable(dir).map_err(|e| {
                format!(
                    "{shown} cannot be created: {} is not writable: {e}",
                    dir.display()
                )
            })?;
            Ok(format!(
                "{shown} does not exist yet; {} is writable, so start-up or `migrate` will create it",
                dir.display()
            ))
        }
        Err(e) => Err(format!("cannot look at {shown}: {e}")),
    }
}

/// The folder a database file lives in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether this process may write `path` (a file, or a folder to create files in), as the kernel
/// decides it (owner, mode, a read-only mount), asked without writing anything.
fn writable(path: &Path) -> Result<(), std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path")
    })?;
    // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The store thread's connection.
pub(crate) struct SqliteWriter {
    /// The only read-write connection that writes rows.
    conn: Connection,
    /// Its `synchronous` setting, as read back after setting it.
    synchronous: SqliteSynchronous,
    /// Dropped with the writer, when the store thread exits: that is what stops the checkpointer.
    _checkpointer: Option<Sender<()>>,
    /// How many migrations this open applied (0 on every later start), for `migrate` to report.
    migrations_applied: usize,
}

impl SqliteWriter {
    /// Creates the file's folder if missing, opens (or creates) the file, switches it to WAL with
    /// `synchronous` and applies the migrations.
    pub(crate) fn open(
        path: &Path,
        synchronous: SqliteSynchronous,
    ) -> Result<SqliteWriter, OpenError> {
        let context = |cause: rusqlite::Error| OpenError::Sqlite {
            context: format!("cannot open sqlite database {}", path.display()),
            cause,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| OpenError::Io {
                context: format!("cannot create the folder {} of the database", dir.display()),
                cause,
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(context)?;
        configure_common(&conn).map_err(context)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(context)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::Refused(format!(
                "cannot open sqlite database {}: WAL mode refused (journal_mode is {mode})",
                path.display()
            )));
        }
        // See the module doc for what each setting means on power loss. Read back, since SQLite
        // ignores a setting it does not know instead of failing; the log line of start-up shows the
        // value read here (`SqliteWriter::synchronous`), not the one asked for.
        conn.pragma_update(None, "synchronous", synchronous.as_str())
            .map_err(context)?;
        let effective: i64 = conn
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .map_err(context)?;
        if effective != synchronous.pragma_number() {
            return Err(OpenError::Refused(format!(
                "cannot open sqlite database {}: synchronous={synchronous} refused (it reads back {effective})",
                path.display()
            )));
        }
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)
            .map_err(context)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(context)?;
        let migrations_applied = migrate(&mut conn).map_err(|cause| OpenError::Sqlite {
            context: format!("cannot migrate sqlite database {}", path.display()),
            cause,
        })?;
        Ok(SqliteWriter {
            conn,
            synchronous,
            _checkpointer: None,
            migrations_applied,
        })
    }

    /// How many migrations [`SqliteWriter::open`] applied.
    pub(crate) fn migrations_applied(&self) -> usize {
        self.migrations_applied
    }

    /// The `synchronous` setting in force on the write connection (read back from SQLite at open).
    pub(crate) fn synchronous(&self) -> SqliteSynchronous {
        self.synchronous
    }

    /// Starts the checkpointer thread on its own connection to `path`. It runs until this writer is
    /// dropped (the store thread has committed its last batch and exited).
    pub(crate) fn spawn_checkpointer(&mut self, path: &Path) -> Result<JoinHandle<()>, OpenError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|cause| OpenError::Sqlite {
            context: format!(
                "cannot open sqlite database {} to checkpoint",
                path.display()
            ),
            cause,
        })?;
        // A RESTART checkpoint waits this long for the writer's current transaction to end.
        conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)
            .map_err(|cause| OpenError::Sqlite {
                context: format!(
                    "cannot configure sqlite database {} to checkpoint",
                    path.display()
                ),
                cause,
            })?;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let handle = std::thread::Builder::new()
            .name(CHECKPOINTER_THREAD_NAME.to_owned())
            .spawn(move || {
                run_checkpointer(
                    &conn,
                    &stopped,
                    CHECKPOINT_INTERVAL,
                    CHECKPOINT_RESTART_FRAMES,
                )
            })
            .map_err(|cause| OpenError::Io {
                context: "cannot start the checkpointer thread".to_owned(),
                cause,
            })?;
        self._checkpointer = Some(stop);
        Ok(handle)
    }
}

/// Checkpoints every [`CHECKPOINT_INTERVAL`] until the writer is gone. The last connection to close
/// (whichever it is) then checkpoints what is left and removes the WAL, as SQLite always does.
///
/// A `PASSIVE` checkpoint never makes the WAL shorter by itself: SQLite rewinds the WAL only when a
/// write transaction starts and finds every frame already copied back. Under sustained writes the
/// writer has always appended more since the checkpoint began, so the WAL would grow until the
/// writer's safety-net auto-checkpoint ran inside a commit, stalling every request of that batch for
/// a copy and two fsyncs of hundreds of MiB (measured: p99 of 0.5 to 0.7 s). So once the WAL passes
/// `restart_frames`, right after a passive round has copied nearly everything, the checkpointer runs
/// one `RESTART` checkpoint: it holds the writer off only while it copies the few frames written
/// since, then the next transaction rewinds the WAL.
fn run_checkpointer(
    conn: &Connection,
    stopped: &Receiver<()>,
    interval: Duration,
    restart_frames: i64,
) {
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
        match checkpoint(conn, "PASSIVE") {
            Ok((wal_frames, checkpointed)) => {
                tracing::trace!(wal_frames, checkpointed, "sqlite checkpoint");
                if wal_frames >= restart_frames {
                    match checkpoint(conn, "RESTART") {
                        Ok((frames, copied)) => {
                            tracing::debug!(frames, copied, "sqlite checkpoint rewound the WAL")
                        }
                        Err(e) => tracing::warn!(error = %e, "sqlite restart checkpoint failed"),
                    }
                }
            }
            // Transient (e.g. the disk is full); the next round retries, and the writer's safety net
            // bounds the WAL meanwhile.
            Err(e) => tracing::warn!(error = %e, "sqlite checkpoint failed"),
        }
    }
}

/// Runs one `PRAGMA wal_checkpoint(<mode>)`: (frames in the WAL, frames copied to the database).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    })
}

/// The channel list as stored (a JSON array).
fn channels_json(channels: &[String]) -> rusqlite::Result<String> {
    json_text(&channels)
}

/// Inserts notifications and their channel index rows.
fn insert_notifications(
    tx: &Transaction<'_>,
    stored: &[Arc<Notification>],
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_NOTIFICATION)?;
    let mut insert_channel = tx.prepare_cached(INSERT_CHANNEL)?;
    for n in stored {
        insert.execute(params![
            n.id.as_bytes(),
            n.user_id,
            n.kind,
            n.title,
            n.message,
            channels_json(&n.channels)?,
            n.broadcast,
            n.data,
            n.created_at,
            n.read_at,
            n.delivered_at,
            n.seen_at,
            n.scheduled_at,
            n.schedule_id.as_ref().map(Uuid::as_bytes),
            n.urgent,
        ])?;
        for channel in &n.channels {
            insert_channel.execute(params![channel, n.id.as_bytes()])?;
        }
    }
    Ok(())
}

/// Looks up an idempotency key in this transaction: `Some(verdict)` when the key was already used
/// (replay the first answer, or refuse a different request); `None` when the write goes ahead, in which
/// case the record is stored with it.
fn claim_key(
    tx: &Transaction<'_>,
    record: Option<&IdempotencyRecord>,
    clock: &BatchClock<'_>,
) -> rusqlite::Result<Option<WriteOutcome>> {
    let Some(record) = record else {
        return Ok(None);
    };
    let found = tx
        .prepare_cached(IDEMPOTENCY_LOOKUP)?
        .query_row(params![record.key, clock.keys_expired_before], |row| {
            Ok(FoundRecord {
                fingerprint: row.get(0)?,
                status: row.get(1)?,
                body: row.get(2)?,
            })
        })
        .optional()?;
    match found {
        Some(found) => verdict(record, found)
            .map(|v| Some(v.into()))
            .map_err(|why| rusqlite::Error::FromSqlConversionFailure(1, Type::Integer, why.into())),
        None => {
            tx.prepare_cached(IDEMPOTENCY_RECORD)?.execute(params![
                record.key,
                record.fingerprint.as_slice(),
                record.status,
                record.body,
                clock.now,
            ])?;
            Ok(None)
        }
    }
}

/// A value as a JSON text parameter (lists of ids and receipts, which `json_each` unpacks).
fn json_text(value: &impl serde::Serialize) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// [`WriteRequest::MarkSeen`]: all of `ids` must be in the user's inbox, else nothing changes.
fn mark_seen(
    tx: &Transaction<'_>,
    user_id: &str,
    ids: &[Uuid],
    now: Millis,
) -> rusqlite::Result<WriteOutcome> {
    let hex: Vec<String> = ids.iter().map(|id| id.simple().to_string()).collect();
    let hex = json_text(&hex)?;
    let in_inbox = tx
        .prepare_cached(SEEN_IN_INBOX)?
        .query_map(params![user_id, hex], |row| {
            Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, Type::Blob, Box::new(e)))
        })?
        .collect::<rusqlite::Result<HashSet<Uuid>>>()?;
    if let Some(missing) = first_not_in_inbox(ids, &in_inbox) {
        return Ok(WriteOutcome::MarkedSeen(missing));
    }
    let changed = tx
        .prepare_cached(MARK_SEEN)?
        .execute(params![user_id, hex, now])?;
    Ok(WriteOutcome::MarkedSeen(MarkedSeen::Updated(
        changed as u64,
    )))
}

/// Applies one request inside the batch's transaction.
fn apply_one(
    tx: &Transaction<'_>,
    request: &WriteRequest,
    clock: &mut BatchClock<'_>,
) -> rusqlite::Result<WriteOutcome> {
    let now = clock.now;
    match request {
        WriteRequest::Insert {
            notifications,
            idempotency,
        } => {
            if let Some(verdict) = claim_key(tx, idempotency.as_ref(), clock)? {
                return Ok(verdict);
            }
            insert_notifications(tx, notifications)?;
            Ok(WriteOutcome::Inserted)
        }
        WriteRequest::Schedule {
            notification: n,
            idempotency,
        } => {
            if let Some(verdict) = claim_key(tx, idempotency.as_ref(), clock)? {
                return Ok(verdict);
            }
            tx.prepare_cached(SCHEDULE)?.execute(params![
                n.id.as_bytes(),
                n.user_id,
                n.kind,
                n.title,
                n.message,
                channels_json(&n.channels)?,
                n.broadcast,
                n.data,
                n.created_at,
                n.scheduled_at.unwrap_or(now),
                n.urgent,
            ])?;
            Ok(WriteOutcome::Scheduled)
        }
        WriteRequest::CancelScheduled { id } => {
            let changed = tx
                .prepare_cached(CANCEL_SCHEDULED)?
                .execute(params![id.as_bytes()])?;
            Ok(WriteOutcome::Cancelled(changed > 0))
        }
        WriteRequest::FireDue { limit } => {
            let due = tx
                .prepare_cached(CLAIM_DUE)?
                .query_map(params![now, sql_int(*limit)], notification_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let fired = fire_in_due_order(due, clock.ids);
            insert_notifications(tx, &fired)?;
            Ok(WriteOutcome::Fired(fired))
        }
        WriteRequest::Purge {
            created_before,
            limit,
        } => {
            tx.prepare_cached(IDEMPOTENCY_EXPIRE)?
                .execute(params![clock.keys_expired_before])?;
            let deleted = match created_before {
                Some(before) => tx
                    .prepare_cached(PURGE)?
                    .execute(params![first_id_of(*before), sql_int(*limit)])?,
                None => 0,
            };
            Ok(WriteOutcome::Purged(deleted as u64))
        }
        WriteRequest::MarkRead { user_id, id } => {
            let mut stmt = tx.prepare_cached(MARK_READ)?;
            let found = stmt
                .query_row(params![id.as_bytes(), user_id, now], notification_from_row)
                .optional()?;
            Ok(WriteOutcome::MarkedRead(found.map(Box::new)))
        }
        WriteRequest::MarkAllRead { user_id } => {
            let changed = tx
                .prepare_cached(MARK_ALL_READ)?
                .execute(params![user_id, now])?;
            Ok(WriteOutcome::MarkedAllRead(changed as u64))
        }
        WriteRequest::Delete { user_id, id } => {
            let changed = tx
                .prepare_cached(DELETE)?
                .execute(params![id.as_bytes(), user_id])?;
            Ok(WriteOutcome::Deleted(changed > 0))
        }
        WriteRequest::MarkSeen { user_id, ids } => mark_seen(tx, user_id, ids, now),
        WriteRequest::RecordDelivered { receipts } => {
            let pairs: Vec<(String, Millis)> = receipts
                .iter()
                .map(|(id, at)| (id.simple().to_string(), *at))
                .collect();
            let changed = tx
                .prepare_cached(RECORD_DELIVERED)?
                .execute(params![json_text(&pairs)?])?;
            Ok(WriteOutcome::RecordedDelivered(changed as u64))
        }
        WriteRequest::SetPreferences { user_id, stored } => {
            set_preferences(tx, user_id, stored.as_deref(), now)
        }
        WriteRequest::HoldQuiet { held } => hold_quiet(tx, held),
        WriteRequest::ReleaseQuiet { limit } => release_quiet(tx, now, *limit),
    }
}

/// The preferences of a user: the defaults are no row.
const SET_PREFERENCES: &str = "INSERT INTO user_preferences (user_id, preferences, updated_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT (user_id) DO UPDATE SET preferences = excluded.preferences, \
     updated_at = excluded.updated_at";
const FORGET_PREFERENCES: &str = "DELETE FROM user_preferences WHERE user_id = ?1";
const PREFERENCES: &str = "SELECT preferences, updated_at FROM user_preferences WHERE user_id = ?1";
const ALL_PREFERENCES: &str = "SELECT user_id, preferences, updated_at FROM user_preferences";
/// `OR IGNORE`: a notification is held once.
const HOLD_QUIET: &str =
    "INSERT OR IGNORE INTO quiet_held (notification_id, user_id, release_at) VALUES (?1, ?2, ?3)";
const DUE_QUIET: &str =
    "SELECT notification_id FROM quiet_held WHERE release_at <= ?1 ORDER BY release_at LIMIT ?2";
const UNHOLD_QUIET: &str = "DELETE FROM quiet_held WHERE notification_id = ?1";
const NOTIFICATION_BY_ID: &str =
    concat!("SELECT ", columns!(), " FROM notifications WHERE id = ?1");

/// [`WriteRequest::SetPreferences`].
fn set_preferences(
    tx: &Transaction<'_>,
    user_id: &str,
    stored: Option<&str>,
    now: i64,
) -> rusqlite::Result<WriteOutcome> {
    match stored {
        Some(json) => tx
            .prepare_cached(SET_PREFERENCES)?
            .execute(params![user_id, json, now])?,
        None => tx
            .prepare_cached(FORGET_PREFERENCES)?
            .execute(params![user_id])?,
    };
    Ok(WriteOutcome::PreferencesSet)
}

/// [`WriteRequest::HoldQuiet`].
fn hold_quiet(tx: &Transaction<'_>, held: &[Held]) -> rusqlite::Result<WriteOutcome> {
    let mut insert = tx.prepare_cached(HOLD_QUIET)?;
    for h in held {
        insert.execute(params![h.id.as_bytes(), h.user_id, h.release_at])?;
    }
    Ok(WriteOutcome::Held)
}

/// [`WriteRequest::ReleaseQuiet`]: one writer per SQLite database, so claiming is reading and
/// deleting in the batch's transaction.
fn release_quiet(tx: &Transaction<'_>, now: i64, limit: usize) -> rusqlite::Result<WriteOutcome> {
    let due = tx
        .prepare_cached(DUE_QUIET)?
        .query_map(params![now, sql_int(limit)], |row| {
            row.get::<_, [u8; 16]>(0)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut released = Vec::with_capacity(due.len());
    for id in due {
        tx.prepare_cached(UNHOLD_QUIET)?.execute(params![id])?;
        if let Some(n) = tx
            .prepare_cached(NOTIFICATION_BY_ID)?
            .query_row(params![id], notification_from_row)
            .optional()?
        {
            released.push(Arc::new(n));
        }
    }
    released.sort_by_key(|n| n.id);
    Ok(WriteOutcome::Released(released))
}

impl WriteBackend for SqliteWriter {
    fn apply_batch(&mut self, requests: &mut [WriteRequest], mut clock: BatchClock<'_>) -> Applied {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite_error)?;
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests.iter() {
            // On error, dropping `tx` rolls the whole batch back (rusqlite's default drop behaviour).
            outcomes.push(apply_one(&tx, request, &mut clock).map_err(sqlite_error)?);
        }
        // A failed COMMIT (e.g. disk full) also rolls back: the Transaction is dropped unfinished.
        tx.commit().map_err(sqlite_error)?;
        Ok(outcomes)
    }
}

/// The counters row of `user` on `conn` (zeros when the user has none yet).
fn read_counters(conn: &Connection, user: &str) -> Result<InboxCounters, BackendError> {
    conn.prepare_cached(COUNTERS)
        .and_then(|mut stmt| {
            stmt.query_row([user], |row| {
                Ok(InboxCounters {
                    total: row.get::<_, i64>(0)?.max(0) as u64,
                    unread: row.get::<_, i64>(1)?.max(0) as u64,
                    version: row.get::<_, i64>(2)?.max(0) as u64,
                })
            })
            .optional()
        })
        .map(Option::unwrap_or_default)
        .map_err(sqlite_error)
}

impl CountersBackend for SqliteWriter {
    fn unread_counts(&mut self, users: &[&str]) -> Result<Vec<UnreadCount>, BackendError> {
        users
            .iter()
            .map(|user| {
                let c = read_counters(&self.conn, user)?;
                Ok(UnreadCount {
                    user_id: (*user).to_owned(),
                    unread: c.unread,
                    version: c.version,
                })
            })
            .collect()
    }
}

/// A reader thread's connection.
pub(crate) struct SqliteReader {
    /// Read-only, so a bug here cannot write.
    conn: Connection,
}

impl SqliteReader {
    /// Opens the file read-only. The writer must have opened it first (it creates the file, sets WAL
    /// and migrates).
    pub(crate) fn open(path: &Path) -> Result<SqliteReader, OpenError> {
        let context = |cause: rusqlite::Error| OpenError::Sqlite {
            context: format!("cannot open sqlite database {} for reading", path.display()),
            cause,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(context)?;
        configure_common(&conn).map_err(context)?;
        Ok(SqliteReader { conn })
    }
}

impl ReadBackend for SqliteReader {
    fn history(&mut self, query: &HistoryQuery) -> Result<HistoryPage, BackendError> {
        // One read transaction: the page and both counts come from the same snapshot, so they agree.
        let tx = self.conn.transaction().map_err(sqlite_error)?;
        let before = history_before(query);
        let sql = HISTORY_BY_FILTERS[history_filters(query)];
        let rows = tx
            .prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.query_map(
                    params![query.user_id, before.as_bytes(), history_fetch(query)],
                    notification_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sqlite_error)?;
        let counters = read_counters(&tx, &query.user_id)?;
        tx.commit().map_err(sqlite_error)?;
        let (total, unread) = (counters.total, counters.unread);
        Ok(history_page(query, rows, total, unread))
    }

    fn replay(&mut self, query: &ReplayQuery) -> Result<Vec<Notification>, BackendError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let channels = serde_json::to_string(&query.channels)
            .map_err(|e| BackendError::Data(format!("cannot encode channels: {e}")))?;
        let mut stmt = self.conn.prepare_cached(REPLAY).map_err(sqlite_error)?;
        let rows = stmt
            .query_map(
                params![
                    query.user_id,
                    query.since.as_bytes(),
                    sql_int(query.limit),
                    channels
                ],
                notification_from_row,
            )
            .map_err(sqlite_error)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sqlite_error)
    }

    fn scheduled(&mut self, id: Uuid) -> Result<Option<Notification>, BackendError> {
        self.conn
            .prepare_cached(SCHEDULED)
            .and_then(|mut stmt| {
                stmt.query_row(params![id.as_bytes()], notification_from_row)
                    .optional()
            })
            .map_err(sqlite_error)
    }

    fn counters(&mut self, user: &str) -> Result<InboxCounters, BackendError> {
        read_counters(&self.conn, user)
    }

    fn ping(&mut self) -> Result<(), BackendError> {
        self.conn
            .prepare_cached(PING)
            .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)))
            .map(|_| ())
            .map_err(sqlite_error)
    }

    fn scheduled_pending(&mut self) -> Result<u64, BackendError> {
        self.conn
            .prepare_cached(SCHEDULED_PENDING)
            .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)))
            .map(|n| n.max(0) as u64)
            .map_err(sqlite_error)
    }

    fn preferences(&mut self, user_id: &str) -> Result<Option<StoredPreferences>, BackendError> {
        self.conn
            .prepare_cached(PREFERENCES)
            .and_then(|mut stmt| {
                stmt.query_row(params![user_id], |row| {
                    Ok(StoredPreferences {
                        json: row.get(0)?,
                        updated_at: row.get(1)?,
                    })
                })
                .optional()
            })
            .map_err(sqlite_error)
    }

    fn all_preferences(&mut self) -> Result<Vec<(String, StoredPreferences)>, BackendError> {
        self.conn
            .prepare_cached(ALL_PREFERENCES)
            .and_then(|mut stmt| {
                stmt.query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        StoredPreferences {
                            json: row.get(1)?,
                            updated_at: row.get(2)?,
                        },
                    ))
                })?
                .collect()
            })
            .map_err(sqlite_error)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! The SQLite side of the backend tests both databases share (`backend/tests.rs`).

    use super::*;
    use crate::store::backend::tests::Harness;

    /// A database file in a temporary folder, and a connection of the test's own to it.
    pub(crate) struct SqliteHarness {
        /// For the test's own queries.
        conn: Connection,
        /// Removed when the test ends (after the connections, which are dropped first).
        _dir: tempfile::TempDir,
    }

    impl Harness for SqliteHarness {
        type Writer = SqliteWriter;
        type Reader = SqliteReader;
        const DUPLICATE_KEY: &'static str = "UNIQUE";

        fn open() -> Option<(SqliteHarness, SqliteWriter, SqliteReader)> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nested/folder/n.db");
            let writer = SqliteWriter::open(&path, SqliteSynchronous::Normal).unwrap();
            let reader = SqliteReader::open(&path).unwrap();
            let conn = Connection::open(&path).unwrap();
            Some((SqliteHarness { conn, _dir: dir }, writer, reader))
        }

        fn count(&self, table: &str) -> i64 {
            self.conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        }

        fn hot_query_plans(&self) -> Vec<(String, &'static [&'static str])> {
            let plan = |sql: &str| -> String {
                let mut stmt = self
                    .conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .unwrap();
                let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
                let rows: Vec<String> = stmt
                    .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                rows.join(" | ")
            };
            let cases: [(&str, &'static [&'static str]); 13] = [
                (HISTORY, &["notifications_user"]),
                (HISTORY_UNREAD, &["notifications_unread"]),
                (HISTORY_BY_FILTERS[2], &["notifications_undelivered"]),
                (HISTORY_BY_FILTERS[4], &["notifications_unseen"]),
                (HISTORY_BY_FILTERS[7], &["notifications_undelivered"]),
                // Any index of the ids will do, as long as no table is scanned.
                (SEEN_IN_INBOX, &[]),
                (MARK_SEEN, &[]),
                (RECORD_DELIVERED, &[]),
                // The counts are one row of the counters, by its key.
                (COUNTERS, &["PRIMARY KEY"]),
                (MARK_ALL_READ, &["notifications_unread"]),
                (
                    REPLAY,
                    &[
                        "notifications_broadcast",
                        "notifications_user",
                        "PRIMARY KEY",
                    ],
                ),
                (SCHEDULED, &["notifications_schedule"]),
                (CLAIM_DUE, &["scheduled_due"]),
            ];
            cases
                .into_iter()
                .map(|(sql, indexes)| (plan(sql), indexes))
                .collect()
        }

        fn scans_a_table(plan: &str) -> bool {
            plan.split(" | ").any(|step| step == "SCAN notifications")
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::model::IdGenerator;
    use crate::store::backend::tests::{insert_one, page, stored};

    fn open(dir: &tempfile::TempDir) -> (SqliteWriter, SqliteReader) {
        let path = dir.path().join("nested/folder/n.db");
        let writer = SqliteWriter::open(&path, SqliteSynchronous::Normal).unwrap();
        let reader = SqliteReader::open(&path).unwrap();
        (writer, reader)
    }

    #[test]
    fn migrations_are_recorded_and_running_them_again_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _reader) = open(&dir);
        // open() applied them; a second run (same connection) and a reopen apply nothing.
        assert_eq!(migrate(&mut writer.conn).unwrap(), 0);
        drop(writer);
        let (mut writer, mut reader) = open(&dir);
        assert_eq!(migrate(&mut writer.conn).unwrap(), 0);
        let versions: Vec<i64> = writer
            .conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            versions,
            MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
        );
        // And the schema works.
        insert_one(&mut writer, 1);
        assert_eq!(page(&mut reader, "u").total, 1);
        reader.ping().unwrap();
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, mut reader) = open(&dir);
        writer
            .conn
            .execute(
                "INSERT INTO notifications (id, user_id, type, title, message, channels, created_at)
                 VALUES (x'0102', 'u', 'info', '', 'short id', '[]', 1)",
                [],
            )
            .unwrap();
        let q = HistoryQuery {
            user_id: "u".into(),
            limit: 10,
            before: None,
            unread_only: false,
            undelivered_only: false,
            unseen_only: false,
        };
        assert!(reader.history(&q).is_err());
        writer
            .conn
            .execute("DELETE FROM notifications", [])
            .unwrap();
        writer
            .conn
            .execute(
                "INSERT INTO notifications (id, user_id, type, title, message, channels, created_at)
                 VALUES (zeroblob(16), 'u', 'info', '', 'bad channels', '{\"not\":\"a list\"}', 1)",
                [],
            )
            .unwrap();
        let err = reader.history(&q).unwrap_err();
        assert!(err.to_string().starts_with("sqlite:"), "{err}");
    }

    #[test]
    fn the_checkpointer_moves_the_wal_into_the_database_file_and_stops_with_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        let mut writer = SqliteWriter::open(&path, SqliteSynchronous::Normal).unwrap();
        let checkpointer = writer.spawn_checkpointer(&path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let rows = (0..2_000u128)
            .map(|i| stored(i + 1, Some("u"), &["c"]))
            .collect();
        writer
            .apply_batch(
                &mut [WriteRequest::plain_insert(rows)],
                BatchClock::at(1, &mut IdGenerator::new()),
            )
            .unwrap();
        // The writer itself would not checkpoint this little; only the checkpointer grows the file.
        let deadline = std::time::Instant::now() + CHECKPOINT_INTERVAL * 6;
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within {:?}",
                CHECKPOINT_INTERVAL * 6
            );
            std::thread::sleep(CHECKPOINT_INTERVAL / 10);
        }
        drop(writer);
        checkpointer.join().unwrap();
    }
}
