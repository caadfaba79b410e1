-- 0006: per-user preferences, and the notifications quiet hours hold back (PostgreSQL variant of
-- migrations/sqlite/0006_preferences.sql; same tables, same meaning, PostgreSQL types).
--
-- A user with no row has the defaults (nothing muted, no quiet hours). `preferences` is the JSON
-- object of the API without `user_id` and `updated_at` (muted_types, muted_channels, quiet_hours),
-- read back whole: the delivery path reads preferences from each node's memory, never from here.
CREATE TABLE user_preferences (
    user_id     text        NOT NULL PRIMARY KEY,
    preferences text        NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- A notification addressed to a user in quiet hours: stored as usual, not pushed, and pushed to the
-- user's connections once `release_at` (the end of the quiet hours) has passed. Nodes claim due rows
-- with FOR UPDATE SKIP LOCKED and delete them in the same transaction, so each is pushed once, by one
-- node, after a restart too.
CREATE TABLE quiet_held (
    notification_id uuid        NOT NULL PRIMARY KEY,
    user_id         text        NOT NULL,
    release_at      timestamptz NOT NULL
);

CREATE INDEX quiet_held_due ON quiet_held (release_at);
