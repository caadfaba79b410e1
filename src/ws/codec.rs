//! WebSocket frame decoding and encoding (RFC 6455) on the caller's buffers.
//!
//! The budget is about 1 KiB per idle connection (docs/architecture.md, "Memory per connection"), so a
//! connection cannot own a tungstenite `WebSocket` with its read and write buffers. Instead the shard
//! reads into a per-shard scratch buffer and hands it to [`Decoder::decode`], which works in place on
//! those bytes:
//!
//! - A frame is handled only once it is complete in the buffer. A partial frame is left unconsumed and the
//!   caller keeps just that tail, so between reads a connection holds at most one partial frame and, when
//!   idle, nothing at all.
//! - A single-frame text message (what every client action of API.md is) is unmasked in place and lent to
//!   the caller straight from the buffer: no copy, no allocation. The slice is mutable because simd-json
//!   parses in place. Only a fragmented message is copied, into the decoder's own `Vec`, which is freed
//!   as soon as the message is delivered, so an idle [`Decoder`] is an empty `Vec` plus a flag.
//! - Limits are enforced from the frame header, before any payload is buffered: a client announcing a
//!   huge frame is refused with 1009 when its first few bytes arrive, not after we have stored them. Nothing
//!   is ever allocated from an untrusted length before it has been checked against `max_message`.
//! - UTF-8 is checked per fragment as it arrives (resuming at the last, possibly cut, character), so bad
//!   text fails fast and a finished message is never scanned twice.
//!
//! Header parsing and formatting are tungstenite's (`FrameHeader`), so the bit layout lives in one
//! well-tested place; this module adds the RFC's rules about what a *server* must accept from a *client*,
//! which tungstenite normally applies inside its `WebSocket` object. The trade-off is that a message is
//! handed to the caller only through a callback borrowing the buffer, and that the caller must keep the
//! unconsumed tail and call again when more bytes arrive.
//!
//! Server frames are never masked (RFC 6455 section 5.1) and never fragmented: each encoder returns one
//! complete frame ready to write.

use std::fmt;
use std::io::Cursor;

use tungstenite::protocol::frame::{
    coding::{Control, Data, OpCode},
    FrameHeader,
};

/// Close codes of API.md, sent in our close frames.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; the client should reconnect.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL: u16 = 1002;
    /// The client sent non-text (binary) data.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text message or close reason was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: authentication failed or the action is not allowed.
    pub const POLICY: u16 = 1008;
    /// A frame or message was over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// An internal server error.
    pub const INTERNAL: u16 = 1011;
    /// Slow consumer: the client should reconnect and resume.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Largest payload of a control frame (close, ping, pong), RFC 6455 section 5.5.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bytes of the status code at the start of a non-empty close payload.
const CLOSE_CODE_LEN: usize = 2;

/// Largest close reason that still fits a control frame after the status code.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - CLOSE_CODE_LEN;

/// Longest header of an unmasked (server) frame: 2 bytes plus a 64-bit extended length.
const MAX_SERVER_HEADER: usize = 10;

/// Size of the masking key of client frames.
const MASK_LEN: usize = 4;

/// Writing into a `Vec<u8>` cannot fail (it aborts on allocation failure instead).
const VEC_WRITE_INFALLIBLE: &str = "writing to a Vec<u8> is infallible";

/// What a client sent: one complete message or one control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A text message: validated UTF-8, already unmasked. Mutable because simd-json parses in place. It
    /// borrows either the caller's buffer (single frame) or the decoder's (fragmented message).
    Text(&'a mut [u8]),
    /// A ping, whose payload (at most 125 bytes) the pong must echo.
    Ping(&'a [u8]),
    /// A pong, answering one of our heartbeat pings.
    Pong(&'a [u8]),
    /// A close frame: its status code, `None` for an empty close (no code given). The reason is checked
    /// for UTF-8 but not kept: the server only logs the code.
    Close(Option<u16>),
}

/// Why the connection must be closed, with the close code to send (see [`Violation::close_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A breach of RFC 6455 (1002); the text says which rule, and is short enough for a close reason.
    Protocol(&'static str),
    /// A binary message (1003): API.md only speaks JSON text.
    NotText,
    /// A text message or close reason that is not UTF-8 (1007).
    InvalidUtf8,
    /// A frame or message over `max_message` (1009).
    TooBig,
}

impl Violation {
    /// The close code to send for this violation.
    pub fn close_code(&self) -> u16 {
        match self {
            Violation::Protocol(_) => close_code::PROTOCOL,
            Violation::NotText => close_code::UNSUPPORTED_DATA,
            Violation::InvalidUtf8 => close_code::INVALID_PAYLOAD,
            Violation::TooBig => close_code::TOO_BIG,
        }
    }

    /// A short reason for the close frame and the log (well under the 123 bytes a close reason allows).
    pub fn reason(&self) -> &'static str {
        match self {
            Violation::Protocol(why) => why,
            Violation::NotText => "binary messages are not supported",
            Violation::InvalidUtf8 => "invalid UTF-8",
            Violation::TooBig => "message too big",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.close_code())
    }
}

impl std::error::Error for Violation {}

/// Per-connection decoder state.
///
/// Idle, it owns no heap memory (an empty `Vec`), so it costs a few words in the connection record. It
/// only buffers the fragments of a fragmented message in progress; a partial *frame* stays in the
/// caller's buffer.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Unmasked payload of the fragmented text message in progress. Invariant: valid UTF-8 except
    /// possibly a cut last character, which the next fragment completes.
    fragments: Vec<u8>,
    /// A fragmented message has started and not finished. Separate from `fragments` because a fragment
    /// may be empty.
    in_progress: bool,
}

