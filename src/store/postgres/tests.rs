//! Tests of the PostgreSQL backend itself: what the store suite (`store/tests.rs`) cannot see from the
//! public API and the backend tests both databases share (`backend/tests.rs`) do not cover, like the
//! schema, jsonb, pipelining order, migrations racing and reconnecting.
//! Each test runs in a schema of its own (see `testing.rs`) and is skipped, outside CI, without a server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::migrate::MIGRATIONS;
use super::rows::POSTGRES_EPOCH_MILLIS;
use super::session::{Backoff, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN};
use super::testing::{base_url, with_param, ProxyMode, SideConnection, TestProxy, TestSchema};
use super::*;
use crate::model::{IdGenerator, Millis, Notification};
use crate::scheduler::IDEMPOTENCY_TTL_MS;
use crate::store::backend::tests::{insert_one, keyed_insert, page, pending, stored};
use crate::store::backend::{
    BackendError, BatchClock, ReadBackend, WriteBackend, WriteOutcome, WriteRequest,
};
use crate::store::Receipt;

/// Limits short enough that an outage test takes about a second instead of the production 15.
const TEST_OPERATION_TIMEOUT: Duration = Duration::from_millis(700);
/// See [`TEST_OPERATION_TIMEOUT`].
const TEST_SETUP_TIMEOUT: Duration = Duration::from_millis(700);

