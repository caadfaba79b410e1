//! The command line (API.md, "Command line"): `migrate` and `check-config` run through the real
//! binary, with settings from the environment and from flags, and their exit statuses; and the server
//! still starts when no subcommand is named.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::pg::PgSchema;
use common::redis::TestRedis;
use common::TestServer;

/// The binary with a clean environment, logs at `warn` (what an operator running a job sees).
fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_notification-service"));
    command.env_clear();
    command
}

/// Runs `args` with `env`, returning the whole output.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    binary()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the binary")
}

/// stdout and stderr as text, for assertions and their messages.
fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `DATABASE_URL` for a file under `dir`.
fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}/notifications.db", dir.display())
}

/// A local port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn migrate_creates_a_fresh_sqlite_store_once_and_the_server_then_starts_on_it() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let url = sqlite_url(dir.path());
    let out = run(&["migrate"], &[("DATABASE_URL", &url)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    assert!(
        stdout.starts_with("migrate: applied 8 migrations"),
        "{stdout}"
    );
    assert!(dir.path().join("notifications.db").exists());

    // Again, as a flag after the subcommand: nothing left to apply.
    let out = run(&["migrate", "--database-url", &url], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("is up to date"), "{stdout}");
    assert!(stdout.contains("nothing applied"), "{stdout}");

    let server = TestServer::start_in(dir.clone(), &[]);
    let id = server.send(serde_json::json!({"user_id": "migrated", "message": "hi"}));
    let page = server.get("/api/v1/notifications/user/migrated").json();
    assert_eq!(page["notifications"][0]["id"], id.as_str());
    // The server found nothing to migrate either.
    assert!(!server.log_contains("applied sqlite migration"));
}

#[test]
fn migrate_applies_the_postgres_schema() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let out = run(&["migrate"], &[("DATABASE_URL", &schema.url)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("migrate: applied 8 migrations"),
        "{stdout}"
    );
    assert!(!stdout.contains("password"), "{stdout}");

    let tables = postgres_tables(&schema.url);
    for table in [
        "notifications",
        "notification_channels",
        "scheduled_notifications",
        "idempotency_keys",
        "id_clock",
        "schema_migrations",
    ] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }

    let out = run(&["migrate"], &[("DATABASE_URL", &schema.url)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out).0.contains("nothing applied"), "{out:?}");
}

/// The tables of the schema `url` points at (its `search_path`).
fn postgres_tables(url: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test schema");
        let task = tokio::spawn(connection);
        let rows = client
            .query(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = current_schema()",
                &[],
            )
            .await
            .expect("list tables");
        drop(client);
        let _ = task.await;
        rows.iter().map(|r| r.get(0)).collect()
    })
}

#[test]
fn migrate_against_an_unreachable_postgres_exits_1_with_one_line() {
    let port = closed_port();
    let url = format!("postgres://postgres:secret@127.0.0.1:{port}/test");
    let out = run(&["migrate"], &[("DATABASE_URL", &url)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
}

#[test]
fn migrate_with_a_bad_setting_exits_2_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL", &sqlite_url(dir.path())),
            ("MAX_FRAME", "1"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out).1.contains("MAX_FRAME"), "{out:?}");
    assert!(!dir.path().join("notifications.db").exists());
}

#[test]
fn check_config_is_ok_with_sqlite_and_redis_and_creates_nothing() {
    let Some(redis) = TestRedis::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &["check-config"],
        &[
            ("DATABASE_URL", &sqlite_url(&dir.path().join("sub"))),
            ("REDIS_URL", &redis.url),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.lines().all(|l| l.starts_with("ok: ")),
        "only ok lines: {stdout}"
    );
    assert!(stdout.contains("settings are valid"), "{stdout}");
    assert!(stdout.contains("will create it"), "{stdout}");
    assert!(stdout.contains("answers PING"), "{stdout}");
    // No folder and no database left behind.
    assert!(!dir.path().join("sub").exists());

    // On a migrated file it reports the schema version, still without changing it.
    let url = sqlite_url(dir.path());
    assert_eq!(
        run(&["migrate"], &[("DATABASE_URL", &url)]).status.code(),
        Some(0)
    );
    let out = run(&["check-config", "--database-url", &url], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text(&out).0.contains("schema version 8 (current)"),
        "{out:?}"
    );
}

#[test]
fn check_config_names_a_bad_setting_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &["check-config", "--heartbeat-s", "0"],
        &[
            ("DATABASE_URL", &sqlite_url(dir.path())),
            ("MAX_FRAME", "1"),
            ("SURVEY_TIMEOUT_MS", "60001"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    // Every problem, one line each, and the store is still checked.
    assert!(
        stdout.contains("problem: MAX_FRAME must be at least 128"),
        "{stdout}"
    );
    assert!(stdout.contains("problem: HEARTBEAT_S"), "{stdout}");
    assert!(
        stdout.contains("problem: SURVEY_TIMEOUT_MS must be 1 to 60000"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: store:"), "{stdout}");

    // A value clap cannot read at all is its usage error, also status 2.
    let out = run(&["check-config"], &[("MAX_FRAME", "lots")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out).1.contains("MAX_FRAME"), "{out:?}");
}

#[test]
fn check_config_reports_an_unreachable_redis_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let out = run(
        &["check-config"],
        &[
            ("DATABASE_URL", &sqlite_url(dir.path())),
            ("REDIS_URL", &format!("127.0.0.1:{port}")),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "problem: redis: REDIS_URL redis://127.0.0.1:{port} did not answer PING"
        )),
        "{stdout}"
    );

    // Each seed of a cluster is tried.
    let out = run(
        &["check-config"],
        &[
            ("DATABASE_URL", &sqlite_url(dir.path())),
            (
                "REDIS_CLUSTER",
                &format!("127.0.0.1:{port},127.0.0.1:{port}"),
            ),
        ],
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(
        stdout.matches("problem: redis: REDIS_CLUSTER").count(),
        2,
        "{stdout}"
    );
}

#[test]
fn check_config_reports_an_unreachable_postgres_and_exits_2() {
    let port = closed_port();
    let out = run(
        &["check-config"],
        &[(
            "DATABASE_URL",
            &format!("postgres://postgres:secret@127.0.0.1:{port}/test"),
        )],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.contains("problem: store: cannot reach"), "{stdout}");
    assert!(stdout.contains(&format!("127.0.0.1:{port}")), "{stdout}");
    assert!(!stdout.contains("secret"), "the password leaked: {stdout}");
    assert!(stdout.contains("ok: settings are valid"), "{stdout}");
}

#[test]
fn check_config_is_ok_with_a_reachable_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let out = run(&["check-config"], &[("DATABASE_URL", &schema.url)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("not migrated yet"), "{stdout}");
    // It created nothing in the schema.
    assert!(postgres_tables(&schema.url).is_empty());
}

#[test]
fn without_a_subcommand_the_flags_start_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let mut child = binary()
        .args([
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--shards",
            "1",
            "--database-url",
            &url,
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("notification-service listening") {
                let _ = tx.send(line);
            }
        }
    });
    let listening = rx.recv_timeout(common::WAIT);
    // Killed, not terminated: `listening` is logged just before the signal handlers are installed,
    // so a SIGTERM sent at once could end the process by the default action; how shutdown goes is
    // tests/lifecycle.rs's business, not this one's.
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("the server logs `listening`");
    assert!(line.contains("addr=127.0.0.1:"), "{line}");
}
