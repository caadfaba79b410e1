//! The SQL text of the PostgreSQL backend: every statement the writer and the readers prepare, and
//! the bookkeeping table of the migration runner. Only text lives here, so a statement and the comment
//! that says why it is shaped so stay together; `write.rs` and `read.rs` bind the parameters.

/// The bookkeeping table of the migration runner.
pub(super) const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    bigint      NOT NULL PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The columns of a notification row, in the order [`notification_from_row`] reads them. `data` is read
/// as text: the model keeps the producer's JSON as text, to splice into encodings unchanged.
macro_rules! columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data::text AS data, created_at, \
         read_at, delivered_at, seen_at, scheduled_at, schedule_id, urgent"
    };
}

/// The columns of a pending scheduled row, in the order of [`columns!`] (the fields a pending
/// notification cannot have yet are NULL), so [`notification_from_row`] decodes both tables.
macro_rules! scheduled_columns {
    () => {
        "id, user_id, type, title, message, channels, broadcast, data::text AS data, created_at, \
         NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, scheduled_at, NULL::uuid, \
         urgent"
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
/// array with one element per notification (`$7`–`$19`, and `$22` for `schedule_id` and `$23` for
/// `urgent`, numbered after the others because they came later; `channels` as a JSON array text per notification, since
/// PostgreSQL arrays cannot be ragged), turned back into rows by UNNEST; the channel rows come as two
/// parallel arrays of (channel, id) (`$20`, `$21`). The CTEs' inserts run
/// even though nothing reads from them. `ON CONFLICT DO NOTHING`: a producer may list the same channel
/// twice; it is one channel.
pub(super) const INSERT_NOTIFICATIONS: &str = concat!(
    claim_key!(),
    "
    inserted AS (
        INSERT INTO notifications (id, user_id, type, title, message, channels, broadcast, data,
                                   created_at, read_at, delivered_at, seen_at, scheduled_at,
                                   schedule_id, urgent)
        SELECT n.id, n.user_id, n.type, n.title, n.message,
               ARRAY(SELECT c.name FROM jsonb_array_elements_text(n.channels::jsonb)
                                        WITH ORDINALITY AS c(name, position)
                     ORDER BY c.position),
               n.broadcast, n.data::jsonb, n.created_at, n.read_at, n.delivered_at, n.seen_at,
               n.scheduled_at, n.schedule_id, n.urgent
        FROM UNNEST($7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                    $13::boolean[], $14::text[], $15::timestamptz[], $16::timestamptz[],
                    $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $22::uuid[],
                    $23::boolean[])
             AS n(id, user_id, type, title, message, channels, broadcast, data, created_at,
                  read_at, delivered_at, seen_at, scheduled_at, schedule_id, urgent)
        WHERE (SELECT yes FROM proceed)
    ),
    indexed AS (
        INSERT INTO notification_channels (channel, id)
        SELECT * FROM UNNEST($20::text[], $21::uuid[]) WHERE (SELECT yes FROM proceed)
        ON CONFLICT DO NOTHING
    )",
    claim_verdict!()
);
/// Locks the id clock (migration 7) until COMMIT and reads the greatest id any node has committed.
/// The first statement of every transaction that takes it, so every other row lock of that
/// transaction (the notifications', the `user_counters` rows' through the triggers of migration 4)
/// comes after it: two nodes' transactions wait for each other here, in one place, and never
/// deadlock on the rows behind it.
pub(super) const CLOCK_LOCK: &str = "SELECT last_id FROM id_clock FOR UPDATE";
/// Records the batch's greatest id (`$1`) in the id clock, under the lock [`CLOCK_LOCK`] took.
pub(super) const CLOCK_ADVANCE: &str = "UPDATE id_clock SET last_id = $1 WHERE last_id < $1::uuid";
/// Stores a pending scheduled notification (`$7`–`$17`) under an optional `Idempotency-Key` (see
/// [`claim_key!`]).
pub(super) const SCHEDULE: &str = concat!(
    claim_key!(),
    "
    scheduled AS (
        INSERT INTO scheduled_notifications (id, user_id, type, title, message, channels,
                                             broadcast, data, created_at, scheduled_at, urgent)
        SELECT $7::uuid, $8::text, $9::text, $10::text, $11::text, $12::text[], $13::boolean,
               $14::text::jsonb, $15::timestamptz, $16::timestamptz, $17::boolean
        WHERE (SELECT yes FROM proceed)
    )",
    claim_verdict!()
);
/// The unexpired record of a key, read after losing a race for it (see [`claim_key!`]).
pub(super) const IDEMPOTENCY_LOOKUP: &str =
    "SELECT fingerprint, status, body FROM idempotency_keys WHERE key = $1 AND created_at > $2";
/// Cancels a pending scheduled notification.
pub(super) const CANCEL_SCHEDULED: &str = "DELETE FROM scheduled_notifications WHERE id = $1";
/// Claims the due ones, oldest due first. `SKIP LOCKED`: rows another node is claiming right now are
/// left to it, so with several nodes on one database each notification fires exactly once and no
/// node waits for another.
pub(super) const CLAIM_DUE: &str = concat!(
    "DELETE FROM scheduled_notifications WHERE id IN (
        SELECT id FROM scheduled_notifications WHERE scheduled_at <= $1
        ORDER BY scheduled_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
    ) RETURNING ",
    scheduled_columns!()
);
/// A scheduled notification by its schedule id: the pending row, or else the notification it fired
/// as (found through the partial index `notifications_schedule`). One statement, so one snapshot: a
/// schedule that fires (on any node) while this runs is found in one table or the other.
pub(super) const SCHEDULED: &str = concat!(
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
pub(super) const PURGE: &str =
    "WITH expired AS (DELETE FROM idempotency_keys WHERE created_at <= $1)
    DELETE FROM notifications WHERE id IN (
        SELECT id FROM notifications WHERE id < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
    )";
/// `COALESCE` keeps the first `read_at`; `RETURNING` gives the row back without a second lookup.
pub(super) const MARK_READ: &str = concat!(
    "UPDATE notifications SET read_at = COALESCE(read_at, $3) WHERE id = $1 AND user_id = $2 \
     RETURNING ",
    columns!()
);
/// `read_at IS NULL` spelled out so the walk uses `notifications_unread`, touching only unread rows.
pub(super) const MARK_ALL_READ: &str =
    "UPDATE notifications SET read_at = $2 WHERE user_id = $1 AND read_at IS NULL";
/// The trigger of migration 1 removes the notification's channel rows.
pub(super) const DELETE: &str = "DELETE FROM notifications WHERE id = $1 AND user_id = $2";
/// Marks `$2` (ids) seen at `$3` in user `$1`'s inbox where not seen yet (the first `seen_at`
/// stays), all or nothing: when one of the ids is not in that inbox, nothing is updated. One row: how
/// many were marked, and the ids that are not in the inbox.
pub(super) const MARK_SEEN: &str = "WITH missing AS (
        SELECT wanted.id FROM unnest($2::uuid[]) AS wanted(id)
        WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.id = wanted.id AND n.user_id = $1)
    ),
    marked AS (
        UPDATE notifications SET seen_at = $3
        WHERE user_id = $1 AND id = ANY($2) AND seen_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM missing)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM marked), ARRAY(SELECT id FROM missing)";
