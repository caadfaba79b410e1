-- 0007: the id clock, so that id order is commit order across every node sharing this database
-- (docs/architecture.md, "Ids across nodes"; the SQLite variant, migrations/sqlite/0007_id_clock.sql,
-- has nothing to do).
--
-- One row: the greatest notification id any node has committed. A node's store thread locks it
-- (`SELECT … FOR UPDATE`) first thing in every transaction that stores notifications or changes
-- inboxes, moves its id generator past it, numbers its batch above it, and writes its own greatest id
-- back before COMMIT. The lock is held until COMMIT, so a later transaction of any node reads an id
-- at least as great as every id committed before it: a notification committed later has a greater
-- id, and a client resuming "after id X" on any node misses nothing committed after X. Being taken
-- first, the lock also orders the `user_counters` row locks of migration 4 between nodes (no
-- deadlock between two nodes' batches).
CREATE TABLE id_clock (
    -- Always true: the table has one row.
    one     boolean NOT NULL PRIMARY KEY DEFAULT true CHECK (one),
    last_id uuid    NOT NULL
);

INSERT INTO id_clock (one, last_id)
VALUES (true, coalesce((SELECT id FROM notifications ORDER BY id DESC LIMIT 1),
                       '00000000-0000-0000-0000-000000000000'));
