//! One connection's task: the HTTP/1.1 request loop, and the I/O primitives the WebSocket session reuses.
//!
//! Memory first (DESIGN.md): an idle connection owns no read buffer. Reads land in the shard's scratch
//! buffer, borrowed only inside `poll` (never across an `.await`), and only the bytes of an unfinished
//! request or frame are copied into the connection's own `inbuf`, which is freed again once consumed.
//! Waiting for the socket is glommio's readiness poll, which pins no buffer either.
//!
//! Timeouts are glommio's per-socket read timeout, set before each wait: the keep-alive timeout while
//! waiting for a new request, the header timeout (408) once its first byte has arrived. A WebSocket has
//! no timer at all: its liveness is the shard's heartbeat sweep.
//!
//! Requests on one connection are answered in order, which is all HTTP/1.1 pipelining asks: the loop
//! parses the next head from whatever is already buffered before it reads again.

use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::api;
use crate::auth::admission::{ConnectionPermit, Refused};
use crate::http::request::{parse_head, Limits, Method, Parsed, RequestHead};
use crate::http::response::Response;
use crate::shard::hub::ConnId;
use crate::shard::outbound::release_if_idle;
use crate::shard::Shard;

/// How long a connection being closed may take to accept its last frames or response.
pub(crate) const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest read timeout glommio is given (it refuses zero).
const MIN_READ_TIMEOUT: Duration = Duration::from_millis(1);

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
        if state.kind == crate::shard::hub::ConnKind::WebSocket {
            self.shard.stats().websocket_closed();
        }
    }
}

/// What the HTTP loop ended with.
pub(crate) enum HttpOutcome {
    /// The connection is done.
    Close,
    /// `GET /ws`: the WebSocket session takes over (the head was consumed from `inbuf`).
    Upgrade(RequestHead),
}

/// Serves one accepted connection until it closes.
pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if shard.hub.borrow().len() >= shard.config.max_connections_per_shard {
        refuse_over_capacity(stream, "the server is at its connection limit").await;
        return;
    }
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let permit = match shard.auth.connections.admit(peer) {
        Ok(permit) => permit,
        Err(Refused::Node) => {
            refuse_over_capacity(stream, "the server is at its connection limit").await;
            return;
        }
        Err(Refused::Ip) => {
            refuse_over_capacity(stream, "too many connections from this address").await;
            return;
        }
    };
    let id = shard.hub.borrow_mut().add(stream.as_raw_fd());
    let mut conn = Connection {
        shard,
        stream,
        id,
        inbuf: Vec::new(),
        _permit: permit,
    };
    // Boxed: the HTTP loop's state (parser, response buffers) is freed before a WebSocket settles in
    // for hours, instead of reserving room in every connection's future (see `ws::session`).
    let outcome = Box::pin(conn.http_loop()).await;
    match outcome {
        HttpOutcome::Close => {}
        HttpOutcome::Upgrade(head) => crate::ws::session::run(conn, head).await,
    }
}