/// Migrates the schema and opens a writer and a reader on it.
fn open(schema: &TestSchema) -> (PostgresWriter, PostgresReader) {
    let target = PostgresTarget::parse(schema.url()).unwrap();
    migrate(&target).unwrap();
    (
        PostgresWriter::open(&target).unwrap(),
        PostgresReader::open(&target, 0).unwrap(),
    )
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
            "id_clock",
            "idempotency_keys",
            "notification_channels",
            "notifications",
            "quiet_held",
            "scheduled_notifications",
            "schema_migrations",
            "user_counters",
            "user_preferences"
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
fn a_node_whose_ids_are_behind_numbers_its_batch_above_every_committed_id() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut ahead, mut reader) = open(&schema);
    let mut behind = PostgresWriter::open(&PostgresTarget::parse(schema.url()).unwrap()).unwrap();
    // Node "ahead" commits an id a minute in the future (its clock is ahead).
    let future = Uuid::from_u64_pair(
        ((crate::model::now_millis() as u64 + 60_000) << 16) | 0x7000,
        0x8000_0000_0000_0001,
    );
    let theirs = Arc::new(Notification {
        id: future,
        ..(*stored(0, Some("u"), &[])).clone()
    });
    ahead
        .apply_batch(
            &mut [WriteRequest::plain_insert(vec![theirs])],
            BatchClock::at(0, &mut IdGenerator::new()),
        )
        .unwrap();
    // Node "behind" commits later with its own, smaller ids: they are numbered again, above.
    let mut ids = IdGenerator::new();
    let mut batch = [WriteRequest::plain_insert(vec![
        stored(1, Some("u"), &[]),
        stored(2, Some("u"), &[]),
    ])];
    behind
        .apply_batch(&mut batch, BatchClock::at(0, &mut ids))
        .unwrap();
    let WriteRequest::Insert { notifications, .. } = &batch[0] else {
        unreachable!()
    };
    let ours: Vec<Uuid> = notifications.iter().map(|n| n.id).collect();
    assert!(future < ours[0] && ours[0] < ours[1], "{future} {ours:?}");
    assert_eq!(notifications[1].message, "m2", "content and order kept");
    // A client that saw `future` resumes from it and gets both.
    let replayed = reader
        .replay(&crate::store::ReplayQuery {
            user_id: Some("u".to_owned()),
            channels: Vec::new(),
            since: future,
            limit: 10,
        })
        .unwrap();
    assert_eq!(replayed.iter().map(|n| n.id).collect::<Vec<_>>(), ours);
    // The clock holds the greatest id committed.
    let clock = schema.side().strings("SELECT last_id::text FROM id_clock");
    assert_eq!(clock, [ours[1].to_string()]);
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
fn an_operators_delete_from_another_search_path_still_removes_channel_rows() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, _reader) = open(&schema);
    writer
        .apply_batch(
            &mut [WriteRequest::plain_insert(vec![stored(
                1,
                Some("u"),
                &["c"],
            )])],
            BatchClock::at(0, &mut IdGenerator::new()),
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
        .apply_batch(&mut batch, BatchClock::at(7, &mut IdGenerator::new()))
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
            &mut [WriteRequest::plain_insert(vec![
                Arc::new(before_epoch.clone()),
                Arc::new(before_2000.clone()),
            ])],
            BatchClock::at(0, &mut IdGenerator::new()),
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
            &mut [WriteRequest::plain_insert(vec![Arc::new(absurd)])],
            BatchClock::at(0, &mut IdGenerator::new()),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("out of PostgreSQL's range"),
        "{err}"
    );
    insert_one(&mut writer, 4);
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
    insert_one(&mut writer, 1);
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
        .apply_batch(&mut insert(1), BatchClock::at(0, &mut IdGenerator::new()))
        .unwrap();

    // The database goes away: the batch fails (a 503 upstream), quickly, and so does a read.
    proxy.set(ProxyMode::Down);
    let started = Instant::now();
    assert!(writer
        .apply_batch(&mut insert(2), BatchClock::at(0, &mut IdGenerator::new()))
        .is_err());
    assert!(reader.ping().is_err());
    assert!(
        started.elapsed() < TEST_OPERATION_TIMEOUT * 2,
        "{:?}",
        started.elapsed()
    );
    // A failed connection attempt arms the backoff (the request above made one, unless it was the
    // one to find the old connection dead, then the next makes it)...
    let backing_off = |e: &BackendError| e.to_string().contains("next connection attempt in");
    let first_backoff = (3..6)
        .find(|seed| {
            backing_off(
                &writer
                    .apply_batch(
                        &mut insert(*seed),
                        BatchClock::at(0, &mut IdGenerator::new()),
                    )
                    .unwrap_err(),
            )
        })
        .expect("the backoff was armed");
    // ...and until it runs out, requests fail at once, without another attempt.
    let started = Instant::now();
    for seed in first_backoff + 1..100 {
        let err = writer
            .apply_batch(
                &mut insert(seed),
                BatchClock::at(0, &mut IdGenerator::new()),
            )
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
        .apply_batch(
            &mut insert(seed),
            BatchClock::at(0, &mut IdGenerator::new()),
        )
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
        .apply_batch(
            &mut insert(1_000),
            BatchClock::at(0, &mut IdGenerator::new()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert!(
        started.elapsed() < TEST_OPERATION_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );
    proxy.set(ProxyMode::Down);
    proxy.set(ProxyMode::Up);
    let deadline = Instant::now() + RECONNECT_BACKOFF_MAX * 2;
    while writer
        .apply_batch(
            &mut insert(1_001),
            BatchClock::at(0, &mut IdGenerator::new()),
        )
        .is_err()
    {
        assert!(Instant::now() < deadline, "the writer did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
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
                &mut [keyed_insert(1, 1), keyed_insert(2, 9)],
                BatchClock::at(now, &mut IdGenerator::new()),
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
    // The winner's record is one a node of the version before receipts wrote: its HTTP answer.
    let first_answer = WriteOutcome::Replayed(Receipt::Answer {
        status: 201,
        body: b"first".to_vec(),
    });
    assert_eq!(outcome.unwrap(), [first_answer, WriteOutcome::KeyReused]);
    assert_eq!(page(&mut r, "u").total, 0, "the loser stored nothing");
}

/// Nodes sharing the database fire each due notification exactly once and never wait for each other:
/// a row another node is claiming is skipped, and fires here once that node lets go of it. (Due order,
/// fresh ids and tracing a fired schedule are the shared backend tests'.)
#[test]
fn a_due_notification_another_node_is_claiming_is_skipped_not_waited_for() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut w, _r) = open(&schema);
    let mut ids = IdGenerator::new();
    w.apply_batch(
        &mut [pending(1, 100), pending(2, 200)],
        BatchClock::at(50, &mut ids),
    )
    .unwrap();
    // Another node is firing #2 right now: it holds the row lock.
    let other_node = schema.side();
    other_node
        .execute(&format!(
            "BEGIN; SELECT id FROM scheduled_notifications WHERE id = '{}' FOR UPDATE",
            Uuid::from_u128(2)
        ))
        .unwrap();
    let mut fire = [WriteRequest::FireDue { limit: 10 }];
    let started = Instant::now();
    let out = w
        .apply_batch(&mut fire, BatchClock::at(500, &mut ids))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "skipped, not waited for"
    );
    let fired = |out: &[WriteOutcome]| -> Vec<String> {
        match out {
            [WriteOutcome::Fired(f)] => f.iter().map(|n| n.message.clone()).collect(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(fired(&out), ["m1"], "the locked one is the other node's");
    // The other node gives up its claim (rolls back): the next tick fires #2 here.
    other_node.execute("ROLLBACK").unwrap();
    let out = w
        .apply_batch(&mut fire, BatchClock::at(500, &mut ids))
        .unwrap();
    assert_eq!(fired(&out), ["m2"]);
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
        &mut [WriteRequest::Schedule {
            notification: Arc::new(due),
            idempotency: None,
        }],
        BatchClock::at(5, &mut ids),
    )
    .unwrap();
    let out = w
        .apply_batch(
            &mut [
                WriteRequest::plain_insert(vec![stored(2, Some("u"), &[])]),
                WriteRequest::FireDue { limit: 10 },
                WriteRequest::MarkAllRead {
                    user_id: "u".into(),
                },
            ],
            BatchClock::at(20, &mut ids),
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

#[test]
fn data_reads_back_as_jsonb_normalized_text() {
    let Some(schema) = TestSchema::create() else {
        return;
    };
    let (mut writer, mut reader) = open(&schema);
    let mut n = (*stored(1, Some("u"), &[])).clone();
    n.data = r#"{"k":1,"b":[true]}"#.into();
    writer
        .apply_batch(
            &mut [WriteRequest::plain_insert(vec![Arc::new(n)])],
            BatchClock::at(1, &mut IdGenerator::new()),
        )
        .unwrap();
    let read = page(&mut reader, "u").notifications.remove(0);
    assert_eq!(
        read.data, r#"{"b": [true], "k": 1}"#,
        "jsonb's normalized text"
    );
}

#[test]
fn open_errors_keep_the_client_error_as_their_cause_and_hide_the_password() {
    use std::error::Error as _;

    use crate::store::OpenError;

    // Port 1 on loopback: nothing listens there, so the connection is refused at once, no server needed.
    let target =
        PostgresTarget::parse("postgres://ns:hunter2@127.0.0.1:1/n?connect_timeout=2").unwrap();
    let errors = [
        PostgresWriter::open(&target).err().unwrap(),
        PostgresReader::open(&target, 3).err().unwrap(),
        migrate(&target).unwrap_err(),
    ];
    let contexts = [
        "cannot connect the postgres store (writer) to postgres://ns@127.0.0.1:1/n: postgres: ",
        "cannot connect the postgres store (reader 3) to postgres://ns@127.0.0.1:1/n: postgres: ",
        "cannot migrate the postgres database postgres://ns@127.0.0.1:1/n: postgres: ",
    ];
    for (err, context) in errors.iter().zip(contexts) {
        assert!(matches!(err, OpenError::Postgres { .. }), "{err:?}");
        let shown = err.to_string();
        assert!(shown.starts_with(context), "{shown}");
        assert!(!shown.contains('\n'), "one line: {shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let cause = err.source().expect("a cause");
        let client = cause
            .downcast_ref::<tokio_postgres::Error>()
            .expect("the cause is the client's error");
        // The operating system's refusal is further down the chain, and in the one line too.
        let os = client.source().expect("the I/O error behind the client's");
        assert!(shown.ends_with(&os.to_string()), "{shown}");
    }

    let bad = PostgresTarget::parse("postgres://ns:hunter2@db:notaport/n").unwrap_err();
    assert!(matches!(bad, OpenError::Url { .. }), "{bad:?}");
    assert!(
        bad.to_string().starts_with("invalid DATABASE_URL: "),
        "{bad}"
    );
    assert!(!bad.to_string().contains("hunter2"), "{bad}");
    assert!(bad.source().unwrap().is::<tokio_postgres::Error>());
}
