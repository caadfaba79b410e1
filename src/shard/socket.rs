//! A connection as its shard holds it: the socket, its slot in the hub, and the bytes of an unfinished
//! request or frame, with the waits and writes that the HTTP loop and every session kind share
//! (`crate::connection` runs them).
//!
//! Memory first (docs/architecture.md, "Memory per connection"): an idle connection owns no read
//! buffer. Reads land in the shard's scratch buffer, borrowed only inside `poll` (never across an
//! `.await`), and only the bytes of an unfinished request or frame are copied into the connection's own
//! `inbuf`, which is freed again once consumed. The socket is a plain non-blocking descriptor: the
//! shard's epoll set says when it can be read or written (`shard::reactor`), and its deadlines are the
//! shard's timeout queue (`shard::timeouts`), so waiting pins no buffer, no poll and no timer.
//!
//! A wait ends on data, on the peer's EOF, on the connection's deadline, or on a signal from the shard
//! (frames queued in the outbox, a close request, a shutdown), which is how the delivery path and the
//! sweeps reach a connection's task without a timer or a channel per connection.

use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::auth::admission::ConnectionPermit;
use crate::delivery::inbox::ConnId;
use crate::shard::hub::{ConnKind, Hub, LiveMark};
use crate::shard::outbound::release_if_idle;
use crate::shard::Shard;

/// How long a connection being closed may take to accept its last frames or response.
pub(crate) const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What woke a wait on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Bytes were appended to `inbuf`.
    Data,
    /// The peer closed its side.
    Eof,
    /// Something else needs the task: frames to flush, a close request, a shutdown, or (a parked
    /// long-poll) a stored delivery.
    Signal,
}

/// What a flush ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything queued was written.
    Drained,
    /// A close was requested meanwhile; the rest was left queued.
    Interrupted,
}

/// Which signals end a wait besides data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signals {
    /// Frames queued in the outbox (WebSocket).
    pub outbox: bool,
    /// The shard is shutting down (an HTTP connection between requests).
    pub shutdown: bool,
}

/// A connection's socket, its slot in the hub, and the bytes of an unfinished request or frame.
pub(crate) struct Connection {
    /// The shard that owns the connection.
    pub shard: Rc<Shard>,
    /// The socket, non-blocking and registered in the shard's epoll set.
    pub stream: TcpStream,
    /// The connection's slot in the shard's hub.
    pub id: ConnId,
    /// Bytes read but not yet consumed; empty (no allocation) when idle.
    pub inbuf: Vec<u8>,
    /// The connection's slot in the node-wide and per-IP caps, given back when it closes.
    _permit: ConnectionPermit,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Unregister before the socket closes, so no delivery writes to a recycled descriptor.
        let (state, shrank) = {
            let mut hub = self.shard.hub.borrow_mut();
            let state = hub.remove(self.id);
            (state, hub.shrink_if_sparse())
        };
        if shrank {
            crate::shard::allocator::return_free_memory();
        }
        if state.kind == ConnKind::WebSocket {
            self.shard.stats().websocket_closed();
        }
    }
}

impl Connection {
    /// Registers an accepted (non-blocking) socket in the shard's hub and epoll set, as an HTTP
    /// connection holding `permit`.
    pub(crate) fn register(
        shard: Rc<Shard>,
        stream: TcpStream,
        permit: ConnectionPermit,
    ) -> io::Result<Connection> {
        let fd = stream.as_raw_fd();
        let id = shard.hub.borrow_mut().add(fd);
        if let Err(e) = shard.reactor.borrow().register(fd, id) {
            shard.hub.borrow_mut().remove(id);
            return Err(e);
        }
        Ok(Connection {
            shard,
            stream,
            id,
            inbuf: Vec::new(),
            _permit: permit,
        })
    }

    /// Sets (or with `None` clears) the deadline of the connection's waits from now on: a wait that
    /// reaches it fails with `TimedOut`.
    pub(crate) fn set_deadline(&mut self, after: Option<Duration>) {
        self.shard.timeouts.borrow_mut().set_after(
            &mut self.shard.hub.borrow_mut(),
            self.id,
            after,
        );
    }

