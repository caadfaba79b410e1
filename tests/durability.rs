//! "A 2xx means it is stored": kill -9 the server while 1,000 sends are in flight, restart it on the same
//! data, and find every acknowledged notification in history.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{parse_responses, TestServer};

const PRODUCERS: usize = 20;
const SENDS_PER_PRODUCER: usize = 50;

/// One producer: sends on a keep-alive connection until the server dies; returns the acknowledged ids.
fn produce(addr: std::net::SocketAddr, producer: usize, acked: Arc<AtomicUsize>) -> Vec<String> {
    let mut ids = Vec::new();
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return ids;
    };
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..SENDS_PER_PRODUCER {
        let body = format!(r#"{{"user_id":"durable-{producer}","message":"{i}"}}"#);
        let req = format!(
            "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(req.as_bytes()).is_err() {
            break;
        }
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        let response = loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break None,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if let Some(r) = parse_responses(&raw)
                .into_iter()
                .next()
                .filter(|r| r.body.len() > 10)
            {
                break Some(r);
            }
        };
        match response {
            Some(r) if r.status == 201 => {
                ids.push(r.json()["id"].as_str().unwrap().to_owned());
                acked.fetch_add(1, Ordering::Relaxed);
            }
            _ => break,
        }
    }
    ids
}

#[test]
fn every_acknowledged_send_survives_kill_9_on_sqlite() {
    kill_9_mid_stream(&[]);
}

#[test]
fn every_acknowledged_send_survives_kill_9_on_postgres() {
    let Some(schema) = common::pg::PgSchema::create() else {
        return;
    };
    kill_9_mid_stream(&[("DATABASE_URL", &schema.url)]);
}

/// Sends from 20 producers, kills the server with SIGKILL after 300 acknowledgements, restarts it on
/// the same data and checks every acknowledged id.
fn kill_9_mid_stream(env: &[(&str, &str)]) {
    let server = TestServer::start_with(env);
    let addr = server.addr;
    let pid = server.pid();
    let acked = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let acked = acked.clone();
            std::thread::spawn(move || produce(addr, p, acked))
        })
        .collect();
    // Kill while sends are in flight: after some have been acknowledged, long before all of them.
    while acked.load(Ordering::Relaxed) < 300 {
        std::thread::sleep(Duration::from_millis(1));
    }
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let acked_ids: Vec<Vec<String>> = producers.into_iter().map(|p| p.join().unwrap()).collect();
    let total: usize = acked_ids.iter().map(Vec::len).sum();
    assert!(
        (300..PRODUCERS * SENDS_PER_PRODUCER).contains(&total),
        "killed mid-stream: {total} acknowledged"
    );

    let server = TestServer::start_in(server.dir.clone(), env);
    for (producer, ids) in acked_ids.iter().enumerate() {
        let page = server
            .get(&format!(
                "/api/v1/notifications/user/durable-{producer}?limit=500"
            ))
            .json();
        let stored: std::collections::HashSet<&str> = page["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        for id in ids {
            assert!(
                stored.contains(id.as_str()),
                "acknowledged {id} of producer {producer} was lost"
            );
        }
    }
}

/// The `store opened (sqlite)` log line of a server started with `env`.
fn store_opened_line(server: &TestServer) -> String {
    server
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("store opened (sqlite)"))
        .cloned()
        .expect("a store opened line")
}

#[test]
fn sqlite_synchronous_is_normal_by_default_full_when_asked_and_logged_as_read_back() {
    let server = TestServer::start();
    let line = store_opened_line(&server);
    assert!(line.contains("synchronous=normal"), "{line}");

    let mut server = TestServer::start_with(&[("SQLITE_SYNCHRONOUS", "full")]);
    let line = store_opened_line(&server);
    assert!(line.contains("synchronous=full"), "{line}");
    let id = server.send(serde_json::json!({"user_id": "fsync", "message": "kept"}));
    assert!(server.terminate().success());
    // The same data under the default setting: the setting is per connection, not in the file.
    let server = TestServer::start_in(server.dir.clone(), &[]);
    assert!(store_opened_line(&server).contains("synchronous=normal"));
    let page = server.get("/api/v1/notifications/user/fsync").json();
    assert_eq!(page["notifications"][0]["id"], id.as_str());
}

#[test]
fn a_bad_sqlite_synchronous_is_refused_before_the_store_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    for value in ["off", "extra", "NORMAL!"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
            .env_clear()
            .env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("SQLITE_SYNCHRONOUS", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // An invalid setting exits 2 (API.md, "Start-up"), like every other one.
        assert_eq!(out.status.code(), Some(2), "{value:?}: {out:?}");
        assert!(stderr.contains("SQLITE_SYNCHRONOUS"), "{value:?}: {stderr}");
        assert!(stderr.contains("normal or full"), "{value:?}: {stderr}");
        assert!(!db.exists(), "{value:?}: the store was opened");
    }
}

#[test]
fn store_readers_and_batch_size_are_settings_that_take_effect() {
    let line = store_opened_line(&TestServer::start());
    assert!(line.contains("readers=2"), "{line}");
    assert!(line.contains("max_batch=4096"), "{line}");
    let server = TestServer::start_with(&[("STORE_READERS", "5"), ("STORE_MAX_BATCH", "100")]);
    let line = store_opened_line(&server);
    assert!(line.contains("readers=5"), "{line}");
    assert!(line.contains("max_batch=100"), "{line}");
    // Five reader threads serve reads; batches of 100 still commit a larger batch request whole.
    let ids = server.post(
        "/api/v1/notifications/batch",
        &serde_json::json!({"notifications": (0..150)
            .map(|i| serde_json::json!({"user_id": "readers", "message": format!("m{i}")}))
            .collect::<Vec<_>>()}),
    );
    assert_eq!(ids.status, 201);
    let page = server.get("/api/v1/notifications/user/readers").json();
    assert_eq!(page["total"], 150);
}

#[test]
fn out_of_range_store_readers_or_batch_size_are_refused_before_the_store_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never.db");
    for (name, value) in [
        ("STORE_READERS", "0"),
        ("STORE_READERS", "65"),
        ("STORE_MAX_BATCH", "0"),
        ("STORE_MAX_BATCH", "65537"),
        ("STORE_MAX_BATCH", "lots"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
            .env_clear()
            .env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // An invalid setting exits 2 (API.md, "Start-up"), like every other one.
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {out:?}");
        assert!(stderr.contains(name), "{name}={value}: {stderr}");
        assert!(
            stderr.contains("must be a whole number from 1 to"),
            "{name}={value}: {stderr}"
        );
        assert!(!db.exists(), "{name}={value}: the store was opened");
    }
}
