//! Holding upgraded connections open the way a real client would, and receiving what they are sent.
//!
//! An idle client is not a silent one: the server pings every `heartbeat_s` seconds and closes a
//! connection that misses two pongs, and it may send `connected` and `unread` frames at any time. So one
//! thread per worker waits on all of the worker's sockets with epoll, reads whatever arrives, answers
//! pings, and counts connections the server closes ("dropped"), which would otherwise silently shrink
//! the denominator of bytes per connection.
//!
//! In the delivery scenarios the same thread is the receiver: every text frame that carries a send-time
//! stamp (see [`crate::stamp`]) counts as one delivery, and its publish-to-receive latency goes into the
//! thread's histogram. Reads are batched (16 KiB at a time, one clock reading per read) and nothing is
//! allocated per frame, so the client stays cheap next to the server it measures. In the chat scenario
//! the thread also publishes, from its own connections to their rooms, at a set rate once told to start.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::pusher;
use crate::stamp::{self, now_ns};
use crate::ws::{self, opcode, KeyGen};

/// Highest latency the histograms record, in microseconds (a minute); slower deliveries are clamped.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// How long one epoll wait lasts, which bounds how late new sockets are watched and how late the
/// holder sees the quit flag.
const EPOLL_WAIT: Duration = Duration::from_millis(100);

/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// Bytes read from a socket at a time. Server frames to an idle client are small; a bigger one simply
/// takes several reads.
const READ_CHUNK: usize = 16 * 1024;

/// Seed salt for the holder's mask generator, distinct from the connector threads' salts.
const HOLDER_KEYGEN_SALT: u64 = u64::MAX;

/// An upgraded connection handed to the holder.
pub struct Upgraded {
    /// The socket, already non-blocking.
    pub stream: TcpStream,
    /// Bytes read past the handshake (and the subscribe answer) that belong to the next frames.
    pub pending: Vec<u8>,
    /// The channel this connection publishes to in the chat scenario, and how many other connections
    /// share it (the deliveries one publish should make).
    pub room: Option<(String, u64)>,
    /// A Server-Sent Events stream rather than a WebSocket: its bytes are events, not frames.
    pub sse: bool,
}

/// A connection being held.
struct HeldConnection {
    /// The socket, non-blocking.
    stream: TcpStream,
    /// Bytes of a frame that has not fully arrived; empty (and unallocated) nearly always.
    partial: Vec<u8>,
    /// See [`Upgraded::room`].
    room: Option<(String, u64)>,
    /// See [`Upgraded::sse`].
    sse: bool,
}

/// Publishing from the held connections (chat): `count` messages at `rate` per second in total,
/// round-robin over the connections that have a room, from the moment `start` is set.
#[derive(Clone)]
pub struct PublishPlan {
    /// Messages per second over all of this worker's connections.
    pub rate: f64,
    /// Messages to publish in all.
    pub count: u64,
    /// Set by the worker when the parent says `start`.
    pub start: Arc<AtomicBool>,
}

/// Counters the holder thread keeps and the worker reports.
#[derive(Default)]
pub struct HolderCounters {
    /// Held connections the server has closed so far.
    pub dropped: AtomicU64,
    /// Stamped messages received.
    pub delivered: AtomicU64,
    /// Messages published (chat).
    pub published: AtomicU64,
    /// Deliveries the published messages should make.
    pub expected: AtomicU64,
}

/// The handle the rest of the worker uses to give connections to the holder thread.
pub struct Holder {
    /// Where connectors send upgraded sockets; they are set non-blocking first.
    incoming: Sender<Upgraded>,
    /// What the thread counted so far.
    counters: Arc<HolderCounters>,
    /// The thread, joined when the worker stops; it returns its latency histogram.
    thread: Option<JoinHandle<Histogram<u64>>>,
}