/// A whole batch of delivery receipts (`$1` ids, ascending, each once; `$2` their times) in one
/// statement, only where `delivered_at` is unset, so the first delivery's time stays. The rows are
/// locked in id order first: another node records receipts for the same rows (a user connected to
/// both), and two statements locking overlapping rows in different orders would deadlock. A row
/// another node recorded meanwhile no longer matches once its lock is granted, and is left alone.
pub(super) const RECORD_DELIVERED: &str = "WITH receipts AS (
        SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) AS r(id, at)
    ),
    locked AS (
        SELECT id FROM notifications WHERE id = ANY($1) AND delivered_at IS NULL
        ORDER BY id FOR UPDATE
    )
    UPDATE notifications AS n SET delivered_at = receipts.at
    FROM locked JOIN receipts ON receipts.id = locked.id
    WHERE n.id = locked.id";

/// A history page and the inbox's counts in ONE statement, so all three come from one snapshot in one
/// round trip: the counts are the user's row of `user_counters` (migration 4; `max` makes one row of
/// zeros when the user has none), and the page (a backwards range scan of the user's index from
/// `before`) is LEFT JOINed to them, so an empty page still yields one row carrying the counts, with
/// NULL notification columns. `$filter` narrows the page (never the counts).
macro_rules! history {
    ($filter:literal) => {
        concat!(
            "SELECT counters.total, counters.unread, page.* FROM
               (SELECT coalesce(max(total), 0) AS total, coalesce(max(unread), 0) AS unread
                FROM user_counters WHERE user_id = $1) AS counters
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
/// Every history page, with the counts, indexed by `history_filters` (bit 0 unread, 1 undelivered,
/// 2 unseen). Each condition is spelled `… IS NULL` so the planner can walk the matching partial index
/// (`notifications_unread`, `notifications_undelivered`, `notifications_unseen`).
pub(super) const HISTORY_BY_FILTERS: [&str; 8] = [
    history!(""),
    history!(" AND read_at IS NULL"),
    history!(" AND delivered_at IS NULL"),
    history!(" AND delivered_at IS NULL AND read_at IS NULL"),
    history!(" AND seen_at IS NULL"),
    history!(" AND seen_at IS NULL AND read_at IS NULL"),
    history!(" AND delivered_at IS NULL AND seen_at IS NULL"),
    history!(" AND delivered_at IS NULL AND seen_at IS NULL AND read_at IS NULL"),
];
/// Where the counts sit in a [`HISTORY`] row; the notification's columns follow.
pub(super) const HISTORY_COUNT_COLUMNS: usize = 2;
/// Three kinds of indexed range scans (the user's inbox, broadcasts, and one per channel through a
/// LATERAL join, so each channel is its own short scan of the primary key rather than one scan of all
/// the channels' rows then a sort), each cut to the limit before they are combined, so a replay costs
/// O(limit × (2 + channels)) rows whatever the history's size; `id IN (...)` removes the duplicates of a
/// notification that matches several ways. A NULL user (`$1`) matches no inbox.
pub(super) const REPLAY: &str = concat!(
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
/// One user's counters; no row: a user never written to.
pub(super) const COUNTERS: &str =
    "SELECT total, unread, version FROM user_counters WHERE user_id = $1";
/// The unread counts of several users, read by the store thread after a commit.
pub(super) const UNREAD_COUNTS: &str =
    "SELECT user_id, unread, version FROM user_counters WHERE user_id = ANY($1)";
/// Touches the schema (not just the connection), so a dropped table or a wrong `search_path` shows.
pub(super) const PING: &str = "SELECT count(*) FROM schema_migrations";
/// Pending scheduled notifications, every node's: a fired one leaves the table.
pub(super) const SCHEDULED_PENDING: &str = "SELECT count(*) FROM scheduled_notifications";

/// A user's preferences (API.md, "Preferences"); the defaults are no row.
pub(super) const SET_PREFERENCES: &str =
    "INSERT INTO user_preferences (user_id, preferences, updated_at) VALUES ($1, $2, $3) \
     ON CONFLICT (user_id) DO UPDATE SET preferences = excluded.preferences, \
     updated_at = excluded.updated_at";
/// Back to the defaults.
pub(super) const FORGET_PREFERENCES: &str = "DELETE FROM user_preferences WHERE user_id = $1";
/// One user's preferences.
pub(super) const PREFERENCES: &str =
    "SELECT preferences, updated_at FROM user_preferences WHERE user_id = $1";
/// Every user's, for a node's start-up.
pub(super) const ALL_PREFERENCES: &str =
    "SELECT user_id, preferences, updated_at FROM user_preferences";
/// Notifications quiet hours hold back, as parallel arrays; a notification is held once.
pub(super) const HOLD_QUIET: &str =
    "INSERT INTO quiet_held (notification_id, user_id, release_at) \
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) ON CONFLICT DO NOTHING";
/// Claims held notifications whose quiet hours ended (`$1` now, `$2` the limit) and reads those still
/// stored. `SKIP LOCKED`: nodes releasing at the same moment each take other rows, so each is pushed
/// once; the claim is the row's deletion, committed with the batch.
pub(super) const RELEASE_QUIET: &str = concat!(
    "WITH claimed AS (
        DELETE FROM quiet_held WHERE notification_id IN (
            SELECT notification_id FROM quiet_held WHERE release_at <= $1
            ORDER BY release_at LIMIT $2 FOR UPDATE SKIP LOCKED)
        RETURNING notification_id
    ) SELECT ",
    columns!(),
    " FROM notifications WHERE id IN (SELECT notification_id FROM claimed) ORDER BY id"
);
