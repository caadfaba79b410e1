//! Tests of the backend seam itself, below the store threads: ONE test body per property, run on BOTH
//! databases. [`on_both_backends!`] turns each test function, generic over a [`Harness`], into
//! `sqlite::<name>` and `postgres::<name>`; the PostgreSQL half is skipped outside CI when no server is
//! reachable (see `postgres/testing.rs`). Also the helpers both backends' own tests build requests with.
//!
//! What only one database has (SQLite's checkpointer, PostgreSQL's reconnects and pipelining) is
//! tested next to that backend; what a shard can see is tested through the store (`store/tests.rs`).

use std::sync::Arc;

use uuid::Uuid;

use super::*;
use crate::model::{now_millis, NewNotification};
use crate::scheduler::IDEMPOTENCY_TTL_MS;
use crate::store::idempotency::{IdempotencyKey, Receipt, Stamp};

/// One database under test: opens a fresh, migrated one and looks at it behind the backend's back.
pub(crate) trait Harness: Sized {
    /// Its write backend.
    type Writer: WriteBackend;
    /// Its read backend.
    type Reader: ReadBackend;
    /// Part of the database's message when a primary key is used twice.
    const DUPLICATE_KEY: &'static str;

    /// A fresh, migrated database with a writer and a reader on it; `None` skips the test (no
    /// PostgreSQL server outside CI).
    fn open() -> Option<(Self, Self::Writer, Self::Reader)>;
    /// The rows in `table`, counted on a connection of the test's own.
    fn count(&self, table: &str) -> i64;
    /// The plan of each hot query, with the indexes it must use.
    fn hot_query_plans(&self) -> Vec<(String, &'static [&'static str])>;
    /// Whether `plan` reads a whole table.
    fn scans_a_table(plan: &str) -> bool;
}

/// Declares each listed test function once per database, as `sqlite::<name>` and `postgres::<name>`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name::<crate::store::sqlite::testing::SqliteHarness>();
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::$name::<crate::store::postgres::testing::PostgresHarness>();
                }
            )*
        }
    };
}

on_both_backends!(
    a_failing_request_rolls_back_the_whole_batch,
    requests_later_in_a_batch_see_earlier_ones,
    retention_deletes_only_older_notifications_in_bounded_batches,
    idempotency_records_replay_refuse_and_expire,
    due_scheduled_notifications_fire_with_new_ids_in_due_order,
    hot_queries_use_the_indexes,
);

/// A notification with a hand-built id (these tests call a backend directly, without the store
/// thread), created at 1,000 ms. `data` is spelled as PostgreSQL's jsonb prints it, so a notification
/// read back equals the one written on both databases.
pub(crate) fn stored(id_seed: u128, user: Option<&str>, channels: &[&str]) -> Arc<Notification> {
    let n = NewNotification {
        kind: "info".into(),
        title: "t".into(),
        message: format!("m{id_seed}"),
        user_id: user.map(str::to_owned),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        broadcast: false,
        data: r#"{"k": 1}"#.into(),
        scheduled_at: None,
        urgent: false,
    };
    Arc::new(n.into_notification(Uuid::from_u128(id_seed), 1_000))
}

/// A notification created at `ms` (its UUIDv7 carries that time, as the store thread's would).
pub(crate) fn created_at(ms: Millis, seq: u16, user: &str) -> Arc<Notification> {
    let id = Uuid::from_u128(u128::from_be_bytes(first_id_of(ms)) | (0x7 << 76) | u128::from(seq));
    let n = stored(0, Some(user), &["c"]);
    Arc::new(Notification {
        id,
        created_at: ms,
        ..(*n).clone()
    })
}

/// The first page (up to 100) of `user`'s inbox.
pub(crate) fn page(reader: &mut impl ReadBackend, user: &str) -> HistoryPage {
    reader
        .history(&HistoryQuery {
            user_id: user.into(),
            limit: 100,
            before: None,
            unread_only: false,
            undelivered_only: false,
            unseen_only: false,
        })
        .unwrap()
}