    /// Waits for bytes (appended to `inbuf`) or for one of `signals`; with `timeout`, gives up with
    /// `TimedOut` that long after it first has to wait. The deadline is set only then (a request already
    /// in the socket costs no timer) and cleared at the end: it belongs to this wait alone.
    pub(crate) async fn read_or_signal(
        &mut self,
        signals: Signals,
        timeout: Option<Duration>,
    ) -> io::Result<Wake> {
        let shard = self.shard.clone();
        let id = self.id;
        let stream = &self.stream;
        let inbuf = &mut self.inbuf;
        let mut armed = false;
        let result = poll_fn(|cx| {
            let mut hub = shard.hub.borrow_mut();
            let conn = hub.conn_mut(id);
            let outbox_ready =
                signals.outbox && conn.outbox.as_ref().is_some_and(|o| o.front().is_some());
            // A parked long-poll is reached by a stored delivery only through its mark (see
            // `ConnKind::LongPoll`).
            let poll_reached =
                conn.kind == ConnKind::LongPoll && matches!(conn.live_mark, LiveMark::FirstLive(_));
            if conn.close_code.is_some()
                || outbox_ready
                || poll_reached
                || (signals.shutdown && shard.is_shutting_down())
            {
                return Poll::Ready(Ok(Wake::Signal));
            }
            while conn.readable {
                let mut scratch = shard.scratch.borrow_mut();
                match (&mut &*stream).read(&mut scratch[..]) {
                    Ok(0) => return Poll::Ready(Ok(Wake::Eof)),
                    Ok(n) => {
                        // A TCP read shorter than asked emptied the queue: the next data is an edge.
                        if n < scratch.len() {
                            conn.readable = false;
                        }
                        inbuf.extend_from_slice(&scratch[..n]);
                        return Poll::Ready(Ok(Wake::Data));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if let Some(timeout) = timeout {
                if !armed {
                    armed = true;
                    let after = Some(timeout);
                    shard.timeouts.borrow_mut().set_after(&mut hub, id, after);
                }
            }
            park(&shard, &mut hub, id, cx)
        })
        .await;
        if armed {
            self.set_deadline(None);
        }
        result
    }

    /// Writes the connection's queued frames until the queue is empty, or until a close is requested
    /// (unless `ignore_close`, used to flush the final close frame itself).
    pub(crate) async fn flush_outbox(&mut self, ignore_close: bool) -> io::Result<Flushed> {
        let shard = self.shard.clone();
        let id = self.id;
        let stream = &self.stream;
        let result = poll_fn(|cx| loop {
            let mut hub = shard.hub.borrow_mut();
            let conn = hub.conn_mut(id);
            if !ignore_close && conn.close_code.is_some() {
                return Poll::Ready(Ok(Flushed::Interrupted));
            }
            let Some(front) = conn.outbox.as_ref().and_then(|o| o.front()) else {
                return Poll::Ready(Ok(Flushed::Drained));
            };
            if !conn.writable {
                return park(&shard, &mut hub, id, cx);
            }
            // A write either takes bytes now (accounted for before anyone else runs) or none, so the
            // queue never disagrees with what reached the socket.
            match (&mut &*stream).write(&front) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    if let Some(o) = conn.outbox.as_mut() {
                        o.advance(n);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        })
        .await;
        release_if_idle(self.shard.hub.borrow_mut().conn_mut(self.id));
        result
    }

    /// Writes a whole buffer (HTTP responses, the WebSocket handshake); with `timeout`, gives up with
    /// `TimedOut` that long after the socket first refuses bytes (a deadline of this write alone, as in
    /// [`Connection::read_or_signal`]).
    pub(crate) async fn write_all(
        &mut self,
        mut bytes: &[u8],
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let shard = self.shard.clone();
        let id = self.id;
        let stream = &self.stream;
        let mut armed = false;
        let result = poll_fn(|cx| loop {
            if bytes.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut hub = shard.hub.borrow_mut();
            let conn = hub.conn_mut(id);
            if !conn.writable {
                if let (Some(timeout), false) = (timeout, armed) {
                    armed = true;
                    let after = Some(timeout);
                    shard.timeouts.borrow_mut().set_after(&mut hub, id, after);
                }
                return park(&shard, &mut hub, id, cx);
            }
            match (&mut &*stream).write(bytes) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        })
        .await;
        if armed {
            self.set_deadline(None);
        }
        result
    }

    /// Ends the connection's side of the TCP stream at once (the descriptor itself is closed when the
    /// connection is dropped).
    pub(crate) fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The end of every wait: `TimedOut` if the connection's deadline passed, otherwise the task's waker
/// is left where the reactor, the sweeps and the delivery path will find it.
fn park<T>(shard: &Shard, hub: &mut Hub, id: ConnId, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
    let conn = hub.conn_mut(id);
    if conn.deadline != 0 && shard.timeouts.borrow().now() >= conn.deadline {
        return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
    }
    if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        conn.waker = Some(cx.waker().clone());
    }
    Poll::Pending
}
