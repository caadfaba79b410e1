//! Connection and process lifecycle: heartbeats, slow consumers, graceful shutdown, restart on the same
//! data.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{raw_ws, read_server_frame, TestServer};
use serde_json::{json, Value};

#[test]
fn a_client_that_misses_two_pongs_is_closed() {
    let server = TestServer::start_with(&[("HEARTBEAT_S", "1")]);
    // The raw client never answers pings.
    let mut silent = raw_ws(&server, "silent");
    let started = Instant::now();
    let mut pings = 0;
    loop {
        let mut h = [0u8; 1];
        match silent.read(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // Read the rest of the frame: pings are tiny.
                let mut len = [0u8; 1];
                silent.read_exact(&mut len).unwrap();
                let mut payload = vec![0u8; (len[0] & 0x7f) as usize];
                silent.read_exact(&mut payload).unwrap();
                if h[0] & 0x0f == 0x9 {
                    pings += 1;
                }
            }
        }
    }
    let after = started.elapsed();
    assert_eq!(pings, 2, "two pings went unanswered before the close");
    assert!(
        after >= Duration::from_millis(2500) && after < Duration::from_secs(6),
        "{after:?}"
    );

    // A client that answers (tungstenite pongs automatically when it reads) stays.
    let mut alive = server.ws("user_id=alive");
    alive.expect_silence(Duration::from_millis(3500));
    let id = server.send(json!({"user_id": "alive", "message": "still connected"}));
    assert_eq!(alive.expect_notification()["id"], id.as_str());
}

#[test]
fn a_client_that_stops_reading_is_closed_with_1013_and_others_are_unaffected() {
    let server = TestServer::start_with(&[("MAX_OUTBOUND_BYTES", "65536")]);
    // A small receive buffer makes the kernel stop accepting bytes for it quickly.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(common::WAIT)).unwrap();
    let mut stuck = server.ws_with_socket("user_id=stuck&channels=firehose", stream);
    stuck.expect_event("subscribed");
    let mut healthy = server.ws("user_id=healthy&channels=firehose");
    healthy.expect_event("subscribed");

    // ~4 MB to the channel while `stuck` reads nothing.
    let big = "x".repeat(2000);
    let batch: Vec<Value> = (0..200)
        .map(|_| json!({"channels": ["firehose"], "message": big}))
        .collect();
    let mut sent = 0;
    for _ in 0..10 {
        let r = server.post(
            "/api/v1/notifications/batch",
            &json!({ "notifications": batch }),
        );
        assert_eq!(r.status, 201);
        sent += 200;
        for _ in 0..200 {
            healthy.expect_notification();
        }
    }
    assert_eq!(sent, 2000);
    // Now `stuck` reads: some notifications, then the close frame 1013.
    assert_eq!(stuck.expect_close(), Some(1013));
    let id = server.send(json!({"channels": ["firehose"], "message": "after"}));
    assert_eq!(healthy.expect_notification()["id"], id.as_str());
}

#[test]
fn sigterm_closes_websockets_with_1001_exits_0_and_keeps_every_notification() {
    let mut server = TestServer::start();
    let mut client = server.ws("user_id=durable");
    let mut raw = raw_ws(&server, "raw-durable");
    let ids: Vec<String> = (0..50)
        .map(|i| server.send(json!({"user_id": "durable", "message": i.to_string()})))
        .collect();
    for _ in 0..50 {
        client.expect_notification();
    }

    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(client.expect_close(), Some(1001));
    let code = loop {
        let (op, payload) = read_server_frame(&mut raw);
        if op == 8 {
            break u16::from_be_bytes([payload[0], payload[1]]);
        }
    };
    assert_eq!(code, 1001);

    // Restart on the same database: everything is there.
    let server = TestServer::start_in(server.dir.clone(), &[]);
    let page = server
        .get("/api/v1/notifications/user/durable?limit=500")
        .json();
    assert_eq!(page["total"], 50);
    let mut stored: Vec<String> = page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    stored.reverse();
    assert_eq!(stored, ids);
}

