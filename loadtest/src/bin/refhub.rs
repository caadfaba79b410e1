//! `refhub`: the reference hub `loadtest/compare` measures notification-service against.
//!
//! # Why it exists
//!
//! Saying "thread-per-core with hand-rolled framing costs less per connection" needs a baseline built the
//! way most Rust WebSocket hubs are built. This is that baseline, written the textbook way on purpose:
//! tokio's multi-thread work-stealing runtime, `tokio-tungstenite` with its default buffers, one task per
//! connection, one bounded mpsc queue per connection for what others send it, and the subscriptions in a
//! `HashMap<channel, HashMap<connection, Sender>>` behind one `Mutex`. It is not tuned; its defaults are
//! the point (a tuned variant would be a different baseline). It stores nothing, so it is compared only
//! on what needs no store: idle connections and client-to-client fan-out.
//!
//! # Protocol
//!
//! The subset of docs/API.md the load scenarios use, with the same frames, so the same client code runs
//! against both servers:
//! - `GET /ws?user_id=X[&channels=a,b]`; a missing `user_id` is `400`.
//! - first frame `{"event":"connected","connection_id":"0-N","user_id":X,"heartbeat_s":H}`, then
//!   `{"event":"subscribed","channels":[...]}` when `channels=` was given;
//! - `{"action":"subscribe","channels":[...]}` → `{"event":"subscribed","channels":[...]}`, and the
//!   same for `unsubscribe`;
//! - `{"action":"publish","channel":C,"data":D}` → `{"event":"message","channel":C,"from":X,"data":D}` to
//!   every other subscriber of C (the sender must be subscribed: `not_subscribed` otherwise);
//! - `{"action":"ping"}` → `{"event":"pong"}`; anything else → an `error` event;
//! - a WebSocket ping every `--heartbeat-s`, and a connection that missed two pongs is closed.
//!
//! A subscriber whose queue is full (it does not read fast enough) loses the frames that do not fit,
//! rather than the hub buffering without bound or the publisher waiting for it. (notification-service
//! closes such a connection with 1013 instead; the load scenarios read fast enough for neither to
//! happen, and count what arrives.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The reference hub: tokio + tokio-tungstenite, a task and an mpsc queue per connection.
#[derive(Debug, Parser)]
#[command(name = "refhub", version)]
struct Args {
    /// Address to listen on (loopback by default: this is a benchmark baseline, not a service).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (printed on stdout).
    #[arg(long, default_value_t = 8090)]
    port: u16,
    /// tokio worker threads; 0 means tokio's default, one per CPU.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seconds between WebSocket pings; two missed pongs close the connection.
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u64,
    /// Frames queued for one connection before it is closed as a slow consumer.
    #[arg(long, default_value_t = 1024)]
    outbox_frames: usize,
    /// tungstenite's read buffer per connection, in bytes. The default is tungstenite's own (128 KiB,
    /// reserved at the handshake), which is what a hub that does not tune it gets.
    #[arg(long, default_value_t = 128 * 1024)]
    read_buffer_bytes: usize,
}

/// Pings a connection may leave unanswered; at the next heartbeat after that it is closed.
const MAX_MISSED_PONGS: u32 = 2;

/// A frame queued for a connection: the text is encoded once per publish and shared by every queue.
type Outbound = Utf8Bytes;

/// One connection's queue, as the hub holds it.
type Outbox = mpsc::Sender<Outbound>;

/// Who is subscribed where: channel → connection id → that connection's queue.
#[derive(Default)]
struct Hub {
    channels: Mutex<HashMap<String, HashMap<u64, Outbox>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn subscribe(&self, channel: &str, conn: u64, outbox: &Outbox) {
        let mut channels = self.channels.lock().unwrap();
        channels
            .entry(channel.to_owned())
            .or_default()
            .insert(conn, outbox.clone());
    }

    fn unsubscribe(&self, channel: &str, conn: u64) {
        let mut channels = self.channels.lock().unwrap();
        if let Some(members) = channels.get_mut(channel) {
            members.remove(&conn);
            if members.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Queues `frame` for every subscriber of `channel` but the sender. The lock is held while
    /// queueing, as the textbook design does; `try_send` keeps it from waiting on a slow reader, whose
    /// frame is dropped when its queue is full. A queue whose task has ended is removed.
    fn publish(&self, channel: &str, from: u64, frame: &Outbound) {
        let mut channels = self.channels.lock().unwrap();
        if let Some(members) = channels.get_mut(channel) {
            members.retain(|&conn, outbox| {
                conn == from
                    || !matches!(
                        outbox.try_send(frame.clone()),
                        Err(mpsc::error::TrySendError::Closed(_))
                    )
            });
        }
    }
}

/// What the upgrade request asked for.
struct Hello {
    user: String,
    channels: Vec<String>,
}

/// Reads `user_id` and `channels` from `/ws?...`; `Err` holds the reason for the 400.
fn parse_hello(request: &Request) -> Result<Hello, String> {
    if request.uri().path() != "/ws" {
        return Err("not found: the WebSocket endpoint is /ws".into());
    }
    let mut user = None;
    let mut channels = Vec::new();
    for pair in request.uri().query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("user_id", v)) if !v.is_empty() => user = Some(v.to_owned()),
            Some(("channels", v)) => {
                channels.extend(v.split(',').filter(|c| !c.is_empty()).map(str::to_owned))
            }
            _ => {}
        }
    }
    let user = user.ok_or("user_id is required")?;
    Ok(Hello { user, channels })
}

fn text(value: Value) -> Message {
    Message::text(value.to_string())
}

