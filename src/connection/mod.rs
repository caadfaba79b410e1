//! One connection's task, from the accepted socket to its end: the admission caps, the HTTP/1.1 request
//! loop, and the hand-over to a session of its kind: at `GET /ws` the upgrade to [`websocket`] (the
//! native protocol), at `GET /app/{key}` the upgrade to [`pusher`] (the Pusher Channels protocol), at
//! `GET /api/v1/notifications/stream` an SSE stream ([`sse`]), at `GET /api/v1/notifications/poll` a
//! long-poll ([`poll`]). What the native receiving kinds share (parameters, channels under a token,
//! resume) is [`live`].
//!
//! This is the top of the request path: it is the one module that knows the shard (where the connection
//! is registered), the API (which answers requests) and the WebSocket session, so none of those three
//! needs another. The shard's accept loop spawns [`serve`] for every accepted socket: `server` hands the
//! function to each shard in `ShardSetup::serve`, a generic parameter, so the call is static and the
//! connection's future is spawned as is, not boxed.
//!
//! Timeouts are the connection's deadline in the shard's timeout queue (`shard::timeouts`), set only
//! when a wait has to wait: the keep-alive timeout while waiting for a new request, the header timeout
//! (408) once its first byte has arrived, and while a response cannot be written. A WebSocket and an
//! SSE stream have no deadline at all: their liveness is the shard's heartbeat sweep. A parked poll's
//! deadline is its `timeout_s`.
//!
//! Requests on one connection are answered in order, which is all HTTP/1.1 pipelining asks: the loop
//! parses the next head from whatever is already buffered before it reads again.

mod audit_origin;
mod frames;
mod live;
mod poll;
pub(crate) mod pusher;
mod sse;
pub(crate) mod websocket;

use std::io::{self, Write};
use std::net::{IpAddr, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::api::{self, ApiContext};
use crate::audit::Caller;
use crate::auth::admission::Refused;
use crate::http::request::{parse_head, Limits, Method, Parsed, RequestHead};
use crate::http::response::Response;
use crate::metrics::{Refusal, Route};
use crate::shard::socket::{Connection, Signals, Wake, CLOSE_FLUSH_TIMEOUT};
use crate::shard::Shard;

/// What the HTTP loop ended with.
enum HttpOutcome {
    /// The connection is done.
    Close,
    /// `GET /ws`: the WebSocket session takes over (the head was consumed from `inbuf`).
    Upgrade(RequestHead),
    /// `GET /api/v1/notifications/stream`: the SSE stream takes over, as `Upgrade`.
    Stream(RequestHead),
    /// `GET /api/v1/notifications/poll`: the long-poll takes over, as `Upgrade`.
    Poll(RequestHead),
    /// `GET /app/{key}` with Pusher apps configured: the Pusher session takes over.
    PusherUpgrade(RequestHead),
}

/// Serves one accepted (non-blocking) connection from `peer` until it closes.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: Option<IpAddr>) {
    let _ = stream.set_nodelay(true);
    if shard.hub.borrow().len() >= shard.config.max_connections_per_shard {
        shard.auth.refusals().count(Refusal::MaxConnectionsPerShard);
        refuse_over_capacity(stream, "the server is at its connection limit");
        return;
    }
    let permit = match shard.auth.connections.admit(peer) {
        Ok(permit) => permit,
        Err(Refused::Node) => {
            refuse_over_capacity(stream, "the server is at its connection limit");
            return;
        }
        Err(Refused::Ip) => {
            refuse_over_capacity(stream, "too many connections from this address");
            return;
        }
    };
    let mut conn = match Connection::register(shard, stream, permit) {
        Ok(conn) => conn,
        Err(e) => {
            warn!(error = %e, "cannot watch an accepted socket");
            return;
        }
    };
    // Boxed: the HTTP loop's state (parser, response buffers) is freed before a WebSocket settles in
    // for hours, instead of reserving room in every connection's future (see `websocket`).
    let outcome = Box::pin(http_loop(&mut conn)).await;
    match outcome {
        HttpOutcome::Close => {}
        HttpOutcome::Upgrade(head) => websocket::run(conn, head).await,
        HttpOutcome::Stream(head) => sse::run(conn, head).await,
        HttpOutcome::Poll(head) => poll::run(conn, head).await,
        HttpOutcome::PusherUpgrade(head) => pusher::run(conn, head).await,
    }
}

