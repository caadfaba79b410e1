//! The PostgreSQL backend: the shared database of a multi-node deployment (`DATABASE_URL=postgres://…`).
//!
//! Same seam, same meaning as the SQLite backend (`sqlite.rs` is the reference): one write connection for
//! the store thread, one read-only connection per reader thread, each a plain OS thread. tokio-postgres is
//! an async client, so **each of those threads owns a current-thread tokio runtime** and calls
//! `block_on` for every batch or read. Nothing here ever runs on a shard: the shards' executor is glommio,
//! and keeping tokio confined to the threads that already block on the database means no second
//! reactor, no cross-runtime waking and no `Send` futures to juggle. A current-thread runtime costs
//! nothing while idle, and the connection task it drives only needs to run while a request is in flight.
//!
//! **Writes: one transaction per drained batch, one statement per run of inserts, pipelined.** A batch
//! of consecutive insert requests (the common case: many shards sending single notifications) becomes
//! ONE `INSERT … SELECT FROM UNNEST($arrays)` that writes every row and its channel-index rows, instead
//! of one statement per row: PostgreSQL is a network round trip away, and a round trip per row (about
//! 50 µs on loopback, far more across a network) would cap ingest near 20,000 rows per second even on
//! loopback, whereas one statement of arrays costs one round trip and one plan whatever the batch size.
//! UNNEST rather than a `VALUES` list keeps the statement text fixed, so it is prepared once per
//! connection and PostgreSQL's 65,535-parameter limit never applies. Other requests (read, read-all,
//! delete) are one prepared statement each, and ALL statements of the batch are pipelined: they are sent
//! back to back on the one connection and the answers read afterwards, so a batch costs about three
//! round trips (BEGIN, the pipeline, COMMIT) rather than one per request. PostgreSQL runs pipelined
//! statements in the order they arrive, so a later request still sees an earlier one's effect, exactly
//! as on SQLite. If any statement fails, the rest of the transaction is refused by the server and the
//! whole batch is rolled back: all-or-nothing, as the seam requires.
//!
//! **Idempotency keys, scheduling and retention** follow `sqlite.rs` request for request, each in ONE
//! statement so it pipelines like the rest: a keyed insert or schedule looks its key up, records it and
//! writes (or not) through data-modifying CTEs guarded by whether the record was stored, which also
//! settles two nodes racing with one key (the loser waits for the winner's commit on the key's unique
//! index, writes nothing, and answers the winner's first answer). The claim of due scheduled
//! notifications is `FOR UPDATE SKIP LOCKED`, so nodes sharing the database fire each one exactly once
//! and never wait for each other; it needs the claimed rows back before it can insert them with new
//! ids, so it is the one request that ends the pipeline before it and starts a new one after it.
//! Retention deletes with `SKIP LOCKED` too, so a purge never waits on a row another node is using.
//!
//! **Reads** are each ONE statement: a history page and both counts come from one query, so they share
//! one snapshot (what SQLite's read transaction gives) in one round trip. Reader sessions are
//! `default_transaction_read_only`, so a bug here cannot write.
//!
//! **Reconnect with backoff.** A [`Link`] is a connection that outlives its sessions. When a request
//! fails because the connection is gone (server restart, network cut, a `FATAL` from the server, no
//! answer within [`OPERATION_TIMEOUT`]), that request fails ([`BackendError`], the API's 503) and the
//! session is dropped; the next request connects again. A failed connection attempt arms a backoff
//! ([`RECONNECT_BACKOFF_MIN`] doubling up to [`RECONNECT_BACKOFF_MAX`]): until it expires, requests fail
//! at once with a message saying when the next attempt is, so a down database gets one attempt per
//! interval per thread instead of one per request, and callers get a fast 503 instead of waiting. The
//! thread never panics or exits over it. Before each request an idle session is checked for a close the
//! server announced while it was idle (a restart), so that case reconnects without failing a request.
//!
//! **Nothing waits forever.** [`CONNECT_TIMEOUT`] bounds connecting, TCP keepalives and
//! `tcp_user_timeout` make the kernel give up on a peer that vanished, `statement_timeout` makes the
//! server give up on a statement, and [`OPERATION_TIMEOUT`] bounds a whole batch or read on the client
//! side, for the case where the network silently drops everything. The price of a client-side timeout is
//! the usual one of any remote commit: if the answer to COMMIT is what got lost, the batch may have
//! committed although its callers were told 503. A producer's retry with the same `Idempotency-Key` is
//! what makes that safe.
//!
//! **Schema** (`migrations/postgres/`): `uuid` ids (byte order is UUIDv7 time order), `jsonb` data,
//! `text[]` channels plus the `notification_channels` side table that makes replay by channel an index
//! range scan, and `timestamptz` times. The model counts milliseconds since the epoch; they are written
//! and read in PostgreSQL's binary timestamp format by [`Timestamp`], which is exact for whole
//! milliseconds, so a time read back equals the time written. `data` comes back as jsonb's normalized
//! text: the same JSON value the producer sent, possibly with different spacing and key order.
//!
//! **Which schema.** Tables live in the first schema of the session's `search_path`, which a
//! `DATABASE_URL` sets the libpq way: `postgres://user@host:5432/db?options=-csearch_path%3Dmyschema`
//! (`options` is percent-decoded to `-csearch_path=myschema`, passed to the server at connect). The
//! schema must exist. TLS is not supported yet: `sslmode=require` fails to connect, and the default
//! `sslmode=prefer` connects without TLS.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::join_all;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::types::{accepts, to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Row, Statement, Transaction};
use uuid::Uuid;

use super::backend::{
    fired_notification, first_id_of, BackendError, ReadBackend, WriteBackend, WriteOutcome,
    WriteRequest,
};
use super::idempotency::{verdict, FoundRecord, IdempotencyRecord};
use super::{HistoryPage, HistoryQuery, ReplayQuery};
use crate::model::{IdGenerator, Millis, Notification};
use crate::scheduler::idempotency_expired_before;

/// Longest wait for a TCP connection to the server, unless the URL's `connect_timeout` says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a whole connection set-up (TCP, authentication, session settings, preparing the
/// statements); `connect_timeout` only covers the TCP part.
const SESSION_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The server cancels a statement that runs longer than this. A 4096-row batch takes tens of
/// milliseconds, so this only fires on a database that is stuck (a lock held by an admin, a full disk).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server ends a session that sits inside a transaction doing nothing for this long, which only
/// happens when this client vanished mid-batch; it releases the locks that session held.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one batch or read, measured here. Longer than [`STATEMENT_TIMEOUT`], so a slow but
/// alive server answers with its own timeout error first; this one is for a server or network that no
/// longer answers at all.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// An idle connection starts TCP keepalive probes after this long, so a peer that vanished without a
/// goodbye (a network cut, a crashed host) is noticed even when nothing is being sent.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered keepalive probes before the kernel declares the connection dead.
const KEEPALIVE_RETRIES: u32 = 3;
/// The kernel fails the connection when data it sent stays unacknowledged this long: keepalives do not
/// cover a connection with a request in flight, and the default retransmission give-up is ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Wait after the first failed connection attempt; doubles after each further failure.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Most wait between connection attempts while the database stays down: also the longest a recovered
/// database waits to be noticed.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Yields to the runtime before using an idle session, so its connection task reads a close that
/// arrived meanwhile (see [`Link::ensure_session`]).
const IDLE_CHECK_YIELDS: usize = 2;
/// How long ending a session waits for its connection to say goodbye to the server.
const CLOSE_GRACE: Duration = Duration::from_millis(100);
/// Shown as `application_name` in `pg_stat_activity`, unless the URL names one.
const APPLICATION_NAME: &str = "notification-service";
/// The key of the session advisory lock held while migrating, so several nodes starting at once
/// migrate one after the other. Any constant works as long as nothing else in the database uses it:
/// this one is "notify" in ASCII, then migration lock number 1.
const MIGRATION_LOCK_KEY: i64 = 0x6e6f_7469_6679_0001;
/// Milliseconds from the Unix epoch (the model's) to 2000-01-01 UTC (PostgreSQL's timestamp epoch).
const POSTGRES_EPOCH_MILLIS: Millis = 946_684_800_000;
/// Microseconds per millisecond, for converting between the two epochs' units.
const MICROS_PER_MILLI: i64 = 1_000;
/// An id above every stored id: the `before` of a first history page, so the page query is one
/// statement with a plain range condition the index can use.
const ID_ABOVE_ALL: Uuid = Uuid::max();

