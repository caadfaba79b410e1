//! Tests of the PostgreSQL backend itself: what the store suite (`store/tests.rs`) cannot see from the
//! public API, like the schema, the plans, pipelining order, migrations racing and reconnecting.
//! Each test runs in a schema of its own (see `testing.rs`) and is skipped, outside CI, without a server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::testing::{base_url, with_param, ProxyMode, SideConnection, TestProxy, TestSchema};
use super::*;
use crate::model::NewNotification;
use crate::scheduler::IDEMPOTENCY_TTL_MS;
use crate::store::Receipt;

/// Limits short enough that an outage test takes about a second instead of the production 15.
const TEST_OPERATION_TIMEOUT: Duration = Duration::from_millis(700);
/// See [`TEST_OPERATION_TIMEOUT`].
const TEST_SETUP_TIMEOUT: Duration = Duration::from_millis(700);

fn stored(id_seed: u128, user: Option<&str>, channels: &[&str]) -> Arc<Notification> {
    let n = NewNotification {
        kind: "info".into(),
        title: "t".into(),
        message: format!("m{id_seed}"),
        user_id: user.map(str::to_owned),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        broadcast: false,
        // As jsonb prints it, so a notification read back equals the one written.
        data: r#"{"k": 1}"#.into(),
        scheduled_at: None,
    };
    // Ids built by hand: these tests call the backend directly, without the store thread.
    Arc::new(n.into_notification(Uuid::from_u128(id_seed), 1_000))
}

/// Migrates the schema and opens a writer and a reader on it.
fn open(schema: &TestSchema) -> (PostgresWriter, PostgresReader) {
    let target = PostgresTarget::parse(schema.url()).unwrap();
    migrate(&target).unwrap();
    (
        PostgresWriter::open(&target).unwrap(),
        PostgresReader::open(&target, 0).unwrap(),
    )
}

fn page(reader: &mut PostgresReader, user: &str) -> HistoryPage {
    reader
        .history(&HistoryQuery {
            user_id: user.into(),
            limit: 100,
            before: None,
            unread_only: false,
        })
        .unwrap()
}

#[test]
fn the_url_options_put_the_tables_in_the_schema_and_logs_never_show_the_password() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (_writer, mut reader) = open(&schema);
    let admin = schema.side();
    let tables = admin.strings(&format!(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = '{}' ORDER BY table_name",
        schema.name()
    ));
    assert_eq!(
        tables,
        [
            "idempotency_keys",
            "notification_channels",
            "notifications",
            "scheduled_notifications",
            "schema_migrations"
        ]
    );
    reader.ping().unwrap();

    let target = PostgresTarget::parse(
        "postgres://ns:hunter2@db.example:6432/inbox?password=hunter3&options=-csearch_path%3Dtenant_7",
    )
    .unwrap();
    let shown = format!("{target} {target:?}");
    assert!(!shown.contains("hunter"), "{shown}");
    assert!(
        shown
            .starts_with(r#"postgres://ns@db.example:6432/inbox options="-csearch_path=tenant_7""#),
        "{shown}"
    );
}

#[test]
fn migrations_are_recorded_and_safe_from_several_nodes_at_once() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let target = PostgresTarget::parse(schema.url()).unwrap();
    // Four "nodes" starting at once: the advisory lock makes them take turns, and each migration is
    // applied by exactly one of them.
    let applied: usize = std::thread::scope(|s| {
        let nodes: Vec<_> = (0..4).map(|_| s.spawn(|| migrate(&target))).collect();
        nodes.into_iter().map(|n| n.join().unwrap().unwrap()).sum()
    });
    assert_eq!(applied, MIGRATIONS.len());
    assert_eq!(
        migrate(&target).unwrap(),
        0,
        "a later start applies nothing"
    );
    let versions = schema
        .side()
        .strings("SELECT version::text FROM schema_migrations ORDER BY version");
    let expected: Vec<String> = MIGRATIONS.iter().map(|m| m.version.to_string()).collect();
    assert_eq!(versions, expected);
}

