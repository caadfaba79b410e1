-- 0001_init: the notification inbox and the channel index that resume reads.
--
-- Applied once by the migration runner in src/store/sqlite.rs, inside the same transaction that records
-- version 1 in schema_migrations, so a crash half-way leaves nothing behind.
--
-- Ids are UUIDv7 stored as their 16 big-endian bytes. SQLite compares BLOBs with memcmp, so byte order is
-- time order: "newest first" is `ORDER BY id DESC`, "after id X" is `id > X`, and there is no separate
-- created_at index to maintain.
--
-- Both tables are WITHOUT ROWID: the table b-tree is keyed by the id itself, so new rows append at its
-- right edge (ids only grow), a lookup by id is one b-tree descent instead of two (PK index, then rowid
-- table), and there is no hidden rowid index to update on every insert. The usual caveat, that WITHOUT
-- ROWID suits rows smaller than about 1/20 of a page, holds for the typical notification (a few hundred
-- bytes); a large one spills into overflow pages, which costs that row only.
--
-- STRICT makes SQLite reject a value of the wrong type instead of silently storing it, so the reader's
-- decoding only has to cope with corruption, not with a loose writer.

CREATE TABLE notifications (
    -- UUIDv7, 16 bytes.
    id           BLOB    NOT NULL PRIMARY KEY,
    -- The inbox it belongs to; NULL for channel-only and broadcast notifications (replay only).
    user_id      TEXT,
    type         TEXT    NOT NULL,
    title        TEXT    NOT NULL,
    message      TEXT    NOT NULL,
    -- JSON array of channel names, as delivered; notification_channels indexes it.
    channels     TEXT    NOT NULL DEFAULT '[]',
    -- 1 when sent to every connection.
    broadcast    INTEGER NOT NULL DEFAULT 0,
    -- The producer's JSON object, raw.
    data         TEXT    NOT NULL DEFAULT '{}',
    -- Milliseconds since the Unix epoch, like every time below.
    created_at   INTEGER NOT NULL,
    read_at      INTEGER,
    delivered_at INTEGER,
    seen_at      INTEGER,
    scheduled_at INTEGER
) STRICT, WITHOUT ROWID;

-- A user's history page (`user_id = ? AND id < ? ORDER BY id DESC LIMIT ?`) and total count are range
-- scans of this index. Partial: channel-only and broadcast rows (user_id NULL) would only bloat it.
CREATE INDEX notifications_user ON notifications (user_id, id) WHERE user_id IS NOT NULL;

-- Unread page and unread count touch only unread entries: once read, a row leaves this index, so the
-- unread badge of a user with 100k mostly-read notifications stays a short scan. read_at (always NULL
-- here, one byte per entry) is carried so the count is answered from the index alone: without it
-- SQLite re-checks `read_at IS NULL` in the table row of every entry.
CREATE INDEX notifications_unread ON notifications (user_id, id, read_at)
    WHERE read_at IS NULL AND user_id IS NOT NULL;

-- Broadcast replay (`broadcast = 1 AND id > ?`) walks only the broadcast rows.
CREATE INDEX notifications_broadcast ON notifications (id) WHERE broadcast = 1;

-- Replay by channel: one row per (channel, notification), so "channel c after id X" is a range scan.
CREATE TABLE notification_channels (
    channel TEXT NOT NULL,
    id      BLOB NOT NULL,
    PRIMARY KEY (channel, id)
) STRICT, WITHOUT ROWID;

-- Keep the channel index in step with every delete (the inbox DELETE route today, a retention job
-- later), whoever issues it.
CREATE TRIGGER notifications_delete_channels AFTER DELETE ON notifications
WHEN OLD.channels <> '[]'
BEGIN
    DELETE FROM notification_channels
    WHERE id = OLD.id AND channel IN (SELECT value FROM json_each(OLD.channels));
END;