/// Answers 503 to a connection over a connection cap, without registering it.
async fn refuse_over_capacity(mut stream: TcpStream, message: &str) {
    let mut out = Vec::new();
    Response::error(503, "too_many_connections", message).write_to(&mut out, false, false);
    let _ = stream.set_write_timeout(Some(CLOSE_FLUSH_TIMEOUT));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

impl Connection {
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

    /// Writes a response with `Connection: close` and closes.
    pub(crate) async fn respond_and_close(&mut self, response: Response) {
        let mut out = Vec::new();
        response.write_to(&mut out, false, false);
        let _ = self.stream.set_write_timeout(Some(CLOSE_FLUSH_TIMEOUT));
        let _ = self.write_all(&out).await;
        let _ = self.stream.close().await;
    }

    /// Reads more of a request under a timeout.
    async fn read_request_bytes(
        &mut self,
        timeout: Duration,
        stop_on_shutdown: bool,
    ) -> ReadResult {
        let _ = self
            .stream
            .set_read_timeout(Some(timeout.max(MIN_READ_TIMEOUT)));
        let signals = Signals {
            outbox: false,
            shutdown: stop_on_shutdown,
        };
        match self.read_or_signal(signals).await {
            Ok(Wake::Data) => ReadResult::Data,
            Ok(Wake::Eof) | Ok(Wake::Signal) => ReadResult::Closed,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => ReadResult::TimedOut,
            Err(_) => ReadResult::Closed,
        }
    }

    /// Serves HTTP requests until the connection closes or upgrades.
    async fn http_loop(&mut self) -> HttpOutcome {
        let config = self.shard.config.clone();
        let limits = Limits {
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body.max(config.max_batch_body),
        };
        let header_timeout = Duration::from_secs(config.header_timeout_s);
        let keepalive_timeout = Duration::from_secs(config.keepalive_timeout_s);
        loop {
            let mut header_deadline: Option<Instant> = None;
            let (head, head_len) = loop {
                match parse_head(&self.inbuf, &limits) {
                    Ok(Parsed::Complete { head, head_len }) => break (head, head_len),
                    Ok(Parsed::Incomplete) => {
                        let idle = self.inbuf.is_empty();
                        let timeout = if idle {
                            keepalive_timeout
                        } else {
                            let deadline = *header_deadline
                                .get_or_insert_with(|| Instant::now() + header_timeout);
                            deadline.saturating_duration_since(Instant::now())
                        };
                        match self.read_request_bytes(timeout, idle).await {
                            ReadResult::Data => continue,
                            ReadResult::Closed => return HttpOutcome::Close,
                            ReadResult::TimedOut if idle => return HttpOutcome::Close,
                            ReadResult::TimedOut => {
                                self.respond_and_close(request_timeout()).await;
                                return HttpOutcome::Close;
                            }
                        }
                    }
                    Err(e) => {
                        self.shard.stats().http_request();
                        self.respond_and_close(Response::error(e.status(), e.code(), &e.message()))
                            .await;
                        return HttpOutcome::Close;
                    }
                }
            };
            // Before the body is read: an unauthenticated or rate-limited client gets no buffer.
            if let Err(refusal) = self.shard.auth.check_request(&head) {
                self.shard.stats().http_request();
                self.respond_and_close(refusal).await;
                return HttpOutcome::Close;
            }
            let total = head_len + head.content_length;
            while self.inbuf.len() < total {
                match self.read_request_bytes(header_timeout, false).await {
                    ReadResult::Data => {}
                    ReadResult::Closed => return HttpOutcome::Close,
                    ReadResult::TimedOut => {
                        self.respond_and_close(request_timeout()).await;
                        return HttpOutcome::Close;
                    }
                }
            }
            self.shard.stats().http_request();
            if head.path() == "/ws" && head.method == Method::Get {
                self.inbuf.drain(..total);
                let _ = self.stream.set_read_timeout(None);
                return HttpOutcome::Upgrade(head);
            }
            let keep_alive = head.keep_alive && !self.shard.is_shutting_down();
            let response = api::handle(&self.shard, &head, &mut self.inbuf[head_len..total]).await;
            let mut out = Vec::with_capacity(256 + response.body.len());
            response.write_to(&mut out, keep_alive, head.method == Method::Head);
            self.inbuf.drain(..total);
            if self.inbuf.is_empty() {
                self.inbuf = Vec::new();
            }
            let _ = self.stream.set_write_timeout(Some(header_timeout));
            if self.write_all(&out).await.is_err() || !keep_alive {
                let _ = self.stream.close().await;
                return HttpOutcome::Close;
            }
        }
    }
}

/// The outcome of reading more request bytes.
enum ReadResult {
    Data,
    Closed,
    TimedOut,
}

fn request_timeout() -> Response {
    Response::error(
        408,
        "request_timeout",
        "the request was not received in time",
    )
}