/// One numbered schema change, applied once.
pub(crate) struct Migration {
    /// Recorded in `schema_migrations.version`; applied in ascending order.
    pub version: i64,
    /// The SQL, possibly several statements.
    pub sql: &'static str,
}

/// Every migration, in order. Embedded in the binary so a deployment is one file.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/postgres/0002_scheduling_idempotency.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/postgres/0003_schedule_id.sql"),
    },
];

/// The bookkeeping table of the migration runner.
const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    bigint      NOT NULL PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The columns of a notification row, in the order [`notification_from_row`] reads them. `data` is read
/// as text: the model keeps the producer's JSON as text, to splice into encodings unchanged.
macro_rules! columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data::text AS data, created_at, \
         read_at, delivered_at, seen_at, scheduled_at, schedule_id"
    };
}

/// The columns of a pending scheduled row, in the order of [`columns!`] (the fields a pending
/// notification cannot have yet are NULL), so [`notification_from_row`] decodes both tables.
macro_rules! scheduled_columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data::text AS data, created_at, \
         NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, scheduled_at, NULL::uuid"
    };
}

/// The `Idempotency-Key` part of a write, as CTEs that open the statement: `found` is the unexpired
/// record of the key, `recorded` stores the new record when there is none (replacing an expired one),
/// and `proceed` says whether the write itself goes ahead (no key, or the record was stored). The
/// write's own CTEs follow, each guarded by `proceed`, and [`claim_verdict!`] ends the statement.
/// Parameters: `$1` key (NULL: no key), `$2` fingerprint, `$3` status, `$4` body, `$5` the expiry
/// cut-off (a record created at or before it is expired), `$6` now.
///
/// Nodes sharing the database may race with the same key: both miss it in `found` (neither sees the
/// other's uncommitted row); the second one's insert then waits for the first to commit, meets the
/// conflict, and its `DO UPDATE` is skipped because the winner's record is not expired, so `recorded`
/// is empty and the second writes nothing. [`keyed_verdict`] then reads the winner's record.
macro_rules! claim_key {
    () => {
        "WITH found AS (
            SELECT fingerprint, status, body FROM idempotency_keys WHERE key = $1 AND created_at > $5
        ),
        recorded AS (
            INSERT INTO idempotency_keys (key, fingerprint, status, body, created_at)
            SELECT $1, $2::bytea, $3::integer, $4::bytea, $6::timestamptz
            WHERE $1 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM found)
            ON CONFLICT (key) DO UPDATE
                SET fingerprint = excluded.fingerprint, status = excluded.status,
                    body = excluded.body, created_at = excluded.created_at
                WHERE idempotency_keys.created_at <= $5
            RETURNING 1
        ),
        proceed AS (
            SELECT $1::text IS NULL OR EXISTS (SELECT 1 FROM recorded) AS yes
        ),"
    };
}

/// Ends a statement that opened with [`claim_key!`]: one row with whether a record was stored and the
/// unexpired record found, if any.
macro_rules! claim_verdict {
    () => {
        " SELECT (SELECT count(*) FROM recorded), found.fingerprint, found.status, found.body
          FROM (SELECT 1) AS one LEFT JOIN found ON true"
    };
}

/// Inserts notifications and their channel-index rows in ONE statement, whatever their number, under
/// an optional `Idempotency-Key` (see [`claim_key!`], `$1`–`$6`). Every notification column is an
/// array with one element per notification (`$7`–`$19`, and `$22` for `schedule_id`, numbered after
/// the others because it came later; `channels` as a JSON array text per notification, since
/// PostgreSQL arrays cannot be ragged), turned back into rows by UNNEST; the channel rows come as two
/// parallel arrays of (channel, id) (`$20`, `$21`). The CTEs' inserts run
/// even though nothing reads from them. `ON CONFLICT DO NOTHING`: a producer may list the same channel
/// twice; it is one channel.
const INSERT_NOTIFICATIONS: &str = concat!(
    claim_key!(),
    "
    inserted AS (
        INSERT INTO notifications (id, user_id, type, title, message, channels, broadcast, data,
                                   created_at, read_at, delivered_at, seen_at, scheduled_at,
                                   schedule_id)
        SELECT n.id, n.user_id, n.type, n.title, n.message,
               ARRAY(SELECT c.name FROM jsonb_array_elements_text(n.channels::jsonb)
                                        WITH ORDINALITY AS c(name, position)
                     ORDER BY c.position),
               n.broadcast, n.data::jsonb, n.created_at, n.read_at, n.delivered_at, n.seen_at,
               n.scheduled_at, n.schedule_id
        FROM UNNEST($7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                    $13::boolean[], $14::text[], $15::timestamptz[], $16::timestamptz[],
                    $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $22::uuid[])
             AS n(id, user_id, type, title, message, channels, broadcast, data, created_at,
                  read_at, delivered_at, seen_at, scheduled_at, schedule_id)
        WHERE (SELECT yes FROM proceed)
    ),
    indexed AS (
        INSERT INTO notification_channels (channel, id)
        SELECT * FROM UNNEST($20::text[], $21::uuid[]) WHERE (SELECT yes FROM proceed)
        ON CONFLICT DO NOTHING
    )",
    claim_verdict!()
);
/// Stores a pending scheduled notification (`$7`–`$16`) under an optional `Idempotency-Key` (see
/// [`claim_key!`]).
const SCHEDULE: &str = concat!(
    claim_key!(),
    "
    scheduled AS (
        INSERT INTO scheduled_notifications (id, user_id, type, title, message, channels,
                                             broadcast, data, created_at, scheduled_at)
        SELECT $7::uuid, $8::text, $9::text, $10::text, $11::text, $12::text[], $13::boolean,
               $14::text::jsonb, $15::timestamptz, $16::timestamptz
        WHERE (SELECT yes FROM proceed)
    )",
    claim_verdict!()
);
/// The unexpired record of a key, read after losing a race for it (see [`claim_key!`]).
const IDEMPOTENCY_LOOKUP: &str =
    "SELECT fingerprint, status, body FROM idempotency_keys WHERE key = $1 AND created_at > $2";