/// A frame header that passed every check, with where its payload lies.
struct CheckedHeader {
    /// What the frame is; never a reserved opcode, never binary.
    opcode: OpCode,
    /// Last frame of its message.
    is_final: bool,
    /// Client masking key.
    mask: [u8; MASK_LEN],
    /// Header length in bytes (where the payload starts).
    header_len: usize,
    /// Payload length, already checked against the limits, so it fits in memory terms.
    payload_len: usize,
}

impl Decoder {
    /// A decoder with no message in progress and no heap memory.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes every complete frame at the start of `buf`, calling `on_message` for each complete message
    /// or control frame, in order.
    ///
    /// Returns how many bytes were consumed; the caller keeps the unconsumed tail (a partial frame) and
    /// calls again with more bytes appended. Decoding stops right after a close frame is delivered, so
    /// bytes after it are not consumed. `max_message` bounds a data frame's payload and the total of a
    /// fragmented message; exceeding it is [`Violation::TooBig`], decided from the header alone. Control
    /// frames are bounded by the RFC's 125 bytes instead.
    ///
    /// Consumed frames are unmasked in place in `buf`. On `Err` the connection must be closed with
    /// [`Violation::close_code`]; messages before the offending frame have already been delivered.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        mut on_message: impl FnMut(Incoming<'_>),
    ) -> Result<usize, Violation> {
        let mut consumed = 0;
        while let Some(frame) = self.check_header(&buf[consumed..], max_message)? {
            let start = consumed + frame.header_len;
            // `start <= buf.len()` because the header was parsed from `buf`; comparing this way round
            // cannot overflow whatever length the client announced.
            if buf.len() - start < frame.payload_len {
                break; // Partial payload: wait for more bytes.
            }
            let end = start + frame.payload_len;
            let payload = &mut buf[start..end];
            unmask(payload, frame.mask);
            consumed = end;

            match frame.opcode {
                OpCode::Data(Data::Text) if frame.is_final => {
                    // The common case: a whole message in one frame, lent without a copy.
                    std::str::from_utf8(payload).map_err(|_| Violation::InvalidUtf8)?;
                    on_message(Incoming::Text(payload));
                }
                OpCode::Data(Data::Text) | OpCode::Data(Data::Continue) => {
                    self.push_fragment(payload, frame.is_final)?;
                    if frame.is_final {
                        on_message(Incoming::Text(&mut self.fragments));
                        // Free the buffer: an idle connection owns no heap memory.
                        self.fragments = Vec::new();
                        self.in_progress = false;
                    }
                }
                OpCode::Control(Control::Ping) => on_message(Incoming::Ping(payload)),
                OpCode::Control(Control::Pong) => on_message(Incoming::Pong(payload)),
                OpCode::Control(Control::Close) => {
                    on_message(Incoming::Close(parse_close(payload)?));
                    break;
                }
                // `check_header` refuses these; listed so the match stays exhaustive without a panic.
                OpCode::Data(Data::Binary | Data::Reserved(_))
                | OpCode::Control(Control::Reserved(_)) => {
                    return Err(Violation::Protocol("unexpected opcode"));
                }
            }
        }
        Ok(consumed)
    }

    /// Bytes held for a fragmented message in progress (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.fragments.len()
    }

    /// Parses the frame header at the start of `buf` and applies every rule that the header alone
    /// decides. `Ok(None)` means the header is not complete yet.
    fn check_header(
        &self,
        buf: &[u8],
        max_message: usize,
    ) -> Result<Option<CheckedHeader>, Violation> {
        let mut cursor = Cursor::new(buf);
        // tungstenite's only error here is a reserved opcode (reading from a slice cannot fail).
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            Err(_) => return Err(Violation::Protocol("reserved opcode")),
        };
        // The cursor stopped at the end of the header, inside `buf`, so this cannot truncate.
        let header_len = cursor.position() as usize;

        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Violation::Protocol(
                "reserved bits set without an extension",
            ));
        }
        let Some(mask) = header.mask else {
            return Err(Violation::Protocol("client frame not masked"));
        };

        // The room left for this frame's payload: the whole limit, or what a fragmented message has
        // not used yet. Compared as u64 so that a 64-bit length is never truncated first.
        let room = match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(Violation::Protocol("reserved opcode"));
            }
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(Violation::Protocol("fragmented control frame"));
                }
                if length > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frame over 125 bytes"));
                }
                MAX_CONTROL_PAYLOAD
            }
            OpCode::Data(Data::Continue) => {
                if !self.in_progress {
                    return Err(Violation::Protocol("continuation without a message"));
                }
                max_message.saturating_sub(self.fragments.len())
            }
            OpCode::Data(Data::Text | Data::Binary) if self.in_progress => {
                return Err(Violation::Protocol("new message inside a fragmented one"));
            }
            // Refused on sight, before its payload arrives: there is nothing to wait for.
            OpCode::Data(Data::Binary) => return Err(Violation::NotText),
            OpCode::Data(Data::Text) => max_message,
        };
        if length > room as u64 {
            return Err(Violation::TooBig);
        }

        Ok(Some(CheckedHeader {
            opcode: header.opcode,
            is_final: header.is_final,
            mask,
            header_len,
            // `length <= room`, a usize, so this is lossless.
            payload_len: length as usize,
        }))
    }

    /// Appends one unmasked fragment of a text message and checks the UTF-8 it adds. A first (text)
    /// fragment starts the message.
    fn push_fragment(&mut self, payload: &[u8], is_final: bool) -> Result<(), Violation> {
        self.in_progress = true;
        let old_len = self.fragments.len();
        // Amortised growth, not `reserve_exact`: many tiny fragments must not cost a copy each. The
        // capacity stays below twice `max_message`, which `check_header` enforced on the total.
        self.fragments.extend_from_slice(payload);
        check_utf8_tail(&self.fragments, old_len, is_final)
    }
}

