//! TLS to PostgreSQL and Redis, as managed databases require: `sslmode=…&sslrootcert=…` in
//! `DATABASE_URL`, `rediss://` in `REDIS_URL` and `REDIS_CLUSTER` with `REDIS_CA_FILE`. Against a
//! private PostgreSQL that accepts only TLS connections and a private Redis that listens only on a TLS
//! port, both on certificates this test makes: two real server processes carry a send on one node to
//! a live WebSocket on the other; a certificate from another CA, or one that does not name the host,
//! stops the start-up with an error that says so; `check-config` reports the same.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::tls::{Certs, TlsPostgres, TlsRedis};
use common::TestServer;
use serde_json::json;

/// A node on the TLS stores.
fn node(database_url: &str, redis: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("DATABASE_URL", database_url), ("REDIS_PREFIX", "tls:")];
    env.extend_from_slice(redis);
    TestServer::start_with(&env)
}

/// Runs the binary (a start-up that must fail, or a subcommand) with a clean environment, killing it
/// if it has not exited within 30 s.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("SHARDS", "1")
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let watchdog = std::thread::spawn(move || {
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("wait for the binary");
    let _ = watchdog.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Asserts that a server with `env` stops at start-up with a non-zero status and every one of `says`
/// in its output.
fn assert_start_up_fails(env: &[(&str, &str)], says: &[&str]) {
    let (out, text) = run(&[], env);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the server should have stopped at start-up: {:?}\n{text}",
        out.status
    );
    assert!(!text.contains("listening"), "it listened anyway:\n{text}");
    for needle in says {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
}

#[test]
fn a_send_crosses_tls_postgres_and_tls_redis_to_a_live_websocket_on_another_node() {
    let certs = Certs::new("test CA");
    let (Some(pg), Some(redis)) = (TlsPostgres::start(&certs), TlsRedis::start(&certs)) else {
        return;
    };
    // The server accepts only `hostssl` connections and Redis has no plain port: nothing below
    // works without TLS.
    let db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca_path()),
    );
    let ca = certs.ca_path();
    let redis_env = [("REDIS_URL", redis.url()), ("REDIS_CA_FILE", ca)];
    let redis_env: Vec<(&str, &str)> = redis_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = node(&db, &redis_env);
    let b = node(&db, &redis_env);

    let mut client = b.ws("user_id=alice");
    redis.wait_subscribers("tls:u:alice", 1, false);
    let id = a.send(json!({"user_id": "alice", "title": "over TLS", "message": "hello"}));
    let n = client.expect_notification();
    assert_eq!(n["id"], id.as_str());
    assert_eq!(n["message"], "hello");
    // Stored in the TLS PostgreSQL: node B reads it back from history.
    let history = b.get("/api/v1/notifications/user/alice").json();
    assert!(
        history.to_string().contains(&id),
        "history on node B: {history}"
    );
    assert_eq!(a.get("/health").json()["redis"], "ok");
}

#[test]
fn a_send_crosses_a_tls_redis_cluster() {
    let certs = Certs::new("test CA");
    let (Some(pg), Some(redis)) = (TlsPostgres::start(&certs), TlsRedis::start_cluster(&certs))
    else {
        return;
    };
    let db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca_path()),
    );
    let seeds = redis.url();
    let ca = certs.ca_path();
    let redis_env = [("REDIS_CLUSTER", seeds.as_str()), ("REDIS_CA_FILE", &ca)];
    let a = node(&db, &redis_env);
    let b = node(&db, &redis_env);

    let mut client = b.ws("user_id=bob");
    redis.wait_subscribers("tls:u:bob", 1, true);
    let id = a.send(json!({"user_id": "bob", "message": "sharded over TLS"}));
    let n = client.expect_notification();
    assert_eq!(n["id"], id.as_str());
    assert_eq!(n["message"], "sharded over TLS");

    // Every node of the slot map is trusted through REDIS_CA_FILE: another CA stops the start-up.
    let other = Certs::new("another CA");
    let wrong_ca = other.ca_path();
    assert_start_up_fails(
        &[
            ("DATABASE_URL", &db),
            ("REDIS_CLUSTER", &seeds),
            ("REDIS_CA_FILE", &wrong_ca),
        ],
        &[
            "cannot connect to Redis (REDIS_CLUSTER) over TLS",
            "not signed by a trusted CA (check REDIS_CA_FILE)",
        ],
    );
}

