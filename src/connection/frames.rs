//! The read side every WebSocket session kind shares (the native session, the Pusher session): wait
//! for the socket or a signal, write the outbox or end on a signal, and decode what arrived into
//! frames, each text message parsed by the session's own protocol. What a session does with them
//! (rates, actions, pongs) stays its own.

use crate::shard::socket::{Connection, Flushed, Signals, Wake};
use crate::ws::codec::{Decoder, Incoming, Violation};

/// One frame a client sent, its text already parsed into `T` by the session's protocol.
pub(super) enum Frame<T> {
    /// A text message.
    Text(T),
    /// A ping, whose payload the pong echoes.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close, with its code if it had one.
    Close(Option<u16>),
}

/// Why a session's reading ends.
pub(super) enum Stop {
    /// The socket is gone (EOF, an error, or the outbox could not be written).
    Gone,
    /// The server closes with this code (a slow consumer, a shutdown, a terminate).
    Server(u16),
    /// The client broke the WebSocket protocol.
    Violation(Violation),
}

/// Waits until the client sent something and returns its frames, writing the outbox whenever the
/// shard signals meanwhile; `parse` reads each text message.
pub(super) async fn next_frames<T>(
    conn: &mut Connection,
    decoder: &mut Decoder,
    mut parse: impl FnMut(&mut [u8]) -> T,
) -> Result<Vec<Frame<T>>, Stop> {
    let signals = Signals {
        outbox: true,
        shutdown: false,
    };
    loop {
        match conn.read_or_signal(signals, None).await {
            Err(_) | Ok(Wake::Eof) => return Err(Stop::Gone),
            Ok(Wake::Signal) => {
                let close = conn.shard.hub.borrow().conn(conn.id).close_code;
                if let Some(code) = close {
                    return Err(Stop::Server(code));
                }
                match conn.flush_outbox(false).await {
                    Ok(Flushed::Drained) | Ok(Flushed::Interrupted) => {}
                    Err(_) => return Err(Stop::Gone),
                }
            }
            Ok(Wake::Data) => {
                let max_frame = conn.shard.config.max_frame;
                let mut frames = Vec::new();
                let consumed = decoder
                    .decode(&mut conn.inbuf, max_frame, |msg| {
                        frames.push(match msg {
                            Incoming::Text(text) => Frame::Text(parse(text)),
                            Incoming::Ping(payload) => Frame::Ping(payload.to_vec()),
                            Incoming::Pong(_) => Frame::Pong,
                            Incoming::Close(code) => Frame::Close(code),
                        })
                    })
                    .map_err(Stop::Violation)?;
                conn.inbuf.drain(..consumed);
                if conn.inbuf.is_empty() {
                    // Free the buffer: an idle connection owns no read memory.
                    conn.inbuf = Vec::new();
                }
                conn.shard.stats().websocket_messages(frames.len());
                return Ok(frames);
            }
        }
    }
}
