//! The writer of the PostgreSQL backend: a batch planned into statements (each run of inserts merged
//! into one `INSERT … SELECT FROM UNNEST` of column arrays), pipelined in one transaction.

use std::collections::HashSet;
use std::future::Future;

use futures_util::future::join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement, Transaction};
use uuid::Uuid;

use super::rows::{column_error, notification_from_row, Timestamp};
use super::session::{Failure, Link, PostgresTarget, Statements};
use super::sql::{
    CANCEL_SCHEDULED, CLAIM_DUE, CLOCK_ADVANCE, CLOCK_LOCK, DELETE, IDEMPOTENCY_LOOKUP,
    INSERT_NOTIFICATIONS, MARK_ALL_READ, MARK_READ, MARK_SEEN, PURGE, RECORD_DELIVERED, SCHEDULE,
    UNREAD_COUNTS,
};
use crate::model::{IdGenerator, Notification};
use crate::store::backend::{
    fire_in_due_order, first_id_of, last_stored_id, number_above, sql_int, Applied, BackendError,
    BatchClock, CountersBackend, WriteBackend, WriteOutcome, WriteRequest,
};
use crate::store::idempotency::{verdict, FoundRecord, IdempotencyRecord};
use crate::store::{MarkedSeen, OpenError, UnreadCount};

/// The store thread's prepared statements.
struct WriterStatements {
    /// [`INSERT_NOTIFICATIONS`].
    insert: Statement,
    /// [`SCHEDULE`].
    schedule: Statement,
    /// [`IDEMPOTENCY_LOOKUP`].
    idempotency_lookup: Statement,
    /// [`CANCEL_SCHEDULED`].
    cancel_scheduled: Statement,
    /// [`CLAIM_DUE`].
    claim_due: Statement,
    /// [`PURGE`].
    purge: Statement,
    /// [`MARK_READ`].
    mark_read: Statement,
    /// [`MARK_ALL_READ`].
    mark_all_read: Statement,
    /// [`DELETE`].
    delete: Statement,
    /// [`MARK_SEEN`].
    mark_seen: Statement,
    /// [`RECORD_DELIVERED`].
    record_delivered: Statement,
    /// [`UNREAD_COUNTS`].
    unread_counts: Statement,
    /// [`CLOCK_LOCK`].
    clock_lock: Statement,
    /// [`CLOCK_ADVANCE`].
    clock_advance: Statement,
}

impl Statements for WriterStatements {
    const READ_ONLY: bool = false;

    async fn prepare(client: &Client) -> Result<WriterStatements, tokio_postgres::Error> {
        Ok(WriterStatements {
            insert: client.prepare(INSERT_NOTIFICATIONS).await?,
            schedule: client.prepare(SCHEDULE).await?,
            idempotency_lookup: client.prepare(IDEMPOTENCY_LOOKUP).await?,
            cancel_scheduled: client.prepare(CANCEL_SCHEDULED).await?,
            claim_due: client.prepare(CLAIM_DUE).await?,
            purge: client.prepare(PURGE).await?,
            mark_read: client.prepare(MARK_READ).await?,
            mark_all_read: client.prepare(MARK_ALL_READ).await?,
            delete: client.prepare(DELETE).await?,
            mark_seen: client.prepare(MARK_SEEN).await?,
            record_delivered: client.prepare(RECORD_DELIVERED).await?,
            unread_counts: client.prepare(UNREAD_COUNTS).await?,
            clock_lock: client.prepare(CLOCK_LOCK).await?,
            clock_advance: client.prepare(CLOCK_ADVANCE).await?,
        })
    }
}

