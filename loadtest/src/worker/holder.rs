//! Holding upgraded connections open the way a real idle client would.
//!
//! An idle client is not a silent one: the server pings every `heartbeat_s` seconds and closes a
//! connection that misses two pongs, and it may send `connected` and `unread` frames at any time. So one
//! thread per worker waits on all of the worker's sockets with epoll, reads whatever arrives, answers
//! pings, and counts connections the server closes ("dropped"), which would otherwise silently shrink
//! the denominator of bytes per connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::ws::{self, opcode, KeyGen};

/// How long one epoll wait lasts, which bounds how late new sockets are watched and how late the
/// holder sees the quit flag.
const EPOLL_WAIT_MS: i32 = 100;

/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 1024;

/// Bytes read from a socket at a time. Server frames to an idle client are small; a bigger one simply
/// takes several reads.
const READ_CHUNK: usize = 16 * 1024;

/// Seed salt for the holder's mask generator, distinct from the connector threads' salts.
const HOLDER_KEYGEN_SALT: u64 = u64::MAX;

/// A connection being held.
struct HeldConnection {
    /// The socket, non-blocking.
    stream: TcpStream,
    /// Bytes of a frame that has not fully arrived; empty (and unallocated) nearly always.
    partial: Vec<u8>,
}

/// The handle the rest of the worker uses to give connections to the holder thread.
pub struct Holder {
    /// Where connectors send upgraded sockets; they are set non-blocking first.
    incoming: Sender<TcpStream>,
    /// Held connections the server has closed so far.
    dropped: Arc<AtomicU64>,
    /// The thread, joined when the worker stops.
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    /// Starts the holder thread; it runs until `quit` is set.
    pub fn spawn(quit: Arc<AtomicBool>) -> io::Result<Holder> {
        // SAFETY: epoll_create1 has no memory preconditions; a negative result is an error.
        let epoll_fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let (incoming, receiver) = mpsc::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&dropped);
        let thread = thread::Builder::new()
            .name("holder".into())
            .spawn(move || hold_loop(epoll_fd, &receiver, &counter, &quit))?;
        Ok(Holder {
            incoming,
            dropped,
            thread: Some(thread),
        })
    }

    /// A sender connector threads use to hand over upgraded sockets.
    pub fn sender(&self) -> Sender<TcpStream> {
        self.incoming.clone()
    }

    /// Held connections the server has closed so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits for the holder thread to see the quit flag and stop.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            // A panicked holder has nothing left to report; the worker exits either way.
            let _ = thread.join();
        }
    }
}

/// The holder thread: watch sockets, answer pings, count closes, until told to quit.
fn hold_loop(
    epoll_fd: i32,
    incoming: &Receiver<TcpStream>,
    dropped: &AtomicU64,
    quit: &AtomicBool,
) {
    let mut slots: Vec<Option<HeldConnection>> = Vec::new();
    let mut free_slots: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut keys = KeyGen::new(HOLDER_KEYGEN_SALT);

    while !quit.load(Ordering::Relaxed) {
        for stream in incoming.try_iter() {
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
                    stream.as_raw_fd(),
                    &mut event,
                )
            };
            if added == 0 {
                slots[slot] = Some(HeldConnection {
                    stream,
                    partial: Vec::new(),
                });
            } else {
                // Unwatchable (out of kernel memory): we could not tell if the server closed it.
                free_slots.push(slot);
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }

        // SAFETY: `events` has room for EVENTS_PER_WAIT entries, the length passed.
        let ready = unsafe {
            libc::epoll_wait(
                epoll_fd,
                events.as_mut_ptr(),
                EVENTS_PER_WAIT as i32,
                EPOLL_WAIT_MS,
            )
        };
        // A negative count is EINTR (or worse); just wait again.
        for event in events.iter().take(ready.max(0) as usize) {
            let slot = event.u64 as usize;
            let Some(conn) = slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if !service(conn, &mut scratch, &mut keys) {
                // Dropping the stream closes the fd, which also removes it from the epoll set.
                slots[slot] = None;
                free_slots.push(slot);
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // SAFETY: epoll_fd is ours and no longer used.
    unsafe { libc::close(epoll_fd) };
}

/// Reads everything available on a ready connection and answers its pings. Returns false when the
/// connection is over (closed by the server, reset, or unreadable as WebSocket).
fn service(conn: &mut HeldConnection, scratch: &mut [u8], keys: &mut KeyGen) -> bool {
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let alive = if conn.partial.is_empty() {
            // The usual case: whole frames in one read, nothing kept.
            match answer_frames(&scratch[..n], &conn.stream, keys) {
                Some(used) => {
                    conn.partial.extend_from_slice(&scratch[used..n]);
                    true
                }
                None => false,
            }
        } else {
            conn.partial.extend_from_slice(&scratch[..n]);
            match answer_frames(&conn.partial, &conn.stream, keys) {
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
    }
}

/// Handles every complete frame at the start of `buf`: pongs for pings, the end for a close. Returns
/// how many bytes were consumed, or `None` if the connection is over.
fn answer_frames(buf: &[u8], mut stream: &TcpStream, keys: &mut KeyGen) -> Option<usize> {
    let mut at = 0;
    loop {
        let frame = match ws::parse_frame(&buf[at..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Some(at),
            Err(_) => return None,
        };
        match frame.opcode {
            opcode::CLOSE => return None,
            opcode::PING => {
                let payload = &buf[at + frame.payload.start..at + frame.payload.end];
                let mask = (keys.next_u64() as u32).to_ne_bytes();
                // A pong of a few bytes fits any socket buffer; if it does not, the server's
                // heartbeat will say so by closing, and that is counted.
                let _ = stream.write_all(&ws::pong_frame(payload, mask));
            }
            _ => {}
        }
        at += frame.len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

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
        let holder = Holder::spawn(Arc::clone(&quit)).unwrap();
        let (client, mut server) = pair();
        holder.sender().send(client).unwrap();

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
}
