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
use common::redis::{PrivateRedis, TestRedis};
use common::{wait_until, TestServer, TestServerRef, WsClient};
use serde_json::json;
use tungstenite::Message;

/// Runs per test: `LOST_ACROSS_NODES_RUNS`, else `default`.
fn runs(default: usize) -> usize {
    std::env::var("LOST_ACROSS_NODES_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A PostgreSQL schema and a `redis-server` of the test's own (with a key prefix), or `None` (skip,
/// outside CI).
fn private_deployment() -> Option<(PgSchema, PrivateRedis, TestRedis)> {
    let (Some(schema), Some(redis)) = (PgSchema::create(), PrivateRedis::start()) else {
        return None;
    };
    let test_redis = redis.as_test_redis();
    Some((schema, redis, test_redis))
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
    /// `(id, message)` of each notification, in order of arrival.
    got: Arc<Mutex<Vec<(String, String)>>>,
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
                            let message = v["message"].as_str().unwrap_or_default().to_owned();
                            got2.lock().unwrap().push((id.to_owned(), message));
                        } else if v["event"] == "resumed" {
                            // A replay cut at MAX_REPLAY: ask for the rest, as a client does.
                            if v["complete"] == false {
                                client
                                    .send_json(json!({"action": "resume", "since": v["last_id"]}));
                            }
                        } else if v["event"] != "unread" {
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

    /// Closes the connection now (a client going away) and returns what it got.
    fn disconnect(self) -> Vec<String> {
        ids(&self.stop_now())
    }

    /// Stops reading and returns `(id, message)` of what arrived.
    fn stop_now(mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("listener thread");
        let got = self.got.lock().unwrap().clone();
        got
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until `expected` notifications arrived (or `within` passed), then one more second for
    /// duplicates, and returns the ids of what arrived, in order.
    fn finish(self, expected: usize, within: Duration) -> Vec<String> {
        ids(&self.finish_with_messages(expected, within))
    }

    /// [`Listener::finish`], with each notification's message.
    fn finish_with_messages(self, expected: usize, within: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && self.count() < expected {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(1));
        self.stop_now()
    }
}

fn ids(got: &[(String, String)]) -> Vec<String> {
    got.iter().map(|(id, _)| id.clone()).collect()
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
    let Some((schema, mut redis, test_redis)) = private_deployment() else {
        return;
    };
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
        let got = l.finish(sent.len(), Duration::from_secs(15));
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

/// Reconnects as `user` to `server` with `since` = the last id of `got_before`, as a client does.
fn resume_as(server: &TestServer, user: &str, got_before: &[String]) -> Listener {
    let last = got_before
        .last()
        .expect("the client saw something before it left");
    Listener::start(server.ws(&format!("user_id={user}&since={last}")))
}

/// Clients of the user on node B that leave and resume there with `since`: one during the outage,
/// one right after Redis is back (before or while B reconnects). What each got before leaving and
/// after resuming is every acknowledged send, once, in id order; so is what a client that stayed got.
fn resume_run(run: usize) {
    let t = timing(run);
    let Some((schema, mut redis, test_redis)) = private_deployment() else {
        return;
    };
    let (url, prefix) = (test_redis.url.clone(), test_redis.prefix.clone());
    let settings = [("MAX_REPLAY", "50")];
    let a = node(&schema, &url, &prefix, &settings);
    let b = node(&schema, &url, &prefix, &settings);
    let stayed = Listener::start(b.ws("user_id=rf2"));
    let during = Listener::start(b.ws("user_id=rf2"));
    let after = Listener::start(b.ws("user_id=rf2"));
    test_redis.wait_numsub("u:rf2", 1);

    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_stream(TestServerRef(a.addr), "rf2", 200, stop.clone());
    std::thread::sleep(t.before);
    redis.stop();
    std::thread::sleep(t.outage / 2);
    let during_before = during.disconnect();
    std::thread::sleep(Duration::from_millis(60));
    let during = resume_as(&b, "rf2", &during_before);
    std::thread::sleep(t.outage / 2);
    redis.restart();
    let after_before = after.disconnect();
    std::thread::sleep(Duration::from_millis(40));
    let after = resume_as(&b, "rf2", &after_before);
    std::thread::sleep(t.after);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    wait_redis(&a, "ok");
    wait_redis(&b, "ok");
    let label = |who: &str| format!("run {run} {t:?}, {who}");
    for (who, before, listener) in [
        ("resumed during the outage", during_before, during),
        ("resumed right after it", after_before, after),
    ] {
        let rest = listener.finish(sent.len() - before.len(), Duration::from_secs(15));
        assert_exactly_once(&label(who), &sent, &[before, rest].concat(), true);
    }
    let got = stayed.finish(sent.len(), Duration::from_secs(5));
    assert_exactly_once(&label("stayed connected"), &sent, &got, true);
}

#[test]
fn clients_that_resume_on_the_other_node_during_and_after_a_redis_restart_miss_nothing() {
    for run in 0..runs(3) {
        resume_run(run + 200);
    }
}

/// Node A reaches Redis through a proxy the test cuts: it goes on committing sends it cannot publish,
/// and is killed (-9) before Redis is back. Nodes B and C see its announcement expire and catch its
/// commits up from the store: their clients get every acknowledged send, once, in id order.
#[test]
fn a_node_killed_with_commits_it_never_published_loses_no_live_delivery_elsewhere() {
    let Some((schema, redis, test_redis)) = private_deployment() else {
        return;
    };
    let proxy = common::proxy::CuttableProxy::start(([127, 0, 0, 1], redis.port).into());
    let settings = [("REDIS_NODE_TIMEOUT_MS", "1000")];
    let via_proxy = format!("redis://{}", proxy.addr);
    let a = node(&schema, &via_proxy, &test_redis.prefix, &settings);
    let b = node(&schema, &test_redis.url, &test_redis.prefix, &settings);
    let c = node(&schema, &test_redis.url, &test_redis.prefix, &settings);
    let listeners = [
        Listener::start(b.ws("user_id=nk")),
        Listener::start(c.ws("user_id=nk")),
    ];
    test_redis.wait_numsub("u:nk", 2);
    let mut sent: Vec<String> = (0..10)
        .map(|i| a.send(json!({"user_id": "nk", "message": format!("live {i}")})))
        .collect();
    wait_until("the live ones", Duration::from_secs(10), || {
        listeners.iter().all(|l| l.count() == 10)
    });

    proxy.cut();
    wait_redis(&a, "down");
    sent.extend(
        (0..20).map(|i| a.send(json!({"user_id": "nk", "message": format!("cut off {i}")}))),
    );
    drop(a); // SIGKILL: the twenty are committed and were never published.

    for (node, listener) in ["B", "C"].into_iter().zip(listeners) {
        let got = listener.finish(sent.len(), Duration::from_secs(15));
        assert_exactly_once(&format!("client on node {node}"), &sent, &got, true);
    }
    assert_eq!(b.metric("notif_redis_peers_gone_total"), 1);
    assert!(c.metric("notif_redis_caught_up_total") >= 20);
}

/// Sends one notification; `None` when no answer came (the node died under it: the send may or may
/// not have been committed).
fn try_send(via: &TestServerRef, body: &serde_json::Value) -> Option<String> {
    use std::io::{Read, Write};
    let body = body.to_string();
    let req = format!(
        "POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(via.0).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let response = common::parse_responses(&raw).into_iter().next()?;
    (response.status == 201).then(|| response.json()["id"].as_str().unwrap().to_owned())
}

/// Three nodes; clients of one user on B and C; a stream of sends through A (then through B once A is
/// gone) and schedules made through all three falling due meanwhile; A killed (-9) at a varied moment
/// and started again. Every acknowledged send and every schedule reaches both clients exactly once; a
/// send that got no answer (A died under it) at most once.
fn kill_run(run: usize) {
    let Some((schema, _redis, test_redis)) = private_deployment() else {
        return;
    };
    let settings = [("REDIS_NODE_TIMEOUT_MS", "1000")];
    let start = || node(&schema, &test_redis.url, &test_redis.prefix, &settings);
    let a = start();
    let b = start();
    let c = start();
    let listeners = [
        Listener::start(b.ws("user_id=kr")),
        Listener::start(c.ws("user_id=kr")),
    ];
    test_redis.wait_numsub("u:kr", 2);

    let due = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let schedules = 60;
    for i in 0..schedules {
        let at = (due + chrono::Duration::milliseconds(i * 25)).to_rfc3339();
        let r = [&a, &b, &c][i as usize % 3].post(
            "/api/v1/notifications/schedule",
            &json!({"user_id": "kr", "message": format!("s{i}"), "scheduled_at": at}),
        );
        assert_eq!(r.status, 201);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (a_addr, b_addr, stop2) = (TestServerRef(a.addr), TestServerRef(b.addr), stop.clone());
    let sender = std::thread::spawn(move || {
        let mut acked = HashMap::new();
        let mut unanswered = Vec::new();
        let mut via = &a_addr;
        let mut i = 0;
        while !stop2.load(Ordering::Relaxed) {
            let message = format!("n{i}");
            match try_send(via, &json!({"user_id": "kr", "message": message})) {
                Some(id) => {
                    acked.insert(message, id);
                }
                None => {
                    unanswered.push(message);
                    via = &b_addr;
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(4));
        }
        (acked, unanswered)
    });
    std::thread::sleep(Duration::from_millis(400 + 97 * (run as u64 % 13)));
    drop(a);
    std::thread::sleep(Duration::from_millis(700));
    let _a_again = start();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let (acked, unanswered) = sender.join().expect("sender");
    let expected = acked.len() + schedules as usize;
    for (node, listener) in ["B", "C"].into_iter().zip(listeners) {
        let got = listener.finish_with_messages(expected, Duration::from_secs(15));
        let label = format!("run {run}, client on node {node}");
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (id, message) in &got {
            *seen.entry(message.as_str()).or_default() += 1;
            if let Some(acked_id) = acked.get(message) {
                assert_eq!(acked_id, id, "{label}: {message}");
            } else {
                assert!(
                    message.starts_with('s') || unanswered.contains(message),
                    "{label}: a stranger: {message}"
                );
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        let missing: Vec<String> = acked
            .keys()
            .cloned()
            .chain((0..schedules).map(|i| format!("s{i}")))
            .filter(|m| !seen.contains_key(m.as_str()))
            .collect();
        assert!(
            twice.is_empty() && missing.is_empty(),
            "{label}: {} acknowledged sends and {schedules} schedules; missing {missing:?}; \
             twice {twice:?}",
            acked.len()
        );
    }
}

#[test]
fn a_node_killed_under_sends_and_scheduled_fires_loses_no_live_delivery_elsewhere() {
    for run in 0..runs(3) {
        kill_run(run);
    }
}

/// A node stopped gracefully (SIGTERM) publishes everything and says so: the others do not take it
/// for gone, and read nothing from the store for it; one killed (-9) is taken for gone.
#[test]
fn a_graceful_stop_is_not_taken_for_a_death_and_a_kill_is() {
    let Some((schema, _redis, test_redis)) = private_deployment() else {
        return;
    };
    let settings = [("REDIS_NODE_TIMEOUT_MS", "600")];
    let start = || node(&schema, &test_redis.url, &test_redis.prefix, &settings);
    let (mut a, b, c) = (start(), start(), start());
    let client = Listener::start(b.ws("user_id=gs"));
    test_redis.wait_numsub("u:gs", 1);
    let sent = vec![a.send(json!({"user_id": "gs", "message": "before the stop"}))];
    wait_until("the send to arrive", Duration::from_secs(10), || {
        client.count() == 1
    });
    assert!(a.terminate().success());
    std::thread::sleep(Duration::from_secs(3)); // five times the timeout
    assert_eq!(b.metric("notif_redis_peers_gone_total"), 0);
    assert_eq!(b.metric("notif_redis_caught_up_total"), 0);

    drop(c);
    wait_until(
        "node C to be taken for gone",
        Duration::from_secs(10),
        || b.metric("notif_redis_peers_gone_total") == 1,
    );
    let got = client.finish(sent.len(), Duration::from_secs(1));
    assert_exactly_once("client on node B", &sent, &got, true);
}