impl Holder {
    /// Starts the holder thread; it runs until `quit` is set, publishing per `publish` if given.
    pub fn spawn(quit: Arc<AtomicBool>, publish: Option<PublishPlan>) -> io::Result<Holder> {
        // SAFETY: epoll_create1 has no memory preconditions; a negative result is an error.
        let epoll_fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let (incoming, receiver) = mpsc::channel();
        let counters = Arc::new(HolderCounters::default());
        let shared = Arc::clone(&counters);
        let thread = thread::Builder::new()
            .name("holder".into())
            .spawn(move || {
                let mut state = HoldState::new(&shared);
                hold_loop(epoll_fd, &receiver, &mut state, &quit, publish.as_ref());
                state.latency_us
            })?;
        Ok(Holder {
            incoming,
            counters,
            thread: Some(thread),
        })
    }

    /// A sender connector threads use to hand over upgraded sockets.
    pub fn sender(&self) -> Sender<Upgraded> {
        self.incoming.clone()
    }

    /// What the holder thread counted so far.
    pub fn counters(&self) -> &HolderCounters {
        &self.counters
    }

    /// Held connections the server has closed so far.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Waits for the holder thread to see the quit flag and stop; returns its latency histogram
    /// (empty if the thread panicked).
    pub fn join(mut self) -> Histogram<u64> {
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_else(new_latency_histogram)
    }
}

/// An empty latency histogram in microseconds, three significant digits.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_max(MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// What the holder thread works with besides its sockets.
struct HoldState<'a> {
    counters: &'a HolderCounters,
    latency_us: Histogram<u64>,
    keys: KeyGen,
    /// Reused for every read.
    scratch: Vec<u8>,
    /// Reused for every publish.
    publish_buf: Vec<u8>,
    payload_buf: Vec<u8>,
}

impl HoldState<'_> {
    fn new(counters: &HolderCounters) -> HoldState<'_> {
        HoldState {
            counters,
            latency_us: new_latency_histogram(),
            keys: KeyGen::new(HOLDER_KEYGEN_SALT),
            scratch: vec![0u8; READ_CHUNK],
            publish_buf: Vec::with_capacity(256),
            payload_buf: Vec::with_capacity(256),
        }
    }
}

