//! Resume is exact across nodes (API.md, "Several nodes"): two nodes on one PostgreSQL and one Redis
//! commit interleaved sends to the same user and the same channel while a client keeps disconnecting
//! from one node and resuming with the last id it saw on the other. Every notification must arrive
//! exactly once. With each node numbering on its own (before the id clock of migration 7), a
//! notification committed on one node just after the client's `since` could sort below it and was
//! never replayed; this test then misses some.
//!
//! The client leaves at a notification relayed from the other node, with `since` = the greatest id it
//! has seen, and only once every acknowledged notification below it has arrived: what remains inexact
//! is on the live side (API.md, "Several nodes": a node's own notification can reach a connection
//! after another node's later one), a client cannot see it, and this test does not leave then. The
//! WebSocket client hops once with both nodes keeping another connection of the user open (each node
//! stays subscribed on Redis), and once alone, so that every hop lands on a node that must subscribe
//! afresh: its resume reads the store only once Redis confirmed the subscription; the event stream
//! hops with `Last-Event-ID`. The producers keep sending until the client has changed nodes
//! [`HOPS`] times, so that a slow machine, where a moment with nothing in flight comes seldom, still
//! sees every hop.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::sse;
use common::{TestServer, TestServerRef};
use serde_json::{json, Value};

/// Sends a producer makes at least, and at most (it stops in between once the client hopped
/// [`HOPS`] times).
const SENDS_PER_NODE: (usize, usize) = (120, 4000);
/// Times the client changes nodes in every test. Producers keep sending until it has, however slow
/// the machine: how often a moment with nothing in flight comes depends on it.
const HOPS: usize = 6;
/// A client stays connected for at least this many notifications before it leaves.
const STAY_FOR: usize = 6;

/// Keeps a WebSocket of `user` on `channel` open on `server` for the test's length, read and
/// discarded on a thread of its own. It keeps the node subscribed on Redis to the user and the
/// channel while the client under test is away.
fn anchor(server: &TestServer, user: &str, channel: &str) {
    let mut ws = server.ws(&format!("user_id={user}&channels={channel}"));
    ws.expect_event("subscribed");
    // Until the node goes at the end of the test.
    ws.ws.get_mut().set_read_timeout(None).unwrap();
    std::thread::spawn(move || while ws.ws.read().is_ok() {});
}

/// Two nodes, or `None` (skip, outside CI) without PostgreSQL or Redis.
fn two_nodes() -> Option<(PgSchema, TestRedis, [TestServer; 2])> {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return None;
    };
    let nodes = [cluster_node(&schema, &redis), cluster_node(&schema, &redis)];
    Some((schema, redis, nodes))
}

/// The ids the producers were answered so far (a 201: committed, and handed to live delivery).
type Acknowledged = Arc<Sends>;

/// What the producers have sent: the ids they were answered, and how many sends await their answer.
#[derive(Default)]
struct Sends {
    /// The ids answered 201.
    acked: Mutex<HashSet<String>>,
    /// Sends made and not yet answered: one of them may be committed already.
    in_flight: AtomicUsize,
    /// Set by the client once it hopped enough: the producers stop.
    enough: AtomicBool,
}

/// Starts a producer on node `index` (named by its letter in every message): interleaved sends to
/// `user` and to `channel`, each waiting for its 201, noted in `acked`, until `acked.enough` (within
/// [`SENDS_PER_NODE`]). Returns the ids it was answered.
fn producer(
    addr: SocketAddr,
    index: usize,
    user: &'static str,
    channel: &'static str,
    acked: &Acknowledged,
) -> std::thread::JoinHandle<Vec<String>> {
    let acked = acked.clone();
    std::thread::spawn(move || {
        let server = TestServerRef(addr);
        let letter = ["A", "B"][index];
        let (least, most) = SENDS_PER_NODE;
        (0..most)
            .take_while(|i| *i < least || !acked.enough.load(Ordering::SeqCst))
            .map(|i| {
                let body = if i % 2 == 0 {
                    json!({"user_id": user, "message": format!("{letter}{i}")})
                } else {
                    json!({"channels": [channel], "message": format!("{letter}{i}")})
                };
                acked.in_flight.fetch_add(1, Ordering::SeqCst);
                let id = server.send(body);
                // Both under the lock, so that `caught_up` sees them agree.
                let mut answered = acked.acked.lock().unwrap();
                answered.insert(id.clone());
                acked.in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(answered);
                // A moment with nothing in flight, for the client to leave in (see `may_leave`).
                std::thread::sleep(Duration::from_millis(2));
                id
            })
            .collect()
    })
}

