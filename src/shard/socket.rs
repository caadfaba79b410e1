//! A connection as its shard holds it: the socket, its slot in the hub, and the bytes of an unfinished
//! request or frame, with the waits and writes that the HTTP loop and every session kind share
//! (`crate::connection` runs them).
//!
//! Memory first (docs/architecture.md, "Memory per connection"): an idle connection owns no read
//! buffer. Reads land in the shard's scratch buffer, borrowed only inside `poll` (never across an
//! `.await`), and only the bytes of an unfinished request or frame are copied into the connection's own
//! `inbuf`, which is freed again once consumed. Waiting for the socket is glommio's readiness poll, which
//! pins no buffer either.
//!
//! A wait ends on data, on the peer's EOF, or on a signal from the shard (frames queued in the outbox,
//! a close request, a shutdown), which is how the delivery path and the sweeps reach a connection's
//! task without a timer or a channel per connection.

use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::auth::admission::ConnectionPermit;
use crate::delivery::inbox::ConnId;
use crate::shard::hub::ConnKind;
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
    /// Something else needs the task: frames to flush, a close request, or a shutdown.
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
    /// The socket.
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
        let state = self.shard.hub.borrow_mut().remove(self.id);
        if state.kind == ConnKind::WebSocket {
            self.shard.stats().websocket_closed();
        }
    }
}

impl Connection {
    /// Registers an accepted socket in the shard's hub, as an HTTP connection holding `permit`.
    pub(crate) fn register(
        shard: Rc<Shard>,
        stream: TcpStream,
        permit: ConnectionPermit,
    ) -> Connection {
        let id = shard.hub.borrow_mut().add(stream.as_raw_fd());
        Connection {
            shard,
            stream,
            id,
            inbuf: Vec::new(),
            _permit: permit,
        }
    }

    /// Waits for bytes (appended to `inbuf`) or for one of `signals`.
    pub(crate) async fn read_or_signal(&mut self, signals: Signals) -> io::Result<Wake> {
        let shard = self.shard.clone();
        let id = self.id;
        let stream = &mut self.stream;
        let inbuf = &mut self.inbuf;
        poll_fn(|cx| {
            {
                let mut hub = shard.hub.borrow_mut();
                let conn = hub.conn_mut(id);
                let outbox_ready =
                    signals.outbox && conn.outbox.as_ref().is_some_and(|o| o.front().is_some());
                if conn.close_code.is_some()
                    || outbox_ready
                    || (signals.shutdown && shard.is_shutting_down())
                {
                    return Poll::Ready(Ok(Wake::Signal));
                }
                if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    conn.waker = Some(cx.waker().clone());
                }
            }
            let mut scratch = shard.scratch.borrow_mut();
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
                Poll::Ready(Ok(0)) => Poll::Ready(Ok(Wake::Eof)),
                Poll::Ready(Ok(n)) => {
                    inbuf.extend_from_slice(&scratch[..n]);
                    Poll::Ready(Ok(Wake::Data))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Writes the connection's queued frames until the queue is empty, or until a close is requested
    /// (unless `ignore_close`, used to flush the final close frame itself).
    pub(crate) async fn flush_outbox(&mut self, ignore_close: bool) -> io::Result<Flushed> {
        let shard = self.shard.clone();
        let id = self.id;
        let stream = &mut self.stream;
        let result = poll_fn(|cx| loop {
            let mut hub = shard.hub.borrow_mut();
            let conn = hub.conn_mut(id);
            if !ignore_close && conn.close_code.is_some() {
                return Poll::Ready(Ok(Flushed::Interrupted));
            }
            let Some(front) = conn.outbox.as_ref().and_then(|o| o.front()) else {
                return Poll::Ready(Ok(Flushed::Drained));
            };
            if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                conn.waker = Some(cx.waker().clone());
            }
            // poll_write either writes now (and we account for it before anyone else runs) or writes
            // nothing and waits, so the queue never disagrees with what reached the socket.
            match Pin::new(&mut *stream).poll_write(cx, &front) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if let Some(o) = conn.outbox.as_mut() {
                        o.advance(n);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
        release_if_idle(self.shard.hub.borrow_mut().conn_mut(self.id));
        result
    }

    /// Writes a whole buffer (HTTP responses, the WebSocket handshake).
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }
}