fn error_event(code: &str, message: &str) -> Message {
    text(json!({"event": "error", "code": code, "message": message}))
}

/// The `channels` list of a subscribe or unsubscribe action, or the error event refusing it.
fn channels_of(action: &Value) -> Result<Vec<String>, Message> {
    action["channels"]
        .as_array()
        .and_then(|list| list.iter().map(|v| v.as_str().map(str::to_owned)).collect())
        .ok_or_else(|| error_event("invalid_field", "channels must be a list of names"))
}

/// One connection, from handshake to close.
async fn serve(stream: TcpStream, hub: Arc<Hub>, args: Arc<Args>) {
    let mut hello = None;
    let config = WebSocketConfig::default().read_buffer_size(args.read_buffer_bytes);
    // The signature is tungstenite's handshake callback; its large error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| match parse_hello(request) {
        Ok(h) => {
            hello = Some(h);
            Ok(response)
        }
        Err(reason) => {
            let mut refusal = ErrorResponse::new(Some(reason));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let Some(Hello { user, channels }) = hello else {
        return;
    };
    let conn = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = ws.split();
    let (outbox, mut queued) = mpsc::channel::<Outbound>(args.outbox_frames);
    let mut subscribed: Vec<String> = Vec::new();

    let connected = json!({"event": "connected", "connection_id": format!("0-{conn}"),
        "user_id": user, "heartbeat_s": args.heartbeat_s});
    if sink.send(text(connected)).await.is_err() {
        return;
    }
    if !channels.is_empty() {
        for channel in &channels {
            hub.subscribe(channel, conn, &outbox);
        }
        subscribed.extend(channels.iter().cloned());
        let frame = json!({"event": "subscribed", "channels": channels});
        if sink.send(text(frame)).await.is_err() {
            return;
        }
    }

    let period = Duration::from_secs(args.heartbeat_s.max(1));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut missed_pongs = 0u32;
    loop {
        tokio::select! {
            incoming = source.next() => {
                let reply = match incoming {
                    Some(Ok(Message::Text(body))) => {
                        handle_action(&body, &user, conn, &hub, &outbox, &mut subscribed)
                    }
                    Some(Ok(Message::Pong(_))) => {
                        missed_pongs = 0;
                        None
                    }
                    // tungstenite queues the pong for a ping itself; it goes out with the next send.
                    Some(Ok(Message::Ping(_))) => None,
                    Some(Ok(Message::Binary(_))) => Some(error_event("invalid_json", "binary frames are not accepted")),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(Message::Frame(_))) => None,
                };
                if let Some(reply) = reply {
                    if sink.send(reply).await.is_err() {
                        break;
                    }
                }
            }
            frame = queued.recv() => {
                // `None` cannot happen: this task holds a sender of its own queue.
                let Some(frame) = frame else { break };
                if sink.send(Message::Text(frame)).await.is_err() {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                if missed_pongs >= MAX_MISSED_PONGS {
                    break;
                }
                missed_pongs += 1;
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
        }
    }
    for channel in &subscribed {
        hub.unsubscribe(channel, conn);
    }
    // Sends the close frame tungstenite queued in answer to the client's (or a 1000 of our own).
    let _ = sink.close().await;
}

/// Answers one client action; `Some` is the frame to send back to this connection.
fn handle_action(
    body: &str,
    user: &str,
    conn: u64,
    hub: &Hub,
    outbox: &Outbox,
    subscribed: &mut Vec<String>,
) -> Option<Message> {
    let Ok(action) = serde_json::from_str::<Value>(body) else {
        return Some(error_event("invalid_json", "not a JSON object"));
    };
    match action["action"].as_str() {
        Some("subscribe") => {
            let channels = match channels_of(&action) {
                Ok(channels) => channels,
                Err(refusal) => return Some(refusal),
            };
            for channel in &channels {
                hub.subscribe(channel, conn, outbox);
                if !subscribed.contains(channel) {
                    subscribed.push(channel.clone());
                }
            }
            Some(text(json!({"event": "subscribed", "channels": channels})))
        }
        Some("unsubscribe") => {
            let channels = match channels_of(&action) {
                Ok(channels) => channels,
                Err(refusal) => return Some(refusal),
            };
            for channel in &channels {
                hub.unsubscribe(channel, conn);
            }
            subscribed.retain(|c| !channels.contains(c));
            Some(text(json!({"event": "unsubscribed", "channels": channels})))
        }
        Some("publish") => {
            let Some(channel) = action["channel"].as_str() else {
                return Some(error_event("invalid_field", "channel is required"));
            };
            if !subscribed.iter().any(|c| c == channel) {
                return Some(error_event(
                    "not_subscribed",
                    "publish to a channel you subscribe to",
                ));
            }
            let data = match &action["data"] {
                Value::Null => json!({}),
                other => other.clone(),
            };
            let frame = json!({"event": "message", "channel": channel, "from": user, "data": data});
            hub.publish(channel, conn, &Utf8Bytes::from(frame.to_string()));
            None
        }
        Some("ping") => Some(text(json!({"event": "pong"}))),
        _ => Some(error_event("unknown_action", "unknown action")),
    }
}

fn main() -> std::io::Result<()> {
    let args = Arc::new(Args::parse());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        runtime.worker_threads(args.threads);
    }
    runtime.enable_all().build()?.block_on(async move {
        let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
        let addr: SocketAddr = listener.local_addr()?;
        println!("refhub listening addr={addr}");
        let hub = Arc::new(Hub::default());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, hub.clone(), args.clone()));
                }
                // Out of descriptors and the like: keep serving what is open, try again shortly.
                Err(e) => {
                    eprintln!("refhub: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
