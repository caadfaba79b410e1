//! Publishers the parent process runs in the delivery scenarios: one WebSocket connection publishing to
//! a channel, or a few keep-alive connections sending durable notifications over REST.
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
use crate::stamp::{self, now_ns};
use crate::target::WsTarget;
use crate::worker::holder::{new_latency_histogram, MAX_LATENCY_US};
use crate::worker::HANDSHAKE_TIMEOUT;
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
        ws::subscribe_and_wait(stream, channel, &mut pending, keys)
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

/// Sends `count` durable notifications with `POST /api/v1/notifications/send` over `connections`
/// keep-alive connections, bodies from `body`; `progress` counts answers.
pub fn publish_over_rest(
    addr: SocketAddrV4,
    count: u64,
    rate: f64,
    connections: u32,
    body: Arc<BodyWriter>,
    progress: Arc<AtomicU64>,
) -> io::Result<Published> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let start_ns = now_ns();
    let threads: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let (next, body, progress) = (next.clone(), body.clone(), progress.clone());
            thread::spawn(move || {
                rest_sender(addr, count, rate, start, start_ns, &next, &*body, &progress)
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

/// One REST connection: claims message numbers until `count`, sends each when due.
#[allow(clippy::too_many_arguments)]
fn rest_sender(
    addr: SocketAddrV4,
    count: u64,
    rate: f64,
    start: Instant,
    start_ns: u64,
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
    let connected = TcpStream::connect(addr).and_then(|s| {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(REST_ANSWER_TIMEOUT))?;
        Ok(s)
    });
    let mut stream = match connected {
        Ok(s) => s,
        Err(e) => {
            fail(&mut out, 0, format!("connect {addr}: {e}"));
            return out;
        }
    };
    let mut reader = ResponseReader::default();
    let (mut body, mut request) = (Vec::with_capacity(512), Vec::with_capacity(1024));
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            return out;
        }
        let stamp_ns = wait_for_turn(i, rate, start, start_ns);
        body.clear();
        body_of(i, stamp_ns, &mut body);
        request.clear();
        let _ = write!(
            request,
            "POST /api/v1/notifications/send HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        request.extend_from_slice(&body);
        let answer = stream
            .write_all(&request)
            .and_then(|()| reader.read_response(&mut stream, None));
        progress.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(status) if (200..300).contains(&status) => {
                out.ok += 1;
                let us = (now_ns().saturating_sub(stamp_ns) / 1_000).clamp(1, MAX_LATENCY_US);
                if let Some(h) = out.answer_latency_us.as_mut() {
                    let _ = h.record(us);
                }
            }
            Ok(status) => fail(&mut out, 1, format!("send {i}: HTTP {status}")),
            Err(e) => {
                // The connection is unusable: the rest of this thread's share is lost.
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
    fn messages_are_due_evenly_over_the_second() {
        assert_eq!(due_offset(0, 100.0), Some(Duration::ZERO));
        assert_eq!(due_offset(50, 100.0), Some(Duration::from_millis(500)));
        assert_eq!(due_offset(7, 0.0), None);
    }
}