#[test]
fn a_failing_request_rolls_back_the_whole_batch() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, mut reader) = open(&schema);
    let first = stored(1, Some("u"), &["c"]);
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![first.clone()])],
            5,
            &mut IdGenerator::new(),
        )
        .unwrap();
    // Batch: a fresh insert, a read-all, then a duplicate primary key, which fails.
    let batch = [
        WriteRequest::plain_insert(vec![stored(2, Some("u"), &["c"])]),
        WriteRequest::MarkAllRead {
            user_id: "u".into(),
        },
        WriteRequest::plain_insert(vec![stored(3, Some("u"), &[]), first.clone()]),
    ];
    let err = writer
        .apply_batch(&batch, 6, &mut IdGenerator::new())
        .unwrap_err();
    assert!(err.0.contains("duplicate key"), "{err}");
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
    // The connection is usable afterwards: a refusal by the server keeps the session.
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![stored(4, Some("u"), &[])])],
            7,
            &mut IdGenerator::new(),
        )
        .unwrap();
    assert_eq!(page(&mut reader, "u").total, 2);
}

#[test]
fn requests_later_in_a_batch_see_earlier_ones() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, _reader) = open(&schema);
    let mut n = (*stored(9, Some("u"), &["c", "c", "b"])).clone();
    n.data = r#"{"k":1,"b":[true]}"#.into();
    let n = Arc::new(n);
    let batch = [
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
        .apply_batch(&batch, 42, &mut IdGenerator::new())
        .unwrap();
    let WriteOutcome::MarkedRead(Some(read)) = &outcomes[1] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(read.read_at, Some(42));
    assert_eq!(read.channels, vec!["c", "c", "b"], "channels kept as sent");
    assert_eq!(
        read.data, r#"{"b": [true], "k": 1}"#,
        "jsonb's normalized text"
    );
    assert_eq!(outcomes[2], WriteOutcome::MarkedRead(None));
    assert_eq!(outcomes[3], WriteOutcome::Deleted(true));
    assert_eq!(outcomes[4], WriteOutcome::Deleted(false));
    let left = schema
        .side()
        .number("SELECT count(*) FROM notification_channels");
    assert_eq!(left, 0, "the delete trigger removed the channel rows");
}

#[test]
fn an_operators_delete_from_another_search_path_still_removes_channel_rows() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, _reader) = open(&schema);
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![stored(
                1,
                Some("u"),
                &["c"],
            )])],
            0,
            &mut IdGenerator::new(),
        )
        .unwrap();
    let operator = SideConnection::connect(&base_url()).unwrap();
    operator
        .execute(&format!(
            "SET search_path = public; DELETE FROM {}.notifications",
            schema.name()
        ))
        .unwrap();
    let left = schema
        .side()
        .number("SELECT count(*) FROM notification_channels");
    assert_eq!(left, 0);
}

/// More statements than `join_all` polls in its simple mode (30): the pipeline must still reach the
/// server in batch order, which each read-all's count proves.
#[test]
fn a_long_mixed_batch_is_applied_in_request_order() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, mut reader) = open(&schema);
    const ROUNDS: u128 = 100;
    let mut batch = Vec::new();
    for i in 1..=ROUNDS {
        let n = stored(i, Some("u"), &["c"]);
        batch.push(WriteRequest::plain_insert(vec![n.clone()]));
        batch.push(WriteRequest::MarkAllRead {
            user_id: "u".into(),
        });
        if i % 10 == 0 {
            batch.push(WriteRequest::Delete {
                user_id: "u".into(),
                id: n.id,
            });
        }
    }
    let outcomes = writer
        .apply_batch(&batch, 7, &mut IdGenerator::new())
        .unwrap();
    assert_eq!(outcomes.len(), batch.len());
    for (request, outcome) in batch.iter().zip(&outcomes) {
        let expected = match request {
            WriteRequest::Insert { .. } => WriteOutcome::Inserted,
            // Exactly the one inserted just before is unread.
            WriteRequest::MarkAllRead { .. } => WriteOutcome::MarkedAllRead(1),
            // Deletes one inserted earlier in the same batch.
            WriteRequest::Delete { .. } => WriteOutcome::Deleted(true),
            other => panic!("not in this batch: {other:?}"),
        };
        assert_eq!(*outcome, expected);
    }
    let after = page(&mut reader, "u");
    assert_eq!((after.total, after.unread), (90, 0));
}