/// Checks `text`, whose first `old_len` bytes were already checked, valid UTF-8 except maybe a cut last
/// character. The scan restarts at that last character, so each byte is checked about once however
/// the client fragments the message. With `complete`, a cut character at the very end is an error too.
fn check_utf8_tail(text: &[u8], old_len: usize, complete: bool) -> Result<(), Violation> {
    /// A character is at most 4 bytes: a lead byte and up to 3 continuation bytes.
    const MAX_CHAR_LEN: usize = 4;
    let mut start = old_len;
    while start > 0 && old_len - start < MAX_CHAR_LEN {
        start -= 1;
        if !is_utf8_continuation(text[start]) {
            break;
        }
    }
    match std::str::from_utf8(&text[start..]) {
        Ok(_) => Ok(()),
        // `error_len() == None`: the input ends inside a character that the next fragment may finish.
        Err(e) if e.error_len().is_none() && !complete => Ok(()),
        Err(_) => Err(Violation::InvalidUtf8),
    }
}

/// A UTF-8 continuation byte is `0b10xx_xxxx`.
fn is_utf8_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// Reads a close payload (RFC 6455 section 5.5.1): nothing, or a status code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::Protocol("close payload of 1 byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(Violation::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Whether a close code may be sent on the wire (RFC 6455 section 7.4 and the IANA registry): the
/// defined codes except those reserved for local use (1004, 1005, 1006, 1015), and the
/// library/application range 3000-4999.
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `payload` with the client's masking key (RFC 6455 section 5.3). Eight bytes at a time: every
/// client byte goes through here, and the key repeats every 4 bytes, so a doubled key lines up with any
/// 8-byte chunk that starts at a multiple of 8.
fn unmask(payload: &mut [u8], mask: [u8; MASK_LEN]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, hence of 4: the key starts over at its first byte.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % MASK_LEN];
    }
}

/// Appends the header of a final, unmasked server frame carrying `len` payload bytes.
fn write_header(opcode: OpCode, len: usize, out: &mut Vec<u8>) {
    let header = FrameHeader {
        is_final: true,
        opcode,
        mask: None,
        ..FrameHeader::default()
    };
    header.format(len as u64, out).expect(VEC_WRITE_INFALLIBLE);
}

/// One whole server frame, header and payload, in a buffer of exactly the right size.
fn encode(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_SERVER_HEADER + payload.len());
    write_header(opcode, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out
}

/// A text frame carrying `payload`, which the caller guarantees is UTF-8 (our JSON always is).
pub fn encode_text(payload: &[u8]) -> Vec<u8> {
    encode(OpCode::Data(Data::Text), payload)
}

/// A ping frame (the heartbeat). `payload` must be at most 125 bytes.
pub fn encode_ping(payload: &[u8]) -> Vec<u8> {
    debug_assert!(
        payload.len() <= MAX_CONTROL_PAYLOAD,
        "ping payload over 125 bytes"
    );
    encode(OpCode::Control(Control::Ping), payload)
}

/// A pong frame echoing a client's ping payload, which the decoder has already bounded to 125 bytes.
pub fn encode_pong(payload: &[u8]) -> Vec<u8> {
    debug_assert!(
        payload.len() <= MAX_CONTROL_PAYLOAD,
        "pong payload over 125 bytes"
    );
    encode(OpCode::Control(Control::Pong), payload)
}

