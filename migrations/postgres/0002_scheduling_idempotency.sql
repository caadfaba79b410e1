-- 0002: scheduled notifications and Idempotency-Key records (PostgreSQL variant of
-- migrations/sqlite/0002_scheduling_idempotency.sql).
--
-- A scheduled notification waits in its own table, not in `notifications`: history, unread counts and
-- replay never have to skip pending rows, and firing is "delete from here, insert there with a new id"
-- in one transaction. The new id (taken when it fires) keeps id order equal to commit order, which is
-- what makes resume exact; the row keeps its `scheduled_at`. Several nodes share this table: each
-- claims due rows with `FOR UPDATE SKIP LOCKED`, so every row fires on exactly one node.

CREATE TABLE scheduled_notifications (
    -- The schedule's id (UUIDv7), returned by POST /schedule, used by GET/DELETE /scheduled/:id.
    id           uuid        NOT NULL PRIMARY KEY,
    user_id      text,
    type         text        NOT NULL,
    title        text        NOT NULL,
    message      text        NOT NULL,
    channels     text[]      NOT NULL DEFAULT '{}',
    broadcast    boolean     NOT NULL DEFAULT false,
    data         jsonb       NOT NULL DEFAULT '{}',
    -- When it was scheduled.
    created_at   timestamptz NOT NULL,
    -- When it is due.
    scheduled_at timestamptz NOT NULL
);

-- The scheduler's claim walks the due end of this index every tick.
CREATE INDEX scheduled_due ON scheduled_notifications (scheduled_at, id);

-- One row per Idempotency-Key seen in the last 24 h: the request's fingerprint and the answer it got.
CREATE TABLE idempotency_keys (
    key         text        NOT NULL PRIMARY KEY,
    -- SHA-256 of route + body.
    fingerprint bytea       NOT NULL,
    -- The first answer's HTTP status and body, returned byte for byte to a retry.
    status      integer     NOT NULL,
    body        bytea       NOT NULL,
    created_at  timestamptz NOT NULL
);

-- Expiry deletes the oldest records.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
