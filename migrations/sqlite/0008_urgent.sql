-- 0008: `urgent` is stored (API.md, "urgent"), on notifications and on pending scheduled ones, so
-- history and replay show it as the live object did, and a scheduled urgent notification that fires
-- in its user's quiet hours is pushed at once.
--
-- ADD COLUMN with a constant default changes only the schema: SQLite reads the default for rows
-- written before, so no table is rewritten.
ALTER TABLE notifications ADD COLUMN urgent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE scheduled_notifications ADD COLUMN urgent INTEGER NOT NULL DEFAULT 0;
