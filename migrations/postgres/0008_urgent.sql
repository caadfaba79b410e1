-- 0008: `urgent` is stored (PostgreSQL variant of migrations/sqlite/0008_urgent.sql): on
-- notifications and on pending scheduled ones, so history and replay show it as the live object did,
-- and a scheduled urgent notification that fires in its user's quiet hours is pushed at once.
--
-- ADD COLUMN with a constant (non-volatile) default is a catalogue change since PostgreSQL 11: rows
-- written before read the default, and no table is rewritten.
ALTER TABLE notifications ADD COLUMN urgent boolean NOT NULL DEFAULT false;
ALTER TABLE scheduled_notifications ADD COLUMN urgent boolean NOT NULL DEFAULT false;