/// Stores notification `seed` for user `u` in a batch of its own: proof that a writer works.
pub(crate) fn insert_one(writer: &mut impl WriteBackend, seed: u128) {
    let insert = WriteRequest::plain_insert(vec![stored(seed, Some("u"), &[])]);
    let mut ids = IdGenerator::new();
    assert_eq!(
        writer
            .apply_batch(&mut [insert], BatchClock::at(1_000, &mut ids))
            .unwrap(),
        [WriteOutcome::Inserted]
    );
}

/// An insert of notification `seed` for user `u` under the key `k`, for the request `fingerprint`.
pub(crate) fn keyed_insert(seed: u128, fingerprint: u8) -> WriteRequest {
    let n = stored(seed, Some("u"), &[]);
    let key = IdempotencyKey {
        key: "k".into(),
        fingerprint: [fingerprint; 32],
    };
    let record = IdempotencyRecord::new(key, &Receipt::inserted(std::slice::from_ref(&n)));
    WriteRequest::Insert {
        notifications: vec![n],
        idempotency: Some(record),
    }
}

fn a_failing_request_rolls_back_the_whole_batch<H: Harness>() {
    let Some((_db, mut writer, mut reader)) = H::open() else {
        return;
    };
    let first = stored(1, Some("u"), &["c"]);
    writer
        .apply_batch(
            &mut [WriteRequest::plain_insert(vec![first.clone()])],
            BatchClock::at(5, &mut IdGenerator::new()),
        )
        .unwrap();
    // Batch: a fresh insert, a read-all, then a duplicate primary key, which fails.
    let mut batch = [
        WriteRequest::plain_insert(vec![stored(2, Some("u"), &["c"])]),
        WriteRequest::MarkAllRead {
            user_id: "u".into(),
        },
        WriteRequest::plain_insert(vec![stored(3, Some("u"), &[]), first.clone()]),
    ];
    let err = writer
        .apply_batch(&mut batch, BatchClock::at(6, &mut IdGenerator::new()))
        .unwrap_err();
    assert!(err.to_string().contains(H::DUPLICATE_KEY), "{err}");
    let after = page(&mut reader, "u");
    assert_eq!(
        after.total, 1,
        "neither insert of the failed batch is there"
    );
    assert_eq!(after.unread, 1, "the read-all was rolled back too");
    let replay = reader
        .replay(&ReplayQuery {
            user_id: None,
            channels: vec!["c".into()],
            since: Uuid::nil(),
            limit: 10,
        })
        .unwrap();
    assert_eq!(replay.len(), 1, "no channel row of the failed batch");
    // The connection is usable afterwards: a refusal by the database keeps the session.
    insert_one(&mut writer, 4);
    assert_eq!(page(&mut reader, "u").total, 2);
}

fn requests_later_in_a_batch_see_earlier_ones<H: Harness>() {
    let Some((db, mut writer, _reader)) = H::open() else {
        return;
    };
    let n = stored(9, Some("u"), &["c", "c", "b"]);
    let mut batch = [
        WriteRequest::plain_insert(vec![n.clone()]),
        WriteRequest::MarkRead {
            user_id: "u".into(),
            id: n.id,
        },
        WriteRequest::MarkRead {
            user_id: "other".into(),
            id: n.id,
        },
        WriteRequest::Delete {
            user_id: "u".into(),
            id: n.id,
        },
        WriteRequest::Delete {
            user_id: "u".into(),
            id: n.id,
        },
    ];
    let outcomes = writer
        .apply_batch(&mut batch, BatchClock::at(42, &mut IdGenerator::new()))
        .unwrap();
    let WriteOutcome::MarkedRead(Some(read)) = &outcomes[1] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(read.read_at, Some(42));
    assert_eq!(read.channels, vec!["c", "c", "b"], "channels kept as sent");
    assert_eq!(read.data, n.data);
    assert_eq!(outcomes[2], WriteOutcome::MarkedRead(None));
    assert_eq!(outcomes[3], WriteOutcome::Deleted(true));
    assert_eq!(outcomes[4], WriteOutcome::Deleted(false));
    assert_eq!(
        db.count("notification_channels"),
        0,
        "the delete trigger removed the channel rows"
    );
}