/// A close frame with `code` (one of [`close_code`]) and `reason`, cut at a character boundary so the
/// payload stays within 125 bytes: a close reason is a hint for humans, so losing its tail is better
/// than sending an invalid frame.
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    debug_assert!(
        is_valid_close_code(code),
        "close code {code} may not be sent"
    );
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1; // Terminates: 0 is always a boundary.
    }
    let reason = &reason.as_bytes()[..cut];
    let mut out = Vec::with_capacity(MAX_SERVER_HEADER + CLOSE_CODE_LEN + reason.len());
    write_header(
        OpCode::Control(Control::Close),
        CLOSE_CODE_LEN + reason.len(),
        &mut out,
    );
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed, non-trivial masking key for test frames.
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    /// The API's default limit.
    const MAX: usize = 64 * 1024;

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const BINARY: OpCode = OpCode::Data(Data::Binary);
    const CONTINUE: OpCode = OpCode::Data(Data::Continue);
    const PING: OpCode = OpCode::Control(Control::Ping);
    const PONG: OpCode = OpCode::Control(Control::Pong);
    const CLOSE: OpCode = OpCode::Control(Control::Close);

    /// An owned copy of what the decoder delivered, so tests can compare after the borrow ends.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(String),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>),
    }

    /// A client frame built with tungstenite's own header formatter and a naive byte-by-byte mask, so
    /// the test encoder shares no code with the decoder under test.
    fn frame_with(header: FrameHeader, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mask = header.mask;
        out.extend(payload.iter().enumerate().map(|(i, b)| match mask {
            Some(m) => b ^ m[i % 4],
            None => *b,
        }));
        out
    }

    /// A masked client frame.
    fn client(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            is_final,
            opcode,
            mask: Some(MASK),
            ..FrameHeader::default()
        };
        frame_with(header, payload)
    }

    /// A masked, final client frame.
    fn fin(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        client(opcode, true, payload)
    }

    /// Runs the decoder over a copy of `bytes`, collecting what it delivered.
    fn decode_all(
        dec: &mut Decoder,
        bytes: &[u8],
        max: usize,
    ) -> (Result<usize, Violation>, Vec<Got>) {
        let mut buf = bytes.to_vec();
        let mut got = Vec::new();
        let res = dec.decode(&mut buf, max, |m| got.push(own(m)));
        (res, got)
    }

    fn own(m: Incoming<'_>) -> Got {
        match m {
            Incoming::Text(t) => {
                Got::Text(String::from_utf8(t.to_vec()).expect("delivered text is UTF-8"))
            }
            Incoming::Ping(p) => Got::Ping(p.to_vec()),
            Incoming::Pong(p) => Got::Pong(p.to_vec()),
            Incoming::Close(c) => Got::Close(c),
        }
    }

    /// Decoding `bytes` with a fresh decoder fails with `want`, whose close code is `code`.
    fn assert_violation(bytes: &[u8], max: usize, want: Violation, code: u16) {
        let (res, _) = decode_all(&mut Decoder::new(), bytes, max);
        assert_eq!(res, Err(want), "bytes {bytes:02x?}");
        assert_eq!(want.close_code(), code);
    }

    fn text(s: &str) -> Got {
        Got::Text(s.to_owned())
    }

    #[test]
    fn masked_text_frame_is_delivered_unmasked() {
        let bytes = fin(TEXT, br#"{"action":"ping"}"#);
        let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX);
        assert_eq!(res, Ok(bytes.len()));
        assert_eq!(got, vec![text(r#"{"action":"ping"}"#)]);
    }

    #[test]
    fn single_frame_text_is_lent_from_the_buffer_without_copy() {
        let mut buf = fin(TEXT, b"hello");
        let range = buf.as_ptr_range();
        let mut dec = Decoder::new();
        let mut seen = None;
        let n = dec
            .decode(&mut buf, MAX, |m| {
                if let Incoming::Text(t) = m {
                    seen = Some(t.as_ptr());
                    t[0] = b'j'; // Mutable, as simd-json needs.
                }
            })
            .unwrap();
        assert_eq!(n, buf.len());
        let ptr = seen.expect("text delivered");
        assert!(
            range.contains(&ptr),
            "text must point into the caller's buffer"
        );
        assert_eq!(&buf[buf.len() - 5..], b"jello");
        assert_eq!(
            dec.fragments.capacity(),
            0,
            "no heap memory for a single frame"
        );
    }

    #[test]
    fn two_frames_in_one_buffer_are_delivered_in_order() {
        let mut bytes = fin(TEXT, b"first");
        bytes.extend(fin(PING, b"beat"));
        bytes.extend(fin(TEXT, b"second"));
        let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX);
        assert_eq!(res, Ok(bytes.len()));
        assert_eq!(
            got,
            vec![text("first"), Got::Ping(b"beat".to_vec()), text("second")]
        );
    }

    #[test]
    fn partial_frames_are_not_consumed_at_any_split() {
        // 7-bit, 16-bit and 64-bit length encodings.
        for len in [5usize, 300, 70_000] {
            let payload = "x".repeat(len);
            let bytes = fin(TEXT, payload.as_bytes());
            for cut in 0..bytes.len() {
                let (res, got) = decode_all(&mut Decoder::new(), &bytes[..cut], MAX * 2);
                assert_eq!(res, Ok(0), "len {len}, cut {cut}");
                assert!(got.is_empty());
            }
            let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX * 2);
            assert_eq!(res, Ok(bytes.len()));
            assert_eq!(got, vec![Got::Text(payload)]);
        }
    }

    #[test]
    fn complete_frame_followed_by_partial_one_consumes_only_the_first() {
        let first = fin(TEXT, b"one");
        let second = fin(TEXT, b"two");
        for cut in 0..second.len() {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second[..cut]);
            let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX);
            assert_eq!(res, Ok(first.len()), "cut {cut}");
            assert_eq!(got, vec![text("one")]);
        }
    }

    /// Feeds a stream one byte at a time, keeping the unconsumed tail as the shard does.
    #[test]
    fn byte_by_byte_stream_with_caller_kept_tail() {
        let mut stream = fin(TEXT, b"alpha");
        stream.extend(client(TEXT, false, "be".as_bytes()));
        stream.extend(fin(PING, b"p"));
        stream.extend(fin(CONTINUE, "ta \u{20ac}".as_bytes()));
        stream.extend(fin(PONG, b""));
        stream.extend(fin(TEXT, "x".repeat(200).as_bytes()));
        let mut dec = Decoder::new();
        let mut tail = Vec::new();
        let mut got = Vec::new();
        for &b in &stream {
            tail.push(b);
            let n = dec.decode(&mut tail, MAX, |m| got.push(own(m))).unwrap();
            tail.drain(..n);
        }
        assert!(tail.is_empty());
        assert_eq!(
            got,
            vec![
                text("alpha"),
                Got::Ping(b"p".to_vec()),
                text("beta \u{20ac}"),
                Got::Pong(Vec::new()),
                Got::Text("x".repeat(200)),
            ]
        );
    }

    #[test]
    fn fragmented_text_with_interleaved_control_frames() {
        let mut dec = Decoder::new();
        let mut got = Vec::new();

        let mut part = client(TEXT, false, b"Hel");
        part.extend(fin(PING, b"are you there"));
        let mut buf = part.clone();
        assert_eq!(
            dec.decode(&mut buf, MAX, |m| got.push(own(m))),
            Ok(part.len())
        );
        assert_eq!(dec.buffered(), 3);

        let mut rest = client(CONTINUE, false, b"lo ");
        rest.extend(fin(PONG, b"ok"));
        rest.extend(fin(CONTINUE, b"world"));
        let mut buf = rest.clone();
        assert_eq!(
            dec.decode(&mut buf, MAX, |m| got.push(own(m))),
            Ok(rest.len())
        );

        assert_eq!(
            got,
            vec![
                Got::Ping(b"are you there".to_vec()),
                Got::Pong(b"ok".to_vec()),
                text("Hello world")
            ]
        );
        assert_eq!(dec.buffered(), 0);
        assert_eq!(
            dec.fragments.capacity(),
            0,
            "fragment buffer freed after delivery"
        );
        assert!(!dec.in_progress);

        // The decoder is ready for a new message, fragmented or not.
        let mut bytes = client(TEXT, false, b"");
        bytes.extend(fin(CONTINUE, b""));
        bytes.extend(fin(TEXT, b"next"));
        let (res, got) = decode_all(&mut dec, &bytes, MAX);
        assert_eq!(res, Ok(bytes.len()));
        assert_eq!(got, vec![text(""), text("next")]);
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let s = "a\u{e9}\u{20ac}\u{1f600}z"; // 1-, 2-, 3- and 4-byte characters.
        let bytes = s.as_bytes();
        // Every way of cutting the message into three fragments.
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut stream = client(TEXT, false, &bytes[..i]);
                stream.extend(client(CONTINUE, false, &bytes[i..j]));
                stream.extend(fin(CONTINUE, &bytes[j..]));
                let (res, got) = decode_all(&mut Decoder::new(), &stream, MAX);
                assert_eq!(res, Ok(stream.len()), "cuts {i},{j}");
                assert_eq!(got, vec![text(s)]);
            }
        }
    }

    #[test]
    fn one_byte_fragments_of_a_four_byte_character() {
        let bytes = "\u{1f600}".as_bytes();
        let mut stream = client(TEXT, false, &bytes[..1]);
        for b in &bytes[1..bytes.len() - 1] {
            stream.extend(client(CONTINUE, false, std::slice::from_ref(b)));
        }
        stream.extend(fin(CONTINUE, &bytes[bytes.len() - 1..]));
        let (res, got) = decode_all(&mut Decoder::new(), &stream, MAX);
        assert_eq!(res, Ok(stream.len()));
        assert_eq!(got, vec![text("\u{1f600}")]);
    }

    #[test]
    fn invalid_utf8_is_1007() {
        // A lone continuation byte, an overlong encoding, a surrogate, a byte never valid.
        for bad in [
            &[0x80][..],
            &[0xc0, 0xaf],
            &[0xed, 0xa0, 0x80],
            &[b'a', 0xff],
        ] {
            assert_violation(
                &fin(TEXT, bad),
                MAX,
                Violation::InvalidUtf8,
                close_code::INVALID_PAYLOAD,
            );
        }
        // A character cut at the end of a single-frame message.
        assert_violation(
            &fin(TEXT, &[b'a', 0xe2, 0x82]),
            MAX,
            Violation::InvalidUtf8,
            1007,
        );
    }

    #[test]
    fn invalid_utf8_in_a_fragment_fails_before_the_message_ends() {
        let bytes = client(TEXT, false, &[b'o', b'k', 0xff]);
        assert_violation(&bytes, MAX, Violation::InvalidUtf8, 1007);
        // Invalid only once joined: a lead byte followed by a non-continuation byte.
        let mut bytes = client(TEXT, false, &[0xe2]);
        bytes.extend(client(CONTINUE, false, b"a"));
        assert_violation(&bytes, MAX, Violation::InvalidUtf8, 1007);
    }

    #[test]
    fn fragmented_message_ending_inside_a_character_is_1007() {
        let mut bytes = client(TEXT, false, b"ok");
        bytes.extend(fin(CONTINUE, &[0xf0, 0x9f, 0x98]));
        assert_violation(&bytes, MAX, Violation::InvalidUtf8, 1007);
    }

    #[test]
    fn unmasked_frame_is_protocol_error() {
        let header = FrameHeader {
            opcode: TEXT,
            mask: None,
            ..FrameHeader::default()
        };
        let bytes = frame_with(header, b"hi");
        assert_eq!(bytes, [0x81, 0x02, b'h', b'i']); // Hand-checked wire bytes.
        assert_violation(
            &bytes,
            MAX,
            Violation::Protocol("client frame not masked"),
            1002,
        );
    }

    #[test]
    fn reserved_bits_are_protocol_errors() {
        for (rsv1, rsv2, rsv3) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let header = FrameHeader {
                opcode: TEXT,
                mask: Some(MASK),
                rsv1,
                rsv2,
                rsv3,
                ..FrameHeader::default()
            };
            let bytes = frame_with(header, b"hi");
            let (res, _) = decode_all(&mut Decoder::new(), &bytes, MAX);
            assert_eq!(
                res.map_err(|v| v.close_code()),
                Err(1002),
                "rsv {rsv1} {rsv2} {rsv3}"
            );
        }
    }

    #[test]
    fn reserved_opcodes_are_protocol_errors() {
        for op in (0x3..=0x7).chain(0xb..=0xf) {
            // Hand-made: FIN + opcode, masked, zero length, masking key.
            let bytes = [0x80 | op, 0x80, 1, 2, 3, 4];
            let (res, _) = decode_all(&mut Decoder::new(), &bytes, MAX);
            assert!(
                matches!(res, Err(Violation::Protocol(_))),
                "opcode {op:#x}: {res:?}"
            );
            assert_eq!(res.unwrap_err().close_code(), 1002);
        }
    }

    #[test]
    fn oversized_control_frames_are_protocol_errors() {
        // Starts with a valid close code, so that the close frame of 125 bytes is otherwise fine.
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.resize(MAX_CONTROL_PAYLOAD, b'a');
        for op in [PING, PONG, CLOSE] {
            let ok = fin(op, &payload);
            let (res, got) = decode_all(&mut Decoder::new(), &ok, MAX);
            assert_eq!(res, Ok(ok.len()), "{op:?} with 125 bytes");
            assert_eq!(got.len(), 1);
            let mut longer = payload.clone();
            longer.push(b'a');
            let bad = fin(op, &longer);
            assert_violation(
                &bad,
                MAX,
                Violation::Protocol("control frame over 125 bytes"),
                1002,
            );
            // Decided from the header alone (2 + 2 bytes of length + 4 of mask).
            assert_violation(
                &bad[..8],
                MAX,
                Violation::Protocol("control frame over 125 bytes"),
                1002,
            );
        }
    }

    #[test]
    fn fragmented_control_frames_are_protocol_errors() {
        for op in [PING, PONG, CLOSE] {
            let bytes = client(op, false, b"x");
            assert_violation(
                &bytes,
                MAX,
                Violation::Protocol("fragmented control frame"),
                1002,
            );
        }
    }

    #[test]
    fn continuation_without_message_is_protocol_error() {
        for is_final in [true, false] {
            let bytes = client(CONTINUE, is_final, b"x");
            assert_violation(
                &bytes,
                MAX,
                Violation::Protocol("continuation without a message"),
                1002,
            );
        }
        // Also right after a fragmented message has completed.
        let mut bytes = client(TEXT, false, b"a");
        bytes.extend(fin(CONTINUE, b"b"));
        bytes.extend(fin(CONTINUE, b"c"));
        let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX);
        assert_eq!(
            res,
            Err(Violation::Protocol("continuation without a message"))
        );
        assert_eq!(got, vec![text("ab")]);
    }

    #[test]
    fn new_message_inside_fragmented_one_is_protocol_error() {
        for op in [TEXT, BINARY] {
            for is_final in [true, false] {
                let mut bytes = client(TEXT, false, b"a");
                bytes.extend(client(op, is_final, b"b"));
                let want = Violation::Protocol("new message inside a fragmented one");
                assert_violation(&bytes, MAX, want, 1002);
            }
        }
    }

    #[test]
    fn binary_is_refused_from_its_header() {
        let bytes = fin(BINARY, &[0u8; 100]);
        assert_violation(
            &bytes,
            MAX,
            Violation::NotText,
            close_code::UNSUPPORTED_DATA,
        );
        // The header alone (2 + 4 bytes of mask) is enough; also for a first fragment.
        assert_violation(&bytes[..6], MAX, Violation::NotText, 1003);
        assert_violation(
            &client(BINARY, false, b"")[..6],
            MAX,
            Violation::NotText,
            1003,
        );
    }

    #[test]
    fn single_frame_size_limit() {
        let max = 300;
        let at_max = fin(TEXT, &vec![b'a'; max]);
        let (res, got) = decode_all(&mut Decoder::new(), &at_max, max);
        assert_eq!(res, Ok(at_max.len()));
        assert_eq!(got.len(), 1);

        let over = fin(TEXT, &vec![b'a'; max + 1]);
        assert_violation(&over, max, Violation::TooBig, close_code::TOO_BIG);
        // Decided from the 8-byte header, before any payload arrives.
        assert_violation(&over[..8], max, Violation::TooBig, 1009);
    }

    #[test]
    fn fragmented_message_size_limit() {
        let max = 10;
        let mut at_max = client(TEXT, false, b"12345");
        at_max.extend(client(CONTINUE, false, b"678"));
        at_max.extend(fin(CONTINUE, b"90"));
        let (res, got) = decode_all(&mut Decoder::new(), &at_max, max);
        assert_eq!(res, Ok(at_max.len()));
        assert_eq!(got, vec![text("1234567890")]);

        let mut over = client(TEXT, false, b"12345");
        over.extend(client(CONTINUE, false, b"678"));
        let last = fin(CONTINUE, b"901");
        // The last fragment's header alone (2 + 4 bytes) already exceeds the total.
        let mut header_only = over.clone();
        header_only.extend_from_slice(&last[..6]);
        assert_violation(&header_only, max, Violation::TooBig, 1009);
        over.extend(last);
        assert_violation(&over, max, Violation::TooBig, 1009);
    }

    #[test]
    fn huge_announced_lengths_never_allocate_or_overflow() {
        // 64-bit lengths up to u64::MAX, including ones with the top bit set.
        for len in [u64::MAX, 1 << 63, (1 << 63) - 1, 1 << 32, MAX as u64 + 1] {
            let mut bytes = vec![0x81, 0x80 | 127];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&MASK);
            assert_violation(&bytes, MAX, Violation::TooBig, 1009);
            // With no limit at all the frame is merely incomplete: nothing is buffered or allocated.
            let mut dec = Decoder::new();
            let (res, got) = decode_all(&mut dec, &bytes, usize::MAX);
            assert_eq!(res, Ok(0));
            assert!(got.is_empty());
            assert_eq!(dec.fragments.capacity(), 0);
        }
    }

    #[test]
    fn control_frames_inside_a_full_fragmented_message_are_not_limited_by_it() {
        let max = 4;
        let mut bytes = client(TEXT, false, b"abcd");
        bytes.extend(fin(PING, b"ping payload longer than max"));
        bytes.extend(fin(CONTINUE, b""));
        let (res, got) = decode_all(&mut Decoder::new(), &bytes, max);
        assert_eq!(res, Ok(bytes.len()));
        assert_eq!(
            got,
            vec![
                Got::Ping(b"ping payload longer than max".to_vec()),
                text("abcd")
            ]
        );
    }

    #[test]
    fn close_with_code_and_reason_stops_decoding() {
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye \u{e9}".as_bytes());
        let close = fin(CLOSE, &payload);
        let mut bytes = close.clone();
        bytes.extend(fin(TEXT, b"after close"));
        let (res, got) = decode_all(&mut Decoder::new(), &bytes, MAX);
        assert_eq!(
            res,
            Ok(close.len()),
            "bytes after the close are not consumed"
        );
        assert_eq!(got, vec![Got::Close(Some(1001))]);
    }

    #[test]
    fn empty_close_is_none() {
        let (res, got) = decode_all(&mut Decoder::new(), &fin(CLOSE, b""), MAX);
        assert_eq!(res, Ok(6));
        assert_eq!(got, vec![Got::Close(None)]);
    }

    #[test]
    fn one_byte_close_is_protocol_error() {
        let want = Violation::Protocol("close payload of 1 byte");
        assert_violation(&fin(CLOSE, &[0x03]), MAX, want, 1002);
    }

    #[test]
    fn close_codes_allowed_on_the_wire() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ];
        for code in valid {
            let (res, got) = decode_all(
                &mut Decoder::new(),
                &fin(CLOSE, &u16::to_be_bytes(code)),
                MAX,
            );
            assert!(res.is_ok(), "code {code}");
            assert_eq!(got, vec![Got::Close(Some(code))]);
        }
        let invalid = [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in invalid {
            let bytes = fin(CLOSE, &u16::to_be_bytes(code));
            assert_violation(&bytes, MAX, Violation::Protocol("invalid close code"), 1002);
        }
    }

    #[test]
    fn close_reason_must_be_utf8() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(&[b'o', 0xff]);
        assert_violation(&fin(CLOSE, &payload), MAX, Violation::InvalidUtf8, 1007);
    }

    #[test]
    fn violation_codes_and_reasons() {
        let cases = [
            (Violation::Protocol("why"), 1002, "why"),
            (
                Violation::NotText,
                1003,
                "binary messages are not supported",
            ),
            (Violation::InvalidUtf8, 1007, "invalid UTF-8"),
            (Violation::TooBig, 1009, "message too big"),
        ];
        for (v, code, reason) in cases {
            assert_eq!(v.close_code(), code);
            assert_eq!(v.reason(), reason);
            assert!(v.reason().len() <= MAX_CLOSE_REASON);
            assert_eq!(v.to_string(), format!("{reason} ({code})"));
        }
    }

    #[test]
    fn unmask_matches_naive_xor_at_every_length() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut fast = original.clone();
            unmask(&mut fast, MASK);
            let naive: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, naive, "len {len}");
        }
    }

    /// Parses one server frame with tungstenite's parser: header, and payload of the announced length.
    fn parse_server(frame: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut cursor = Cursor::new(frame);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .unwrap()
            .expect("complete header");
        let start = cursor.position() as usize;
        assert_eq!(
            frame.len() - start,
            len as usize,
            "frame is exactly header + payload"
        );
        (header, frame[start..].to_vec())
    }

    /// One of the `encode_*` functions taking a payload.
    type Encoder = fn(&[u8]) -> Vec<u8>;

    #[test]
    fn encoded_frames_parse_with_tungstenite() {
        let cases: [(Encoder, OpCode); 3] = [
            (encode_text, TEXT),
            (encode_ping, PING),
            (encode_pong, PONG),
        ];
        for (encoder, opcode) in cases {
            for len in [0usize, 1, 125] {
                let payload = vec![b'z'; len];
                let (header, body) = parse_server(&encoder(&payload));
                assert_eq!(header.opcode, opcode);
                assert!(header.is_final);
                assert_eq!(header.mask, None, "server frames are never masked");
                assert!(!header.rsv1 && !header.rsv2 && !header.rsv3);
                assert_eq!(body, payload);
            }
        }
        // Every length encoding of a text frame.
        for len in [126usize, 65_535, 65_536, 100_000] {
            let payload = vec![b'q'; len];
            let frame = encode_text(&payload);
            assert_eq!(
                frame.len(),
                payload.len() + if len <= 65_535 { 4 } else { 10 }
            );
            let (header, body) = parse_server(&frame);
            assert_eq!(header.opcode, TEXT);
            assert_eq!(body, payload);
        }
    }

    /// The header the deliveries' frames are built with (`delivery::frame`) is this codec's.
    #[test]
    fn write_text_header_matches_encode_text() {
        use crate::delivery::frame::write_text_header;
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let payload = vec![b'j'; len];
            let mut out = b"prefix".to_vec();
            write_text_header(len, &mut out);
            out.extend_from_slice(&payload);
            assert_eq!(&out[..6], b"prefix", "header appended, not written over");
            assert_eq!(out[6..], encode_text(&payload));
        }
    }

    #[test]
    fn encode_close_round_trips_through_both_parsers() {
        let frame = encode_close(close_code::GOING_AWAY, "server shutting down");
        let (header, body) = parse_server(&frame);
        assert_eq!(header.opcode, CLOSE);
        assert_eq!(&body[..2], &1001u16.to_be_bytes());
        assert_eq!(&body[2..], b"server shutting down");
        // Masked as a client would send it, our decoder reads it back.
        let (res, got) = decode_all(&mut Decoder::new(), &fin(CLOSE, &body), MAX);
        assert_eq!(res.map(|_| ()), Ok(()));
        assert_eq!(got, vec![Got::Close(Some(1001))]);
    }

    #[test]
    fn encode_close_cuts_long_reasons_at_a_character_boundary() {
        // 2-byte characters: 123 is odd, so the cut must back off to 122 bytes.
        let reason = "\u{e9}".repeat(100);
        let (_, body) = parse_server(&encode_close(close_code::POLICY, &reason));
        assert_eq!(body.len(), CLOSE_CODE_LEN + 122);
        let kept = std::str::from_utf8(&body[2..]).expect("reason stays UTF-8");
        assert!(reason.starts_with(kept));

        // ASCII fills the payload exactly to 125 bytes.
        let (_, body) = parse_server(&encode_close(close_code::POLICY, &"a".repeat(500)));
        assert_eq!(body.len(), MAX_CONTROL_PAYLOAD);

        // Short reasons and the empty reason are kept whole.
        let (_, body) = parse_server(&encode_close(close_code::NORMAL, ""));
        assert_eq!(body, 1000u16.to_be_bytes());
    }

    #[test]
    fn decoder_is_small_and_idle_owns_no_heap() {
        assert!(
            std::mem::size_of::<Decoder>() <= 40,
            "{}",
            std::mem::size_of::<Decoder>()
        );
        let dec = Decoder::new();
        assert_eq!(dec.fragments.capacity(), 0);
        assert_eq!(dec.buffered(), 0);
    }

    /// xorshift64: deterministic pseudo-random bytes without an extra crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            fin(TEXT, "h\u{e9}llo".as_bytes()),
            client(TEXT, false, b"frag"),
            fin(CONTINUE, b"ment"),
            fin(PING, b"p"),
            fin(CLOSE, &1000u16.to_be_bytes()),
            fin(TEXT, &[b'a'; 130]),
        ];
        for round in 0..20_000 {
            // Half pure noise, half valid frames with a few bytes flipped, to reach deeper states.
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else {
                let mut v = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    v.extend_from_slice(&seeds[rng.below(seeds.len())]);
                }
                for _ in 0..rng.below(4) {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                v
            };
            let max = [0, 1, 16, 125, MAX, usize::MAX][rng.below(6)];
            let len = bytes.len();
            let mut dec = Decoder::new();
            // Deliver in two chunks, as the caller would after a short read.
            let split = rng.below(len + 1);
            let mut total = 0;
            let mut ok = true;
            let mut tail = bytes[..split].to_vec();
            for chunk in [&[][..], &bytes[split..]] {
                tail.extend_from_slice(chunk);
                match dec.decode(&mut tail, max, |_| {}) {
                    Ok(n) => {
                        assert!(n <= tail.len());
                        total += n;
                        tail.drain(..n);
                    }
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                assert!(total <= len);
            }
            assert!(dec.buffered() <= max.min(len));
        }
    }
}
