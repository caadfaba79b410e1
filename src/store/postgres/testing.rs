//! Test support for the PostgreSQL store: a throwaway schema per test, a blocking side connection for
//! a test's own SQL, and a TCP proxy that a test can cut to play a network outage.
//!
//! Tests reach the server named by `TEST_POSTGRES_URL` (default [`DEFAULT_TEST_URL`]). Each test gets
//! a schema of its own with a random name, so tests run in parallel and never see each other's rows;
//! the schema is dropped when the test ends, also when it panics. Under `CI=true` an unreachable server
//! fails the test; elsewhere the test is skipped with a note on stderr, so a laptop without PostgreSQL
//! still runs the SQLite half of the suite.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio_postgres::Client;

use super::migrate::migrate;
use super::session::{connect_client, new_runtime, Failure, PostgresTarget};
use super::sql::{
    CLAIM_DUE, HISTORY_BY_FILTERS, MARK_ALL_READ, MARK_SEEN, PURGE, RECORD_DELIVERED, REPLAY,
    SCHEDULED,
};
use super::{PostgresReader, PostgresWriter};
use crate::store::backend::tests::Harness;

/// The variable naming the test server.
pub(crate) const TEST_URL_VAR: &str = "TEST_POSTGRES_URL";
/// The server tests use when [`TEST_URL_VAR`] is unset: the one on this machine.
pub(crate) const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Prefix of every test schema, so a leftover from a killed test run is easy to recognize.
pub(crate) const TEST_SCHEMA_PREFIX: &str = "ns_test_";
/// How long dropping a test schema waits for locks before giving up (and leaving it behind).
const DROP_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The test server's URL.
pub(crate) fn base_url() -> String {
    std::env::var(TEST_URL_VAR).unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

/// Whether this is a CI run, where a missing PostgreSQL is a failure rather than a skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `url` with one more query parameter.
pub(crate) fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// A blocking connection for a test's own SQL (setting traps, holding locks, inspecting tables).
pub(crate) struct SideConnection {
    /// Drives the connection; current-thread, like the store's.
    runtime: Runtime,
    /// The connection.
    client: Client,
}

impl SideConnection {
    /// Connects to `url`.
    pub(crate) fn connect(url: &str) -> Result<SideConnection, String> {
        let target = PostgresTarget::parse(url).map_err(|e| e.to_string())?;
        let runtime = new_runtime().map_err(|e| e.to_string())?;
        let (client, _connection) = runtime
            .block_on(connect_client(&target))
            .map_err(|e| Failure::from(e).to_string())?;
        Ok(SideConnection { runtime, client })
    }

    /// Runs one or more statements.
    pub(crate) fn execute(&self, sql: &str) -> Result<(), String> {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .map_err(|e| Failure::from(e).to_string())
    }

    /// The first column of every row, as text (cast in the SQL if needed).
    pub(crate) fn strings(&self, sql: &str) -> Vec<String> {
        let rows = self
            .runtime
            .block_on(self.client.query(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {}", Failure::from(e)));
        rows.iter().map(|row| row.get::<_, String>(0)).collect()
    }

    /// The one bigint the query returns.
    pub(crate) fn number(&self, sql: &str) -> i64 {
        let row = self
            .runtime
            .block_on(self.client.query_one(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {}", Failure::from(e)));
        row.get(0)
    }
}

/// A schema of its own for one test, dropped (with everything in it) when this is dropped.
pub(crate) struct TestSchema {
    /// The schema's name.
    name: String,
    /// The test server's URL pointing at this schema.
    url: String,
    /// The connection that created the schema and will drop it.
    admin: SideConnection,
}

impl TestSchema {
    /// Creates a schema with a random name on the test server. When the server is unreachable: panics
    /// under `CI=true`, otherwise prints a note and returns `None` (the caller skips its test).
    pub(crate) fn create() -> Option<TestSchema> {
        let base = base_url();
        let admin = match SideConnection::connect(&base) {
            Ok(admin) => admin,
            Err(e) if in_ci() => panic!(
                "PostgreSQL at {} is unreachable and CI=true requires it: {e}",
                PostgresTarget::parse(&base).map_or_else(|e| e.to_string(), |t| t.to_string())
            ),
            Err(e) => {
                eprintln!(
                    "note: skipping a PostgreSQL test: the server is unreachable ({e}); \
                     set {TEST_URL_VAR} to run it, CI=true to make this a failure"
                );
                return None;
            }
        };
        let name = format!("{TEST_SCHEMA_PREFIX}{}", uuid::Uuid::now_v7().simple());
        admin
            .execute(&format!("CREATE SCHEMA {name}"))
            .unwrap_or_else(|e| panic!("cannot create the test schema {name}: {e}"));
        // The documented way to point the store at a schema: libpq's `options`, percent-encoded.
        let url = with_param(&base, &format!("options=-csearch_path%3D{name}"));
        Some(TestSchema { name, url, admin })
    }

    /// The URL of this schema, as a `DATABASE_URL`.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The schema's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A side connection whose `search_path` is this schema.
    pub(crate) fn side(&self) -> SideConnection {
        SideConnection::connect(&self.url)
            .unwrap_or_else(|e| panic!("cannot open a side connection: {e}"))
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let sql = format!(
            "SET lock_timeout = {}; DROP SCHEMA IF EXISTS {} CASCADE",
            DROP_LOCK_TIMEOUT.as_millis(),
            self.name
        );
        if let Err(e) = self.admin.execute(&sql) {
            eprintln!("note: could not drop test schema {}: {e}", self.name);
        }
    }
}

/// The PostgreSQL side of the backend tests both databases share (`backend/tests.rs`): a test schema
/// and a side connection to it.
pub(crate) struct PostgresHarness {
    /// For the test's own queries.
    side: SideConnection,
    /// Dropped last, with everything in it.
    schema: TestSchema,
}

impl Harness for PostgresHarness {
    type Writer = PostgresWriter;
    type Reader = PostgresReader;
    const DUPLICATE_KEY: &'static str = "duplicate key";

    fn open() -> Option<(PostgresHarness, PostgresWriter, PostgresReader)> {
        let schema = TestSchema::create()?;
        let target = PostgresTarget::parse(schema.url()).unwrap();
        migrate(&target).unwrap();
        let writer = PostgresWriter::open(&target).unwrap();
        let reader = PostgresReader::open(&target, 0).unwrap();
        let side = schema.side();
        Some((PostgresHarness { side, schema }, writer, reader))
    }

    fn count(&self, table: &str) -> i64 {
        self.side.number(&format!("SELECT count(*) FROM {table}"))
    }

    /// Checked on the generic plan (what a prepared statement settles on) with sequential scans priced
    /// out, so this proves the indexes are USABLE for each query (the partial-index predicates match);
    /// with real statistics the planner picks them.
    fn hot_query_plans(&self) -> Vec<(String, &'static [&'static str])> {
        let side = self.schema.side();
        side.execute("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
            .unwrap();
        let plan = |name: &str, types: &str, sql: &str, args: &str| -> String {
            side.execute(&format!("PREPARE {name} ({types}) AS {sql}"))
                .unwrap();
            side.strings(&format!("EXPLAIN EXECUTE {name} ({args})"))
                .join("\n")
        };
        let page_args = "'u', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 51";
        let nil = "'00000000-0000-0000-0000-000000000000'";
        vec![
            (
                plan(
                    "history",
                    "text, uuid, bigint",
                    HISTORY_BY_FILTERS[0],
                    page_args,
                ),
                // The counts are the user's counters row (migration 4), no longer a count over
                // `notifications_unread`.
                &["notifications_user", "user_counters_pkey"],
            ),
            (
                plan(
                    "unread",
                    "text, uuid, bigint",
                    HISTORY_BY_FILTERS[1],
                    page_args,
                ),
                &["notifications_unread", "user_counters_pkey"],
            ),
            (
                plan(
                    "undelivered",
                    "text, uuid, bigint",
                    HISTORY_BY_FILTERS[2],
                    page_args,
                ),
                &["notifications_undelivered"],
            ),
            (
                plan(
                    "unseen",
                    "text, uuid, bigint",
                    HISTORY_BY_FILTERS[4],
                    page_args,
                ),
                &["notifications_unseen"],
            ),
            (
                plan(
                    "mark_seen",
                    "text, uuid[], timestamptz",
                    MARK_SEEN,
                    &format!("'u', ARRAY[{nil}]::uuid[], now()"),
                ),
                // Any index of the ids will do, as long as no table is scanned.
                &[],
            ),
            (
                plan(
                    "record_delivered",
                    "uuid[], timestamptz[]",
                    RECORD_DELIVERED,
                    &format!("ARRAY[{nil}]::uuid[], ARRAY[now()]"),
                ),
                &[],
            ),
            (
                plan("read_all", "text, timestamptz", MARK_ALL_READ, "'u', now()"),
                &["notifications_unread"],
            ),
            (
                plan(
                    "replay",
                    "text, uuid, bigint, text[]",
                    REPLAY,
                    &format!("'u', {nil}, 100, '{{a,b}}'"),
                ),
                &[
                    "notifications_user",
                    "notifications_broadcast",
                    "notification_channels_pkey",
                    "notifications_pkey",
                ],
            ),
            (
                plan("scheduled", "uuid", SCHEDULED, nil),
                &["notifications_schedule", "scheduled_notifications_pkey"],
            ),
            (
                plan("claim_due", "timestamptz, bigint", CLAIM_DUE, "now(), 1000"),
                &["scheduled_due", "scheduled_notifications_pkey"],
            ),
            (
                plan(
                    "purge",
                    "timestamptz, uuid, bigint",
                    PURGE,
                    &format!("now(), {nil}, 1000"),
                ),
                &["idempotency_keys_created", "notifications_pkey"],
            ),
        ]
    }

    fn scans_a_table(plan: &str) -> bool {
        plan.contains("Seq Scan")
    }
}

/// What a [`TestProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ProxyMode {
    /// Forwards both ways.
    Up = 0,
    /// Closes every connection and refuses new ones at once (a server that went away).
    Down = 1,
    /// Keeps connections open but forwards nothing (a network that silently drops packets).
    Blackhole = 2,
}

/// A TCP proxy in front of the test server that a test can cut, to play an outage.
pub(crate) struct TestProxy {
    /// The proxy's address, `127.0.0.1:port`.
    port: u16,
    /// The current [`ProxyMode`].
    mode: Arc<AtomicU8>,
    /// Both ends of every open pair, to close them when cut.
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// The accept loop; ends when the proxy is dropped.
    accept: Option<JoinHandle<()>>,
}

/// How often a blackholed copier rechecks the mode.
const PROXY_POLL: Duration = Duration::from_millis(20);

impl TestProxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub(crate) fn start(upstream: &str) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mode = Arc::new(AtomicU8::new(ProxyMode::Up as u8));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accept = {
            let (mode, open) = (mode.clone(), open.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    match mode.load(Ordering::SeqCst) {
                        m if m == ProxyMode::Down as u8 => continue, // dropped: closed at once
                        u8::MAX => return,                           // the proxy was dropped
                        _ => {}
                    }
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        continue;
                    };
                    let mut all = open.lock().expect("proxy lock");
                    for (from, to) in [(&client, &server), (&server, &client)] {
                        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                            continue;
                        };
                        let mode = mode.clone();
                        std::thread::spawn(move || copy(from, to, &mode));
                    }
                    all.push(client);
                    all.push(server);
                }
            })
        };
        TestProxy {
            port,
            mode,
            open,
            accept: Some(accept),
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Switches mode; `Down` also closes every open connection.
    pub(crate) fn set(&self, mode: ProxyMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        if mode == ProxyMode::Down {
            for stream in self.open.lock().expect("proxy lock").drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.set(ProxyMode::Down);
        self.mode.store(u8::MAX, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Copies one direction until either side closes; in [`ProxyMode::Blackhole`] holds the bytes back.
fn copy(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8) {
    let _ = from.set_read_timeout(Some(PROXY_POLL));
    let mut buf = [0u8; 16 * 1024];
    loop {
        let current = mode.load(Ordering::SeqCst);
        if current == ProxyMode::Blackhole as u8 {
            std::thread::sleep(PROXY_POLL);
            continue;
        }
        if current != ProxyMode::Up as u8 {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