/// Cancels a pending scheduled notification.
const CANCEL_SCHEDULED: &str = "DELETE FROM scheduled_notifications WHERE id = $1";
/// Claims the due ones, oldest due first. `SKIP LOCKED`: rows another node is claiming right now are
/// left to it, so with several nodes on one database each notification fires exactly once and no
/// node waits for another.
const CLAIM_DUE: &str = concat!(
    "DELETE FROM scheduled_notifications WHERE id IN (
        SELECT id FROM scheduled_notifications WHERE scheduled_at <= $1
        ORDER BY scheduled_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
    ) RETURNING ",
    scheduled_columns!()
);
/// A scheduled notification by its schedule id: the pending row, or else the notification it fired
/// as (found through the partial index `notifications_schedule`). One statement, so one snapshot: a
/// schedule that fires (on any node) while this runs is found in one table or the other.
const SCHEDULED: &str = concat!(
    "(SELECT ",
    scheduled_columns!(),
    " FROM scheduled_notifications WHERE id = $1) UNION ALL (SELECT ",
    columns!(),
    " FROM notifications WHERE schedule_id = $1) LIMIT 1"
);
/// Retention and expiry in one statement: every idempotency record created at or before `$1`, and up
/// to `$3` notifications with an id below `$2`. Ids are UUIDv7, so "created before t" is "id below the
/// smallest id of t", a range scan of the primary key from its old end. `SKIP LOCKED`: rows another
/// node is purging (or a user is marking read) are left for a later run instead of waited for. The
/// trigger of migration 1 removes the channel rows.
const PURGE: &str = "WITH expired AS (DELETE FROM idempotency_keys WHERE created_at <= $1)
    DELETE FROM notifications WHERE id IN (
        SELECT id FROM notifications WHERE id < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
    )";
/// `COALESCE` keeps the first `read_at`; `RETURNING` gives the row back without a second lookup.
const MARK_READ: &str = concat!(
    "UPDATE notifications SET read_at = COALESCE(read_at, $3) WHERE id = $1 AND user_id = $2 \
     RETURNING ",
    columns!()
);
/// `read_at IS NULL` spelled out so the walk uses `notifications_unread`, touching only unread rows.
const MARK_ALL_READ: &str =
    "UPDATE notifications SET read_at = $2 WHERE user_id = $1 AND read_at IS NULL";
/// The trigger of migration 1 removes the notification's channel rows.
const DELETE: &str = "DELETE FROM notifications WHERE id = $1 AND user_id = $2";

/// A history page and the inbox's counts in ONE statement, so all three come from one snapshot in one
/// round trip: the counts are one-row subqueries, and the page (a backwards range scan of the user's
/// index from `before`) is LEFT JOINed to them, so an empty page still yields one row carrying the
/// counts, with NULL notification columns. `$filter` narrows the page (never the counts).
macro_rules! history {
    ($filter:literal) => {
        concat!(
            "SELECT total.n, unread.n, page.* FROM
               (SELECT count(*) AS n FROM notifications WHERE user_id = $1) AS total
             CROSS JOIN
               (SELECT count(*) AS n FROM notifications WHERE user_id = $1 AND read_at IS NULL)
               AS unread
             LEFT JOIN LATERAL
               (SELECT ",
            columns!(),
            " FROM notifications WHERE user_id = $1 AND id < $2",
            $filter,
            " ORDER BY id DESC LIMIT $3) AS page ON true
             ORDER BY page.id DESC"
        )
    };
}
/// A page of the whole inbox, with the counts.
const HISTORY: &str = history!("");
/// A page of the unread notifications, with the counts; `read_at IS NULL` lets it walk
/// `notifications_unread`.
const HISTORY_UNREAD: &str = history!(" AND read_at IS NULL");
/// Where the counts sit in a [`HISTORY`] row; the notification's columns follow.
const HISTORY_COUNT_COLUMNS: usize = 2;
/// Three kinds of indexed range scans (the user's inbox, broadcasts, and one per channel through a
/// LATERAL join, so each channel is its own short scan of the primary key rather than one scan of all
/// the channels' rows then a sort), each cut to the limit before they are combined, so a replay costs
/// O(limit × (2 + channels)) rows whatever the history's size; `id IN (...)` removes the duplicates of a
/// notification that matches several ways. A NULL user (`$1`) matches no inbox.
const REPLAY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM notifications WHERE id IN (
        (SELECT id FROM notifications WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3)
        UNION ALL
        (SELECT id FROM notifications WHERE broadcast AND id > $2 ORDER BY id LIMIT $3)
        UNION ALL
        (SELECT matched.id FROM unnest($4::text[]) AS wanted(channel)
         CROSS JOIN LATERAL (SELECT id FROM notification_channels
                             WHERE channel = wanted.channel AND id > $2
                             ORDER BY id LIMIT $3) AS matched)
    ) ORDER BY id LIMIT $3"
);
/// Touches the schema (not just the connection), so a dropped table or a wrong `search_path` shows.
const PING: &str = "SELECT count(*) FROM schema_migrations";

/// Settings of every session. Set after connecting rather than through the startup `options`, so
/// connection poolers that refuse startup options still work, and a URL's own `options` stay as given.
fn session_settings(read_only: bool) -> String {
    format!(
        "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}; \
         SET default_transaction_read_only = {}",
        STATEMENT_TIMEOUT.as_millis(),
        IDLE_IN_TRANSACTION_TIMEOUT.as_millis(),
        if read_only { "on" } else { "off" },
    )
}

/// Where the data lives: a parsed `DATABASE_URL` with this backend's connection defaults applied.
#[derive(Clone)]
pub(crate) struct PostgresTarget {
    /// What tokio-postgres connects with; holds the password, so it is never printed.
    config: Config,
    /// Bounds one batch or read (see [`OPERATION_TIMEOUT`]); a field so tests can shorten it.
    operation_timeout: Duration,
    /// Bounds one connection set-up (see [`SESSION_SETUP_TIMEOUT`]); a field so tests can shorten it.
    setup_timeout: Duration,
}

