//! Publishers the parent process runs in the delivery scenarios: one WebSocket connection publishing to
//! a channel, or a few keep-alive connections sending durable notifications over REST.
//!
//! The REST publisher either keeps its connections alive or opens a fresh one per request
//! ([`RestClient::connection_per_request`]), the cost of a client that does not reuse connections.
//!
//! Both are open-loop at a set rate: message `i` is due at `start + i / rate` and carries that due time
//! as its stamp, so a publisher or server that falls behind shows up as latency instead of quietly
//! lowering the rate (no coordinated omission). A rate of 0 publishes as fast as possible, stamping the
//! time each message is written.

use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::http::ResponseReader;
use crate::pusher::{self, PusherApp};
use crate::stamp::{self, now_ns};
use crate::target::WsTarget;
use crate::worker::holder::{new_latency_histogram, MAX_LATENCY_US};
use crate::worker::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::ws::{self, KeyGen};

/// Salt of the publisher's key generator, apart from the workers'.
const PUBLISHER_KEYGEN_SALT: u64 = 0x5055_424c;

/// Longest wait for a REST answer. A durable send waits for a commit, which takes milliseconds, but
/// an overloaded server answers late rather than never, and a late answer is a latency, not a loss.
const REST_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the WebSocket publisher's reader looks at the stop flag.
const READER_POLL: Duration = Duration::from_millis(200);

/// When message `i` of a run at `rate` per second is due, as an offset from the start; `None` for a
/// run as fast as possible.
pub fn due_offset(i: u64, rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(i as f64 / rate))
}

/// Waits until message `i` is due and returns its stamp (the due time on the shared clock).
fn wait_for_turn(i: u64, rate: f64, start: Instant, start_ns: u64) -> u64 {
    match due_offset(i, rate) {
        Some(offset) => {
            if let Some(wait) = (start + offset).checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            start_ns + offset.as_nanos() as u64
        }
        None => now_ns(),
    }
}

/// What a publisher did.
#[derive(Debug)]
pub struct Published {
    /// Messages the server accepted (a WebSocket write, or a 2xx answer).
    pub ok: u64,
    /// Messages refused: error events on the WebSocket, non-2xx answers, failed writes.
    pub errors: u64,
    /// The first error, described.
    pub first_error: Option<String>,
    /// Latency of the 2xx answers (REST only), microseconds.
    pub answer_latency_us: Option<Histogram<u64>>,
}