/// One statement of a batch's pipeline (two for [`Step::FireDue`], which is why it runs alone).
enum Step<'a> {
    /// Consecutive [`WriteRequest::Insert`]s without a key (`requests` of them), as one insert.
    Insert {
        /// Every notification of the run, in order.
        rows: Vec<&'a Notification>,
        /// How many requests the run merges: each gets an [`WriteOutcome::Inserted`].
        requests: usize,
    },
    /// A [`WriteRequest::Insert`] with an `Idempotency-Key`: alone, since its key decides whether
    /// it writes.
    KeyedInsert {
        /// The notifications.
        rows: Vec<&'a Notification>,
        /// The key's record.
        record: &'a IdempotencyRecord,
    },
    /// A [`WriteRequest::FireDue`]: claims, then inserts what it claimed, so it waits for the
    /// statements before it and the ones after it wait for it.
    FireDue {
        /// Most to fire.
        limit: usize,
    },
    /// Any other request, one statement.
    Single(&'a WriteRequest),
}

/// Groups a batch into the statements that apply it: each run of consecutive inserts without a key
/// merges into one. Order is kept, so each statement still sees the effect of the requests before it.
fn plan(requests: &[WriteRequest]) -> Vec<Step<'_>> {
    let mut steps: Vec<Step<'_>> = Vec::new();
    for request in requests {
        match (request, steps.last_mut()) {
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: None,
                },
                Some(Step::Insert { rows, requests }),
            ) => {
                rows.extend(notifications.iter().map(|n| &**n));
                *requests += 1;
            }
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: None,
                },
                _,
            ) => steps.push(Step::Insert {
                rows: notifications.iter().map(|n| &**n).collect(),
                requests: 1,
            }),
            (
                WriteRequest::Insert {
                    notifications,
                    idempotency: Some(record),
                },
                _,
            ) => steps.push(Step::KeyedInsert {
                rows: notifications.iter().map(|n| &**n).collect(),
                record,
            }),
            (WriteRequest::FireDue { limit }, _) => steps.push(Step::FireDue { limit: *limit }),
            (other, _) => steps.push(Step::Single(other)),
        }
    }
    steps
}

/// The times of a [`BatchClock`] as statement parameters.
#[derive(Debug, Clone, Copy)]
struct StatementClock {
    /// The batch's time (`read_at`, due times, records' creation).
    now: Timestamp,
    /// Idempotency records created at or before this are expired.
    expired_before: Timestamp,
}

/// A key's record as the parameters `$1`–`$6` of a statement opening with [`claim_key!`].
struct KeyParams<'a> {
    /// `$1`; `None` for a write without a key.
    key: Option<&'a str>,
    /// `$2`.
    fingerprint: Option<&'a [u8]>,
    /// `$3`.
    status: Option<i32>,
    /// `$4`.
    body: Option<&'a [u8]>,
    /// `$5` and `$6`.
    clock: StatementClock,
}

impl<'a> KeyParams<'a> {
    /// The parameters of `record`, or the NULLs of "no key".
    fn new(record: Option<&'a IdempotencyRecord>, clock: StatementClock) -> KeyParams<'a> {
        KeyParams {
            key: record.map(|r| r.key.as_str()),
            fingerprint: record.map(|r| r.fingerprint.as_slice()),
            status: record.map(|r| i32::from(r.status)),
            body: record.map(|r| r.body.as_slice()),
            clock,
        }
    }

    /// `$1`–`$6`, in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.key,
            &self.fingerprint,
            &self.status,
            &self.body,
            &self.clock.expired_before,
            &self.clock.now,
        ]
    }
}