impl PostgresTarget {
    /// Parses a `postgres://` URL (or a libpq `key=value` string) and fills in the timeouts, keepalives
    /// and application name the URL does not set itself.
    pub(crate) fn parse(url: &str) -> Result<PostgresTarget, String> {
        // tokio-postgres's own error names the bad part without echoing the URL.
        let mut config = Config::from_str(url).map_err(|e| format!("invalid DATABASE_URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        // The URL cannot be told apart from the library default here; two hours is the default and far
        // too long to notice a dead peer, so anything else is taken as the URL's choice.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        config.keepalives(true);
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        Ok(PostgresTarget {
            config,
            operation_timeout: OPERATION_TIMEOUT,
            setup_timeout: SESSION_SETUP_TIMEOUT,
        })
    }

    /// The same target with shorter limits, so a test of an outage does not wait for the real ones.
    #[cfg(test)]
    pub(crate) fn with_timeouts(mut self, operation: Duration, setup: Duration) -> PostgresTarget {
        self.operation_timeout = operation;
        self.setup_timeout = setup;
        self
    }
}

/// Names the server, database, user and options; never the password.
impl fmt::Display for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("postgres://")?;
        if let Some(user) = self.config.get_user() {
            write!(f, "{user}@")?;
        }
        let ports = self.config.get_ports();
        for (i, host) in self.config.get_hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                Host::Tcp(name) => f.write_str(name)?,
                Host::Unix(path) => write!(f, "{}", path.display())?,
            }
            // One port for all hosts, or one per host.
            if let Some(port) = ports.get(i).or(ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        if let Some(dbname) = self.config.get_dbname() {
            write!(f, "/{dbname}")?;
        }
        if let Some(options) = self.config.get_options() {
            write!(f, " options={options:?}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A time in the model's unit (milliseconds since the Unix epoch), in PostgreSQL's binary `timestamptz`
/// format (microseconds since 2000-01-01 UTC, a big-endian i64). Written by hand rather than through
/// `SystemTime` so that conversion is exact both ways and an out-of-range time is an error, never a
/// panic (the library's `SystemTime` encoding overflows on absurd values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timestamp(Millis);

impl ToSql for Timestamp {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let micros = self
            .0
            .checked_sub(POSTGRES_EPOCH_MILLIS)
            .and_then(|ms| ms.checked_mul(MICROS_PER_MILLI))
            .ok_or_else(|| format!("time {} ms is out of PostgreSQL's range", self.0))?;
        out.extend_from_slice(&micros.to_be_bytes());
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Timestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Timestamp, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("timestamptz of {} bytes, expected 8", raw.len()))?;
        let micros = i64::from_be_bytes(bytes);
        // Floor division, so a time before 2000 (or an operator's sub-millisecond edit) rounds down
        // like every other; `infinity` saturates instead of overflowing.
        Ok(Timestamp(
            micros
                .div_euclid(MICROS_PER_MILLI)
                .saturating_add(POSTGRES_EPOCH_MILLIS),
        ))
    }

    accepts!(TIMESTAMPTZ);
}

/// Why a request failed inside a session.
#[derive(Debug)]
enum Failure {
    /// The server refused, or the connection failed.
    Postgres(tokio_postgres::Error),
    /// Data that could not be encoded or decoded: a bug or a corrupt row, not a connection problem.
    Data(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Postgres(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // tokio-postgres's message omits the server's text (it is the error's source); say both.
            Failure::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "postgres: {db}"),
                None => match e.source() {
                    Some(cause) => write!(f, "postgres: {e}: {cause}"),
                    None => write!(f, "postgres: {e}"),
                },
            },
            Failure::Data(why) => write!(f, "postgres: {why}"),
        }
    }
}

impl Failure {
    /// Whether the session this happened on can no longer be used. Only the server's own refusals
    /// (a constraint, a timeout it enforced, a trigger's exception) leave the connection in a known good
    /// state; anything else (the socket, the protocol, a `FATAL`, the connection-exception class) drops
    /// it, and reconnecting costs one connection set-up.
    fn loses_connection(&self, client: &Client) -> bool {
        match self {
            Failure::Data(_) => false,
            Failure::Postgres(e) => {
                if client.is_closed() || e.is_closed() {
                    return true;
                }
                match e.as_db_error() {
                    None => true,
                    Some(db) => {
                        matches!(db.severity(), "FATAL" | "PANIC")
                            // Class 08: connection exception.
                            || db.code().code().starts_with("08")
                    }
                }
            }
        }
    }
}

/// The backoff between connection attempts while the database is unreachable.
#[derive(Debug)]
struct Backoff {
    /// The wait armed by the next failure.
    next_delay: Duration,
    /// No attempt before this instant; `None` when the last attempt succeeded (or none was made).
    retry_at: Option<Instant>,
}

impl Backoff {
    /// No wait armed.
    fn new() -> Backoff {
        Backoff {
            next_delay: RECONNECT_BACKOFF_MIN,
            retry_at: None,
        }
    }

    /// How long until an attempt is allowed, or `None` if it is allowed now.
    fn wait_left(&self, now: Instant) -> Option<Duration> {
        self.retry_at
            .and_then(|at| at.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// An attempt failed: wait before the next one, twice as long as last time, up to the cap.
    fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.next_delay);
        self.next_delay = (self.next_delay * 2).min(RECONNECT_BACKOFF_MAX);
    }

    /// An attempt succeeded: the next failure starts from the shortest wait again.
    fn succeeded(&mut self) {
        *self = Backoff::new();
    }
}

/// The prepared statements of one kind of session, prepared once per connection.
trait Statements: Sized {
    /// Whether the session is read-only (reader threads).
    const READ_ONLY: bool;
    /// Prepares every statement on a fresh connection.
    fn prepare(client: &Client) -> impl Future<Output = Result<Self, tokio_postgres::Error>>;
}

/// A live connection and its prepared statements.
struct Session<S> {
    /// The connection; its socket is driven by [`Session::connection`].
    client: Client,
    /// Prepared on this connection (prepared statements belong to one server session).
    statements: S,
    /// The task on the link's runtime that drives the socket; it ends when the socket fails or, once
    /// the client is dropped, after saying goodbye to the server.
    connection: JoinHandle<()>,
}

/// A connection to PostgreSQL that outlives its sessions: it reconnects, with backoff, after a failure.
struct Link<S> {
    /// Runs this link's connection task and its requests; current-thread, used only by the thread that
    /// owns the link, and only inside `block_on`, so nothing runs while the thread waits for work.
    runtime: Runtime,
    /// Where to connect.
    target: PostgresTarget,
    /// Who this link serves ("writer", "reader 0"), for logs.
    role: String,
    /// The current session; `None` after a failure, until a request reconnects.
    session: Option<Session<S>>,
    /// Paces connection attempts while they fail.
    backoff: Backoff,
    /// Why the last connection attempt failed, repeated to callers while the backoff runs.
    last_connect_error: String,
}

/// A current-thread runtime with the I/O and timer drivers tokio-postgres needs.
fn new_runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start a runtime for the postgres store: {e}"))
}

/// Connects and starts the connection's task on the current runtime. Must run inside `block_on`.
async fn connect_client(config: &Config) -> Result<(Client, JoinHandle<()>), Failure> {
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        // Ends when the client is dropped or the socket fails; the failure reaches the caller of the
        // request in flight, so it is only worth a debug line here.
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok((client, task))
}

/// Connects, applies the session settings and prepares the statements: a ready session.
async fn open_session<S: Statements>(config: &Config) -> Result<Session<S>, Failure> {
    let (client, connection) = connect_client(config).await?;
    client
        .batch_execute(&session_settings(S::READ_ONLY))
        .await?;
    let statements = S::prepare(&client).await?;
    Ok(Session {
        client,
        statements,
        connection,
    })
}

impl<S> Link<S> {
    /// Ends the current session, if any: drops the client and gives the connection task a moment to
    /// tell the server (which then rolls back whatever that session had open and releases its locks
    /// at once, instead of when it notices the socket is gone).
    fn close_session(&mut self) {
        if let Some(Session {
            client, connection, ..
        }) = self.session.take()
        {
            drop(client);
            // The task only runs inside block_on; a peer that no longer answers cannot hold this up
            // beyond the grace period.
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(CLOSE_GRACE, connection).await });
        }
    }
}

/// A thread's link is dropped when the thread ends (the store closed): say goodbye to the server.
impl<S> Drop for Link<S> {
    fn drop(&mut self) {
        self.close_session();
    }
}

impl<S: Statements> Link<S> {
    /// Opens the first session now, so a wrong URL or a missing schema stops the start-up with a clear
    /// error instead of a stream of 503s.
    fn open(target: &PostgresTarget, role: String) -> Result<Link<S>, String> {
        let mut link = Link {
            runtime: new_runtime()?,
            target: target.clone(),
            role,
            session: None,
            backoff: Backoff::new(),
            last_connect_error: String::new(),
        };
        link.connect().map_err(|e| {
            format!(
                "cannot connect the postgres store ({}) to {target}: {e}",
                link.role
            )
        })?;
        Ok(link)
    }

