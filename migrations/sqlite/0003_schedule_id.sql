-- 0003: a fired scheduled notification remembers its schedule.
--
-- Firing gives a notification a new id (commit order, for exact resume), so without this column
-- nothing tied it back to the id POST /schedule answered. `schedule_id` is that id (16 UUIDv7 bytes);
-- NULL for sends and batches. GET /api/v1/notifications/scheduled/:id looks a fired one up by it.

ALTER TABLE notifications ADD COLUMN schedule_id BLOB;

-- Partial: only fired schedules have an entry, so sends and batches pay nothing for it.
CREATE INDEX notifications_schedule ON notifications (schedule_id) WHERE schedule_id IS NOT NULL;