/// The holder thread: watch sockets, answer pings, count closes and deliveries, publish when due,
/// until told to quit.
fn hold_loop(
    epoll_fd: i32,
    incoming: &Receiver<Upgraded>,
    state: &mut HoldState,
    quit: &AtomicBool,
    publish: Option<&PublishPlan>,
) {
    let mut slots: Vec<Option<HeldConnection>> = Vec::new();
    let mut free_slots: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    // Publishing (chat): when it started, how many were sent, and whose turn it is.
    let mut publish_started: Option<Instant> = None;
    let mut published = 0u64;
    let mut turn = 0usize;

    while !quit.load(Ordering::Relaxed) {
        for upgraded in incoming.try_iter() {
            let slot = free_slots.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                u64: slot as u64,
            };
            // SAFETY: epoll_fd is our epoll instance, the socket fd is open (owned by `stream`), and
            // `event` is a valid epoll_event.
            let added = unsafe {
                libc::epoll_ctl(
                    epoll_fd,
                    libc::EPOLL_CTL_ADD,
                    upgraded.stream.as_raw_fd(),
                    &mut event,
                )
            };
            if added == 0 {
                let mut conn = HeldConnection {
                    stream: upgraded.stream,
                    partial: Vec::new(),
                    room: upgraded.room,
                    sse: upgraded.sse,
                };
                // Frames that came with the handshake are handled before anything read later.
                if upgraded.pending.is_empty() || absorb(&mut conn, &upgraded.pending, state) {
                    slots[slot] = Some(conn);
                    continue;
                }
            }
            // Unwatchable (out of kernel memory) or already broken: count it as dropped.
            free_slots.push(slot);
            state.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }

        let mut wait = EPOLL_WAIT;
        if let Some(plan) = publish {
            if publish_started.is_none() && plan.start.load(Ordering::Relaxed) {
                publish_started = Some(Instant::now());
            }
            if let Some(started) = publish_started {
                let next_due =
                    publish_due(plan, started, &mut published, &mut turn, &mut slots, state);
                if let Some(due) = next_due {
                    wait = wait.min(due.saturating_duration_since(Instant::now()));
                }
            }
        }

        // epoll_pwait2 takes a timespec: publishes due in less than a millisecond are waited for
        // exactly, neither late (epoll_wait's milliseconds) nor by spinning on a zero timeout.
        let timeout = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` has room for EVENTS_PER_WAIT entries, the length passed; `timeout` is a
        // valid timespec and a null sigmask leaves the mask alone.
        let ready = unsafe {
            libc::epoll_pwait2(
                epoll_fd,
                events.as_mut_ptr(),
                EVENTS_PER_WAIT as i32,
                &timeout,
                std::ptr::null(),
            )
        };
        // A negative count is EINTR (or worse); just wait again.
        for event in events.iter().take(ready.max(0) as usize) {
            let slot = event.u64 as usize;
            let Some(conn) = slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if !service(conn, state) {
                // Dropping the stream closes the fd, which also removes it from the epoll set.
                slots[slot] = None;
                free_slots.push(slot);
                state.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // SAFETY: epoll_fd is ours and no longer used.
    unsafe { libc::close(epoll_fd) };
}

/// Publishes every message whose time has come, each stamped with the time it was due, from the next
/// connection with a room. Returns when the next one is due, or `None` when all are sent.
fn publish_due(
    plan: &PublishPlan,
    started: Instant,
    published: &mut u64,
    turn: &mut usize,
    slots: &mut [Option<HeldConnection>],
    state: &mut HoldState,
) -> Option<Instant> {
    let started_ns = now_ns().saturating_sub(started.elapsed().as_nanos() as u64);
    while *published < plan.count {
        let offset = Duration::from_secs_f64(*published as f64 / plan.rate);
        let due = started + offset;
        if due > Instant::now() {
            return Some(due);
        }
        // The next connection that has a room; none left means nothing can be published.
        let index = (0..slots.len())
            .map(|k| (*turn + k) % slots.len().max(1))
            .find(|&i| slots[i].as_ref().is_some_and(|c| c.room.is_some()))?;
        *turn = index + 1;
        let conn = slots[index].as_mut().expect("found above");
        let (room, peers) = conn.room.as_ref().expect("found above");
        state.payload_buf.clear();
        state
            .payload_buf
            .extend_from_slice(b"{\"action\":\"publish\",\"channel\":\"");
        state.payload_buf.extend_from_slice(room.as_bytes());
        state.payload_buf.extend_from_slice(b"\",\"data\":");
        stamp::write_stamp_object(
            &mut state.payload_buf,
            started_ns + offset.as_nanos() as u64,
        );
        state.payload_buf.push(b'}');
        state.publish_buf.clear();
        let mask = (state.keys.next_u64() as u32).to_ne_bytes();
        ws::write_masked_text_frame(&mut state.publish_buf, &state.payload_buf, mask);
        // A publish is a few dozen bytes; a socket buffer too full for it means the server stopped
        // reading, which the latency figures will show. Counted as published either way.
        let _ = (&conn.stream).write_all(&state.publish_buf);
        *published += 1;
        state.counters.published.fetch_add(1, Ordering::Relaxed);
        state.counters.expected.fetch_add(*peers, Ordering::Relaxed);
    }
    None
}

/// Handles bytes already read for a connection (those that came with its handshake). Returns false
/// when the connection is over.
fn absorb(conn: &mut HeldConnection, bytes: &[u8], state: &mut HoldState) -> bool {
    conn.partial.extend_from_slice(bytes);
    let now = now_ns();
    match answer(conn.sse, &conn.partial, &conn.stream, state, now) {
        Some(used) => {
            conn.partial.drain(..used);
            true
        }
        None => false,
    }
}

/// Reads everything available on a ready connection, answers its pings and records its deliveries.
/// Returns false when the connection is over (closed by the server, reset, or unreadable as WebSocket).
fn service(conn: &mut HeldConnection, state: &mut HoldState) -> bool {
    let mut scratch = std::mem::take(&mut state.scratch);
    let alive = service_with(conn, state, &mut scratch);
    state.scratch = scratch;
    alive
}

fn service_with(conn: &mut HeldConnection, state: &mut HoldState, scratch: &mut [u8]) -> bool {
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        // One clock reading per read: frames that arrived together arrived at the same time.
        let now = now_ns();
        let alive = if conn.partial.is_empty() {
            // The usual case: whole frames in one read, nothing kept.
            match answer(conn.sse, &scratch[..n], &conn.stream, state, now) {
                Some(used) => {
                    conn.partial.extend_from_slice(&scratch[used..n]);
                    true
                }
                None => false,
            }
        } else {
            conn.partial.extend_from_slice(&scratch[..n]);
            match answer(conn.sse, &conn.partial, &conn.stream, state, now) {
                Some(used) => {
                    conn.partial.drain(..used);
                    if conn.partial.is_empty() {
                        // Give the memory back: an idle client should hold nothing between frames.
                        conn.partial = Vec::new();
                    }
                    true
                }
                None => false,
            }
        };
        if !alive {
            return false;
        }
        if n < scratch.len() {
            // A short read emptied the socket; skip the read that would only say WouldBlock.
            return true;
        }
    }
}

/// Handles what a connection received: WebSocket frames, or Server-Sent Events when `sse`.
fn answer(
    sse: bool,
    buf: &[u8],
    stream: &TcpStream,
    state: &mut HoldState,
    now: u64,
) -> Option<usize> {
    if sse {
        Some(answer_events(buf, state, now))
    } else {
        answer_frames(buf, stream, state, now)
    }
}

/// Handles every complete Server-Sent Event (up to its blank line) at the start of `buf`: a delivery
/// for each stamped one; heartbeat comments and control events only need reading. Returns how many
/// bytes were consumed. An SSE stream ends only by its connection closing.
fn answer_events(buf: &[u8], state: &mut HoldState, now: u64) -> usize {
    let mut at = 0;
    let mut delivered = 0;
    while let Some(end) = memchr::memmem::find(&buf[at..], b"\n\n") {
        if let Some(sent) = stamp::find_stamp(&buf[at..at + end]) {
            let us = (now.saturating_sub(sent) / 1_000).clamp(1, MAX_LATENCY_US);
            let _ = state.latency_us.record(us);
            delivered += 1;
        }
        at += end + 2;
    }
    if delivered > 0 {
        state
            .counters
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }
    at
}

/// Handles every complete frame at the start of `buf`: pongs for pings, a delivery for a stamped text
/// frame, the end for a close. Returns how many bytes were consumed, or `None` if the connection is over.
fn answer_frames(
    buf: &[u8],
    mut stream: &TcpStream,
    state: &mut HoldState,
    now: u64,
) -> Option<usize> {
    let mut at = 0;
    let mut delivered = 0;
    let result = loop {
        let frame = match ws::parse_frame(&buf[at..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => break Some(at),
            Err(_) => break None,
        };
        let payload = &buf[at + frame.payload.start..at + frame.payload.end];
        match frame.opcode {
            opcode::CLOSE => break None,
            opcode::PING => {
                let mask = (state.keys.next_u64() as u32).to_ne_bytes();
                // A pong of a few bytes fits any socket buffer; if it does not, the server's
                // heartbeat will say so by closing, and that is counted.
                let _ = stream.write_all(&ws::pong_frame(payload, mask));
            }
            opcode::TEXT if memchr::memmem::find(payload, pusher::PING_EVENT).is_some() => {
                let mask = (state.keys.next_u64() as u32).to_ne_bytes();
                let mut pong = Vec::with_capacity(pusher::PONG_MESSAGE.len() + 8);
                ws::write_masked_text_frame(&mut pong, pusher::PONG_MESSAGE, mask);
                // As for a pong frame: tiny, and a server that misses it closes, which is counted.
                let _ = stream.write_all(&pong);
            }
            opcode::TEXT => {
                if let Some(sent) = stamp::find_stamp(payload) {
                    let us = (now.saturating_sub(sent) / 1_000).clamp(1, MAX_LATENCY_US);
                    // In range by the clamp, so recording cannot fail.
                    let _ = state.latency_us.record(us);
                    delivered += 1;
                }
            }
            _ => {}
        }
        at += frame.len;
    };
    if delivered > 0 {
        state
            .counters
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// How long the tests wait for the holder to react.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        (client, server)
    }

    #[test]
    fn a_held_connection_answers_pings_and_counts_a_server_close() {
        let quit = Arc::new(AtomicBool::new(false));
        let holder = Holder::spawn(Arc::clone(&quit), None).unwrap();
        let (client, mut server) = pair();
        holder
            .sender()
            .send(Upgraded {
                stream: client,
                pending: Vec::new(),
                room: None,
                sse: false,
            })
            .unwrap();

        // A text frame, then a ping split over two writes.
        server
            .write_all(&[0x81, 0x02, b'h', b'i', 0x89, 0x02, b'x'])
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.write_all(b"y").unwrap();

        server.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut pong = [0u8; 8];
        server.read_exact(&mut pong).unwrap();
        assert_eq!(pong[0], 0x8A);
        assert_eq!(pong[1], 0x80 | 2);
        let payload = [pong[6] ^ pong[2], pong[7] ^ pong[3]];
        assert_eq!(&payload, b"xy");
        assert_eq!(holder.dropped(), 0);

        drop(server);
        let start = Instant::now();
        while holder.dropped() == 0 && start.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(holder.dropped(), 1);
        quit.store(true, Ordering::Relaxed);
        holder.join();
    }

    #[test]
    fn stamped_text_frames_count_as_deliveries_with_their_latency() {
        let quit = Arc::new(AtomicBool::new(false));
        let holder = Holder::spawn(Arc::clone(&quit), None).unwrap();
        let (client, mut server) = pair();
        // The first frame came with the handshake; the second arrives on the socket.
        let mut payload = b"{\"event\":\"message\",\"data\":".to_vec();
        stamp::write_stamp_object(&mut payload, now_ns().saturating_sub(2_000_000));
        payload.push(b'}');
        let mut frame = vec![0x81, payload.len() as u8];
        frame.extend_from_slice(&payload);
        holder
            .sender()
            .send(Upgraded {
                stream: client,
                pending: frame.clone(),
                room: None,
                sse: false,
            })
            .unwrap();
        server.write_all(&frame).unwrap();
        // A control event without a stamp is not a delivery.
        server
            .write_all(&[0x81, 0x10])
            .and_then(|()| server.write_all(br#"{"event":"pong"}"#))
            .unwrap();
        let start = Instant::now();
        while holder.counters().delivered.load(Ordering::Relaxed) < 2 && start.elapsed() < PATIENCE
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        quit.store(true, Ordering::Relaxed);
        let latency = holder.join();
        assert_eq!(latency.len(), 2);
        assert!(latency.min() >= 2_000, "latency {} us", latency.min());
    }

    #[test]
    fn stamped_server_sent_events_count_as_deliveries_and_comments_do_not() {
        let quit = Arc::new(AtomicBool::new(false));
        let holder = Holder::spawn(Arc::clone(&quit), None).unwrap();
        let (client, mut server) = pair();
        let mut event = b"event: notification\nid: 1\ndata: {\"data\":".to_vec();
        stamp::write_stamp_object(&mut event, now_ns().saturating_sub(2_000_000));
        event.extend_from_slice(b"}\n\n");
        holder
            .sender()
            .send(Upgraded {
                stream: client,
                pending: b"retry: 1000\n\n: ping\n\n".to_vec(),
                room: None,
                sse: true,
            })
            .unwrap();
        // One event split over two writes, then a heartbeat comment.
        let (first, second) = event.split_at(10);
        server.write_all(first).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.write_all(second).unwrap();
        server.write_all(b": ping\n\n").unwrap();
        let start = Instant::now();
        while holder.counters().delivered.load(Ordering::Relaxed) < 1 && start.elapsed() < PATIENCE
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        quit.store(true, Ordering::Relaxed);
        assert_eq!(holder.counters().delivered.load(Ordering::Relaxed), 1);
        assert_eq!(holder.dropped(), 0);
        let latency = holder.join();
        assert!(latency.min() >= 2_000, "latency {} us", latency.min());
    }
}