#[test]
fn times_round_trip_exactly_and_odd_stored_times_decode() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, mut reader) = open(&schema);
    let mut before_epoch = (*stored(1, Some("u"), &[])).clone();
    before_epoch.created_at = -1;
    before_epoch.scheduled_at = Some(1_706_524_200_123);
    let mut before_2000 = (*stored(2, Some("u"), &[])).clone();
    before_2000.created_at = POSTGRES_EPOCH_MILLIS - 1;
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![
                Arc::new(before_epoch.clone()),
                Arc::new(before_2000.clone()),
            ])],
            0,
            &mut IdGenerator::new(),
        )
        .unwrap();
    let got = page(&mut reader, "u").notifications;
    assert_eq!(got, vec![before_2000, before_epoch]);
    // An operator's edit the model cannot represent exactly: decoded, not a panic.
    schema
        .side()
        .execute("UPDATE notifications SET read_at = 'infinity', seen_at = '2024-01-29 10:30:00.0005+00'")
        .unwrap();
    let got = page(&mut reader, "u").notifications;
    assert_eq!(
        got[0].seen_at,
        Some(1_706_524_200_000),
        "rounded down to the millisecond"
    );
    assert!(got[0].read_at.is_some_and(|t| t > 1_000_000_000_000_000));
    // An absurd time fails its batch with an error, not a panic of the store thread.
    let mut absurd = (*stored(3, Some("u"), &[])).clone();
    absurd.scheduled_at = Some(Millis::MAX);
    let err = writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![Arc::new(absurd)])],
            0,
            &mut IdGenerator::new(),
        )
        .unwrap_err();
    assert!(err.0.contains("out of PostgreSQL's range"), "{err}");
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![stored(4, Some("u"), &[])])],
            0,
            &mut IdGenerator::new(),
        )
        .unwrap();
}

/// Every hot query must be an index range scan, never a scan of a whole table: these are the queries
/// that must stay fast for a user with 100k notifications. Checked on the generic plan (what a prepared
/// statement settles on) with sequential scans priced out, so this proves the indexes are USABLE for
/// each query (the partial-index predicates match); with real statistics the planner picks them.
#[test]
fn hot_queries_use_the_indexes() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let _ = open(&schema);
    let side = schema.side();
    side.execute("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        .unwrap();
    let plan = |name: &str, types: &str, sql: &str, args: &str| -> String {
        side.execute(&format!("PREPARE {name} ({types}) AS {sql}"))
            .unwrap();
        side.strings(&format!("EXPLAIN EXECUTE {name} ({args})"))
            .join("\n")
    };
    let page_args = "'u', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 51";
    let cases = [
        (
            plan("history", "text, uuid, bigint", HISTORY, page_args),
            &["notifications_user", "notifications_unread"][..],
        ),
        (
            plan(
                "history_unread",
                "text, uuid, bigint",
                HISTORY_UNREAD,
                page_args,
            ),
            &["notifications_unread"][..],
        ),
        (
            plan(
                "mark_all_read",
                "text, timestamptz",
                MARK_ALL_READ,
                "'u', now()",
            ),
            &["notifications_unread"][..],
        ),
        (
            plan(
                "replay",
                "text, uuid, bigint, text[]",
                REPLAY,
                "'u', '00000000-0000-0000-0000-000000000000', 100, '{a,b}'",
            ),
            &[
                "notifications_user",
                "notifications_broadcast",
                "notification_channels_pkey",
                "notifications_pkey",
            ][..],
        ),
        (
            plan(
                "scheduled",
                "uuid",
                SCHEDULED,
                "'00000000-0000-0000-0000-000000000000'",
            ),
            &["notifications_schedule", "scheduled_notifications_pkey"][..],
        ),
        (
            plan("claim_due", "timestamptz, bigint", CLAIM_DUE, "now(), 1000"),
            &["scheduled_due", "scheduled_notifications_pkey"][..],
        ),
        (
            plan(
                "purge",
                "timestamptz, uuid, bigint",
                PURGE,
                "now(), '00000000-0000-0000-0000-000000000000', 1000",
            ),
            &["idempotency_keys_created", "notifications_pkey"][..],
        ),
    ];
    for (plan, indexes) in cases {
        for index in indexes {
            assert!(plan.contains(index), "expected {index} in\n{plan}");
        }
        assert!(!plan.contains("Seq Scan"), "a full scan in\n{plan}");
    }
}