#[test]
fn a_certificate_from_another_ca_stops_the_start_up() {
    let certs = Certs::new("test CA");
    let other = Certs::new("another CA");
    let (Some(pg), Some(redis)) = (TlsPostgres::start(&certs), TlsRedis::start(&certs)) else {
        return;
    };
    let wrong_db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", other.ca_path()),
    );
    assert_start_up_fails(
        &[("DATABASE_URL", &wrong_db)],
        &[
            "cannot open the store",
            "TLS",
            "certificate",
            "not signed by a trusted CA (check sslrootcert)",
        ],
    );

    // The store is right, Redis's certificate is not: refused before the node joins.
    let right_db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca_path()),
    );
    let url = redis.url();
    let wrong_ca = other.ca_path();
    assert_start_up_fails(
        &[
            ("DATABASE_URL", &right_db),
            ("REDIS_URL", &url),
            ("REDIS_CA_FILE", &wrong_ca),
        ],
        &[
            "cannot connect to Redis (REDIS_URL) over TLS",
            "certificate",
            "not signed by a trusted CA (check REDIS_CA_FILE)",
        ],
    );
    // Without REDIS_CA_FILE the system's CAs are trusted, and they did not sign the test's CA.
    assert_start_up_fails(
        &[("DATABASE_URL", &right_db), ("REDIS_URL", &url)],
        &["over TLS", "not signed by a trusted CA"],
    );
}

#[test]
fn require_needs_no_ca_and_verify_full_checks_the_host_name() {
    let certs = Certs::new("test CA");
    let Some(pg) = TlsPostgres::start(&certs) else {
        return;
    };
    // libpq's `require`: encrypted, the certificate not checked, so no CA is needed.
    let server =
        TestServer::start_with(&[("DATABASE_URL", &pg.url("127.0.0.1", "sslmode=require"))]);
    let id = server.send(json!({"user_id": "carol", "message": "encrypted"}));
    assert!(!id.is_empty());
    // `prefer` uses TLS when the server offers it (this one takes nothing else).
    let server =
        TestServer::start_with(&[("DATABASE_URL", &pg.url("127.0.0.1", "sslmode=prefer"))]);
    let history = server.get("/api/v1/notifications/user/carol").json();
    assert!(history.to_string().contains(&id), "{history}");
    // `verify-ca` checks the chain only: the right CA under another host name is accepted.
    let ca = certs.ca_path();
    let verify_ca = format!(
        "postgres://postgres@elsewhere.test:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={ca}",
        pg.port
    );
    let server = TestServer::start_with(&[("DATABASE_URL", &verify_ca)]);
    assert_eq!(server.get("/health").status, 200);
    // `verify-full` also wants the certificate to name the host: it names localhost and 127.0.0.1,
    // not elsewhere.test (reached through hostaddr, so only the name differs).
    let wrong_name = verify_ca.replace("verify-ca", "verify-full");
    assert_start_up_fails(
        &[("DATABASE_URL", &wrong_name)],
        &["TLS", "certificate does not name the host connected to"],
    );
    // And `localhost` is named: accepted.
    let server = TestServer::start_with(&[(
        "DATABASE_URL",
        &pg.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}&hostaddr=127.0.0.1"),
        ),
    )]);
    assert_eq!(server.get("/health").status, 200);
    // Plain TCP is refused by this server (hostssl only): `disable` cannot start.
    assert_start_up_fails(
        &[("DATABASE_URL", &pg.url("127.0.0.1", "sslmode=disable"))],
        &["no encryption"],
    );
}

#[test]
fn check_config_reports_a_refused_certificate() {
    let certs = Certs::new("test CA");
    let other = Certs::new("another CA");
    let (Some(pg), Some(redis)) = (TlsPostgres::start(&certs), TlsRedis::start(&certs)) else {
        return;
    };
    let url = redis.url();
    let wrong_ca = other.ca_path();
    let wrong_db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={wrong_ca}"),
    );
    let (out, text) = run(
        &["check-config"],
        &[
            ("DATABASE_URL", &wrong_db),
            ("REDIS_URL", &url),
            ("REDIS_CA_FILE", &wrong_ca),
        ],
    );
    assert!(!out.status.success(), "{text}");
    let problems: Vec<&str> = text.lines().filter(|l| l.starts_with("problem:")).collect();
    assert!(
        problems.iter().any(|l| l.starts_with("problem: store:")
            && l.contains("not signed by a trusted CA (check sslrootcert)")),
        "{text}"
    );
    assert!(
        problems
            .iter()
            .any(|l| l.starts_with("problem: redis: REDIS_URL")
                && l.contains("not signed by a trusted CA (check REDIS_CA_FILE)")),
        "{text}"
    );

    let ca = certs.ca_path();
    let right_db = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let (out, text) = run(
        &["check-config"],
        &[
            ("DATABASE_URL", &right_db),
            ("REDIS_URL", &url),
            ("REDIS_CA_FILE", &ca),
        ],
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("answers PING over TLS"), "{text}");
}
