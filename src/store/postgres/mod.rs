//! The PostgreSQL backend: the shared database of a multi-node deployment (`DATABASE_URL=postgres://…`).
//!
//! Same seam, same meaning as the SQLite backend (`sqlite.rs` is the reference): one write connection for
//! the store thread, one read-only connection per reader thread, each a plain OS thread. tokio-postgres is
//! an async client, so **each of those threads owns a current-thread tokio runtime** and calls
//! `block_on` for every batch or read. Nothing here ever runs on a shard: the shards' executor is glommio,
//! and keeping tokio confined to the threads that already block on the database means no second
//! reactor, no cross-runtime waking and no `Send` futures to juggle. A current-thread runtime costs
//! nothing while idle, and the connection task it drives only needs to run while a request is in flight.
//!
//! **Writes: one transaction per drained batch, one statement per run of inserts, pipelined.** A batch
//! of consecutive insert requests (the common case: many shards sending single notifications) becomes
//! ONE `INSERT … SELECT FROM UNNEST($arrays)` that writes every row and its channel-index rows, instead
//! of one statement per row: PostgreSQL is a network round trip away, and a round trip per row (about
//! 50 µs on loopback, far more across a network) would cap ingest near 20,000 rows per second even on
//! loopback, whereas one statement of arrays costs one round trip and one plan whatever the batch size.
//! UNNEST rather than a `VALUES` list keeps the statement text fixed, so it is prepared once per
//! connection and PostgreSQL's 65,535-parameter limit never applies. Other requests (read, read-all,
//! delete) are one prepared statement each, and ALL statements of the batch are pipelined: they are sent
//! back to back on the one connection and the answers read afterwards, so a batch costs about three
//! round trips (BEGIN, the pipeline, COMMIT) rather than one per request. PostgreSQL runs pipelined
//! statements in the order they arrive, so a later request still sees an earlier one's effect, exactly
//! as on SQLite. If any statement fails, the rest of the transaction is refused by the server and the
//! whole batch is rolled back: all-or-nothing, as the seam requires.
//!
//! **Idempotency keys, scheduling and retention** follow `sqlite.rs` request for request, each in ONE
//! statement so it pipelines like the rest: a keyed insert or schedule looks its key up, records it and
//! writes (or not) through data-modifying CTEs guarded by whether the record was stored, which also
//! settles two nodes racing with one key (the loser waits for the winner's commit on the key's unique
//! index, writes nothing, and answers the winner's first answer). The claim of due scheduled
//! notifications is `FOR UPDATE SKIP LOCKED`, so nodes sharing the database fire each one exactly once
//! and never wait for each other; it needs the claimed rows back before it can insert them with new
//! ids, so it is the one request that ends the pipeline before it and starts a new one after it.
//! Retention deletes with `SKIP LOCKED` too, so a purge never waits on a row another node is using.
//!
//! **Reads** are each ONE statement: a history page and both counts come from one query, so they share
//! one snapshot (what SQLite's read transaction gives) in one round trip. Reader sessions are
//! `default_transaction_read_only`, so a bug here cannot write.
//!
//! **Reconnect with backoff.** A [`Link`](session::Link) is a connection that outlives its sessions. When a request
//! fails because the connection is gone (server restart, network cut, a `FATAL` from the server, no
//! answer within [`OPERATION_TIMEOUT`](session::OPERATION_TIMEOUT)), that request fails ([`BackendError`](crate::store::BackendError), the API's 503) and the
//! session is dropped; the next request connects again. A failed connection attempt arms a backoff
//! ([`RECONNECT_BACKOFF_MIN`](session::RECONNECT_BACKOFF_MIN) doubling up to [`RECONNECT_BACKOFF_MAX`](session::RECONNECT_BACKOFF_MAX)): until it expires, requests fail
//! at once with a message saying when the next attempt is, so a down database gets one attempt per
//! interval per thread instead of one per request, and callers get a fast 503 instead of waiting. The
//! thread never panics or exits over it. Before each request an idle session is checked for a close the
//! server announced while it was idle (a restart), so that case reconnects without failing a request.
//!
//! **Nothing waits forever.** [`CONNECT_TIMEOUT`](session::CONNECT_TIMEOUT) bounds connecting, TCP keepalives and
//! `tcp_user_timeout` make the kernel give up on a peer that vanished, `statement_timeout` makes the
//! server give up on a statement, and [`OPERATION_TIMEOUT`](session::OPERATION_TIMEOUT) bounds a whole batch or read on the client
//! side, for the case where the network silently drops everything. The price of a client-side timeout is
//! the usual one of any remote commit: if the answer to COMMIT is what got lost, the batch may have
//! committed although its callers were told 503. A producer's retry with the same `Idempotency-Key` is
//! what makes that safe.
//!
//! **Schema** (`migrations/postgres/`): `uuid` ids (byte order is UUIDv7 time order), `jsonb` data,
//! `text[]` channels plus the `notification_channels` side table that makes replay by channel an index
//! range scan, and `timestamptz` times. The model counts milliseconds since the epoch; they are written
//! and read in PostgreSQL's binary timestamp format by [`Timestamp`](rows::Timestamp), which is exact for whole
//! milliseconds, so a time read back equals the time written. `data` comes back as jsonb's normalized
//! text: the same JSON value the producer sent, possibly with different spacing and key order.
//!
//! **Which schema.** Tables live in the first schema of the session's `search_path`, which a
//! `DATABASE_URL` sets the libpq way: `postgres://user@host:5432/db?options=-csearch_path%3Dmyschema`
//! (`options` is percent-decoded to `-csearch_path=myschema`, passed to the server at connect). The
//! schema must exist.
//!
//! **TLS** (`tls.rs`): `sslmode=require|verify-ca|verify-full` (and `prefer`, `disable`) with
//! `sslrootcert=<CA file>`, libpq's meanings, through rustls. Without `sslmode` the connection is plain,
//! as it was before TLS was supported.
//!
//! **Layout.** `sql.rs` holds every statement's text; `session.rs` the target, the sessions and the
//! `Link` that reconnects; `rows.rs` the row and time codec; `write.rs` the writer (a batch
//! planned into pipelined statements); `read.rs` the readers; `migrate.rs` the migration runner.

mod migrate;
mod preferences;
mod read;
mod rows;
mod session;
mod sql;
mod tls;
mod write;

pub(crate) use migrate::{migrate, probe, MIGRATIONS};
pub(crate) use read::PostgresReader;
pub(crate) use session::PostgresTarget;
pub(crate) use write::PostgresWriter;

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
