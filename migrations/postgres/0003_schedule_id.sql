-- 0003: a fired scheduled notification remembers its schedule (PostgreSQL variant of
-- migrations/sqlite/0003_schedule_id.sql).
--
-- Firing gives a notification a new id (commit order, for exact resume), so without this column
-- nothing tied it back to the id POST /schedule answered. `schedule_id` is that id; NULL for sends
-- and batches. GET /api/v1/notifications/scheduled/:id looks a fired one up by it. Adding a nullable
-- column without a default rewrites nothing, so this is quick on a large table.

ALTER TABLE notifications ADD COLUMN schedule_id uuid;

-- Partial: only fired schedules have an entry, so sends and batches pay nothing for it.
CREATE INDEX notifications_schedule ON notifications (schedule_id) WHERE schedule_id IS NOT NULL;