    /// One connection attempt, bounded by the target's set-up timeout.
    fn connect(&mut self) -> Result<(), String> {
        let config = &self.target.config;
        let limit = self.target.setup_timeout;
        let attempt = self
            .runtime
            .block_on(async { tokio::time::timeout(limit, open_session::<S>(config)).await });
        match attempt {
            Ok(Ok(session)) => {
                self.session = Some(session);
                Ok(())
            }
            Ok(Err(failure)) => Err(failure.to_string()),
            Err(_) => Err(format!(
                "no connection within {} ms (is the server reachable?)",
                limit.as_millis()
            )),
        }
    }

    /// Makes sure there is a usable session: keeps the current one unless the server closed it, else
    /// connects, unless the backoff says to wait, in which case the request fails at once.
    fn ensure_session(&mut self) -> Result<(), BackendError> {
        if let Some(session) = &self.session {
            // Let the connection task read what arrived while the thread was idle: a server that
            // restarted has said goodbye on this socket, and noticing it now means reconnecting
            // instead of failing this request. One yield lets the runtime poll the socket and wake
            // the connection task; the next lets that task run. Should it not (a different runtime
            // version), the request fails on the closed connection as it would without this check.
            self.runtime.block_on(async {
                for _ in 0..IDLE_CHECK_YIELDS {
                    tokio::task::yield_now().await;
                }
            });
            if !session.client.is_closed() {
                return Ok(());
            }
            tracing::warn!(role = %self.role, "postgres connection closed by the server; reconnecting");
            self.close_session();
        }
        let now = Instant::now();
        if let Some(wait) = self.backoff.wait_left(now) {
            return Err(BackendError(format!(
                "postgres unreachable ({}); next connection attempt in {} ms",
                self.last_connect_error,
                wait.as_millis()
            )));
        }
        match self.connect() {
            Ok(()) => {
                // The first session is opened by `open`; any connection made here is a reconnect.
                tracing::info!(role = %self.role, target = %self.target, "postgres reconnected");
                self.backoff.succeeded();
                Ok(())
            }
            Err(e) => {
                // From the end of the attempt: one that timed out must not leave the wait expired.
                self.backoff.failed(Instant::now());
                tracing::warn!(
                    role = %self.role,
                    target = %self.target,
                    error = %e,
                    retry_in_ms = self.backoff.wait_left(Instant::now()).map_or(0, |w| w.as_millis()),
                    "postgres connection attempt failed"
                );
                self.last_connect_error = e.clone();
                Err(BackendError(format!("postgres unreachable: {e}")))
            }
        }
    }

    /// Runs `work` on the session (connecting first if needed), bounded by the operation timeout. A
    /// failure that lost the connection ends the session, so the next call reconnects.
    fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut Client, &S) -> Result<T, Failure>,
    ) -> Result<T, BackendError> {
        self.ensure_session()?;
        let Some(live) = self.session.as_mut() else {
            return Err(BackendError("postgres: no session".to_owned()));
        };
        let limit = self.target.operation_timeout;
        let outcome = self.runtime.block_on(async {
            tokio::time::timeout(limit, work(&mut live.client, &live.statements)).await
        });
        let (result, lost) = match outcome {
            Ok(Ok(value)) => (Ok(value), false),
            Ok(Err(failure)) => {
                let lost = failure.loses_connection(&live.client);
                if lost {
                    tracing::warn!(role = %self.role, error = %failure, "postgres connection lost");
                }
                (Err(BackendError(failure.to_string())), lost)
            }
            Err(_) => {
                // The state of the connection is unknown (a statement may still be running, its
                // answer may still arrive): never reuse it.
                tracing::warn!(role = %self.role, timeout = ?limit, "postgres did not answer; dropping the connection");
                let why = format!("postgres: no answer within {} ms", limit.as_millis());
                (Err(BackendError(why)), true)
            }
        };
        if lost {
            self.close_session();
        }
        result
    }
}

/// Applies the migrations not yet recorded in `schema_migrations`, each in its own transaction together
/// with its record, while holding a session advisory lock, so several nodes starting at once apply each
/// migration once (the others wait, then find it recorded). Runs on a connection of its own, closed at
/// the end (which would release the lock even if unlocking failed). Returns how many were applied.
pub(crate) fn migrate(target: &PostgresTarget) -> Result<usize, String> {
    let runtime = new_runtime()?;
    let context =
        |e: &dyn fmt::Display| format!("cannot migrate the postgres database {target}: {e}");
    runtime.block_on(async {
        let (client, _connection) =
            tokio::time::timeout(target.setup_timeout, connect_client(&target.config))
                .await
                .map_err(|_| context(&format!("no connection within {:?}", target.setup_timeout)))?
                .map_err(|e| context(&e))?;
        migrate_on(client).await.map_err(|e| context(&e))
    })
}

/// See [`migrate`]; `client` is closed when this returns.
async fn migrate_on(mut client: Client) -> Result<usize, Failure> {
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .try_get(0)?;
    if !locked {
        tracing::info!("another node is migrating the postgres database; waiting for it");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
    }
    client.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
    let mut applied = 0;
    for migration in MIGRATIONS {
        let tx = client.transaction().await?;
        let done: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                &[&migration.version],
            )
            .await?
            .try_get(0)?;
        if done {
            continue; // dropping `tx` rolls back a transaction that changed nothing
        }
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&migration.version],
        )
        .await?;
        tx.commit().await?;
        applied += 1;
        tracing::info!(version = migration.version, "applied postgres migration");
    }
    let newest: Option<i64> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .try_get(0)?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if newest.is_some_and(|v| v > known) {
        // A newer binary ran here before (a rollback). Its changes are additive by convention, so
        // carry on, but say so: it explains any surprise.
        tracing::warn!(newest, known, "database schema is newer than this binary");
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    Ok(applied)
}

/// A decoding failure of column `index`, as a [`Failure`] that keeps the connection.
fn column_error(index: usize, e: tokio_postgres::Error) -> Failure {
    let cause = e.source().map(ToString::to_string).unwrap_or_default();
    Failure::Data(format!("cannot decode column {index}: {e} {cause}"))
}

/// Decodes one notification selected with [`columns!`], starting at column `first`.
fn notification_from_row(row: &Row, first: usize) -> Result<Notification, Failure> {
    let get = |offset: usize| first + offset;
    macro_rules! column {
        ($offset:expr) => {
            row.try_get(get($offset))
                .map_err(|e| column_error(get($offset), e))?
        };
    }
    let time = |t: Option<Timestamp>| t.map(|t| t.0);
    let created_at: Timestamp = column!(8);
    Ok(Notification {
        id: column!(0),
        user_id: column!(1),
        kind: column!(2),
        title: column!(3),
        message: column!(4),
        channels: column!(5),
        broadcast: column!(6),
        data: column!(7),
        created_at: created_at.0,
        read_at: time(column!(9)),
        delivered_at: time(column!(10)),
        seen_at: time(column!(11)),
        scheduled_at: time(column!(12)),
        schedule_id: column!(13),
    })
}

/// A row count or limit as PostgreSQL's bigint; a `usize` beyond `i64` means "no limit" anyway.
fn sql_int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The store thread's prepared statements.
struct WriterStatements {
    /// [`INSERT_NOTIFICATIONS`].
    insert: Statement,
    /// [`SCHEDULE`].
    schedule: Statement,
    /// [`IDEMPOTENCY_LOOKUP`].
    idempotency_lookup: Statement,
    /// [`CANCEL_SCHEDULED`].
    cancel_scheduled: Statement,
    /// [`CLAIM_DUE`].
    claim_due: Statement,
    /// [`PURGE`].
    purge: Statement,
    /// [`MARK_READ`].
    mark_read: Statement,
    /// [`MARK_ALL_READ`].
    mark_all_read: Statement,
    /// [`DELETE`].
    delete: Statement,
}

