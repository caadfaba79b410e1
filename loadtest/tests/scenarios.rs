//! End to end: the delivery scenarios run against the real server binary on 127.0.0.1:0 and must report
//! every expected delivery, none lost.
//!
//! The server binary is the workspace's own `notification-service`, found next to this package's
//! `loadtest` binary (same target directory and profile); `cargo test --workspace` builds both.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// How long the server may take to say it listens.
const START_WAIT: Duration = Duration::from_secs(20);

/// A server started for one test, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str) -> Server {
        let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
        let binary = loadtest.with_file_name("notification-service");
        assert!(
            binary.exists(),
            "{} is missing: build the server first (cargo build --workspace)",
            binary.display()
        );
        let dir = std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(binary)
            .env_clear()
            .env("PORT", "0")
            .env("HOST", "127.0.0.1")
            .env("SHARDS", "2")
            .env("DATABASE_URL", format!("sqlite://{}/n.db", dir.display()))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    if let Some(port) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port = rx.recv_timeout(START_WAIT).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the server did not start");
        });
        Server { child, port, dir }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Runs a scenario with `--json` and returns its JSON line, after checking it exited 0.
    fn run(&self, args: &[&str]) -> Value {
        let url = self.url();
        let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(&args[..1])
            .args(["--url", &url, "--json", "--drain-s", "10"])
            .args(&args[1..])
            .output()
            .expect("run loadtest");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "loadtest {args:?} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().last().expect("a JSON line");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_all_delivered(v: &Value, expected: u64) {
    assert_eq!(v["expected"], expected, "{v}");
    assert_eq!(v["delivered"], expected, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["publish_errors"], 0, "{v}");
    assert!(v["p50_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn fanout_over_websocket_and_rest_delivers_every_message_to_every_subscriber() {
    let server = Server::start("fanout");
    let ws = server.run(&[
        "fanout",
        "--subscribers",
        "20",
        "--messages",
        "30",
        "--rate",
        "300",
        "--via",
        "ws",
        "--user-prefix",
        "fw",
    ]);
    assert_eq!(ws["scenario"], "fanout");
    assert_all_delivered(&ws, 20 * 30);
    assert!(ws["server_cpu_s_per_million"].is_number(), "{ws}");
    let rest = server.run(&[
        "fanout",
        "--subscribers",
        "20",
        "--messages",
        "30",
        "--rate",
        "300",
        "--via",
        "rest",
        "--channel",
        "lt-rest",
        "--user-prefix",
        "fr",
    ]);
    assert_all_delivered(&rest, 20 * 30);
    assert!(rest["rest_p50_ms"].as_f64().unwrap() > 0.0, "{rest}");
}

#[test]
fn targeted_sends_reach_their_users_and_chat_rooms_reach_their_other_members() {
    let server = Server::start("targeted");
    let targeted = server.run(&[
        "targeted",
        "--users",
        "25",
        "--messages",
        "50",
        "--rate",
        "500",
    ]);
    assert_all_delivered(&targeted, 50);
    // 24 clients in rooms of 5 (the last room has 4): 48 publishes round-robin over the clients.
    let chat = server.run(&[
        "chat",
        "--clients",
        "24",
        "--room-size",
        "5",
        "--messages",
        "48",
        "--rate",
        "500",
        "--user-prefix",
        "c",
    ]);
    // Each client publishes twice; a client's publish reaches the other members of its room.
    let expected = 2 * (20 * 4 + 4 * 3);
    assert_all_delivered(&chat, expected);
}
