//! Tests of the whole store (handle, threads, database) through its public API, as a shard uses it.
//!
//! ONE suite, TWO stores: every test here is a plain function taking the [`Database`] it runs against,
//! and [`on_both_stores!`] turns each into two `#[test]`s, `sqlite::<name>` and `postgres::<name>`
//! (filter with `cargo test store::tests::postgres`). The PostgreSQL half runs in a schema of its own per
//! test on the server named by `TEST_POSTGRES_URL` (default: the one on this machine); under `CI=true`
//! an unreachable server fails the test, elsewhere it is skipped with a note (see
//! `postgres/testing.rs`).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_executor::block_on;
use uuid::Uuid;

use super::postgres::testing::{SideConnection, TestSchema};
use super::*;
use crate::model::{Millis, NewNotification, Notification};

/// Declares each listed test function twice, as `sqlite::<name>` and `postgres::<name>`; attributes
/// written before a name (`#[ignore = "..."]`) go on both.
macro_rules! on_both_stores {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod sqlite {
            $(
                $(#[$attr])*
                #[test]
                fn $name() {
                    super::$name(super::Database::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                $(#[$attr])*
                #[test]
                fn $name() {
                    // `None`: no server outside CI, the test is skipped with a note.
                    if let Some(database) = super::Database::postgres() {
                        super::$name(database);
                    }
                }
            )*
        }
    };
}

on_both_stores!(
    inserts_get_increasing_ids_and_the_listener_sees_them_before_the_reply,
    a_failing_insert_stores_nothing_of_its_batch_and_answers_unavailable,
    history_pages_newest_first_with_before,
    unread_filter_mark_read_and_counts,
    delete_removes_from_the_inbox_only_for_its_user,
    replay_by_user_channel_and_broadcast_in_order_once_each,
    data_survives_close_and_reopen_including_writes_queued_at_shutdown,
    concurrent_inserts_share_transactions,
    reads_are_not_blocked_by_an_open_write_transaction,
    scheduled_notifications_fire_into_history_survive_a_restart_and_can_be_cancelled,
    an_idempotency_key_stores_once_and_replays_what_the_first_request_committed,
    a_record_of_the_version_that_stored_answers_still_replays_after_an_upgrade,
    idle_scheduler_ticks_are_not_counted_as_commits,
    delivery_receipts_are_coalesced_keep_the_first_time_and_survive_a_failed_recording,
    seen_is_all_or_nothing_keeps_the_first_time_and_filters_combine,
    unread_counts_follow_every_change_once_per_batch_with_growing_versions,
    #[ignore = "timing printout; run explicitly, in release"]
    insert_rates,
);

/// Where a test's store keeps its data; dropped after the store, it removes the data.
enum Database {
    /// A file in a temporary folder.
    Sqlite(tempfile::TempDir),
    /// A schema of its own on the test server (boxed: it holds a runtime and a connection).
    Postgres(Box<TestSchema>),
}

impl Database {
    fn sqlite() -> Database {
        Database::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Option<Database> {
        TestSchema::create().map(|schema| Database::Postgres(Box::new(schema)))
    }

    /// "sqlite" or "postgres", for printouts.
    fn kind(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// A new, empty database of the `kind` a test already got one of (so PostgreSQL is reachable).
    fn another(kind: &str) -> Database {
        match kind {
            "sqlite" => Database::sqlite(),
            _ => Database::postgres().expect("the test server went away"),
        }
    }

    fn config(&self) -> StoreConfig {
        let url = match self {
            Database::Sqlite(dir) => format!(
                "sqlite://{}",
                dir.path().join("data/notifications.db").display()
            ),
            Database::Postgres(schema) => schema.url().to_owned(),
        };
        StoreConfig::new(StoreUrl::parse(&url).unwrap())
    }

    /// A second connection to the same data, for what a test does behind the store's back.
    fn side(&self) -> Side {
        match self {
            Database::Sqlite(dir) => Side::Sqlite(
                rusqlite::Connection::open(dir.path().join("data/notifications.db")).unwrap(),
            ),
            Database::Postgres(schema) => Side::Postgres(schema.side()),
        }
    }
}

/// A second connection to a test's database.
enum Side {
    Sqlite(rusqlite::Connection),
    Postgres(SideConnection),
}

impl Side {
    /// Runs the SQL of this side's dialect.
    fn execute(&self, sqlite: &str, postgres: &str) {
        match self {
            Side::Sqlite(conn) => conn.execute_batch(sqlite).unwrap(),
            Side::Postgres(conn) => conn.execute(postgres).unwrap(),
        }
    }

    /// Makes the database refuse to insert a notification whose message is `message`, as a full disk
    /// or a constraint would, with an error that says "refused by test".
    fn refuse_inserts_of(&self, message: &str) {
        self.execute(
            &format!(
                "CREATE TRIGGER refuse BEFORE INSERT ON notifications WHEN NEW.message = '{message}'
                 BEGIN SELECT RAISE(ABORT, 'refused by test'); END;"
            ),
            &format!(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.message = '{message}' THEN RAISE EXCEPTION 'refused by test'; END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER refuse BEFORE INSERT ON notifications
                 FOR EACH ROW EXECUTE FUNCTION refuse();"
            ),
        );
    }

    /// Undoes [`Side::refuse_inserts_of`].
    fn allow_inserts(&self) {
        self.execute(
            "DROP TRIGGER refuse",
            "DROP TRIGGER refuse ON notifications; DROP FUNCTION refuse()",
        );
    }

    /// Opens a write transaction that deletes every notification and leaves it uncommitted, as a
    /// long batch of another writer would.
    fn hold_write_transaction(&self) {
        self.execute(
            "BEGIN IMMEDIATE; DELETE FROM notifications;",
            "BEGIN; DELETE FROM notifications;",
        );
    }

    /// Ends [`Side::hold_write_transaction`] without committing.
    fn rollback(&self) {
        self.execute("ROLLBACK", "ROLLBACK");
    }
}

/// Records what the store told it, and optionally stalls the first commit so that writes pile up.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Uuid>>>,
    /// What [`CommitListener::unread_changed`] reported, in order.
    unread: Arc<Mutex<Vec<UnreadCount>>>,
    stall_first: Option<Duration>,
    calls: Arc<Mutex<usize>>,
}

impl CommitListener for Recorder {
    fn committed(&self, inserted: &[Arc<Notification>]) {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls == 1
        };
        self.seen
            .lock()
            .unwrap()
            .extend(inserted.iter().map(|n| n.id));
        if let (true, Some(stall)) = (first, self.stall_first) {
            std::thread::sleep(stall);
        }
    }

    fn unread_changed(&self, counts: &[UnreadCount]) {
        self.unread.lock().unwrap().extend_from_slice(counts);
    }
}

struct Fixture {
    store: Store,
    threads: StoreThreads,
    recorder: Recorder,
    /// Last, so it outlives the store threads' connections when dropped during a panic.
    database: Database,
}

impl Fixture {
    fn new(database: Database) -> Fixture {
        Fixture::with(database, Recorder::default())
    }

    fn with(database: Database, recorder: Recorder) -> Fixture {
        let (store, threads) = Store::open(&database.config(), Box::new(recorder.clone())).unwrap();
        Fixture {
            store,
            threads,
            recorder,
            database,
        }
    }

    /// Drops the handle, waits for the threads, and opens the same database again.
    fn reopen(self) -> Fixture {
        let Fixture {
            store,
            threads,
            recorder,
            database,
        } = self;
        drop(store);
        threads.join();
        Fixture::with(database, recorder)
    }

    fn close(self) {
        drop(self.store);
        self.threads.join();
    }

    fn side(&self) -> Side {
        self.database.side()
    }

    fn insert(&self, batch: Vec<NewNotification>) -> Vec<Arc<Notification>> {
        block_on(self.store.insert(batch)).unwrap()
    }

    fn history(
        &self,
        user: &str,
        limit: usize,
        before: Option<Uuid>,
        unread_only: bool,
    ) -> HistoryPage {
        let q = HistoryQuery {
            user_id: user.into(),
            limit,
            before,
            unread_only,
            undelivered_only: false,
            unseen_only: false,
        };
        block_on(self.store.history(q)).unwrap()
    }

    fn replay(
        &self,
        user: Option<&str>,
        channels: &[&str],
        since: Uuid,
        limit: usize,
    ) -> Vec<Arc<Notification>> {
        let q = ReplayQuery {
            user_id: user.map(str::to_owned),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            since,
            limit,
        };
        block_on(self.store.replay(q)).unwrap()
    }
}

fn to_user(user: &str, message: &str) -> NewNotification {
    NewNotification {
        kind: "info".into(),
        title: "title".into(),
        message: message.into(),
        user_id: Some(user.into()),
        channels: Vec::new(),
        broadcast: false,
        data: r#"{"k":"v"}"#.into(),
        scheduled_at: None,
        urgent: false,
    }
}

fn to_channels(channels: &[&str], message: &str) -> NewNotification {
    NewNotification {
        user_id: None,
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..to_user("", message)
    }
}

fn broadcast(message: &str) -> NewNotification {
    NewNotification {
        user_id: None,
        broadcast: true,
        ..to_user("", message)
    }
}

/// A JSON text as a value, to compare what was stored with what was sent.
fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

fn ids(ns: &[Arc<Notification>]) -> Vec<Uuid> {
    ns.iter().map(|n| n.id).collect()
}

#[test]
fn database_urls_parse() {
    assert_eq!(
        StoreUrl::parse("sqlite://data/notifications.db").unwrap(),
        StoreUrl::Sqlite("data/notifications.db".into())
    );
    assert_eq!(
        StoreUrl::parse("sqlite:///var/lib/n.db").unwrap(),
        StoreUrl::Sqlite("/var/lib/n.db".into())
    );
    assert_eq!(
        StoreUrl::parse("sqlite:n.db?mode=rwc").unwrap(),
        StoreUrl::Sqlite("n.db".into())
    );
    assert!(matches!(
        StoreUrl::parse("postgres://u:pw@db/n").unwrap(),
        StoreUrl::Postgres(_)
    ));
    assert!(matches!(
        StoreUrl::parse("postgresql://db/n").unwrap(),
        StoreUrl::Postgres(_)
    ));
    assert!(StoreUrl::parse("sqlite://").is_err());
    assert!(StoreUrl::parse("sqlite://:memory:").is_err());
    assert!(StoreUrl::parse("mysql://db").is_err());
    let shown = format!(
        "{:?}",
        StoreUrl::parse("postgres://user:secret@db:5432/n").unwrap()
    );
    assert_eq!(
        shown, "postgres://***@db:5432/n",
        "the password never reaches a log"
    );
    let shown = format!(
        "{:?}",
        StoreUrl::parse("postgres://u@db/n?password=secret&options=-csearch_path%3Dt").unwrap()
    );
    assert_eq!(
        shown,
        "postgres://***@db/n?password=***&options=-csearch_path%3Dt"
    );
}

#[test]
fn an_unreachable_postgres_fails_to_open_with_a_clear_error_and_no_password() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let config = StoreConfig::new(
        StoreUrl::parse("postgres://ns:hunter2@127.0.0.1:1/n?connect_timeout=2").unwrap(),
    );
    let err = Store::open(&config, Box::new(Recorder::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("postgres://ns@127.0.0.1:1/n"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

fn inserts_get_increasing_ids_and_the_listener_sees_them_before_the_reply(database: Database) {
    let f = Fixture::new(database);
    let mut all = Vec::new();
    for round in 0..5 {
        let batch = (0..3)
            .map(|i| to_user("u1", &format!("{round}.{i}")))
            .collect();
        let stored = f.insert(batch);
        assert_eq!(stored.len(), 3);
        // The reply came after the listener: it has already seen this batch, in the same order.
        let seen = f.recorder.seen.lock().unwrap().clone();
        assert_eq!(seen[seen.len() - 3..], ids(&stored)[..]);
        assert_eq!(
            stored[0].message,
            format!("{round}.0"),
            "reply in batch order"
        );
        assert!(stored
            .iter()
            .all(|n| n.user_id.as_deref() == Some("u1") && n.read_at.is_none()));
        all.extend(ids(&stored));
    }
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase across calls"
    );
    assert_eq!(*f.recorder.seen.lock().unwrap(), all);
    assert!(block_on(f.store.insert(Vec::new())).unwrap().is_empty());
    block_on(f.store.ping()).unwrap();
    f.close();
}

fn a_failing_insert_stores_nothing_of_its_batch_and_answers_unavailable(database: Database) {
    let f = Fixture::new(database);
    f.insert(vec![to_user("u1", "before")]);
    // Make the database refuse one particular row, as a full disk or a constraint would.
    let side = f.side();
    side.refuse_inserts_of("boom");
    let calls_before = *f.recorder.calls.lock().unwrap();
    let result = block_on(
        f.store
            .insert(vec![to_user("u1", "fine"), to_user("u1", "boom")]),
    );
    let Err(StoreError::Unavailable(why)) = result else {
        panic!("{result:?}")
    };
    assert!(why.to_string().contains("refused by test"), "{why}");
    assert_eq!(
        *f.recorder.calls.lock().unwrap(),
        calls_before,
        "nothing delivered"
    );
    let page = f.history("u1", 10, None, false);
    assert_eq!(
        page.total, 1,
        "the good row of the failed batch was rolled back too"
    );
    assert_eq!(page.notifications[0].message, "before");
    // The store keeps working.
    side.allow_inserts();
    f.insert(vec![to_user("u1", "after")]);
    assert_eq!(f.history("u1", 10, None, false).total, 2);
    assert_eq!(f.store.stats().failed_batches, 1);
    f.close();
}

fn idle_scheduler_ticks_are_not_counted_as_commits(database: Database) {
    let f = Fixture::new(database);
    // The scheduler claims due notifications every 100 ms in a transaction of its own; several of
    // those pass here, and none stores anything.
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(f.store.stats().commits, 0);
    f.insert(vec![to_user("u1", "one")]);
    assert_eq!(f.store.stats().commits, 1);
    f.close();
}

fn history_pages_newest_first_with_before(database: Database) {
    let f = Fixture::new(database);
    let stored = f.insert((0..120).map(|i| to_user("u1", &format!("n{i}"))).collect());
    f.insert(vec![to_user("someone-else", "not mine")]);
    let mut newest_first = ids(&stored);
    newest_first.reverse();

    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = f.history("u1", 50, before, false);
        assert_eq!(
            (page.total, page.unread),
            (120, 120),
            "counts cover the whole inbox"
        );
        pages.push(page.notifications.len());
        let got: Vec<Uuid> = page.notifications.iter().map(|n| n.id).collect();
        let offset = pages.iter().sum::<usize>() - got.len();
        assert_eq!(got, newest_first[offset..offset + got.len()]);
        match page.next_before {
            Some(id) => {
                assert_eq!(Some(&id), got.last());
                before = Some(id);
            }
            None => break,
        }
    }
    assert_eq!(pages, vec![50, 50, 20]);
    // Exactly one page's worth: no next page.
    assert_eq!(f.history("u1", 120, None, false).next_before, None);
    assert!(f
        .history("nobody", 50, None, false)
        .notifications
        .is_empty());
    f.close();
}

fn unread_filter_mark_read_and_counts(database: Database) {
    let f = Fixture::new(database);
    let stored = f.insert((0..10).map(|i| to_user("u1", &format!("n{i}"))).collect());
    let target = stored[3].id;

    let first = block_on(f.store.mark_read("u1".into(), target))
        .unwrap()
        .unwrap();
    let read_at = first.read_at.expect("read_at set");
    assert_eq!(first.id, target);
    std::thread::sleep(Duration::from_millis(5));
    let again = block_on(f.store.mark_read("u1".into(), target))
        .unwrap()
        .unwrap();
    assert_eq!(
        again.read_at,
        Some(read_at),
        "a second read keeps the first read_at"
    );
    assert_eq!(
        block_on(f.store.mark_read("u2".into(), target)).unwrap(),
        None,
        "not u2's"
    );
    assert_eq!(
        block_on(f.store.mark_read("u1".into(), Uuid::now_v7())).unwrap(),
        None
    );

    let unread = f.history("u1", 50, None, true);
    assert_eq!((unread.total, unread.unread), (10, 9));
    assert_eq!(unread.notifications.len(), 9);
    assert!(unread
        .notifications
        .iter()
        .all(|n| n.read_at.is_none() && n.id != target));
    let all = f.history("u1", 50, None, false);
    assert_eq!(all.notifications.len(), 10);
    assert_eq!(
        all.notifications
            .iter()
            .find(|n| n.id == target)
            .unwrap()
            .read_at,
        Some(read_at)
    );
    // Unread paging works like full paging.
    let p1 = f.history("u1", 5, None, true);
    assert_eq!(p1.notifications.len(), 5);
    let p2 = f.history("u1", 5, p1.next_before, true);
    assert_eq!((p2.notifications.len(), p2.next_before), (4, None));

    assert_eq!(block_on(f.store.mark_all_read("u1".into())).unwrap(), 9);
    assert_eq!(block_on(f.store.mark_all_read("u1".into())).unwrap(), 0);
    let after = f.history("u1", 50, None, true);
    assert_eq!(
        (after.total, after.unread, after.notifications.len()),
        (10, 0, 0)
    );
    let kept = f.history("u1", 50, None, false);
    assert_eq!(
        kept.notifications
            .iter()
            .find(|n| n.id == target)
            .unwrap()
            .read_at,
        Some(read_at)
    );
    f.close();
}

/// The ids of `user`'s history with the receipt filters (and `unread`).
fn filtered(f: &Fixture, user: &str, unread: bool, undelivered: bool, unseen: bool) -> Vec<Uuid> {
    let q = HistoryQuery {
        user_id: user.into(),
        limit: 50,
        before: None,
        unread_only: unread,
        undelivered_only: undelivered,
        unseen_only: unseen,
    };
    let page = block_on(f.store.history(q)).unwrap();
    page.notifications.iter().map(|n| n.id).collect()
}

/// `delivered_at` of notification `id` of `user`, once it is `expected` (receipts have no reply;
/// the store thread records them after the batch they came with). Fails after 10 s.
fn wait_for_delivered_at(f: &Fixture, user: &str, id: Uuid, expected: Option<Millis>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = f.history(user, 50, None, false);
        let found = page.notifications.iter().find(|n| n.id == id).unwrap();
        if found.delivered_at == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "delivered_at of {id} is {:?}, expected {expected:?}",
            found.delivered_at
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn delivery_receipts_are_coalesced_keep_the_first_time_and_survive_a_failed_recording(
    database: Database,
) {
    let f = Fixture::new(database);
    let stored = f.insert(vec![
        to_user("u1", "a"),
        to_user("u1", "b"),
        to_user("u1", "c"),
        to_user("u1", "d"),
    ]);
    let [a, b, c, d] = [0, 1, 2, 3].map(|i| stored[i].id);
    assert_eq!(filtered(&f, "u1", false, true, false), vec![d, c, b, a]);

    // Two shards report `a`: the earliest time is kept.
    f.store
        .record_delivered(vec![(a, 300_000), (b, 400_000)])
        .unwrap();
    f.store.record_delivered(vec![(a, 200_000)]).unwrap();
    wait_for_delivered_at(&f, "u1", b, Some(400_000));
    wait_for_delivered_at(&f, "u1", a, Some(200_000));
    // A later receipt, even with an earlier time, leaves the recorded one alone.
    f.store.record_delivered(vec![(a, 100_000)]).unwrap();
    f.store.record_delivered(vec![(c, 500_000)]).unwrap();
    wait_for_delivered_at(&f, "u1", c, Some(500_000));
    wait_for_delivered_at(&f, "u1", a, Some(200_000));
    assert_eq!(filtered(&f, "u1", false, true, false), vec![d]);

    // While recording fails, the receipt waits; it is recorded once the database takes it.
    let side = f.side();
    side.execute(
        "CREATE TRIGGER refuse_receipt BEFORE UPDATE OF delivered_at ON notifications
         BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
        "CREATE FUNCTION refuse_receipt() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused by test'; END $$;
         CREATE TRIGGER refuse_receipt BEFORE UPDATE OF delivered_at ON notifications
         FOR EACH ROW EXECUTE FUNCTION refuse_receipt();",
    );
    f.store.record_delivered(vec![(d, 600_000)]).unwrap();
    // Sends are not held up by the failing receipts.
    let after = f.insert(vec![to_user("u1", "e")]);
    std::thread::sleep(Duration::from_millis(300));
    wait_for_delivered_at(&f, "u1", d, None);
    side.execute(
        "DROP TRIGGER refuse_receipt",
        "DROP TRIGGER refuse_receipt ON notifications; DROP FUNCTION refuse_receipt()",
    );
    wait_for_delivered_at(&f, "u1", d, Some(600_000));
    assert_eq!(filtered(&f, "u1", false, true, false), vec![after[0].id]);
    f.close();
}

fn seen_is_all_or_nothing_keeps_the_first_time_and_filters_combine(database: Database) {
    let f = Fixture::new(database);
    let stored = f.insert(vec![
        to_user("u1", "a"),
        to_user("u1", "b"),
        to_user("u1", "c"),
        to_user("u2", "other"),
    ]);
    let [a, b, c, other] = [0, 1, 2, 3].map(|i| stored[i].id);

    let seen = |ids: Vec<Uuid>| block_on(f.store.mark_seen("u1".into(), ids)).unwrap();
    assert_eq!(seen(vec![a]), MarkedSeen::Updated(1));
    let first = f.history("u1", 50, None, false).notifications[2].clone();
    assert_eq!(first.id, a);
    assert!(first.seen_at.is_some());
    assert_eq!(first.read_at, None, "seen is not read");
    // One id that is not u1's (another user's, or none's): nothing is marked, and it is named.
    let nobodys = Uuid::now_v7();
    assert_eq!(seen(vec![b, other]), MarkedSeen::NotInInbox(other));
    assert_eq!(
        seen(vec![b, nobodys, other]),
        MarkedSeen::NotInInbox(nobodys)
    );
    assert_eq!(filtered(&f, "u1", false, false, true), vec![c, b]);
    // The first `seen_at` stays; only the unseen ones count.
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(seen(vec![a, b, b]), MarkedSeen::Updated(1));
    let again = f.history("u1", 50, None, false).notifications[2].clone();
    assert_eq!(again.seen_at, first.seen_at);
    assert_eq!(filtered(&f, "u1", false, false, true), vec![c]);

    // Filters combine: unseen AND unread AND undelivered.
    block_on(f.store.mark_read("u1".into(), c)).unwrap();
    assert_eq!(filtered(&f, "u1", true, false, true), Vec::<Uuid>::new());
    assert_eq!(filtered(&f, "u1", true, false, false), vec![b, a]);
    f.store.record_delivered(vec![(b, 1_000)]).unwrap();
    wait_for_delivered_at(&f, "u1", b, Some(1_000));
    assert_eq!(filtered(&f, "u1", true, true, false), vec![a]);
    assert_eq!(filtered(&f, "u1", false, true, true), vec![c]);
    assert_eq!(filtered(&f, "u1", false, true, false), vec![c, a]);
    let all = f.history("u1", 50, None, false);
    assert_eq!((all.total, all.unread), (3, 2));
    f.close();
}

fn unread_counts_follow_every_change_once_per_batch_with_growing_versions(database: Database) {
    let f = Fixture::new(database);
    let reported = || -> Vec<(String, u64)> {
        f.recorder
            .unread
            .lock()
            .unwrap()
            .drain(..)
            .map(|c| (c.user_id, c.unread))
            .collect()
    };
    let count = |user: &str| block_on(f.store.unread(user.into())).unwrap();
    assert_eq!((count("u1").unread, count("u1").version), (0, 0));

    // One batch of three for u1 and one for u2: one count each.
    let stored = f.insert(vec![
        to_user("u1", "a"),
        to_user("u1", "b"),
        to_user("u2", "c"),
        to_user("u1", "d"),
        to_channels(&["news"], "no inbox"),
    ]);
    assert_eq!(reported(), vec![("u1".into(), 3), ("u2".into(), 1)]);
    let v1 = count("u1").version;
    assert_eq!(count("u1").unread, 3);

    block_on(f.store.mark_read("u1".into(), stored[0].id)).unwrap();
    assert_eq!(reported(), vec![("u1".into(), 2)]);
    // A second read of the same one changes nothing and reports nothing. The writer tells a read
    // that changed something by its `read_at` being the batch's time, so the second read must come
    // in a later millisecond than the first.
    std::thread::sleep(std::time::Duration::from_millis(2));
    block_on(f.store.mark_read("u1".into(), stored[0].id)).unwrap();
    assert_eq!(reported(), vec![]);
    assert!(block_on(f.store.delete("u1".into(), stored[1].id)).unwrap());
    assert_eq!(reported(), vec![("u1".into(), 1)]);
    assert_eq!(block_on(f.store.mark_all_read("u1".into())).unwrap(), 1);
    assert_eq!(reported(), vec![("u1".into(), 0)]);
    let after = count("u1");
    assert!(after.version > v1, "{} after {v1}", after.version);
    assert_eq!(after.unread, 0);
    let page = f.history("u1", 50, None, false);
    assert_eq!((page.total, page.unread), (2, 0));
    let page = f.history("u2", 50, None, false);
    assert_eq!((page.total, page.unread), (1, 1));
    f.close();
}

fn delete_removes_from_the_inbox_only_for_its_user(database: Database) {
    let f = Fixture::new(database);
    let stored = f.insert(vec![to_user("u1", "a"), to_user("u1", "b")]);
    assert!(
        !block_on(f.store.delete("u2".into(), stored[0].id)).unwrap(),
        "not u2's"
    );
    assert!(block_on(f.store.delete("u1".into(), stored[0].id)).unwrap());
    assert!(
        !block_on(f.store.delete("u1".into(), stored[0].id)).unwrap(),
        "already gone"
    );
    let page = f.history("u1", 50, None, false);
    assert_eq!(page.total, 1);
    assert_eq!(page.notifications[0].id, stored[1].id);
    assert_eq!(
        block_on(f.store.mark_read("u1".into(), stored[0].id)).unwrap(),
        None
    );
    f.close();
}

fn replay_by_user_channel_and_broadcast_in_order_once_each(database: Database) {
    let f = Fixture::new(database);
    let mine = f.insert(vec![to_user("u1", "mine")]);
    let other = f.insert(vec![to_user("u2", "theirs")]);
    let on_a = f.insert(vec![to_channels(&["a"], "on a")]);
    let on_b = f.insert(vec![to_channels(&["b", "a"], "on b and a")]);
    let everyone = f.insert(vec![broadcast("everyone")]);
    // Matches the user AND a channel: must come once.
    let both = f.insert(vec![NewNotification {
        channels: vec!["a".into()],
        ..to_user("u1", "both")
    }]);
    let on_c = f.insert(vec![to_channels(&["c"], "on c")]);

    let got = f.replay(Some("u1"), &["a"], Uuid::nil(), 100);
    assert_eq!(
        ids(&got),
        vec![
            mine[0].id,
            on_a[0].id,
            on_b[0].id,
            everyone[0].id,
            both[0].id
        ]
    );
    assert_eq!(got[4].channels, vec!["a"]);

    // By user only; by channel only (anonymous); broadcast reaches everyone.
    assert_eq!(
        ids(&f.replay(Some("u2"), &[], Uuid::nil(), 100)),
        vec![other[0].id, everyone[0].id]
    );
    assert_eq!(
        ids(&f.replay(None, &["b", "c"], Uuid::nil(), 100)),
        vec![on_b[0].id, everyone[0].id, on_c[0].id]
    );
    assert_eq!(
        ids(&f.replay(None, &[], Uuid::nil(), 100)),
        vec![everyone[0].id]
    );

    // Since is exclusive.
    assert_eq!(
        ids(&f.replay(Some("u1"), &["a"], on_b[0].id, 100)),
        vec![everyone[0].id, both[0].id]
    );
    assert!(f
        .replay(Some("u1"), &["a", "c"], on_c[0].id, 100)
        .is_empty());

    // Limit keeps the oldest, and resuming from the last one gets the rest.
    let first = f.replay(Some("u1"), &["a"], Uuid::nil(), 2);
    assert_eq!(ids(&first), vec![mine[0].id, on_a[0].id]);
    let rest = f.replay(Some("u1"), &["a"], first[1].id, 100);
    assert_eq!(ids(&rest), vec![on_b[0].id, everyone[0].id, both[0].id]);
    assert!(f.replay(Some("u1"), &["a"], Uuid::nil(), 0).is_empty());

    // A deleted notification is no longer replayed, through its channel either.
    assert!(block_on(f.store.delete("u1".into(), both[0].id)).unwrap());
    assert_eq!(
        ids(&f.replay(None, &["a"], everyone[0].id, 100)),
        Vec::<Uuid>::new()
    );
    f.close();
}

fn data_survives_close_and_reopen_including_writes_queued_at_shutdown(database: Database) {
    let f = Fixture::new(database);
    let stored = f.insert(vec![to_user("u1", "committed")]);
    block_on(f.store.mark_read("u1".into(), stored[0].id)).unwrap();

    // Queue a write, then shut down without awaiting it: the store thread must still commit it.
    let mut pending = std::pin::pin!(f.store.insert(vec![to_user("u1", "queued at shutdown")]));
    let f = f.reopen();
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(Ok(queued)) = pending.as_mut().poll(&mut cx) else {
        panic!("the queued write was answered before join() returned");
    };

    let page = f.history("u1", 10, None, false);
    assert_eq!(page.total, 2);
    assert_eq!(page.unread, 1);
    assert_eq!(page.notifications[0].id, queued[0].id);
    let old = &page.notifications[1];
    assert_eq!(
        (old.id, old.message.as_str(), old.created_at),
        (stored[0].id, "committed", stored[0].created_at)
    );
    // The same JSON value; PostgreSQL's jsonb gives it back normalized (spacing, key order).
    assert_eq!(json(&old.data), json(&stored[0].data));
    assert!(old.read_at.is_some(), "read state survived");
    // New ids keep increasing after a restart.
    let later = f.insert(vec![to_user("u1", "later")]);
    assert!(later[0].id > queued[0].id);
    f.close();
}

fn concurrent_inserts_share_transactions(database: Database) {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 200;
    // Stall the first commit's listener so the other threads' writes queue up behind it.
    let f = Fixture::with(
        database,
        Recorder {
            stall_first: Some(Duration::from_millis(100)),
            ..Recorder::default()
        },
    );
    let replies: Vec<Vec<Uuid>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = f.store.clone();
                s.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let n = to_user(&format!("u{t}"), &format!("{i}"));
                            block_on(store.insert(vec![n])).unwrap()[0].id
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let inserts = (THREADS * PER_THREAD) as u64;
    let stats = f.store.stats();
    println!(
        "{inserts} concurrent single inserts took {} transactions",
        stats.commits
    );
    assert_eq!((stats.inserted, stats.write_ops), (inserts, inserts));
    assert!(
        stats.commits < inserts,
        "{} commits for {inserts} inserts",
        stats.commits
    );
    // Each thread's own ids increase (it waited for each reply), and the listener saw every id once,
    // in increasing (commit) order.
    assert!(replies.iter().all(|r| r.windows(2).all(|w| w[0] < w[1])));
    let seen = f.recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, inserts);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "delivery order is id order"
    );
    assert_eq!(f.history("u3", 1, None, false).total, PER_THREAD as u64);
    f.close();
}

fn reads_are_not_blocked_by_an_open_write_transaction(database: Database) {
    let f = Fixture::new(database);
    f.insert(vec![to_user("u1", "a")]);
    // Another connection holds the write lock (as a long batch would): reads still answer at once.
    let side = f.side();
    side.hold_write_transaction();
    let started = Instant::now();
    assert_eq!(
        f.history("u1", 10, None, false).total,
        1,
        "the committed snapshot"
    );
    block_on(f.store.ping()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    side.rollback();
    f.close();
}

fn scheduled_notifications_fire_into_history_survive_a_restart_and_can_be_cancelled(
    database: Database,
) {
    let f = Fixture::new(database);
    let now = crate::model::now_millis();
    let schedule = |n: NewNotification| match block_on(f.store.schedule(n, None)).unwrap() {
        Committed::Fresh(pending) => pending,
        other => panic!("{other:?}"),
    };
    let soon = schedule(NewNotification {
        scheduled_at: Some(now + 300),
        ..to_user("u1", "soon")
    });
    let later = schedule(NewNotification {
        scheduled_at: Some(now + 3_600_000),
        ..to_user("u1", "later")
    });
    let shown = block_on(f.store.scheduled(soon.id)).unwrap().unwrap();
    assert_eq!(
        (shown.message.as_str(), shown.scheduled_at),
        ("soon", Some(now + 300))
    );
    assert_eq!(
        f.history("u1", 10, None, false).total,
        0,
        "pending, not in the inbox"
    );

    // Pending ones survive a restart, and fire after it.
    let f = f.reopen();
    let deadline = Instant::now() + Duration::from_secs(3);
    let page = loop {
        let page = f.history("u1", 10, None, false);
        if page.total > 0 {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduled notification never fired"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let fired = &page.notifications[0];
    assert_eq!(
        (page.total, fired.message.as_str(), fired.scheduled_at),
        (1, "soon", Some(now + 300))
    );
    assert!(fired.id > later.id, "a new id, taken when it fired");
    assert!(fired.created_at >= now + 300, "fired when due, not before");
    assert!(
        f.recorder.seen.lock().unwrap().contains(&fired.id),
        "handed to delivery"
    );
    assert_eq!(fired.schedule_id, Some(soon.id), "traced to its schedule");
    let traced = block_on(f.store.scheduled(soon.id)).unwrap().unwrap();
    assert_eq!(
        (traced.id, traced.schedule_id),
        (fired.id, Some(soon.id)),
        "fired: found as the notification it became"
    );
    assert_eq!(shown.schedule_id, None, "pending: no schedule_id");

    assert!(block_on(f.store.cancel_scheduled(later.id)).unwrap());
    assert!(!block_on(f.store.cancel_scheduled(later.id)).unwrap());
    assert_eq!(block_on(f.store.scheduled(later.id)).unwrap(), None);
    assert!(
        !block_on(f.store.cancel_scheduled(fired.id)).unwrap(),
        "fired: not pending"
    );
    f.close();
}

fn an_idempotency_key_stores_once_and_replays_what_the_first_request_committed(database: Database) {
    let f = Fixture::new(database);
    let key = |name: &str, body: u8| IdempotencyKey {
        key: name.into(),
        fingerprint: [body; 32],
    };
    let send = |key: IdempotencyKey| {
        block_on(f.store.insert_idempotent(vec![to_user("u1", "once")], key)).unwrap()
    };
    let Committed::Fresh(stored) = send(key("k1", 1)) else {
        panic!("the first send stores")
    };
    let first = Committed::Replayed(Receipt::Inserted(vec![Stamp::of(&stored[0])]));
    assert_eq!(send(key("k1", 1)), first, "a retry gets the first answer");
    assert_eq!(send(key("k1", 2)), Committed::KeyReused, "another body");

    // Retries racing each other from several shards: exactly one stores.
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..8).map(|_| s.spawn(|| send(key("k2", 1)))).collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let stored: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, Committed::Fresh(_)))
        .collect();
    assert_eq!(stored.len(), 1, "{outcomes:?}");
    assert_eq!(f.history("u1", 10, None, false).total, 2);
    f.close();
}

fn a_record_of_the_version_that_stored_answers_still_replays_after_an_upgrade(database: Database) {
    let f = Fixture::new(database);
    // As the previous version recorded a send a moment ago: the HTTP status and body of its answer.
    let body =
        r#"{"id":"0190a0a0-0000-7000-8000-000000000001","timestamp":"2024-01-29T17:00:00.000Z"}"#;
    let fingerprint = "07".repeat(32);
    f.side().execute(
        &format!(
            "INSERT INTO idempotency_keys (key, fingerprint, status, body, created_at)
             VALUES ('old', x'{fingerprint}', 201, CAST('{body}' AS BLOB), {})",
            crate::model::now_millis()
        ),
        &format!(
            "INSERT INTO idempotency_keys (key, fingerprint, status, body, created_at)
             VALUES ('old', '\\x{fingerprint}', 201, convert_to('{body}', 'UTF8'), now())"
        ),
    );
    let retry = block_on(f.store.insert_idempotent(
        vec![to_user("u1", "again")],
        IdempotencyKey {
            key: "old".into(),
            fingerprint: [7; 32],
        },
    ))
    .unwrap();
    assert_eq!(
        retry,
        Committed::Replayed(Receipt::Answer {
            status: 201,
            body: body.as_bytes().to_vec()
        })
    );
    assert_eq!(f.history("u1", 10, None, false).total, 0, "nothing stored");
    f.close();
}

/// Rough throughput, printed (not asserted): 100k notifications from 8 threads, in requests of 1,000
/// and as single requests, then history reads of a user with 100k notifications. Run it optimized, for
/// both stores, to compare them:
/// `cargo test --release --lib store::tests -- --ignored --nocapture insert_rates`.
fn insert_rates(database: Database) {
    const TOTAL: usize = 100_000;
    const THREADS: usize = 8;
    let kind = database.kind();
    let mut database = Some(database);
    for per_request in [1_000, 1] {
        // Each phase on an empty database of the same kind, so the phases do not slow each other.
        let fresh = database.take().unwrap_or_else(|| Database::another(kind));
        let f = Fixture::new(fresh);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let store = f.store.clone();
                s.spawn(move || {
                    for _ in 0..TOTAL / THREADS / per_request {
                        let batch = (0..per_request)
                            .map(|i| NewNotification {
                                channels: if i % 10 == 0 {
                                    vec!["news".into()]
                                } else {
                                    Vec::new()
                                },
                                ..to_user(
                                    &format!("user{}", i % 1000),
                                    "Se te ha asignado una tarea importante",
                                )
                            })
                            .collect();
                        block_on(store.insert(batch)).unwrap();
                    }
                });
            }
        });
        let elapsed = started.elapsed();
        let stats = f.store.stats();
        println!(
            "{kind}: {TOTAL} inserts, {per_request} per request, {THREADS} threads: {:.0} ms, {:.0}/s, {} transactions",
            elapsed.as_secs_f64() * 1e3,
            TOTAL as f64 / elapsed.as_secs_f64(),
            stats.commits
        );
        f.close();
    }

    // History and counts of one user with 100k notifications, half of them read.
    let f = Fixture::new(Database::another(kind));
    for _ in 0..100 {
        let ids = ids(&f.insert(
            (0..1_000)
                .map(|i| to_user("big", &format!("{i}")))
                .collect(),
        ));
        for id in ids.iter().step_by(2) {
            drop(f.store.mark_read("big".into(), *id));
        }
    }
    // Writes commit in queue order: once this one is answered, every mark_read above is committed.
    assert!(!block_on(f.store.delete("big".into(), Uuid::nil())).unwrap());
    let started = Instant::now();
    const PAGES: u32 = 100;
    for _ in 0..PAGES {
        let page = f.history("big", 50, None, false);
        assert_eq!((page.total, page.notifications.len()), (100_000, 50));
    }
    println!(
        "{kind}: history page + counts, 100k-notification user: {:?} each",
        started.elapsed() / PAGES
    );
    let started = Instant::now();
    for _ in 0..PAGES {
        let page = f.history("big", 50, None, true);
        assert_eq!(page.unread, 50_000);
    }
    println!(
        "{kind}: unread page + counts, 100k-notification user: {:?} each",
        started.elapsed() / PAGES
    );
    f.close();
}