impl Statements for WriterStatements {
    const READ_ONLY: bool = false;

    async fn prepare(client: &Client) -> Result<WriterStatements, tokio_postgres::Error> {
        Ok(WriterStatements {
            insert: client.prepare(INSERT_NOTIFICATIONS).await?,
            schedule: client.prepare(SCHEDULE).await?,
            idempotency_lookup: client.prepare(IDEMPOTENCY_LOOKUP).await?,
            cancel_scheduled: client.prepare(CANCEL_SCHEDULED).await?,
            claim_due: client.prepare(CLAIM_DUE).await?,
            purge: client.prepare(PURGE).await?,
            mark_read: client.prepare(MARK_READ).await?,
            mark_all_read: client.prepare(MARK_ALL_READ).await?,
            delete: client.prepare(DELETE).await?,
        })
    }
}

/// One statement of a batch's pipeline (two for [`Step::FireDue`], which is why it runs alone).
enum Step<'a> {
    /// Consecutive [`WriteRequest::Insert`]s without a key (`requests` of them), as one insert.
    Insert {
        /// Every notification of the run, in order.
        rows: Vec<&'a Notification>,
        /// How many requests the run merges: each gets an [`WriteOutcome::Inserted`].
        requests: usize,
    },
    /// A [`WriteRequest::Insert`] with an `Idempotency-Key`: alone, since its key decides whether
    /// it writes.
    KeyedInsert {
        /// The notifications.
        rows: Vec<&'a Notification>,
        /// The key's record.
        record: &'a IdempotencyRecord,
    },
    /// A [`WriteRequest::FireDue`]: claims, then inserts what it claimed, so it waits for the
    /// statements before it and the ones after it wait for it.
    FireDue {
        /// Most to fire.
        limit: usize,
    },
    /// Any other request, one statement.
    Single(&'a WriteRequest),
}

/// Groups a batch into the statements that apply it: each run of consecutive inserts without a key
/// merges into one. Order is kept, so each statement still sees the effect of the requests before it.
fn plan(requests: &[WriteRequest]) -> Vec<Step<'_>> {
    let mut steps: Vec<Step<'_>> = Vec::new();
    for request in requests {
        match (request, steps.last_mut()) {
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: None,
                },
                Some(Step::Insert { rows, requests }),
            ) => {
                rows.extend(notifications.iter().map(|n| &**n));
                *requests += 1;
            }
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: None,
                },
                _,
            ) => steps.push(Step::Insert {
                rows: notifications.iter().map(|n| &**n).collect(),
                requests: 1,
            }),
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: Some(record),
                },
                _,
            ) => steps.push(Step::KeyedInsert {
                rows: notifications.iter().map(|n| &**n).collect(),
                record,
            }),
            (WriteRequest::FireDue { limit }, _) => steps.push(Step::FireDue { limit: *limit }),
            (other, _) => steps.push(Step::Single(other)),
        }
    }
    steps
}

/// The clock of one batch: `now`, and the idempotency expiry cut-off derived from it.
#[derive(Debug, Clone, Copy)]
struct BatchClock {
    /// The batch's time (`read_at`, due times, records' creation).
    now: Timestamp,
    /// Idempotency records created at or before this are expired.
    expired_before: Timestamp,
}

/// A key's record as the parameters `$1`–`$6` of a statement opening with [`claim_key!`].
struct KeyParams<'a> {
    /// `$1`; `None` for a write without a key.
    key: Option<&'a str>,
    /// `$2`.
    fingerprint: Option<&'a [u8]>,
    /// `$3`.
    status: Option<i32>,
    /// `$4`.
    body: Option<&'a [u8]>,
    /// `$5` and `$6`.
    clock: BatchClock,
}

impl<'a> KeyParams<'a> {
    /// The parameters of `record`, or the NULLs of "no key".
    fn new(record: Option<&'a IdempotencyRecord>, clock: BatchClock) -> KeyParams<'a> {
        KeyParams {
            key: record.map(|r| r.key.as_str()),
            fingerprint: record.map(|r| r.fingerprint.as_slice()),
            status: record.map(|r| i32::from(r.status)),
            body: record.map(|r| r.body.as_slice()),
            clock,
        }
    }

    /// `$1`–`$6`, in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.key,
            &self.fingerprint,
            &self.status,
            &self.body,
            &self.clock.expired_before,
            &self.clock.now,
        ]
    }
}

/// The notifications of an insert as the columns-as-arrays `$7`–`$21` of [`INSERT_NOTIFICATIONS`].
struct InsertArrays<'a> {
    /// `$7`.
    ids: Vec<Uuid>,
    /// `$8`.
    user_ids: Vec<Option<&'a str>>,
    /// `$9`.
    kinds: Vec<&'a str>,
    /// `$10`.
    titles: Vec<&'a str>,
    /// `$11`.
    messages: Vec<&'a str>,
    /// `$12`: each a JSON array of channel names.
    channels: Vec<String>,
    /// `$13`.
    broadcasts: Vec<bool>,
    /// `$14`.
    data: Vec<&'a str>,
    /// `$15`.
    created: Vec<Timestamp>,
    /// `$16`.
    read: Vec<Option<Timestamp>>,
    /// `$17`.
    delivered: Vec<Option<Timestamp>>,
    /// `$18`.
    seen: Vec<Option<Timestamp>>,
    /// `$19`.
    scheduled: Vec<Option<Timestamp>>,
    /// `$22`.
    schedule_ids: Vec<Option<Uuid>>,
    /// `$20`: the channel of each channel-index row.
    channel_names: Vec<&'a str>,
    /// `$21`: the notification of each channel-index row.
    channel_ids: Vec<Uuid>,
}

