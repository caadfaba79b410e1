//! No notification is lost across nodes: a Redis restart under a stream of sends, and a node killed
//! between commit and publish. Every run checks that every acknowledged send reaches every live
//! connection of its user exactly once, and (where one node takes all the sends) in id order.
//!
//! The Redis restart is repeated with varied timings (outage length, when the restart lands in the
//! nodes' reconnect backoff, how long the sends go on after it) because the ways to lose a notification
//! here are races between the nodes' reconnects. `LOST_ACROSS_NODES_RUNS` sets how many runs each test
//! makes (default: a short loop for CI; the acceptance loop is 50).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::pg::PgSchema;
use common::redis::PrivateRedis;
use common::{TestServer, TestServerRef, WsClient};
use serde_json::json;
use tungstenite::Message;

/// Runs per test: `LOST_ACROSS_NODES_RUNS`, else `default`.
fn runs(default: usize) -> usize {
    std::env::var("LOST_ACROSS_NODES_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A node on the shared schema and the private Redis, with extra settings.
fn node(schema: &PgSchema, redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("DATABASE_URL", schema.url.as_str()),
        ("REDIS_URL", redis_url),
        ("REDIS_PREFIX", prefix),
    ];
    env.extend_from_slice(extra);
    TestServer::start_with(&env)
}

/// Waits until `check` holds, failing with `what` after `within`.
fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a node's `/health` says Redis is `state`.
fn wait_redis(server: &TestServer, state: &str) {
    wait_until(
        &format!("redis {state} on {}", server.addr),
        Duration::from_secs(20),
        || server.get("/health").json()["redis"] == state,
    );
}

/// A WebSocket client read on its own thread, so that the server never has to hold a backlog for it.
struct Listener {
    got: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts reading `client` (whose `connected`, and any `subscribed` or `resumed`, were consumed).
    fn start(mut client: WsClient) -> Listener {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (got2, stop2) = (got.clone(), stop.clone());
        client
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match client.ws.read() {
                    Ok(Message::Text(t)) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        if let Some(id) = v["id"].as_str().filter(|_| v.get("event").is_none()) {
                            got2.lock().unwrap().push(id.to_owned());
                        } else if v["event"] != "resumed" {
                            panic!("unexpected frame: {v}");
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("the client's connection failed: {e}"),
                }
            }
        });
        Listener {
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until every id of `sent` arrived (or `within` passed), then one more second for
    /// duplicates, and returns what arrived, in order.
    fn finish(mut self, sent: &[String], within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && self.count() < sent.len() {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("listener thread");
        let got = self.got.lock().unwrap().clone();
        got
    }
}

/// Checks that `got` is exactly `sent`: each once, none missing, no stranger; and in id order when
/// `ordered`.
fn assert_exactly_once(label: &str, sent: &[String], got: &[String], ordered: bool) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in got {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    // Send numbers of the missing ones: which part of the stream was lost tells why.
    let missing: Vec<usize> = sent
        .iter()
        .enumerate()
        .filter(|(_, id)| !seen.contains_key(id.as_str()))
        .map(|(i, _)| i)
        .collect();
    let twice: Vec<&&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    let strangers = got.iter().filter(|id| !sent.contains(id)).count();
    assert!(
        missing.is_empty() && twice.is_empty() && strangers == 0,
        "{label}: {} sent, {} received; {} missing (send numbers {}); {} twice; {strangers} strangers",
        sent.len(),
        got.len(),
        missing.len(),
        ranges(&missing),
        twice.len()
    );
    if ordered {
        let mut sorted = got.to_vec();
        sorted.sort();
        let first_out = got.iter().zip(&sorted).position(|(a, b)| a != b);
        assert!(
            first_out.is_none(),
            "{label}: not in id order from position {first_out:?}"
        );
    }
}

/// `[1, 2, 3, 7]` as `1-3, 7`.
fn ranges(numbers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        while i + 1 < numbers.len() && numbers[i + 1] == numbers[i] + 1 {
            i += 1;
        }
        out.push(if numbers[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", numbers[i])
        });
        i += 1;
    }
    out.join(", ")
}

/// Sends to `user` through `via` at `per_second`, open-loop, until `stop`; returns the acknowledged ids.
fn send_stream(
    via: TestServerRef,
    user: &'static str,
    per_second: u32,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let gap = Duration::from_secs(1) / per_second;
        let mut next = Instant::now();
        let mut sent = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            sent.push(via.send(json!({"user_id": user, "message": format!("n{}", sent.len())})));
            next += gap;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sent
    })
}

/// One timing of the Redis restart scenario.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Sends before Redis is killed.
    before: Duration,
    /// How long Redis stays down.
    outage: Duration,
    /// Sends after Redis is started again.
    after: Duration,
}

/// The varied timings: outages from a blip to longer than the nodes' largest backoff step, and
/// restarts that land early and late in a backoff pause.
fn timing(run: usize) -> Timing {
    const OUTAGES_MS: [u64; 7] = [150, 420, 800, 1_250, 1_700, 2_600, 3_300];
    const AFTER_MS: [u64; 3] = [400, 900, 1_600];
    Timing {
        before: Duration::from_millis(300 + 70 * (run as u64 % 5)),
        outage: Duration::from_millis(OUTAGES_MS[run % OUTAGES_MS.len()] + 13 * run as u64),
        after: Duration::from_millis(AFTER_MS[run % AFTER_MS.len()]),
    }
}

/// Two or three nodes; sends to one user through node A; the user's live clients on the other nodes.
/// Redis is killed (-9) and started again under the stream. `MAX_REPLAY` is small, so that what a node
/// catches up after the outage is more than one replay page.
fn redis_restart_run(nodes: usize, run: usize) {
    let t = timing(run);
    let (Some(schema), Some(mut redis)) = (PgSchema::create(), PrivateRedis::start()) else {
        return;
    };
    let test_redis = redis.as_test_redis();
    let (url, prefix) = (test_redis.url.clone(), test_redis.prefix.clone());
    let settings = [("MAX_REPLAY", "50")];
    let a = node(&schema, &url, &prefix, &settings);
    let others: Vec<TestServer> = (1..nodes)
        .map(|_| node(&schema, &url, &prefix, &settings))
        .collect();
    let listeners: Vec<Listener> = others
        .iter()
        .map(|n| Listener::start(n.ws("user_id=rf1")))
        .collect();
    test_redis.wait_numsub("u:rf1", nodes as i64 - 1);

    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_stream(TestServerRef(a.addr), "rf1", 200, stop.clone());
    std::thread::sleep(t.before);
    redis.stop();
    std::thread::sleep(t.outage);
    redis.restart();
    std::thread::sleep(t.after);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    for n in std::iter::once(&a).chain(&others) {
        wait_redis(n, "ok");
    }
    for (i, l) in listeners.into_iter().enumerate() {
        let got = l.finish(&sent, Duration::from_secs(15));
        assert_exactly_once(
            &format!("run {run} {t:?}, client on node {}", i + 1),
            &sent,
            &got,
            true,
        );
    }
}

#[test]
fn a_redis_restart_under_a_stream_of_sends_loses_nothing_between_two_nodes() {
    for run in 0..runs(6) {
        redis_restart_run(2, run);
    }
}

#[test]
fn a_redis_restart_under_a_stream_of_sends_loses_nothing_among_three_nodes() {
    for run in 0..runs(3) {
        redis_restart_run(3, run + 100);
    }
}