#[test]
fn shutdown_finishes_a_request_in_flight() {
    let mut server = TestServer::start();
    // A keep-alive connection mid-request: head sent, body not yet.
    let mut conn = server.tcp();
    let body = r#"{"user_id":"late","message":"made it"}"#;
    use std::io::Write;
    conn.write_all(format!("POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let pid = server.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    conn.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    let r = common::parse_responses(&raw).remove(0);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(server.wait_exit().success());
    let server = TestServer::start_in(server.dir.clone(), &[]);
    assert_eq!(
        server.get("/api/v1/notifications/user/late").json()["total"],
        1
    );
}

#[test]
fn the_embedded_store_folder_is_created_and_help_documents_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/c/notifications.db");
    let server =
        TestServer::start_with(&[("DATABASE_URL", &format!("sqlite://{}", nested.display()))]);
    assert_eq!(server.get("/health").status, 200);
    assert!(nested.exists());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for setting in [
        "PORT",
        "HOST",
        "DATABASE_URL",
        "SHARDS",
        "HEARTBEAT_S",
        "MAX_BODY",
        "MAX_FRAME",
        "MAX_OUTBOUND_BYTES",
        "LOG_FORMAT",
    ] {
        assert!(help.contains(setting), "--help does not mention {setting}");
    }
}

#[test]
fn json_logs_carry_connect_and_disconnect_with_user_and_shard() {
    let server = TestServer::start_with(&[("LOG_FORMAT", "json")]);
    // With JSON logs the harness cannot read the address from a text line; the JSON line has it too.
    let c = server.ws("user_id=logged");
    drop(c);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let lines = server.log.lock().unwrap().clone();
        let events: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let disconnected = events
            .iter()
            .find(|e| e["fields"]["message"] == "disconnected" && e["fields"]["user"] == "logged");
        if let Some(e) = disconnected {
            assert!(e["fields"]["shard"].is_number());
            assert!(e["fields"]["duration_ms"].is_number());
            assert!(events
                .iter()
                .any(|e| e["fields"]["message"] == "connected" && e["fields"]["user"] == "logged"));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no disconnect log line: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the binary with `env` (on top of a clean environment) until it exits by itself, at most
/// `common::WAIT`; returns its status and everything it printed.
fn run_to_exit(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second server did not exit: it is serving the port too");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    (status, output)
}

#[test]
fn a_second_server_on_a_port_already_served_exits_1_before_opening_its_store() {
    let first = TestServer::start();
    let before = first.send(json!({"user_id": "owner", "message": "first"}));
    let port = first.addr.port().to_string();
    let other = tempfile::tempdir().unwrap();
    let other_db = other.path().join("second.db");
    let (status, output) = run_to_exit(&[
        ("HOST", "127.0.0.1"),
        ("PORT", &port),
        ("SHARDS", "2"),
        ("DATABASE_URL", &format!("sqlite://{}", other_db.display())),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!(
            "cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{output}"
    );
    assert!(output.contains(&format!("port {port}")), "{output}");
    assert!(
        output.contains(&format!("pid {}", first.pid())),
        "the message names the process that holds the port: {output}"
    );
    assert!(!output.contains("listening"), "{output}");
    assert!(!other_db.exists(), "the second server opened its store");

    // The first one still serves, alone: every new connection reaches it.
    for i in 0..20 {
        let r = first.get("/health");
        assert_eq!(r.status, 200, "connection {i}");
    }
    let page = first.get("/api/v1/notifications/user/owner").json();
    assert_eq!(page["notifications"][0]["id"], before.as_str());

    // A server listening on the wildcard address of that port is refused the same way.
    let (status, output) = run_to_exit(&[
        ("HOST", "0.0.0.0"),
        ("PORT", &port),
        ("SHARDS", "1"),
        ("DATABASE_URL", &format!("sqlite://{}", other_db.display())),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("Address already in use"), "{output}");
    assert!(!other_db.exists());
}

#[test]
fn two_servers_started_together_on_one_port_never_both_serve_it() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        // A port that was free a moment ago.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let mut children: Vec<(std::process::Child, std::path::PathBuf)> = (0..2)
            .map(|i| {
                let log = dir.path().join(format!("race-{round}-{i}.log"));
                let file = std::fs::File::create(&log).unwrap();
                let child = std::process::Command::new(env!("CARGO_BIN_EXE_notification-service"))
                    .env_clear()
                    .env("RUST_LOG", "info")
                    .env("HOST", "127.0.0.1")
                    .env("PORT", &port)
                    .env("SHARDS", "2")
                    .env(
                        "DATABASE_URL",
                        format!("sqlite://{}/race-{round}-{i}.db", dir.path().display()),
                    )
                    .stdout(file.try_clone().unwrap())
                    .stderr(file)
                    .spawn()
                    .unwrap();
                (child, log)
            })
            .collect();
        // Each ends up listening or exited; give both the time to get there.
        let deadline = Instant::now() + common::WAIT;
        let serving = loop {
            let mut settled = 0;
            let mut serving = 0;
            for (child, log) in &mut children {
                let listening = std::fs::read_to_string(&*log)
                    .unwrap_or_default()
                    .contains("notification-service listening");
                let exited = child.try_wait().unwrap().is_some();
                if exited || listening {
                    settled += 1;
                }
                if listening && !exited {
                    serving += 1;
                }
            }
            if settled == 2 || Instant::now() > deadline {
                break serving;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let a loser that already logged `listening` finish exiting before counting again.
        std::thread::sleep(Duration::from_millis(300));
        let still_serving = children
            .iter_mut()
            .map(|(child, _)| child.try_wait().unwrap().is_none())
            .filter(|running| *running)
            .count();
        for (child, _) in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            serving <= 1 && still_serving <= 1,
            "round {round}: both servers serve port {port}"
        );
    }
}