impl<'a> InsertArrays<'a> {
    /// Transposes the rows into columns.
    fn new(rows: &[&'a Notification]) -> Result<InsertArrays<'a>, Failure> {
        let count = rows.len();
        let mut arrays = InsertArrays {
            ids: Vec::with_capacity(count),
            user_ids: Vec::with_capacity(count),
            kinds: Vec::with_capacity(count),
            titles: Vec::with_capacity(count),
            messages: Vec::with_capacity(count),
            channels: Vec::with_capacity(count),
            broadcasts: Vec::with_capacity(count),
            data: Vec::with_capacity(count),
            created: Vec::with_capacity(count),
            read: Vec::with_capacity(count),
            delivered: Vec::with_capacity(count),
            seen: Vec::with_capacity(count),
            scheduled: Vec::with_capacity(count),
            schedule_ids: Vec::with_capacity(count),
            channel_names: Vec::new(),
            channel_ids: Vec::new(),
        };
        for &n in rows {
            arrays.ids.push(n.id);
            arrays.user_ids.push(n.user_id.as_deref());
            arrays.kinds.push(&n.kind);
            arrays.titles.push(&n.title);
            arrays.messages.push(&n.message);
            arrays.channels.push(
                serde_json::to_string(&n.channels)
                    .map_err(|e| Failure::Data(format!("cannot encode channels: {e}")))?,
            );
            arrays.broadcasts.push(n.broadcast);
            arrays.data.push(&n.data);
            arrays.created.push(Timestamp(n.created_at));
            arrays.read.push(n.read_at.map(Timestamp));
            arrays.delivered.push(n.delivered_at.map(Timestamp));
            arrays.seen.push(n.seen_at.map(Timestamp));
            arrays.scheduled.push(n.scheduled_at.map(Timestamp));
            arrays.schedule_ids.push(n.schedule_id);
            for channel in &n.channels {
                arrays.channel_names.push(channel);
                arrays.channel_ids.push(n.id);
            }
        }
        Ok(arrays)
    }

    /// `$7`–`$22`, in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 16] {
        [
            &self.ids,
            &self.user_ids,
            &self.kinds,
            &self.titles,
            &self.messages,
            &self.channels,
            &self.broadcasts,
            &self.data,
            &self.created,
            &self.read,
            &self.delivered,
            &self.seen,
            &self.scheduled,
            &self.channel_names,
            &self.channel_ids,
            &self.schedule_ids,
        ]
    }
}

/// Runs [`INSERT_NOTIFICATIONS`] for `rows`; returns the key's verdict when `record` is given and the
/// key was already used (nothing written), `None` when the rows were written.
async fn insert_rows(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    rows: &[&Notification],
    record: Option<&IdempotencyRecord>,
    clock: BatchClock,
) -> Result<Option<WriteOutcome>, Failure> {
    let key = KeyParams::new(record, clock);
    let arrays = InsertArrays::new(rows)?;
    let params: Vec<&(dyn ToSql + Sync)> =
        key.params().into_iter().chain(arrays.params()).collect();
    let row = tx.query_one(&statements.insert, &params).await?;
    keyed_verdict(tx, statements, &row, record, clock).await
}

/// Reads the end of a statement that opened with [`claim_key!`]: `None` when the write went ahead,
/// else the verdict on the key ([`WriteOutcome::Replayed`] or [`WriteOutcome::KeyReused`]).
async fn keyed_verdict(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    row: &Row,
    record: Option<&IdempotencyRecord>,
    clock: BatchClock,
) -> Result<Option<WriteOutcome>, Failure> {
    let Some(record) = record else {
        return Ok(None);
    };
    let recorded: i64 = row.try_get(0).map_err(|e| column_error(0, e))?;
    let found = match decode_record(row)? {
        Some(found) => found,
        None if recorded > 0 => return Ok(None),
        None => {
            // Lost a race for the key to another node, which has committed its record by now (our
            // insert waited for it): read it. This statement is sent after the rest of the pipeline,
            // which is harmless: nothing else in a batch reads or writes that fresh record.
            let winner = tx
                .query_opt(
                    &statements.idempotency_lookup,
                    &[&record.key, &clock.expired_before],
                )
                .await?;
            match winner.as_ref().map(decode_record).transpose()?.flatten() {
                Some(found) => found,
                None => {
                    return Err(Failure::Data(format!(
                        "idempotency key {:?} was neither recorded nor found",
                        record.key
                    )))
                }
            }
        }
    };
    Ok(Some(verdict(record, found).map_err(Failure::Data)?.into()))
}

/// Decodes an idempotency record (fingerprint, status, body) from the last three columns of `row`, or
/// `None` when they are NULL (no record).
fn decode_record(row: &Row) -> Result<Option<FoundRecord>, Failure> {
    let first = row.len().saturating_sub(3);
    let fingerprint: Option<Vec<u8>> = row.try_get(first).map_err(|e| column_error(first, e))?;
    let Some(fingerprint) = fingerprint else {
        return Ok(None);
    };
    let status: i32 = row
        .try_get(first + 1)
        .map_err(|e| column_error(first + 1, e))?;
    let body: Vec<u8> = row
        .try_get(first + 2)
        .map_err(|e| column_error(first + 2, e))?;
    Ok(Some(FoundRecord {
        fingerprint,
        status: i64::from(status),
        body,
    }))
}

/// Runs one single-statement step and returns the outcomes of the requests it covers. The statement
/// is sent on the first poll (before the first await), which is what lets [`apply_batch_on`] pipeline
/// the steps.
async fn run_step(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    step: Step<'_>,
    clock: BatchClock,
) -> Result<Vec<WriteOutcome>, Failure> {
    let now = clock.now;
    let outcome = match step {
        Step::Insert { rows, requests } => {
            insert_rows(tx, statements, &rows, None, clock).await?;
            return Ok(vec![WriteOutcome::Inserted; requests]);
        }
        Step::KeyedInsert { rows, record } => {
            insert_rows(tx, statements, &rows, Some(record), clock)
                .await?
                .unwrap_or(WriteOutcome::Inserted)
        }
        Step::FireDue { .. } => {
            return Err(Failure::Data(
                "a claim of due notifications inside a pipeline (a planning bug)".to_owned(),
            ))
        }
        Step::Single(request) => match request {
            WriteRequest::Schedule {
                notification: n,
                idempotency,
            } => {
                let key = KeyParams::new(idempotency.as_ref(), clock);
                let scheduled_at = Timestamp(n.scheduled_at.unwrap_or(now.0));
                let created_at = Timestamp(n.created_at);
                let row: [&(dyn ToSql + Sync); 10] = [
                    &n.id,
                    &n.user_id,
                    &n.kind,
                    &n.title,
                    &n.message,
                    &n.channels,
                    &n.broadcast,
                    &n.data,
                    &created_at,
                    &scheduled_at,
                ];
                let params: Vec<&(dyn ToSql + Sync)> =
                    key.params().into_iter().chain(row).collect();
                let found = tx.query_one(&statements.schedule, &params).await?;
                keyed_verdict(tx, statements, &found, idempotency.as_ref(), clock)
                    .await?
                    .unwrap_or(WriteOutcome::Scheduled)
            }
            WriteRequest::CancelScheduled { id } => {
                let changed = tx.execute(&statements.cancel_scheduled, &[id]).await?;
                WriteOutcome::Cancelled(changed > 0)
            }
            WriteRequest::Purge {
                created_before,
                limit,
            } => {
                // No cut-off: the nil id, below which nothing is.
                let below =
                    created_before.map_or(Uuid::nil(), |ms| Uuid::from_bytes(first_id_of(ms)));
                let deleted = tx
                    .execute(
                        &statements.purge,
                        &[&clock.expired_before, &below, &sql_int(*limit)],
                    )
                    .await?;
                WriteOutcome::Purged(deleted)
            }
            WriteRequest::MarkRead { user_id, id } => {
                let row = tx
                    .query_opt(&statements.mark_read, &[id, user_id, &now])
                    .await?;
                let found = row.map(|row| notification_from_row(&row, 0)).transpose()?;
                WriteOutcome::MarkedRead(found.map(Box::new))
            }
            WriteRequest::MarkAllRead { user_id } => {
                let changed = tx
                    .execute(&statements.mark_all_read, &[user_id, &now])
                    .await?;
                WriteOutcome::MarkedAllRead(changed)
            }
            WriteRequest::Delete { user_id, id } => {
                let changed = tx.execute(&statements.delete, &[id, user_id]).await?;
                WriteOutcome::Deleted(changed > 0)
            }
            WriteRequest::Insert { .. } | WriteRequest::FireDue { .. } => {
                return Err(Failure::Data(
                    "an insert or claim planned as a single statement (a planning bug)".to_owned(),
                ))
            }
        },
    };
    Ok(vec![outcome])
}

/// Claims the due scheduled notifications and stores them with new ids (see
/// [`WriteRequest::FireDue`]).
async fn fire_due(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    limit: usize,
    clock: BatchClock,
    ids: &mut IdGenerator,
) -> Result<WriteOutcome, Failure> {
    let rows = tx
        .query(&statements.claim_due, &[&clock.now, &sql_int(limit)])
        .await?;
    let mut due = rows
        .iter()
        .map(|row| notification_from_row(row, 0))
        .collect::<Result<Vec<_>, _>>()?;
    // RETURNING gives no order: fire in due order.
    due.sort_by_key(|n| (n.scheduled_at, n.id));
    let fired: Vec<Arc<Notification>> = due
        .into_iter()
        .map(|n| Arc::new(fired_notification(n, ids)))
        .collect();
    if !fired.is_empty() {
        let rows: Vec<&Notification> = fired.iter().map(|n| &**n).collect();
        insert_rows(tx, statements, &rows, None, clock).await?;
    }
    Ok(WriteOutcome::Fired(fired))
}

/// Awaits the pipelined steps of one segment and appends their outcomes, in order; the first error
/// (the cause; the statements after it only say "transaction aborted") ends the batch.
async fn finish_segment(
    segment: &mut Vec<impl Future<Output = Result<Vec<WriteOutcome>, Failure>>>,
    outcomes: &mut Vec<WriteOutcome>,
) -> Result<(), Failure> {
    // join_all polls the steps for the first time in order, and each sends its statement on that
    // first poll, so the statements go out in batch order and the server runs them in that order.
    for result in join_all(segment.drain(..)).await {
        outcomes.extend(result?);
    }
    Ok(())
}

/// Applies a batch in one transaction: BEGIN, the steps pipelined (a claim of due notifications
/// waits for the steps before it), COMMIT. Any error returns early, and dropping the transaction
/// rolls it back.
async fn apply_batch_on(
    client: &mut Client,
    statements: &WriterStatements,
    requests: &[WriteRequest],
    now: Millis,
    ids: &mut IdGenerator,
) -> Result<Vec<WriteOutcome>, Failure> {
    let tx = client.transaction().await?;
    let clock = BatchClock {
        now: Timestamp(now),
        expired_before: Timestamp(idempotency_expired_before(now)),
    };
    let mut outcomes = Vec::with_capacity(requests.len());
    // Built but not polled: nothing is sent until the segment is finished.
    let mut segment = Vec::new();
    for step in plan(requests) {
        if let Step::FireDue { limit } = step {
            finish_segment(&mut segment, &mut outcomes).await?;
            outcomes.push(fire_due(&tx, statements, limit, clock, ids).await?);
        } else {
            segment.push(run_step(&tx, statements, step, clock));
        }
    }
    finish_segment(&mut segment, &mut outcomes).await?;
    drop(segment); // empty now; it borrowed `tx`
    tx.commit().await?;
    Ok(outcomes)
}

/// The store thread's connection.
pub(crate) struct PostgresWriter {
    /// The connection, reconnecting as needed.
    link: Link<WriterStatements>,
}

impl PostgresWriter {
    /// Connects (the migrations must have run: the statements are prepared against the tables).
    pub(crate) fn open(target: &PostgresTarget) -> Result<PostgresWriter, String> {
        Ok(PostgresWriter {
            link: Link::open(target, "writer".to_owned())?,
        })
    }
}

impl WriteBackend for PostgresWriter {
    fn apply_batch(
        &mut self,
        requests: &[WriteRequest],
        now: Millis,
        ids: &mut IdGenerator,
    ) -> Result<Vec<WriteOutcome>, BackendError> {
        self.link.run(async |client, statements| {
            apply_batch_on(client, statements, requests, now, ids).await
        })
    }
}

/// A reader thread's prepared statements.
struct ReaderStatements {
    /// [`HISTORY`].
    history: Statement,
    /// [`HISTORY_UNREAD`].
    history_unread: Statement,
    /// [`REPLAY`].
    replay: Statement,
    /// [`SCHEDULED`].
    scheduled: Statement,
    /// [`PING`].
    ping: Statement,
}

impl Statements for ReaderStatements {
    const READ_ONLY: bool = true;

