//! One WebSocket connection held by the parent process for a single user, timing every stamped frame
//! it receives: the receiver of `loadtest flat`, which sends to one user and takes the deliveries phase
//! by phase.
//!
//! A reader thread owns the socket: it answers the server's pings (an unanswered heartbeat would get
//! the connection closed in a long run), and for every text frame carrying a send-time stamp (see
//! [`crate::stamp`]) it records the stamp and the arrival time, read once per socket read as the
//! worker holders do. The scenario takes what arrived with [`Subscriber::take`] and keeps only the
//! stamps of its own phase, so a straggler from an earlier phase is never counted twice.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::stamp::{self, now_ns};
use crate::target::WsTarget;
use crate::worker::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::ws::{self, opcode, KeyGen};

/// How often the reader looks at the stop flag while nothing arrives.
const READ_POLL: Duration = Duration::from_millis(100);

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Salt of the subscriber's key generator, apart from the workers' and the publisher's.
const SUBSCRIBER_KEYGEN_SALT: u64 = 0x5355_4253;

/// One stamped frame as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The send-time stamp the frame carried (nanoseconds on the shared monotonic clock).
    pub stamp_ns: u64,
    /// When the read that brought it returned, on the same clock.
    pub arrived_ns: u64,
}

impl Delivery {
    /// Send-to-arrival latency in microseconds, at least 1 (the histograms' lowest value).
    pub fn latency_us(&self) -> u64 {
        (self.arrived_ns.saturating_sub(self.stamp_ns) / 1_000).max(1)
    }
}

/// What the reader thread shares with the scenario.
#[derive(Debug, Default)]
struct Inbox {
    /// Deliveries not yet taken.
    deliveries: Vec<Delivery>,
    /// Stamped frames received in all.
    received: u64,
    /// Why the reader stopped early (the server closed, a read failed), if it did.
    failure: Option<String>,
}

/// A connected subscriber; its reader thread stops when it is dropped.
pub struct Subscriber {
    inbox: Arc<Mutex<Inbox>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects to `target` as `user` and starts reading once the server has said `connected`.
    pub fn connect(target: &WsTarget, user: &str) -> io::Result<Subscriber> {
        let mut keys = KeyGen::new(SUBSCRIBER_KEYGEN_SALT);
        let mut stream = TcpStream::connect_timeout(&target.addr.into(), CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut pending = ws::client_handshake(
            &mut stream,
            &target.host_header,
            &target.path_for_user(user),
            &keys.websocket_key(),
        )
        .map_err(|e| io::Error::other(format!("{user}: {e}")))?;
        wait_for_connected(&mut stream, &mut pending)?;
        stream.set_read_timeout(Some(READ_POLL))?;
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (inbox, stop) = (Arc::clone(&inbox), Arc::clone(&stop));
            thread::Builder::new()
                .name("subscriber".into())
                .spawn(move || {
                    if let Err(e) = read_loop(&mut stream, pending, &inbox, &stop, &mut keys) {
                        lock(&inbox).failure = Some(e.to_string());
                    }
                })?
        };
        Ok(Subscriber {
            inbox,
            stop,
            reader: Some(reader),
        })
    }

    /// Stamped frames received so far, taken or not.
    pub fn received(&self) -> u64 {
        lock(&self.inbox).received
    }

    /// The deliveries received since the last call.
    pub fn take(&self) -> Vec<Delivery> {
        std::mem::take(&mut lock(&self.inbox).deliveries)
    }

    /// Why the connection ended, if it has.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inbox).failure.clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            // A reader that panicked has nothing left to say.
            let _ = reader.join();
        }
    }
}

/// The inbox, even if the reader panicked while holding it (its data is still counts and stamps).
fn lock(inbox: &Mutex<Inbox>) -> MutexGuard<'_, Inbox> {
    inbox.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads until the server's first text frame (`connected`), keeping what follows it in `pending`.
fn wait_for_connected(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(frame) =
            ws::parse_frame(pending).map_err(|e| io::Error::other(e.to_string()))?
        {
            let text = frame.opcode == opcode::TEXT;
            let close = frame.opcode == opcode::CLOSE;
            pending.drain(..frame.len);
            if close {
                return Err(io::Error::other("the server closed the connection at once"));
            }
            if text {
                return Ok(());
            }
            continue;
        }
        match stream.read(&mut chunk)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The reader thread: frames in, pongs out, stamped deliveries recorded, until `stop`.
fn read_loop(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    inbox: &Mutex<Inbox>,
    stop: &AtomicBool,
    keys: &mut KeyGen,
) -> io::Result<()> {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut arrived_ns = now_ns();
    loop {
        let mut at = 0;
        while let Some(frame) =
            ws::parse_frame(&buf[at..]).map_err(|e| io::Error::other(e.to_string()))?
        {
            let payload = &buf[at + frame.payload.start..at + frame.payload.end];
            match frame.opcode {
                opcode::TEXT => {
                    if let Some(stamp_ns) = stamp::find_stamp(payload) {
                        let mut inbox = lock(inbox);
                        inbox.received += 1;
                        inbox.deliveries.push(Delivery {
                            stamp_ns,
                            arrived_ns,
                        });
                    }
                }
                opcode::PING => stream.write_all(&ws::pong_frame(
                    payload,
                    (keys.next_u64() as u32).to_ne_bytes(),
                ))?,
                opcode::CLOSE => return Err(io::Error::other("the server closed the connection")),
                _ => {}
            }
            at += frame.len;
        }
        buf.drain(..at);
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                arrived_ns = now_ns();
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_arrival_minus_stamp_in_whole_microseconds() {
        let d = Delivery {
            stamp_ns: 1_000_000,
            arrived_ns: 3_499_999,
        };
        assert_eq!(d.latency_us(), 2_499);
        let early = Delivery {
            stamp_ns: 5,
            arrived_ns: 4,
        };
        assert_eq!(early.latency_us(), 1);
    }
}