/// The notifications of an insert as the columns-as-arrays `$7`–`$21` of [`INSERT_NOTIFICATIONS`].
struct InsertArrays<'a> {
    /// `$7`.
    ids: Vec<Uuid>,
    /// `$8`.
    user_ids: Vec<Option<&'a str>>,
    /// `$9`.
    kinds: Vec<&'a str>,
    /// `$10`.
    titles: Vec<&'a str>,
    /// `$11`.
    messages: Vec<&'a str>,
    /// `$12`: each a JSON array of channel names.
    channels: Vec<String>,
    /// `$13`.
    broadcasts: Vec<bool>,
    /// `$14`.
    data: Vec<&'a str>,
    /// `$15`.
    created: Vec<Timestamp>,
    /// `$16`.
    read: Vec<Option<Timestamp>>,
    /// `$17`.
    delivered: Vec<Option<Timestamp>>,
    /// `$18`.
    seen: Vec<Option<Timestamp>>,
    /// `$19`.
    scheduled: Vec<Option<Timestamp>>,
    /// `$22`.
    schedule_ids: Vec<Option<Uuid>>,
    /// `$23`.
    urgent: Vec<bool>,
    /// `$20`: the channel of each channel-index row.
    channel_names: Vec<&'a str>,
    /// `$21`: the notification of each channel-index row.
    channel_ids: Vec<Uuid>,
}