    async fn prepare(client: &Client) -> Result<ReaderStatements, tokio_postgres::Error> {
        Ok(ReaderStatements {
            history: client.prepare(HISTORY).await?,
            history_unread: client.prepare(HISTORY_UNREAD).await?,
            replay: client.prepare(REPLAY).await?,
            scheduled: client.prepare(SCHEDULED).await?,
            ping: client.prepare(PING).await?,
        })
    }
}

/// A reader thread's connection.
pub(crate) struct PostgresReader {
    /// The connection (read-only sessions), reconnecting as needed.
    link: Link<ReaderStatements>,
}

impl PostgresReader {
    /// Connects reader number `index` (for logs).
    pub(crate) fn open(target: &PostgresTarget, index: usize) -> Result<PostgresReader, String> {
        Ok(PostgresReader {
            link: Link::open(target, format!("reader {index}"))?,
        })
    }
}

/// Reads a count column as the API's unsigned count.
fn count(row: &Row, index: usize) -> Result<u64, Failure> {
    let n: i64 = row.try_get(index).map_err(|e| column_error(index, e))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

impl ReadBackend for PostgresReader {
    fn history(&mut self, query: &HistoryQuery) -> Result<HistoryPage, BackendError> {
        let before = query.before.unwrap_or(ID_ABOVE_ALL);
        // One more than asked: whether it exists says whether there is a next page.
        let fetch = sql_int(query.limit).saturating_add(1);
        self.link.run(async |client, statements| {
            let statement = if query.unread_only {
                &statements.history_unread
            } else {
                &statements.history
            };
            let rows = client
                .query(statement, &[&query.user_id, &before, &fetch])
                .await?;
            let Some(first) = rows.first() else {
                return Err(Failure::Data("history returned no row".to_owned()));
            };
            let total = count(first, 0)?;
            let unread = count(first, 1)?;
            let mut notifications = Vec::with_capacity(rows.len());
            for row in &rows {
                // The LEFT JOIN's row for an empty page has no notification.
                let id: Option<Uuid> = row
                    .try_get(HISTORY_COUNT_COLUMNS)
                    .map_err(|e| column_error(HISTORY_COUNT_COLUMNS, e))?;
                if id.is_some() {
                    notifications.push(notification_from_row(row, HISTORY_COUNT_COLUMNS)?);
                }
            }
            let more = notifications.len() > query.limit;
            notifications.truncate(query.limit);
            let next_before = if more {
                notifications.last().map(|n| n.id)
            } else {
                None
            };
            Ok(HistoryPage {
                notifications,
                total,
                unread,
                next_before,
            })
        })
    }

    fn replay(&mut self, query: &ReplayQuery) -> Result<Vec<Notification>, BackendError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = sql_int(query.limit);
        self.link.run(async |client, statements| {
            let rows = client
                .query(
                    &statements.replay,
                    &[&query.user_id, &query.since, &limit, &query.channels],
                )
                .await?;
            rows.iter()
                .map(|row| notification_from_row(row, 0))
                .collect()
        })
    }

    fn scheduled(&mut self, id: Uuid) -> Result<Option<Notification>, BackendError> {
        self.link.run(async |client, statements| {
            let row = client.query_opt(&statements.scheduled, &[&id]).await?;
            row.map(|row| notification_from_row(&row, 0)).transpose()
        })
    }

    fn ping(&mut self) -> Result<(), BackendError> {
        self.link.run(async |client, statements| {
            client.query_one(&statements.ping, &[]).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