fn retention_deletes_only_older_notifications_in_bounded_batches<H: Harness>() {
    let Some((db, mut w, mut r)) = H::open() else {
        return;
    };
    let now = now_millis();
    let day = 24 * 60 * 60 * 1000;
    let old: Vec<_> = (0..5).map(|i| created_at(now - 3 * day, i, "u")).collect();
    let new: Vec<_> = (0..2).map(|i| created_at(now - day / 2, i, "u")).collect();
    let mut ids = IdGenerator::new();
    w.apply_batch(
        &mut [WriteRequest::plain_insert([old, new].concat())],
        BatchClock::at(now, &mut ids),
    )
    .unwrap();
    let mut purge = |created_before: Option<Millis>| {
        let out = w
            .apply_batch(
                &mut [WriteRequest::Purge {
                    created_before,
                    limit: 3,
                }],
                BatchClock::at(now, &mut ids),
            )
            .unwrap();
        match out.as_slice() {
            [WriteOutcome::Purged(n)] => *n,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(purge(None), 0, "no retention: nothing deleted");
    assert_eq!(purge(Some(now - 2 * day)), 3, "bounded by the limit");
    assert_eq!(purge(Some(now - 2 * day)), 2);
    assert_eq!(purge(Some(now - 2 * day)), 0);
    assert_eq!(page(&mut r, "u").total, 2, "the recent ones stay");
    assert_eq!(
        db.count("notification_channels"),
        2,
        "channel rows of deleted notifications went with them"
    );
}

fn idempotency_records_replay_refuse_and_expire<H: Harness>() {
    let Some((db, mut w, mut r)) = H::open() else {
        return;
    };
    let mut ids = IdGenerator::new();
    let now = 10 * IDEMPOTENCY_TTL_MS;
    // What the first request under the key committed, as a retry gets it back.
    let first = WriteOutcome::Replayed(Receipt::Inserted(vec![Stamp {
        id: Uuid::from_u128(1),
        created_at: 1_000,
    }]));
    // Two requests with one key in one batch: the second is a retry of the first.
    let out = w
        .apply_batch(
            &mut [keyed_insert(1, 1), keyed_insert(2, 1), keyed_insert(3, 9)],
            BatchClock::at(now, &mut ids),
        )
        .unwrap();
    assert_eq!(
        out,
        [
            WriteOutcome::Inserted,
            first.clone(),
            WriteOutcome::KeyReused
        ]
    );
    assert_eq!(page(&mut r, "u").total, 1);
    // A schedule under a used key is answered the same way, and stores nothing.
    let mut pending = (*stored(4, Some("u"), &[])).clone();
    pending.scheduled_at = Some(now + 1_000);
    let WriteRequest::Insert { idempotency, .. } = keyed_insert(4, 1) else {
        unreachable!()
    };
    let out = w
        .apply_batch(
            &mut [WriteRequest::Schedule {
                notification: Arc::new(pending),
                idempotency,
            }],
            BatchClock::at(now, &mut ids),
        )
        .unwrap();
    assert_eq!(out, [first]);
    assert_eq!(r.scheduled(Uuid::from_u128(4)).unwrap(), None);
    // After 24 h the key is free again: the write goes ahead and replaces the expired record.
    let later = now + IDEMPOTENCY_TTL_MS + 1;
    let out = w
        .apply_batch(&mut [keyed_insert(5, 9)], BatchClock::at(later, &mut ids))
        .unwrap();
    assert_eq!(out, [WriteOutcome::Inserted]);
    assert_eq!(page(&mut r, "u").total, 2);
    // The purge removes expired records only.
    let purge = WriteRequest::Purge {
        created_before: None,
        limit: 1,
    };
    w.apply_batch(&mut [purge.clone()], BatchClock::at(later, &mut ids))
        .unwrap();
    assert_eq!(db.count("idempotency_keys"), 1);
    let much_later = later + IDEMPOTENCY_TTL_MS;
    w.apply_batch(&mut [purge], BatchClock::at(much_later, &mut ids))
        .unwrap();
    assert_eq!(db.count("idempotency_keys"), 0);
}

/// A pending scheduled notification `seed` for user `u` on channel `ch`, due at `due`.
pub(crate) fn pending(seed: u128, due: Millis) -> WriteRequest {
    let mut n = (*stored(seed, Some("u"), &["ch"])).clone();
    n.scheduled_at = Some(due);
    WriteRequest::Schedule {
        notification: Arc::new(n),
        idempotency: None,
    }
}

fn due_scheduled_notifications_fire_with_new_ids_in_due_order<H: Harness>() {
    let Some((_db, mut w, mut r)) = H::open() else {
        return;
    };
    let mut ids = IdGenerator::new();
    let mut schedules = [pending(1, 300), pending(2, 100), pending(3, 9_000)];
    let out = w
        .apply_batch(&mut schedules, BatchClock::at(50, &mut ids))
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Scheduled; 3]);
    let shown = r.scheduled(Uuid::from_u128(2)).unwrap().unwrap();
    assert_eq!(
        (shown.scheduled_at, shown.created_at, shown.read_at),
        (Some(100), 1_000, None)
    );
    assert_eq!(shown.channels, ["ch"]);
    let out = w
        .apply_batch(
            &mut [WriteRequest::FireDue { limit: 10 }],
            BatchClock::at(500, &mut ids),
        )
        .unwrap();
    let [WriteOutcome::Fired(fired)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let messages: Vec<&str> = fired.iter().map(|n| n.message.as_str()).collect();
    assert_eq!(
        messages,
        vec!["m2", "m1"],
        "oldest due first; the future one waits"
    );
    assert!(
        fired[0].id < fired[1].id && fired[0].id > Uuid::from_u128(3),
        "fresh, ordered ids"
    );
    assert_eq!(fired[0].scheduled_at, Some(100));
    // No longer pending: the lookup finds the notification it fired as.
    let traced = r.scheduled(Uuid::from_u128(2)).unwrap().unwrap();
    assert_eq!(
        (traced.id, traced.schedule_id),
        (fired[0].id, Some(Uuid::from_u128(2)))
    );
    assert_eq!(fired[0].schedule_id, Some(Uuid::from_u128(2)));
    assert!(r.scheduled(Uuid::from_u128(3)).unwrap().is_some());
    let inbox = page(&mut r, "u");
    assert_eq!(inbox.total, 2);
    assert_eq!(inbox.notifications[1], *fired[0], "stored as fired");
    let cancel = WriteRequest::CancelScheduled {
        id: Uuid::from_u128(3),
    };
    let cancelled = w
        .apply_batch(&mut [cancel.clone(), cancel], BatchClock::at(600, &mut ids))
        .unwrap();
    assert_eq!(
        cancelled,
        [
            WriteOutcome::Cancelled(true),
            WriteOutcome::Cancelled(false)
        ]
    );
}

/// Every hot query must be an index range scan, never a scan of a whole table: these are the queries
/// that must stay fast for a user with 100k notifications.
fn hot_queries_use_the_indexes<H: Harness>() {
    let Some((db, _writer, _reader)) = H::open() else {
        return;
    };
    for (plan, indexes) in db.hot_query_plans() {
        for index in indexes {
            assert!(plan.contains(index), "expected {index} in\n{plan}");
        }
        assert!(!H::scans_a_table(&plan), "a full scan in\n{plan}");
    }
}