impl<'a> InsertArrays<'a> {
    /// Transposes the rows into columns.
    fn new(rows: &[&'a Notification]) -> Result<InsertArrays<'a>, Failure> {
        let count = rows.len();
        let mut arrays = InsertArrays {
            ids: Vec::with_capacity(count),
            user_ids: Vec::with_capacity(count),
            kinds: Vec::with_capacity(count),
            titles: Vec::with_capacity(count),
            messages: Vec::with_capacity(count),
            channels: Vec::with_capacity(count),
            broadcasts: Vec::with_capacity(count),
            data: Vec::with_capacity(count),
            created: Vec::with_capacity(count),
            read: Vec::with_capacity(count),
            delivered: Vec::with_capacity(count),
            seen: Vec::with_capacity(count),
            scheduled: Vec::with_capacity(count),
            schedule_ids: Vec::with_capacity(count),
            urgent: Vec::with_capacity(count),
            channel_names: Vec::new(),
            channel_ids: Vec::new(),
        };
        for &n in rows {
            arrays.ids.push(n.id);
            arrays.user_ids.push(n.user_id.as_deref());
            arrays.kinds.push(&n.kind);
            arrays.titles.push(&n.title);
            arrays.messages.push(&n.message);
            arrays.channels.push(
                serde_json::to_string(&n.channels)
                    .map_err(|e| Failure::Data(format!("cannot encode channels: {e}")))?,
            );
            arrays.broadcasts.push(n.broadcast);
            arrays.data.push(&n.data);
            arrays.created.push(Timestamp(n.created_at));
            arrays.read.push(n.read_at.map(Timestamp));
            arrays.delivered.push(n.delivered_at.map(Timestamp));
            arrays.seen.push(n.seen_at.map(Timestamp));
            arrays.scheduled.push(n.scheduled_at.map(Timestamp));
            arrays.schedule_ids.push(n.schedule_id);
            arrays.urgent.push(n.urgent);
            for channel in &n.channels {
                arrays.channel_names.push(channel);
                arrays.channel_ids.push(n.id);
            }
        }
        Ok(arrays)
    }

    /// `$7`–`$23`, in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 17] {
        [
            &self.ids,
            &self.user_ids,
            &self.kinds,
            &self.titles,
            &self.messages,
            &self.channels,
            &self.broadcasts,
            &self.data,
            &self.created,
            &self.read,
            &self.delivered,
            &self.seen,
            &self.scheduled,
            &self.channel_names,
            &self.channel_ids,
            &self.schedule_ids,
            &self.urgent,
        ]
    }
}

/// Runs [`INSERT_NOTIFICATIONS`] for `rows`; returns the key's verdict when `record` is given and the
/// key was already used (nothing written), `None` when the rows were written.
async fn insert_rows(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    rows: &[&Notification],
    record: Option<&IdempotencyRecord>,
    clock: StatementClock,
) -> Result<Option<WriteOutcome>, Failure> {
    let key = KeyParams::new(record, clock);
    let arrays = InsertArrays::new(rows)?;
    let params: Vec<&(dyn ToSql + Sync)> =
        key.params().into_iter().chain(arrays.params()).collect();
    let row = tx.query_one(&statements.insert, &params).await?;
    keyed_verdict(tx, statements, &row, record, clock).await
}

/// Reads the end of a statement that opened with [`claim_key!`]: `None` when the write went ahead,
/// else the verdict on the key ([`WriteOutcome::Replayed`] or [`WriteOutcome::KeyReused`]).
async fn keyed_verdict(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    row: &Row,
    record: Option<&IdempotencyRecord>,
    clock: StatementClock,
) -> Result<Option<WriteOutcome>, Failure> {
    let Some(record) = record else {
        return Ok(None);
    };
    let recorded: i64 = row.try_get(0).map_err(|e| column_error(0, e))?;
    let found = match decode_record(row)? {
        Some(found) => found,
        None if recorded > 0 => return Ok(None),
        None => {
            // Lost a race for the key to another node, which has committed its record by now (our
            // insert waited for it): read it. This statement is sent after the rest of the pipeline,
            // which is harmless: nothing else in a batch reads or writes that fresh record.
            let winner = tx
                .query_opt(
                    &statements.idempotency_lookup,
                    &[&record.key, &clock.expired_before],
                )
                .await?;
            match winner.as_ref().map(decode_record).transpose()?.flatten() {
                Some(found) => found,
                None => {
                    return Err(Failure::Data(format!(
                        "idempotency key {:?} was neither recorded nor found",
                        record.key
                    )))
                }
            }
        }
    };
    Ok(Some(verdict(record, found).map_err(Failure::Data)?.into()))
}

/// Decodes an idempotency record (fingerprint, status, body) from the last three columns of `row`, or
/// `None` when they are NULL (no record).
fn decode_record(row: &Row) -> Result<Option<FoundRecord>, Failure> {
    let first = row.len().saturating_sub(3);
    let fingerprint: Option<Vec<u8>> = row.try_get(first).map_err(|e| column_error(first, e))?;
    let Some(fingerprint) = fingerprint else {
        return Ok(None);
    };
    let status: i32 = row
        .try_get(first + 1)
        .map_err(|e| column_error(first + 1, e))?;
    let body: Vec<u8> = row
        .try_get(first + 2)
        .map_err(|e| column_error(first + 2, e))?;
    Ok(Some(FoundRecord {
        fingerprint,
        status: i64::from(status),
        body,
    }))
}

/// Runs one single-statement step and returns the outcomes of the requests it covers. The statement
/// is sent on the first poll (before the first await), which is what lets [`apply_batch_on`] pipeline
/// the steps.
async fn run_step(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    step: Step<'_>,
    clock: StatementClock,
) -> Result<Vec<WriteOutcome>, Failure> {
    let now = clock.now;
    let outcome = match step {
        Step::Insert { rows, requests } => {
            insert_rows(tx, statements, &rows, None, clock).await?;
            return Ok(vec![WriteOutcome::Inserted; requests]);
        }
        Step::KeyedInsert { rows, record } => {
            insert_rows(tx, statements, &rows, Some(record), clock)
                .await?
                .unwrap_or(WriteOutcome::Inserted)
        }
        Step::FireDue { .. } => {
            return Err(Failure::Data(
                "a claim of due notifications inside a pipeline (a planning bug)".to_owned(),
            ))
        }
        Step::Single(request) => match request {
            WriteRequest::Schedule {
                notification: n,
                idempotency,
            } => {
                let key = KeyParams::new(idempotency.as_ref(), clock);
                let scheduled_at = Timestamp(n.scheduled_at.unwrap_or(now.0));
                let created_at = Timestamp(n.created_at);
                let row: [&(dyn ToSql + Sync); 11] = [
                    &n.id,
                    &n.user_id,
                    &n.kind,
                    &n.title,
                    &n.message,
                    &n.channels,
                    &n.broadcast,
                    &n.data,
                    &created_at,
                    &scheduled_at,
                    &n.urgent,
                ];
                let params: Vec<&(dyn ToSql + Sync)> =
                    key.params().into_iter().chain(row).collect();
                let found = tx.query_one(&statements.schedule, &params).await?;
                keyed_verdict(tx, statements, &found, idempotency.as_ref(), clock)
                    .await?
                    .unwrap_or(WriteOutcome::Scheduled)
            }
            WriteRequest::CancelScheduled { id } => {
                let changed = tx.execute(&statements.cancel_scheduled, &[id]).await?;
                WriteOutcome::Cancelled(changed > 0)
            }
            WriteRequest::Purge {
                created_before,
                limit,
            } => {
                // No cut-off: the nil id, below which nothing is.
                let below =
                    created_before.map_or(Uuid::nil(), |ms| Uuid::from_bytes(first_id_of(ms)));
                let deleted = tx
                    .execute(
                        &statements.purge,
                        &[&clock.expired_before, &below, &sql_int(*limit)],
                    )
                    .await?;
                WriteOutcome::Purged(deleted)
            }
            WriteRequest::MarkRead { user_id, id } => {
                let row = tx
                    .query_opt(&statements.mark_read, &[id, user_id, &now])
                    .await?;
                let found = row.map(|row| notification_from_row(&row, 0)).transpose()?;
                WriteOutcome::MarkedRead(found.map(Box::new))
            }
            WriteRequest::MarkAllRead { user_id } => {
                let changed = tx
                    .execute(&statements.mark_all_read, &[user_id, &now])
                    .await?;
                WriteOutcome::MarkedAllRead(changed)
            }
            WriteRequest::Delete { user_id, id } => {
                let changed = tx.execute(&statements.delete, &[id, user_id]).await?;
                WriteOutcome::Deleted(changed > 0)
            }
            WriteRequest::MarkSeen { user_id, ids } => {
                let row = tx
                    .query_one(&statements.mark_seen, &[user_id, ids, &now])
                    .await?;
                let marked: i64 = row.try_get(0).map_err(|e| column_error(0, e))?;
                let missing: Vec<Uuid> = row.try_get(1).map_err(|e| column_error(1, e))?;
                let missing: HashSet<Uuid> = missing.into_iter().collect();
                // Named in the client's order: the first of its ids that is not in the inbox.
                WriteOutcome::MarkedSeen(match ids.iter().find(|id| missing.contains(id)) {
                    Some(id) => MarkedSeen::NotInInbox(*id),
                    None => MarkedSeen::Updated(u64::try_from(marked).unwrap_or(0)),
                })
            }
            WriteRequest::RecordDelivered { receipts } => {
                let ids: Vec<Uuid> = receipts.iter().map(|(id, _)| *id).collect();
                let times: Vec<Timestamp> = receipts.iter().map(|(_, at)| Timestamp(*at)).collect();
                let changed = tx
                    .execute(&statements.record_delivered, &[&ids, &times])
                    .await?;
                WriteOutcome::RecordedDelivered(changed)
            }
            WriteRequest::SetPreferences { .. }
            | WriteRequest::HoldQuiet { .. }
            | WriteRequest::ReleaseQuiet { .. } => {
                super::preferences::apply(tx, request, now).await?
            }
            WriteRequest::Insert { .. } | WriteRequest::FireDue { .. } => {
                return Err(Failure::Data(
                    "an insert or claim planned as a single statement (a planning bug)".to_owned(),
                ))
            }
        },
    };
    Ok(vec![outcome])
}

/// Claims the due scheduled notifications and stores them with new ids (see
/// [`WriteRequest::FireDue`]).
async fn fire_due(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
    limit: usize,
    clock: StatementClock,
    ids: &mut IdGenerator,
    id_clock: &mut IdClock,
) -> Result<WriteOutcome, Failure> {
    let rows = tx
        .query(&statements.claim_due, &[&clock.now, &sql_int(limit)])
        .await?;
    let due = rows
        .iter()
        .map(|row| notification_from_row(row, 0))
        .collect::<Result<Vec<_>, _>>()?;
    if !due.is_empty() && *id_clock == IdClock::NotTaken {
        // A scheduler tick with nothing else in its batch: it has no counter rows locked yet (the
        // claim skips locked rows rather than wait), so taking the clock here keeps the order.
        let floor = lock_id_clock(tx, statements).await?;
        ids.skip_past(floor);
        *id_clock = IdClock::Held;
    }
    let fired = fire_in_due_order(due, ids);
    if !fired.is_empty() {
        let rows: Vec<&Notification> = fired.iter().map(|n| &**n).collect();
        insert_rows(tx, statements, &rows, None, clock).await?;
    }
    Ok(WriteOutcome::Fired(fired))
}

/// Awaits the pipelined steps of one segment and appends their outcomes, in order; the first error
/// (the cause; the statements after it only say "transaction aborted") ends the batch.
async fn finish_segment(
    segment: &mut Vec<impl Future<Output = Result<Vec<WriteOutcome>, Failure>>>,
    outcomes: &mut Vec<WriteOutcome>,
) -> Result<(), Failure> {
    // join_all polls the steps for the first time in order, and each sends its statement on that
    // first poll, so the statements go out in batch order and the server runs them in that order.
    for result in join_all(segment.drain(..)).await {
        outcomes.extend(result?);
    }
    Ok(())
}

/// Whether a transaction holds the id clock (migration 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdClock {
    /// Not taken (yet): the batch neither stores notifications nor changes an inbox so far.
    NotTaken,
    /// Locked until COMMIT.
    Held,
}

