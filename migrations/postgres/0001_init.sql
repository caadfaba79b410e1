-- 0001_init: the notification inbox and the channel index that resume reads (PostgreSQL variant of
-- migrations/sqlite/0001_init.sql; same tables, same meaning, PostgreSQL types).
--
-- Applied once by the migration runner in src/store/postgres.rs, inside the same transaction that records
-- version 1 in schema_migrations, while holding the runner's advisory lock, so a crash half-way leaves
-- nothing behind and two nodes starting at once apply it once. Tables are created in the first schema of
-- the connection's search_path (set it with `?options=-csearch_path%3D<schema>` in DATABASE_URL).
--
-- Ids are UUIDv7 in the native `uuid` type, which PostgreSQL compares byte by byte, so id order is time
-- order: "newest first" is `ORDER BY id DESC`, "after id X" is `id > X`, and no created_at index is needed.
--
-- Times are `timestamptz`: the usual PostgreSQL type, readable in psql and comparable with now() by an
-- operator or a retention job. The store writes whole milliseconds (the model's unit), which timestamptz
-- (microsecond precision) holds exactly, so a time read back equals the time written.

CREATE TABLE notifications (
    -- UUIDv7, assigned by the store thread.
    id           uuid        NOT NULL PRIMARY KEY,
    -- The inbox it belongs to; NULL for channel-only and broadcast notifications (replay only).
    user_id      text,
    type         text        NOT NULL,
    title        text        NOT NULL,
    message      text        NOT NULL,
    -- The channel names, as delivered (order and repeats kept); notification_channels indexes them.
    channels     text[]      NOT NULL DEFAULT '{}',
    -- True when sent to every connection.
    broadcast    boolean     NOT NULL DEFAULT false,
    -- The producer's JSON object. jsonb, so it can be queried and indexed; it is returned normalized
    -- (key order and spacing may differ from what the producer sent; the value is the same).
    data         jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL,
    read_at      timestamptz,
    delivered_at timestamptz,
    seen_at      timestamptz,
    scheduled_at timestamptz
);

-- A user's history page (`user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3`) and total count are
-- range scans of this index (the count an index-only scan once autovacuum has marked the pages
-- all-visible). Partial: channel-only and broadcast rows (user_id NULL) would only bloat it.
CREATE INDEX notifications_user ON notifications (user_id, id) WHERE user_id IS NOT NULL;

-- Unread page, unread count and read-all touch only unread entries: once read, a row leaves this index,
-- so the unread badge of a user with 100k mostly-read notifications stays a short scan.
-- `read_at IS NULL` must be spelled out in a query for the planner to use it.
CREATE INDEX notifications_unread ON notifications (user_id, id)
    WHERE read_at IS NULL AND user_id IS NOT NULL;

-- Broadcast replay (`broadcast AND id > $1`) walks only the broadcast rows.
CREATE INDEX notifications_broadcast ON notifications (id) WHERE broadcast;

-- Replay by channel: one row per (channel, notification), so "channel c after id X" is a range scan
-- of the primary key.
CREATE TABLE notification_channels (
    channel text NOT NULL,
    id      uuid NOT NULL,
    PRIMARY KEY (channel, id)
);

-- Keep the channel index in step with every delete (the inbox DELETE route, the retention job),
-- whoever issues it. A row trigger with a primary-key lookup per channel: predictable for a single
-- delete and for a retention batch alike (a statement trigger over a transition table has no
-- statistics, and a bad plan there would scan the whole channel table).
--
-- `SET search_path FROM CURRENT` pins the function to this migration's schema, so a delete issued from a
-- session with another search_path (an operator's psql) still finds this schema's channel table.
CREATE FUNCTION notifications_delete_channels() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM notification_channels WHERE channel = ANY (OLD.channels) AND id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_delete_channels AFTER DELETE ON notifications
FOR EACH ROW WHEN (OLD.channels <> '{}')
EXECUTE FUNCTION notifications_delete_channels();