/// Publishes `count` messages to `channel` over one WebSocket connection as user `user`, which first
/// subscribes (this server requires publishers to be subscribed); `progress` counts writes.
pub fn publish_over_websocket(
    target: &WsTarget,
    user: &str,
    channel: &str,
    count: u64,
    rate: f64,
    progress: &AtomicU64,
) -> io::Result<Published> {
    let mut keys = KeyGen::new(PUBLISHER_KEYGEN_SALT);
    let mut stream = TcpStream::connect(target.addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let path = target.path_for_user(user);
    let handshake = |stream: &mut TcpStream, keys: &mut KeyGen| {
        let mut pending =
            ws::client_handshake(stream, &target.host_header, &path, &keys.websocket_key())?;
        ws::subscribe_and_wait(stream, channel, &mut pending, keys, ws::Protocol::Native)
    };
    handshake(&mut stream, &mut keys).map_err(|e| io::Error::other(e.to_string()))?;

    // The server may answer a publish with an error event; a reader counts those (and keeps the
    // socket drained) while the writer publishes.
    stream.set_read_timeout(Some(READER_POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut stream = stream.try_clone()?;
        let stop = Arc::clone(&stop);
        thread::spawn(move || count_error_events(&mut stream, &stop))
    };

    let mut frame = Vec::with_capacity(256);
    let mut payload = Vec::with_capacity(256);
    let mut written = 0;
    let mut first_error = None;
    let start = Instant::now();
    let start_ns = now_ns();
    for i in 0..count {
        let stamp_ns = wait_for_turn(i, rate, start, start_ns);
        payload.clear();
        payload.extend_from_slice(b"{\"action\":\"publish\",\"channel\":\"");
        payload.extend_from_slice(channel.as_bytes());
        payload.extend_from_slice(b"\",\"data\":");
        stamp::write_stamp_object(&mut payload, stamp_ns);
        payload.push(b'}');
        frame.clear();
        ws::write_masked_text_frame(&mut frame, &payload, (keys.next_u64() as u32).to_ne_bytes());
        if let Err(e) = stream.write_all(&frame) {
            first_error = Some(format!("publish {i}: {e}"));
            break;
        }
        written += 1;
        progress.fetch_add(1, Ordering::Relaxed);
    }
    // Error answers to the last publishes come within a moment on loopback.
    thread::sleep(READER_POLL);
    stop.store(true, Ordering::Relaxed);
    let (refused, sample) = reader.join().unwrap_or((0, None));
    Ok(Published {
        ok: written - refused.min(written),
        errors: refused + (count - written).min(1),
        first_error: first_error.or(sample),
        answer_latency_us: None,
    })
}

/// Reads the publisher's socket until `stop`, counting `error` events; returns the count and the first.
fn count_error_events(stream: &mut TcpStream, stop: &AtomicBool) -> (u64, Option<String>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut errors = 0;
    let mut first = None;
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let mut at = 0;
        while let Ok(Some(frame)) = ws::parse_frame(&buf[at..]) {
            let payload = &buf[at + frame.payload.start..at + frame.payload.end];
            if frame.opcode == ws::opcode::TEXT
                && memchr::memmem::find(payload, b"\"event\":\"error\"").is_some()
            {
                errors += 1;
                first.get_or_insert_with(|| String::from_utf8_lossy(payload).into_owned());
            }
            at += frame.len;
        }
        buf.drain(..at);
    }
    (errors, first)
}

/// Writes the JSON body of REST send `i`, stamped `stamp_ns`, into the buffer.
pub type BodyWriter = dyn Fn(u64, u64, &mut Vec<u8>) + Send + Sync;

/// How the REST publisher talks to the server.
#[derive(Debug, Clone)]
pub struct RestClient {
    /// The server's HTTP address.
    pub addr: SocketAddrV4,
    /// Sending threads, each with its own connection (or its own series of connections).
    pub connections: u32,
    /// Sent as `Authorization: Bearer <key>` when the server wants an API key.
    pub api_key: Option<String>,
    /// Open a fresh TCP connection for every request and send it with `Connection: close`, instead
    /// of keeping one connection per thread alive: what a client without connection reuse costs.
    pub connection_per_request: bool,
    /// Post Pusher events (`POST /apps/ID/events`, signed with this app's secret) instead of sends.
    pub pusher: Option<PusherApp>,
}

impl RestClient {
    /// `connections` keep-alive connections to `addr`, without an API key.
    pub fn keep_alive(addr: SocketAddrV4, connections: u32) -> RestClient {
        RestClient {
            addr,
            connections,
            api_key: None,
            connection_per_request: false,
            pusher: None,
        }
    }

    /// The request head for `body`: a send, or a Pusher event signed now (the signature covers the
    /// body's MD5, so it is made per request).
    fn write_head(&self, request: &mut Vec<u8>, body: &[u8]) {
        let path = match &self.pusher {
            Some(app) => app.signed_events_path(body, pusher::unix_now()),
            None => "/api/v1/notifications/send".to_string(),
        };
        let _ = write!(
            request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(key) = &self.api_key {
            let _ = write!(request, "Authorization: Bearer {key}\r\n");
        }
        if self.connection_per_request {
            request.extend_from_slice(b"Connection: close\r\n");
        }
        request.extend_from_slice(b"\r\n");
    }

    /// A connection ready for requests: connected within [`CONNECT_TIMEOUT`], no Nagle delay, answers
    /// awaited at most [`REST_ANSWER_TIMEOUT`].
    fn connect(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr.into(), CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(REST_ANSWER_TIMEOUT))?;
        Ok(stream)
    }
}

/// Sends `count` durable notifications with `POST /api/v1/notifications/send` as `client` says, bodies
/// from `body`; `progress` counts answers.
pub fn publish_over_rest(
    client: &RestClient,
    count: u64,
    rate: f64,
    body: Arc<BodyWriter>,
    progress: Arc<AtomicU64>,
) -> io::Result<Published> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_ns = now_ns();
    let threads: Vec<_> = (0..client.connections.max(1))
        .map(|_| {
            let (next, body, progress) = (next.clone(), body.clone(), progress.clone());
            let client = client.clone();
            thread::spawn(move || {
                let schedule = Schedule {
                    count,
                    rate,
                    start,
                    start_ns,
                };
                rest_sender(&client, &schedule, &next, &*body, &progress)
            })
        })
        .collect();
    let mut total = Published {
        ok: 0,
        errors: 0,
        first_error: None,
        answer_latency_us: Some(new_latency_histogram()),
    };
    for thread in threads {
        let part = thread
            .join()
            .map_err(|_| io::Error::other("a REST sender panicked"))?;
        total.ok += part.ok;
        total.errors += part.errors;
        total.first_error = total.first_error.or(part.first_error);
        if let (Some(sum), Some(h)) = (total.answer_latency_us.as_mut(), &part.answer_latency_us) {
            sum.add(h).map_err(io::Error::other)?;
        }
    }
    Ok(total)
}