/// A URL for `schema` whose sessions can be found (and ended) by their application name.
fn tagged_url(schema: &TestSchema) -> (String, String) {
    let tag = format!("{}_app", schema.name());
    (
        with_param(schema.url(), &format!("application_name={tag}")),
        tag,
    )
}

#[test]
fn sessions_ended_by_the_server_reconnect_without_failing_a_request() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (url, tag) = tagged_url(&schema);
    let target = PostgresTarget::parse(&url).unwrap();
    migrate(&target).unwrap();
    let mut writer = PostgresWriter::open(&target).unwrap();
    let mut reader = PostgresReader::open(&target, 0).unwrap();
    let side = schema.side();
    let ended = side.number(&format!(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE application_name = '{tag}') AS t"
    ));
    assert_eq!(ended, 2, "the writer's and the reader's sessions");
    // Give the server's goodbye time to arrive, as it would during an idle moment.
    std::thread::sleep(Duration::from_millis(200));
    // The closed sessions are noticed before use: these succeed on fresh connections.
    writer
        .apply_batch(
            &[WriteRequest::plain_insert(vec![stored(1, Some("u"), &[])])],
            0,
            &mut IdGenerator::new(),
        )
        .unwrap();
    assert_eq!(page(&mut reader, "u").total, 1);
    reader.ping().unwrap();
}

