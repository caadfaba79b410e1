//! Fuzz target: the WebSocket frame decoder (`ws::codec::Decoder`) fed the way the session feeds it.
//!
//! Input layout: the first byte picks the message limit (low 3 bits) and how the rest is cut into
//! reads (high 5 bits: 0 = one read, n = reads of n bytes); the rest is what the client sent. Each
//! chunk is appended to a tail buffer, decoded, and the consumed prefix drained, as in
//! `ws::session`. Besides "never panics", it asserts:
//!
//! - every delivered text message is UTF-8 and within the limit, every ping/pong ≤ 125 bytes, every
//!   close code one that may be sent on the wire;
//! - the decoder never consumes more than it was given, and never buffers more than the limit;
//! - how the bytes were cut into reads does not change what is delivered or the verdict: the same
//!   stream decoded in one read gives the same messages and the same result.

#![no_main]

use libfuzzer_sys::fuzz_target;
use notification_service::ws::codec::{Decoder, Incoming, Violation, MAX_CONTROL_PAYLOAD};

/// Message limits to try: zero, tiny, around the control-frame bound, the default, unlimited.
const LIMITS: [usize; 8] = [0, 1, 16, 125, 126, 1024, 65_536, usize::MAX];

/// An owned copy of what the decoder delivered, to compare two runs.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, stream)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(config & 0b111)];
    let chunk = usize::from(config >> 3);

    let chunked = run(
        stream,
        max,
        if chunk == 0 {
            stream.len().max(1)
        } else {
            chunk
        },
    );
    let whole = run(stream, max, stream.len().max(1));
    assert_eq!(
        chunked, whole,
        "the verdict depends on how the bytes were read"
    );
});

/// Feeds `stream` to a fresh decoder in reads of `chunk` bytes. Returns the delivered messages and
/// the final verdict (`Ok(bytes left unconsumed)` or the violation).
fn run(stream: &[u8], max: usize, chunk: usize) -> (Vec<Got>, Result<usize, Violation>) {
    let mut decoder = Decoder::new();
    let mut tail = Vec::new();
    let mut got = Vec::new();
    let mut closed = false;
    for read in stream.chunks(chunk) {
        tail.extend_from_slice(read);
        let result = decoder.decode(&mut tail, max, |msg| {
            assert!(!closed, "a message after the close frame");
            got.push(match msg {
                Incoming::Text(text) => {
                    assert!(std::str::from_utf8(text).is_ok(), "text is not UTF-8");
                    assert!(text.len() <= max, "text over the limit");
                    Got::Text(text.to_vec())
                }
                Incoming::Ping(p) => {
                    assert!(p.len() <= MAX_CONTROL_PAYLOAD);
                    Got::Ping(p.to_vec())
                }
                Incoming::Pong(p) => {
                    assert!(p.len() <= MAX_CONTROL_PAYLOAD);
                    Got::Pong(p.to_vec())
                }
                Incoming::Close(code) => {
                    if let Some(code) = code {
                        assert!(matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999));
                    }
                    closed = true;
                    Got::Close(code)
                }
            });
        });
        match result {
            Ok(consumed) => {
                assert!(consumed <= tail.len());
                tail.drain(..consumed);
            }
            Err(violation) => {
                assert!([1002, 1003, 1007, 1009].contains(&violation.close_code()));
                assert!(violation.reason().len() <= 123, "fits a close frame");
                return (got, Err(violation));
            }
        }
        assert!(decoder.buffered() <= max);
        if closed {
            // The session stops reading at a close frame; what follows is never decoded.
            return (got, Ok(0));
        }
    }
    (got, Ok(tail.len()))
}