/// Whether a client that saw `received` may leave now and resume from `since` with nothing in
/// flight toward it: `since` is the greatest id it saw, and every acknowledged id below it arrived.
/// (An id below `since` that is committed but not yet handed to live delivery is the window
/// API.md names; a client cannot see it, and this test does not leave then.)
fn may_leave(received: &Received, since: &str, acked: &Acknowledged) -> bool {
    // Nothing in flight first: then every committed notification is acknowledged, and whatever is
    // sent from now on commits after `since`.
    acked.in_flight.load(Ordering::SeqCst) == 0
        && received.greatest.as_deref() == Some(since)
        && acked
            .acked
            .lock()
            .unwrap()
            .iter()
            .all(|id| id.as_str() >= since || received.count.contains_key(id))
}

/// The next text frame of `client` as JSON (`unread` events skipped), or `None` when nothing came
/// for a few seconds: the caller then reports what is missing.
fn next_frame(client: &mut common::WsClient) -> Option<Value> {
    client
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    loop {
        match client.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).expect("frame is JSON");
                if v["event"] != "unread" {
                    return Some(v);
                }
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// What a client received, across all its connections.
#[derive(Default)]
struct Received {
    /// Notification id → how many times it arrived.
    count: HashMap<String, usize>,
    /// The greatest id seen (UUIDv7 strings sort as the ids do).
    greatest: Option<String>,
}

impl Received {
    /// Notes a notification frame.
    fn note(&mut self, n: &Value) -> String {
        let id = n["id"].as_str().expect("notification id").to_owned();
        *self.count.entry(id.clone()).or_default() += 1;
        if self.greatest.as_ref().is_none_or(|g| *g < id) {
            self.greatest = Some(id.clone());
        }
        id
    }

    /// Asserts every id of `sent` arrived exactly once and nothing else did.
    fn assert_exactly(&self, sent: &[String], how: &str) {
        let missing: Vec<&String> = sent
            .iter()
            .filter(|id| !self.count.contains_key(*id))
            .collect();
        let twice: Vec<(&String, &usize)> = self.count.iter().filter(|(_, n)| **n > 1).collect();
        let expected: HashSet<&String> = sent.iter().collect();
        let unexpected: Vec<&String> = self
            .count
            .keys()
            .filter(|id| !expected.contains(id))
            .collect();
        assert!(
            missing.is_empty() && twice.is_empty() && unexpected.is_empty(),
            "{how}: {} of {} missing {missing:?}, duplicated {twice:?}, unexpected {unexpected:?}",
            missing.len(),
            sent.len()
        );
    }
}

#[test]
fn a_websocket_client_hopping_between_nodes_gets_every_notification_once() {
    hop_between_nodes::<WsHopper>(true);
}

#[test]
fn a_websocket_client_alone_on_each_node_it_hops_to_gets_every_notification_once() {
    hop_between_nodes::<WsHopper>(false);
}

#[test]
fn an_event_stream_resuming_with_last_event_id_on_the_other_node_gets_every_notification_once() {
    hop_between_nodes::<SseHopper>(true);
}

/// What a hopping client reads next.
enum Next {
    /// A notification: its JSON.
    Notification(Value),
    /// `resumed`: the replay of a resume is over.
    Resumed,
    /// Any other protocol event, or an SSE comment.
    Other,
}

/// A connection kind the client hops with.
trait Hopper: Sized {
    /// What the test calls it in its messages.
    const KIND: &'static str;
    /// Connects to `node` with `query`, resuming after `since` when given.
    fn open(node: &TestServer, query: &str, since: Option<&str>) -> Self;
    /// The next frame or event; `None` when nothing came for a few seconds.
    fn next(&mut self) -> Option<Next>;
    /// Asserts that nothing arrives for `dur`.
    fn expect_silence(&mut self, dur: Duration);
}

/// A WebSocket resuming with `since` in its query.
struct WsHopper(common::WsClient);

impl Hopper for WsHopper {
    const KIND: &'static str = "websocket";

    fn open(node: &TestServer, query: &str, since: Option<&str>) -> Self {
        match since {
            Some(id) => WsHopper(node.ws(&format!("{query}&since={id}"))),
            None => {
                let mut ws = node.ws(query);
                ws.expect_event("subscribed");
                WsHopper(ws)
            }
        }
    }

    fn next(&mut self) -> Option<Next> {
        let frame = next_frame(&mut self.0)?;
        Some(match frame.get("event") {
            None => Next::Notification(frame),
            Some(e) if e == "resumed" => Next::Resumed,
            Some(_) => Next::Other,
        })
    }

    fn expect_silence(&mut self, dur: Duration) {
        self.0.expect_silence(dur);
    }
}

/// An event stream reconnecting with `Last-Event-ID`, as an `EventSource` does.
struct SseHopper(sse::SseClient);

impl Hopper for SseHopper {
    const KIND: &'static str = "event stream";

    fn open(node: &TestServer, query: &str, since: Option<&str>) -> Self {
        let headers: Vec<(&str, &str)> =
            since.map(|id| ("Last-Event-ID", id)).into_iter().collect();
        let mut stream = sse::open(node.addr, query, &headers).expect("the stream opens");
        if since.is_none() {
            // The `retry:` block, then `connected`.
            while stream.next_event().name != "connected" {}
        }
        SseHopper(stream)
    }

    fn next(&mut self) -> Option<Next> {
        let event = self.0.next().expect("the stream stays open");
        Some(match event.name.as_str() {
            "notification" => {
                let frame = event.json();
                assert_eq!(
                    event.id.as_deref(),
                    frame["id"].as_str(),
                    "id: is the notification's"
                );
                Next::Notification(frame)
            }
            "resumed" => Next::Resumed,
            _ => Next::Other,
        })
    }

    fn expect_silence(&mut self, dur: Duration) {
        self.0.expect_silence(dur);
    }
}

/// Whether everything the producers sent so far has arrived (in flight too): nothing to read until
/// they send again.
fn caught_up(received: &Received, acked: &Acknowledged) -> bool {
    // Under the lock the producers note an answer under, so the two figures agree.
    let answered = acked.acked.lock().unwrap();
    let in_flight = acked.in_flight.load(Ordering::SeqCst);
    answered.iter().all(|id| received.count.contains_key(id))
        && received.count.len() >= answered.len() + in_flight
}

/// A client of kind `C` hops between the two nodes while both commit to its user and channel, until
/// it changed nodes [`HOPS`] times; with `anchored`, each node also holds another connection of the
/// user all along.
fn hop_between_nodes<C: Hopper>(anchored: bool) {
    let Some((_schema, _redis, nodes)) = two_nodes() else {
        return;
    };
    let (user, channel) = ("hopper", "relay");
    let query = format!("user_id={user}&channels={channel}");
    if anchored {
        nodes.iter().for_each(|n| anchor(n, user, channel));
    }
    // Connected before the sends start, so the first connection needs no `since`.
    let mut client = C::open(&nodes[0], &query, None);
    let acked = Acknowledged::default();
    let producers = [
        producer(nodes[0].addr, 0, user, channel, &acked),
        producer(nodes[1].addr, 1, user, channel, &acked),
    ];

    let mut received = Received::default();
    let mut on = 0usize;
    let mut hops = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut here = 0usize;
    let mut awaiting_resumed = false;
    while Instant::now() < deadline {
        if caught_up(&received, &acked) {
            if producers.iter().all(|p| p.is_finished()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let frame = match client.next() {
            Some(Next::Notification(frame)) => frame,
            Some(Next::Resumed) => {
                awaiting_resumed = false;
                continue;
            }
            Some(Next::Other) => continue,
            None => break,
        };
        let id = received.note(&frame);
        here += 1;
        let other = ["B", "A"][on];
        let relayed = frame["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(other));
        let producing =
            !acked.enough.load(Ordering::SeqCst) && producers.iter().any(|p| !p.is_finished());
        if producing && here >= STAY_FOR && relayed && may_leave(&received, &id, &acked) {
            // Leave, and resume on the other node from the greatest id seen.
            drop(client);
            on = 1 - on;
            hops += 1;
            here = 0;
            client = C::open(&nodes[on], &query, Some(&id));
            awaiting_resumed = true;
            if hops >= HOPS {
                acked.enough.store(true, Ordering::SeqCst);
            }
        }
    }
    // The last hop's replay may have brought the last notifications, its `resumed` still to come.
    while awaiting_resumed {
        match client.next().expect("the last hop's resumed event") {
            Next::Resumed => awaiting_resumed = false,
            Next::Notification(frame) => {
                received.note(&frame);
            }
            Next::Other => {}
        }
    }
    // Stops the producers if the deadline passed first.
    acked.enough.store(true, Ordering::SeqCst);
    let sent: Vec<String> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    received.assert_exactly(
        &sent,
        &format!("{} (anchored: {anchored}), {hops} hops", C::KIND),
    );
    // Anything duplicated would come now.
    client.expect_silence(Duration::from_millis(300));
    assert!(
        hops >= HOPS,
        "the {} changed nodes only {hops} times",
        C::KIND
    );
}