#[test]
fn an_outage_fails_fast_backs_off_and_recovers_by_itself() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let direct = PostgresTarget::parse(schema.url()).unwrap();
    migrate(&direct).unwrap();
    let upstream = match &direct.config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => {
            format!(
                "{host}:{}",
                direct.config.get_ports().first().copied().unwrap_or(5432)
            )
        }
        other => panic!("this test needs a TCP server, not {other:?}"),
    };
    let proxy = TestProxy::start(&upstream);
    let url = schema
        .url()
        .replacen(&upstream, &format!("127.0.0.1:{}", proxy.port()), 1);
    assert_ne!(url, schema.url(), "the URL goes through the proxy");
    let target = PostgresTarget::parse(&url)
        .unwrap()
        .with_timeouts(TEST_OPERATION_TIMEOUT, TEST_SETUP_TIMEOUT);
    let mut writer = PostgresWriter::open(&target).unwrap();
    let mut reader = PostgresReader::open(&target, 0).unwrap();
    let insert = |seed: u128| {
        [WriteRequest::plain_insert(vec![stored(
            seed,
            Some("u"),
            &[],
        )])]
    };
    writer
        .apply_batch(&insert(1), 0, &mut IdGenerator::new())
        .unwrap();

    // The database goes away: the batch fails (a 503 upstream), quickly, and so does a read.
    proxy.set(ProxyMode::Down);
    let started = Instant::now();
    assert!(writer
        .apply_batch(&insert(2), 0, &mut IdGenerator::new())
        .is_err());
    assert!(reader.ping().is_err());
    assert!(
        started.elapsed() < TEST_OPERATION_TIMEOUT * 2,
        "{:?}",
        started.elapsed()
    );
    // A failed connection attempt arms the backoff (the request above made one, unless it was the
    // one to find the old connection dead, then the next makes it)...
    let backing_off = |e: &BackendError| e.0.contains("next connection attempt in");
    let first_backoff = (3..6)
        .find(|seed| {
            backing_off(
                &writer
                    .apply_batch(&insert(*seed), 0, &mut IdGenerator::new())
                    .unwrap_err(),
            )
        })
        .expect("the backoff was armed");
    // ...and until it runs out, requests fail at once, without another attempt.
    let started = Instant::now();
    for seed in first_backoff + 1..100 {
        let err = writer
            .apply_batch(&insert(seed), 0, &mut IdGenerator::new())
            .unwrap_err();
        assert!(backing_off(&err), "{err}");
    }
    assert!(
        started.elapsed() < RECONNECT_BACKOFF_MIN,
        "{:?}",
        started.elapsed()
    );

    // It comes back: within one backoff interval, both recover by themselves.
    proxy.set(ProxyMode::Up);
    let deadline = Instant::now() + RECONNECT_BACKOFF_MAX * 2;
    let mut seed = 100;
    while writer
        .apply_batch(&insert(seed), 0, &mut IdGenerator::new())
        .is_err()
    {
        assert!(Instant::now() < deadline, "the writer did not recover");
        std::thread::sleep(Duration::from_millis(20));
        seed += 1;
    }
    while reader.ping().is_err() {
        assert!(Instant::now() < deadline, "the reader did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing of the failed batches was stored; the first and the recovering one were.
    assert_eq!(page(&mut reader, "u").total, 2);

    // A network that silently drops everything: the batch fails after the operation timeout
    // instead of hanging, and the link recovers once the network does.
    proxy.set(ProxyMode::Blackhole);
    let started = Instant::now();
    let err = writer
        .apply_batch(&insert(1_000), 0, &mut IdGenerator::new())
        .unwrap_err();
    assert!(err.0.contains("no answer within"), "{err}");
    assert!(
        started.elapsed() < TEST_OPERATION_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );
    proxy.set(ProxyMode::Down);
    proxy.set(ProxyMode::Up);
    let deadline = Instant::now() + RECONNECT_BACKOFF_MAX * 2;
    while writer
        .apply_batch(&insert(1_001), 0, &mut IdGenerator::new())
        .is_err()
    {
        assert!(Instant::now() < deadline, "the writer did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A notification created at `ms` (its UUIDv7 carries that time, as the store thread's would).
fn created_at(ms: Millis, seq: u16, user: &str) -> Arc<Notification> {
    let id = Uuid::from_u128(u128::from_be_bytes(first_id_of(ms)) | (0x7 << 76) | u128::from(seq));
    let n = stored(0, Some(user), &["c"]);
    Arc::new(Notification {
        id,
        created_at: ms,
        ..(*n).clone()
    })
}

#[test]
fn retention_deletes_only_older_notifications_in_bounded_batches() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, mut r) = open(&schema);
    let now = crate::model::now_millis();
    let day = 24 * 60 * 60 * 1000;
    let old: Vec<_> = (0..5).map(|i| created_at(now - 3 * day, i, "u")).collect();
    let new: Vec<_> = (0..2).map(|i| created_at(now - day / 2, i, "u")).collect();
    let mut ids = IdGenerator::new();
    w.apply_batch(
        &[WriteRequest::plain_insert([old, new].concat())],
        now,
        &mut ids,
    )
    .unwrap();
    let mut purge = |created_before: Option<Millis>| {
        let out = w
            .apply_batch(
                &[WriteRequest::Purge {
                    created_before,
                    limit: 3,
                }],
                now,
                &mut ids,
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
    let channel_rows = schema
        .side()
        .number("SELECT count(*) FROM notification_channels");
    assert_eq!(
        channel_rows, 2,
        "channel rows of deleted notifications went with them"
    );
}

fn record(fingerprint: u8) -> IdempotencyRecord {
    IdempotencyRecord {
        key: "k".into(),
        fingerprint: [fingerprint; 32],
        status: 201,
        body: b"first".to_vec(),
    }
}

fn keyed_insert(seed: u128, fingerprint: u8) -> WriteRequest {
    WriteRequest::Insert {
        notifications: vec![stored(seed, Some("u"), &[])],
        idempotency: Some(record(fingerprint)),
    }
}

/// What a retry under [`record`]'s key answers.
fn first_answer() -> WriteOutcome {
    WriteOutcome::Replayed(Receipt::Answer {
        status: 201,
        body: b"first".to_vec(),
    })
}

#[test]
fn idempotency_records_replay_refuse_and_expire() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, mut r) = open(&schema);
    let mut ids = IdGenerator::new();
    let now = 10 * IDEMPOTENCY_TTL_MS;
    // Two requests with one key in one batch: the second is a retry of the first.
    let out = w
        .apply_batch(
            &[keyed_insert(1, 1), keyed_insert(2, 1), keyed_insert(3, 9)],
            now,
            &mut ids,
        )
        .unwrap();
    assert_eq!(
        out,
        [
            WriteOutcome::Inserted,
            first_answer(),
            WriteOutcome::KeyReused
        ]
    );
    assert_eq!(page(&mut r, "u").total, 1);
    // A schedule under a used key is refused the same way, and stores nothing.
    let mut pending = (*stored(4, Some("u"), &[])).clone();
    pending.scheduled_at = Some(now + 1_000);
    let out = w
        .apply_batch(
            &[WriteRequest::Schedule {
                notification: Arc::new(pending),
                idempotency: Some(record(1)),
            }],
            now,
            &mut ids,
        )
        .unwrap();
    assert_eq!(out, [first_answer()]);
    assert_eq!(r.scheduled(Uuid::from_u128(4)).unwrap(), None);
    // After 24 h the key is free again: the write goes ahead and replaces the expired record.
    let later = now + IDEMPOTENCY_TTL_MS + 1;
    let out = w
        .apply_batch(&[keyed_insert(5, 9)], later, &mut ids)
        .unwrap();
    assert_eq!(out, [WriteOutcome::Inserted]);
    assert_eq!(page(&mut r, "u").total, 2);
    // The purge removes expired records only.
    let side = schema.side();
    let purge = WriteRequest::Purge {
        created_before: None,
        limit: 1,
    };
    w.apply_batch(std::slice::from_ref(&purge), later, &mut ids)
        .unwrap();
    assert_eq!(side.number("SELECT count(*) FROM idempotency_keys"), 1);
    let much_later = later + IDEMPOTENCY_TTL_MS;
    w.apply_batch(&[purge], much_later, &mut ids).unwrap();
    assert_eq!(side.number("SELECT count(*) FROM idempotency_keys"), 0);
}

/// Two nodes on one database, the same key at the same moment: neither sees the other's record when
/// its statement starts; the loser waits for the winner's commit, stores nothing, and answers the
/// winner's first answer.
#[test]
fn a_key_raced_by_another_node_stores_once_and_replays_the_winner() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, mut r) = open(&schema);
    let now = 10 * IDEMPOTENCY_TTL_MS;
    // The other node: its record of the key is written but not committed yet.
    let other_node = schema.side();
    other_node
        .execute(&format!(
            "BEGIN; INSERT INTO idempotency_keys (key, fingerprint, status, body, created_at)
             VALUES ('k', '\\x{}', 201, 'first', to_timestamp({}))",
            "01".repeat(32),
            now / 1000
        ))
        .unwrap();
    let (outcome, waited) = std::thread::scope(|s| {
        let racing = s.spawn(|| {
            let started = Instant::now();
            let out = w.apply_batch(
                &[keyed_insert(1, 1), keyed_insert(2, 9)],
                now,
                &mut IdGenerator::new(),
            );
            (out, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        other_node.execute("COMMIT").unwrap();
        racing.join().unwrap()
    });
    assert!(
        waited >= Duration::from_millis(250),
        "it waited for the winner: {waited:?}"
    );
    assert_eq!(outcome.unwrap(), [first_answer(), WriteOutcome::KeyReused]);
    assert_eq!(page(&mut r, "u").total, 0, "the loser stored nothing");
}

#[test]
fn due_scheduled_notifications_fire_with_new_ids_in_due_order_once_across_nodes() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, mut r) = open(&schema);
    let mut ids = IdGenerator::new();
    let pending = |seed: u128, due: Millis| {
        let mut n = (*stored(seed, Some("u"), &["ch"])).clone();
        n.scheduled_at = Some(due);
        WriteRequest::Schedule {
            notification: Arc::new(n),
            idempotency: None,
        }
    };
    let out = w
        .apply_batch(
            &[
                pending(1, 300),
                pending(2, 100),
                pending(3, 9_000),
                pending(4, 200),
            ],
            50,
            &mut ids,
        )
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Scheduled; 4]);
    let shown = r.scheduled(Uuid::from_u128(2)).unwrap().unwrap();
    assert_eq!(
        (shown.scheduled_at, shown.created_at, shown.read_at),
        (Some(100), 1_000, None)
    );
    assert_eq!(shown.channels, ["ch"]);
    // Another node is firing #4 right now: it holds the row lock.
    let other_node = schema.side();
    other_node
        .execute(&format!(
            "BEGIN; SELECT id FROM scheduled_notifications WHERE id = '{}' FOR UPDATE",
            Uuid::from_u128(4)
        ))
        .unwrap();
    let started = Instant::now();
    let out = w
        .apply_batch(&[WriteRequest::FireDue { limit: 10 }], 500, &mut ids)
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "skipped, not waited for"
    );
    let [WriteOutcome::Fired(fired)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let messages: Vec<&str> = fired.iter().map(|n| n.message.as_str()).collect();
    assert_eq!(
        messages,
        vec!["m2", "m1"],
        "oldest due first; the future one waits; the locked one is the other node's"
    );
    assert!(
        fired[0].id < fired[1].id && fired[0].id > Uuid::from_u128(4),
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
    // The other node gives up its claim (rolls back): the next tick fires #4 here.
    other_node.execute("ROLLBACK").unwrap();
    let out = w
        .apply_batch(&[WriteRequest::FireDue { limit: 10 }], 500, &mut ids)
        .unwrap();
    assert!(
        matches!(out.as_slice(), [WriteOutcome::Fired(f)] if f.len() == 1 && f[0].message == "m4")
    );
    let cancelled = w
        .apply_batch(
            &[
                WriteRequest::CancelScheduled {
                    id: Uuid::from_u128(3),
                },
                WriteRequest::CancelScheduled {
                    id: Uuid::from_u128(3),
                },
            ],
            600,
            &mut ids,
        )
        .unwrap();
    assert_eq!(
        cancelled,
        [
            WriteOutcome::Cancelled(true),
            WriteOutcome::Cancelled(false)
        ]
    );
}

/// A claim of due notifications inside a batch waits for the statements before it (its insert must
/// come after them) and the ones after it wait for it.
#[test]
fn a_claim_in_the_middle_of_a_batch_keeps_request_order() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, mut r) = open(&schema);
    let mut ids = IdGenerator::new();
    let mut due = (*stored(1, Some("u"), &[])).clone();
    due.scheduled_at = Some(10);
    w.apply_batch(
        &[WriteRequest::Schedule {
            notification: Arc::new(due),
            idempotency: None,
        }],
        5,
        &mut ids,
    )
    .unwrap();
    let out = w
        .apply_batch(
            &[
                WriteRequest::plain_insert(vec![stored(2, Some("u"), &[])]),
                WriteRequest::FireDue { limit: 10 },
                WriteRequest::MarkAllRead {
                    user_id: "u".into(),
                },
            ],
            20,
            &mut ids,
        )
        .unwrap();
    assert!(matches!(&out[1], WriteOutcome::Fired(f) if f.len() == 1));
    assert_eq!(out[2], WriteOutcome::MarkedAllRead(2), "saw the fired one");
    assert_eq!(page(&mut r, "u").unread, 0);
}

#[test]
fn backoff_doubles_up_to_its_cap_and_resets_on_success() {
    let mut backoff = Backoff::new();
    let now = Instant::now();
    assert_eq!(backoff.wait_left(now), None);
    let mut waits = Vec::new();
    for _ in 0..8 {
        backoff.failed(now);
        waits.push(backoff.wait_left(now).unwrap());
    }
    assert_eq!(waits[0], RECONNECT_BACKOFF_MIN);
    assert_eq!(waits[1], RECONNECT_BACKOFF_MIN * 2);
    assert_eq!(*waits.last().unwrap(), RECONNECT_BACKOFF_MAX);
    assert_eq!(backoff.wait_left(now + RECONNECT_BACKOFF_MAX), None);
    backoff.succeeded();
    backoff.failed(now);
    assert_eq!(backoff.wait_left(now), Some(RECONNECT_BACKOFF_MIN));
}
