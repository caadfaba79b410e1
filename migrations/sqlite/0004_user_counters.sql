-- 0004: per-user counters, kept in the same transaction as every change of an inbox.
--
-- History answers `total` and `unread` from one row instead of counting the user's index (a COUNT(*)
-- over 100,000 entries per page), and the live `unread` event reads the same row. Triggers keep it
-- right whoever changes `notifications`: a send or batch, a fired schedule, a read, read-all, a delete
-- and retention all run inside the store thread's batch transaction, so the counters commit with the
-- change or not at all.
--
-- `version` goes up by one with every change of the row. The store thread reports (unread, version)
-- after each commit, and a shard that receives counts from several ways (its own node, other nodes
-- through Redis) keeps the one with the highest version, so an older count never overwrites a newer
-- one on a client's badge.

CREATE TABLE user_counters (
    user_id TEXT    NOT NULL PRIMARY KEY,
    -- Notifications in the inbox.
    total   INTEGER NOT NULL DEFAULT 0,
    -- Of those, unread (`read_at` unset).
    unread  INTEGER NOT NULL DEFAULT 0,
    -- Changes of this row so far: orders the counts one user's changes report.
    version INTEGER NOT NULL DEFAULT 0
) STRICT, WITHOUT ROWID;

INSERT INTO user_counters (user_id, total, unread, version)
SELECT user_id, COUNT(*), SUM(read_at IS NULL), 1
FROM notifications WHERE user_id IS NOT NULL GROUP BY user_id;

CREATE TRIGGER user_counters_insert AFTER INSERT ON notifications
WHEN NEW.user_id IS NOT NULL
BEGIN
    INSERT INTO user_counters (user_id, total, unread, version)
    VALUES (NEW.user_id, 1, NEW.read_at IS NULL, 1)
    ON CONFLICT (user_id) DO UPDATE SET
        total = total + 1, unread = unread + (NEW.read_at IS NULL), version = version + 1;
END;

CREATE TRIGGER user_counters_delete AFTER DELETE ON notifications
WHEN OLD.user_id IS NOT NULL
BEGIN
    UPDATE user_counters
    SET total = total - 1, unread = unread - (OLD.read_at IS NULL), version = version + 1
    WHERE user_id = OLD.user_id;
END;

-- Only a change between read and unread moves the count (a second read keeps the first `read_at`).
CREATE TRIGGER user_counters_read AFTER UPDATE OF read_at ON notifications
WHEN NEW.user_id IS NOT NULL AND (OLD.read_at IS NULL) <> (NEW.read_at IS NULL)
BEGIN
    UPDATE user_counters
    SET unread = unread + (NEW.read_at IS NULL) - (OLD.read_at IS NULL), version = version + 1
    WHERE user_id = NEW.user_id;
END;
