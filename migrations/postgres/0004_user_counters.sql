-- 0004: per-user counters, kept in the same transaction as every change of an inbox (PostgreSQL
-- variant of migrations/sqlite/0004_user_counters.sql).
--
-- History answers `total` and `unread` from one row instead of counting the user's index (a COUNT(*)
-- over 100,000 entries per page), and the live `unread` event reads the same row. Triggers keep it
-- right whoever changes `notifications` (any node's store thread, an operator's psql): a send or batch,
-- a fired schedule, a read, read-all, a delete, retention.
--
-- Statement-level triggers over transition tables: a batch insert of 4,096 rows updates each user's
-- row once, not once per notification. The updates take the users in `user_id` order, so two nodes'
-- transactions lock the rows they share in the same order. The row lock also orders two nodes'
-- changes of one user: `version` goes up by one with every change, in commit order, and a shard that
-- receives counts from several ways keeps the one with the highest version.

CREATE TABLE user_counters (
    user_id text   NOT NULL PRIMARY KEY,
    -- Notifications in the inbox.
    total   bigint NOT NULL DEFAULT 0,
    -- Of those, unread (`read_at` unset).
    unread  bigint NOT NULL DEFAULT 0,
    -- Changes of this row so far: orders the counts one user's changes report.
    version bigint NOT NULL DEFAULT 0
);

INSERT INTO user_counters (user_id, total, unread, version)
SELECT user_id, count(*), count(*) FILTER (WHERE read_at IS NULL), 1
FROM notifications WHERE user_id IS NOT NULL GROUP BY user_id;

-- Adds what one statement inserted, one upsert per user.
CREATE FUNCTION user_counters_insert() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO user_counters AS c (user_id, total, unread, version)
    SELECT user_id, count(*), count(*) FILTER (WHERE read_at IS NULL), 1
    FROM inserted_rows WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET
        total = c.total + excluded.total, unread = c.unread + excluded.unread,
        version = c.version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER user_counters_insert AFTER INSERT ON notifications
REFERENCING NEW TABLE AS inserted_rows
FOR EACH STATEMENT EXECUTE FUNCTION user_counters_insert();

CREATE FUNCTION user_counters_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE user_counters AS c
    SET total = c.total - d.total, unread = c.unread - d.unread, version = c.version + 1
    FROM (SELECT user_id, count(*) AS total, count(*) FILTER (WHERE read_at IS NULL) AS unread
          FROM deleted_rows WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY user_id) AS d
    WHERE c.user_id = d.user_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER user_counters_delete AFTER DELETE ON notifications
REFERENCING OLD TABLE AS deleted_rows
FOR EACH STATEMENT EXECUTE FUNCTION user_counters_delete();

-- Only a change between read and unread moves the count (a second read keeps the first `read_at`;
-- an update of other columns changes nothing here).
CREATE FUNCTION user_counters_read() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE user_counters AS c
    SET unread = c.unread + d.delta, version = c.version + 1
    FROM (SELECT n.user_id, sum(CASE WHEN n.read_at IS NULL THEN 1 ELSE -1 END) AS delta
          FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
          WHERE n.user_id IS NOT NULL AND (n.read_at IS NULL) <> (o.read_at IS NULL)
          GROUP BY n.user_id ORDER BY n.user_id) AS d
    WHERE c.user_id = d.user_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER user_counters_read AFTER UPDATE ON notifications
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION user_counters_read();