/// Locks the id clock ([`CLOCK_LOCK`]) and returns the greatest id committed by any node.
async fn lock_id_clock(
    tx: &Transaction<'_>,
    statements: &WriterStatements,
) -> Result<Uuid, Failure> {
    let row = tx.query_one(&statements.clock_lock, &[]).await?;
    row.try_get(0).map_err(|e| column_error(0, e))
}

/// Whether a batch takes the id clock first thing: it stores notifications (their ids must follow
/// commit order across nodes) or changes rows of `notifications` and so, through the triggers of
/// migration 4, `user_counters` rows another node may be changing too (taking the clock first
/// orders those locks). A scheduler tick alone does not: it takes the clock only when it has
/// something to fire ([`fire_due`]), so idle nodes do not queue on it ten times a second.
fn takes_id_clock_first(requests: &[WriteRequest]) -> bool {
    requests.iter().any(|r| {
        matches!(
            r,
            WriteRequest::Insert { .. }
                | WriteRequest::MarkRead { .. }
                | WriteRequest::MarkAllRead { .. }
                | WriteRequest::MarkSeen { .. }
                | WriteRequest::Delete { .. }
                | WriteRequest::Purge { .. }
        )
    })
}

/// Applies a batch in one transaction: BEGIN, the id clock when the batch needs it (then the batch's
/// ids are made greater than every id committed before, see [`number_above`]), the steps pipelined
/// (a claim of due notifications waits for the steps before it), the clock's new last id, COMMIT.
/// Any error returns early, and dropping the transaction rolls it back.
async fn apply_batch_on(
    client: &mut Client,
    statements: &WriterStatements,
    requests: &mut [WriteRequest],
    batch: BatchClock<'_>,
) -> Result<Vec<WriteOutcome>, Failure> {
    let tx = client.transaction().await?;
    let clock = StatementClock {
        now: Timestamp(batch.now),
        expired_before: Timestamp(batch.keys_expired_before),
    };
    let ids = batch.ids;
    let mut id_clock = IdClock::NotTaken;
    if takes_id_clock_first(requests) {
        let floor = lock_id_clock(&tx, statements).await?;
        if number_above(requests, floor, ids) {
            tracing::trace!(%floor, "batch numbered above another node's ids");
        }
        id_clock = IdClock::Held;
    }
    let requests: &[WriteRequest] = requests;
    let mut outcomes = Vec::with_capacity(requests.len());
    // Built but not polled: nothing is sent until the segment is finished.
    let mut segment = Vec::new();
    for step in plan(requests) {
        if let Step::FireDue { limit } = step {
            finish_segment(&mut segment, &mut outcomes).await?;
            outcomes.push(fire_due(&tx, statements, limit, clock, ids, &mut id_clock).await?);
        } else {
            segment.push(run_step(&tx, statements, step, clock));
        }
    }
    finish_segment(&mut segment, &mut outcomes).await?;
    drop(segment); // empty now; it borrowed `tx`
    if let Some(last) = last_stored_id(requests, &outcomes) {
        if id_clock != IdClock::Held {
            return Err(Failure::Data(
                "notifications stored without the id clock (a planning bug)".to_owned(),
            ));
        }
        tx.execute(&statements.clock_advance, &[&last]).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// How many times a batch that PostgreSQL chose as a deadlock's victim is applied again. Two
/// nodes' batches no longer deadlock (the id clock orders them), but a batch and the other node's
/// delivery receipts (a transaction of their own, which does not take the clock) still can.
const DEADLOCK_RETRIES: usize = 2;

/// Whether `error` is PostgreSQL aborting the transaction to break a deadlock or a serialization
/// conflict: nothing was written, and the same batch may simply be applied again.
fn is_retryable(error: &BackendError) -> bool {
    use tokio_postgres::error::SqlState;
    match error {
        BackendError::Postgres {
            cause: Some(cause), ..
        } => matches!(
            cause.code(),
            Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
        ),
        _ => false,
    }
}

/// The store thread's connection.
pub(crate) struct PostgresWriter {
    /// The connection, reconnecting as needed.
    link: Link<WriterStatements>,
}

impl PostgresWriter {
    /// Connects (the migrations must have run: the statements are prepared against the tables).
    pub(crate) fn open(target: &PostgresTarget) -> Result<PostgresWriter, OpenError> {
        Ok(PostgresWriter {
            link: Link::open(target, "writer".to_owned())?,
        })
    }
}

impl WriteBackend for PostgresWriter {
    fn apply_batch(&mut self, requests: &mut [WriteRequest], clock: BatchClock<'_>) -> Applied {
        let BatchClock {
            now,
            keys_expired_before,
            ids,
        } = clock;
        let mut attempt = 0;
        loop {
            let clock = BatchClock {
                now,
                keys_expired_before,
                ids: &mut *ids,
            };
            let result = self.link.run(async |client, statements| {
                apply_batch_on(client, statements, &mut *requests, clock).await
            });
            match result {
                Err(e) if attempt < DEADLOCK_RETRIES && is_retryable(&e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "store batch retried after a deadlock");
                }
                other => return other,
            }
        }
    }
}

impl CountersBackend for PostgresWriter {
    fn unread_counts(&mut self, users: &[&str]) -> Result<Vec<UnreadCount>, BackendError> {
        self.link.run(async |client, statements| {
            let rows = client.query(&statements.unread_counts, &[&users]).await?;
            let mut counts: Vec<UnreadCount> = users
                .iter()
                .map(|u| UnreadCount {
                    user_id: (*u).to_owned(),
                    unread: 0,
                    version: 0,
                })
                .collect();
            for row in &rows {
                let user: &str = row.try_get(0).map_err(|e| column_error(0, e))?;
                // `users` is sorted (the store thread sorts and dedups it).
                if let Ok(i) = users.binary_search(&user) {
                    counts[i].unread = super::read::count(row, 1)?;
                    counts[i].version = super::read::count(row, 2)?;
                }
            }
            Ok(counts)
        })
    }
}
