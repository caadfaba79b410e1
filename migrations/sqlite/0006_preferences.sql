-- 0006: per-user preferences, and the notifications quiet hours hold back (API.md, "Preferences").
--
-- A user with no row has the defaults (nothing muted, no quiet hours). `preferences` is the JSON
-- object of the API without `user_id` and `updated_at` (muted_types, muted_channels, quiet_hours),
-- read back whole: the delivery path reads preferences from each node's memory, never from here.
CREATE TABLE user_preferences (
    user_id     TEXT    NOT NULL PRIMARY KEY,
    preferences TEXT    NOT NULL,
    -- Milliseconds since the epoch.
    updated_at  INTEGER NOT NULL
);

-- A notification addressed to a user in quiet hours: stored as usual, not pushed, and pushed to the
-- user's connections once `release_at` (the end of the quiet hours) has passed. The row is taken
-- out when it is pushed, in the transaction that claims it, so it is pushed once, after a restart
-- too. Deleting the notification leaves the row; the release then finds nothing to push.
CREATE TABLE quiet_held (
    notification_id BLOB    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL,
    -- Milliseconds since the epoch.
    release_at      INTEGER NOT NULL
);

CREATE INDEX quiet_held_due ON quiet_held (release_at);