/// Answers 503 to a connection over a connection cap, without registering it: one non-blocking write
/// (a fresh socket has room for a short response), then the close.
fn refuse_over_capacity(mut stream: TcpStream, message: &str) {
    let mut out = Vec::new();
    Response::error(503, "too_many_connections", message).write_to(&mut out, false, false);
    let _ = stream.write(&out);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Writes a response with `Connection: close` and closes.
pub(crate) async fn respond_and_close(conn: &mut Connection, response: Response) {
    let mut out = Vec::new();
    response.write_to(&mut out, false, false);
    let _ = conn.write_all(&out, Some(CLOSE_FLUSH_TIMEOUT)).await;
    conn.close();
}

/// Reads more of a request under a timeout.
async fn read_request_bytes(
    conn: &mut Connection,
    timeout: Duration,
    stop_on_shutdown: bool,
) -> ReadResult {
    let signals = Signals {
        outbox: false,
        shutdown: stop_on_shutdown,
    };
    match conn.read_or_signal(signals, Some(timeout)).await {
        Ok(Wake::Data) => ReadResult::Data,
        Ok(Wake::Eof) | Ok(Wake::Signal) => ReadResult::Closed,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => ReadResult::TimedOut,
        Err(_) => ReadResult::Closed,
    }
}

/// Serves HTTP requests until the connection closes or upgrades.
async fn http_loop(conn: &mut Connection) -> HttpOutcome {
    let config = conn.shard.config.clone();
    let limits = Limits {
        max_header_bytes: config.max_header_bytes,
        max_body_bytes: config.max_body.max(config.max_batch_body),
    };
    let header_timeout = Duration::from_secs(config.header_timeout_s);
    let keepalive_timeout = Duration::from_secs(config.keepalive_timeout_s);
    let ip = audit_origin::peer_ip(conn);
    loop {
        let mut header_deadline: Option<Instant> = None;
        let (head, head_len) = loop {
            match parse_head(&conn.inbuf, &limits) {
                Ok(Parsed::Complete { head, head_len }) => break (head, head_len),
                Ok(Parsed::Incomplete) => {
                    let idle = conn.inbuf.is_empty();
                    let timeout = if idle {
                        keepalive_timeout
                    } else {
                        let deadline =
                            *header_deadline.get_or_insert_with(|| Instant::now() + header_timeout);
                        deadline.saturating_duration_since(Instant::now())
                    };
                    match read_request_bytes(conn, timeout, idle).await {
                        ReadResult::Data => continue,
                        ReadResult::Closed => return HttpOutcome::Close,
                        ReadResult::TimedOut if idle => return HttpOutcome::Close,
                        ReadResult::TimedOut => {
                            respond_and_close(conn, request_timeout()).await;
                            return HttpOutcome::Close;
                        }
                    }
                }
                Err(e) => {
                    conn.shard.stats().http_request();
                    conn.shard.stats().http_response(Route::None, e.status());
                    respond_and_close(conn, Response::error(e.status(), e.code(), &e.message()))
                        .await;
                    return HttpOutcome::Close;
                }
            }
        };
        // Before the body is read: an unauthenticated or rate-limited client gets no buffer.
        let credential = match conn.shard.auth.check_request(&head, ip) {
            Ok(credential) => credential,
            Err(refusal) => {
                conn.shard.stats().http_request();
                conn.shard
                    .stats()
                    .http_response(api::route_of(&head), refusal.status);
                respond_and_close(conn, refusal).await;
                return HttpOutcome::Close;
            }
        };
        let total = head_len + head.content_length;
        while conn.inbuf.len() < total {
            match read_request_bytes(conn, header_timeout, false).await {
                ReadResult::Data => {}
                ReadResult::Closed => return HttpOutcome::Close,
                ReadResult::TimedOut => {
                    respond_and_close(conn, request_timeout()).await;
                    return HttpOutcome::Close;
                }
            }
        }
        conn.shard.stats().http_request();
        if head.path() == "/ws" && head.method == Method::Get {
            conn.inbuf.drain(..total);
            // A live session has no deadline: the heartbeat sweep watches it.
            conn.set_deadline(None);
            return HttpOutcome::Upgrade(head);
        }
        if head.method == Method::Get {
            // A stream or a parked poll leaves the keep-alive loop as `/ws` does; its own code
            // sets its deadlines.
            match api::route_of(&head) {
                Route::Stream => {
                    conn.inbuf.drain(..total);
                    conn.set_deadline(None);
                    return HttpOutcome::Stream(head);
                }
                Route::Poll => {
                    conn.inbuf.drain(..total);
                    conn.set_deadline(None);
                    return HttpOutcome::Poll(head);
                }
                _ => {}
            }
        }
        if head.method == Method::Get
            && !conn.shard.config.pusher.is_empty()
            && pusher::app_key_of(head.path()).is_some()
        {
            conn.inbuf.drain(..total);
            conn.set_deadline(None);
            return HttpOutcome::PusherUpgrade(head);
        }
        let keep_alive = head.keep_alive && !conn.shard.is_shutting_down();
        let caller = Caller { credential, ip };
        let response = api::handle(
            &api_context(&conn.shard, &caller),
            &head,
            &mut conn.inbuf[head_len..total],
        )
        .await;
        let mut out = Vec::with_capacity(256 + response.body.len());
        response.write_to(&mut out, keep_alive, head.method == Method::Head);
        conn.inbuf.drain(..total);
        if conn.inbuf.is_empty() {
            conn.inbuf = Vec::new();
        }
        if conn.write_all(&out, Some(header_timeout)).await.is_err() || !keep_alive {
            conn.close();
            return HttpOutcome::Close;
        }
    }
}

/// What the API's handlers may use of the shard that serves the request (a few references, made per
/// request on the stack).
fn api_context<'a>(shard: &'a Shard, caller: &'a Caller) -> ApiContext<'a> {
    ApiContext {
        audit: shard.auth.audit(),
        caller,
        config: &shard.config,
        store: &shard.store,
        counters: shard.stats(),
        metrics: &shard.metrics,
        fanout: &shard.fanout,
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