/// When the messages of a run are due.
struct Schedule {
    /// Messages in all.
    count: u64,
    /// Messages per second; 0 for as fast as possible.
    rate: f64,
    /// When message 0 was due.
    start: Instant,
    /// The same moment as a stamp.
    start_ns: u64,
}

/// One sending thread: claims message numbers until `count`, sends each when due, on its keep-alive
/// connection or on a fresh one per message.
fn rest_sender(
    client: &RestClient,
    schedule: &Schedule,
    next: &AtomicU64,
    body_of: &BodyWriter,
    progress: &AtomicU64,
) -> Published {
    let mut out = Published {
        ok: 0,
        errors: 0,
        first_error: None,
        answer_latency_us: Some(new_latency_histogram()),
    };
    let fail = |out: &mut Published, n: u64, what: String| {
        out.errors += n;
        out.first_error.get_or_insert(what);
    };
    let addr = client.addr;
    let mut kept = None;
    if !client.connection_per_request {
        match client.connect() {
            Ok(s) => kept = Some(s),
            Err(e) => {
                fail(&mut out, 0, format!("connect {addr}: {e}"));
                return out;
            }
        }
    }
    let mut reader = ResponseReader::default();
    let (mut body, mut request) = (Vec::with_capacity(512), Vec::with_capacity(1024));
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= schedule.count {
            return out;
        }
        let stamp_ns = wait_for_turn(i, schedule.rate, schedule.start, schedule.start_ns);
        body.clear();
        body_of(i, stamp_ns, &mut body);
        request.clear();
        client.write_head(&mut request, &body);
        request.extend_from_slice(&body);
        let answer = match kept.as_mut() {
            Some(stream) => stream
                .write_all(&request)
                .and_then(|()| reader.read_response(stream, None)),
            None => client.connect().and_then(|mut stream| {
                // Whatever a previous connection left unread belongs to nobody now.
                reader = ResponseReader::default();
                stream.write_all(&request)?;
                reader.read_response(&mut stream, None)
            }),
        };
        progress.fetch_add(1, Ordering::Relaxed);
        if answer.is_ok() && reader.server_closes() {
            // The server closes the kept connection after this answer: a new one per request.
            kept = None;
        }
        match answer {
            Ok(status) if (200..300).contains(&status) => {
                out.ok += 1;
                let us = (now_ns().saturating_sub(stamp_ns) / 1_000).clamp(1, MAX_LATENCY_US);
                if let Some(h) = out.answer_latency_us.as_mut() {
                    let _ = h.record(us);
                }
            }
            Ok(status) => fail(&mut out, 1, format!("send {i}: HTTP {status}")),
            Err(e) if kept.is_none() => fail(&mut out, 1, format!("send {i}: {e}")),
            Err(e) => {
                // The kept connection is unusable: the rest of this thread's share is lost.
                fail(&mut out, 1, format!("send {i}: {e}"));
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_carry_the_key_and_the_close_when_asked() {
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8080);
        let mut head = Vec::new();
        RestClient::keep_alive(addr, 1).write_head(&mut head, b"{\"x\":\"abcd\"}");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /api/v1/notifications/send HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
             Content-Type: application/json\r\nContent-Length: 12\r\n\r\n"
        );
        let client = RestClient {
            api_key: Some("k1".into()),
            connection_per_request: true,
            ..RestClient::keep_alive(addr, 1)
        };
        let mut head = Vec::new();
        client.write_head(&mut head, b"");
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.ends_with("Authorization: Bearer k1\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn messages_are_due_evenly_over_the_second() {
        assert_eq!(due_offset(0, 100.0), Some(Duration::ZERO));
        assert_eq!(due_offset(50, 100.0), Some(Duration::from_millis(500)));
        assert_eq!(due_offset(7, 0.0), None);
    }
}
