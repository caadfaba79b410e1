-- 0002: scheduled notifications and Idempotency-Key records.
--
-- A scheduled notification waits in its own table, not in `notifications`: history, unread counts and
-- replay never have to skip pending rows, and firing is "delete from here, insert there with a new id"
-- in one transaction. The new id (taken when it fires) keeps id order equal to commit order, which is
-- what makes resume exact; the row keeps its `scheduled_at`.

CREATE TABLE scheduled_notifications (
    -- The schedule's id (UUIDv7 bytes), returned by POST /schedule, used by GET/DELETE /scheduled/:id.
    id           BLOB    NOT NULL PRIMARY KEY,
    user_id      TEXT,
    type         TEXT    NOT NULL,
    title        TEXT    NOT NULL,
    message      TEXT    NOT NULL,
    channels     TEXT    NOT NULL DEFAULT '[]',
    broadcast    INTEGER NOT NULL DEFAULT 0,
    data         TEXT    NOT NULL DEFAULT '{}',
    -- When it was scheduled (ms).
    created_at   INTEGER NOT NULL,
    -- When it is due (ms).
    scheduled_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- The scheduler's claim walks the due end of this index every tick.
CREATE INDEX scheduled_due ON scheduled_notifications (scheduled_at, id);

-- One row per Idempotency-Key seen in the last 24 h: the request's fingerprint and the answer it got.
CREATE TABLE idempotency_keys (
    key         TEXT    NOT NULL PRIMARY KEY,
    -- SHA-256 of route + body.
    fingerprint BLOB    NOT NULL,
    status      INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Expiry deletes the oldest records.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
