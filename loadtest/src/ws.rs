//! The little of WebSocket (RFC 6455) a load client needs, written by hand so an idle client owns no
//! library state: the upgrade request and the check of its answer, reading the server's frames
//! (unmasked), and the masked pong that keeps the server's heartbeat satisfied.
//!
//! The answer's `Sec-WebSocket-Accept` is not verified (that needs SHA-1); a `101` status line is
//! taken as an accepted upgrade. Keys and masks come from a small non-cryptographic generator, which
//! is all a test client needs: the server only requires that they be present and well formed.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest upgrade response accepted. Real ones are about 150 bytes; a longer one means the peer is
/// not the expected server.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Bytes read at a time while waiting for the end of the response head.
const RESPONSE_READ_CHUNK: usize = 1024;

/// Longest frame payload the client will buffer before calling the stream broken. The server's own
/// limit is 64 KiB; anything far beyond that is a framing error, not a message.
pub const MAX_FRAME_PAYLOAD: u64 = 16 * 1024 * 1024;

/// Longest control-frame payload allowed by RFC 6455.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes the client reacts to.
pub mod opcode {
    /// A text frame: every message of the protocol.
    pub const TEXT: u8 = 0x1;
    /// The peer is closing the connection.
    pub const CLOSE: u8 = 0x8;
    /// A heartbeat the client must answer with a pong carrying the same payload.
    pub const PING: u8 = 0x9;
    /// The answer to a ping.
    pub const PONG: u8 = 0xA;
}

/// Why an upgrade did not produce a WebSocket.
#[derive(Debug)]
pub enum HandshakeError {
    /// Writing the request or reading the response failed (including timeouts).
    Io(io::Error),
    /// The server closed the connection before the response head was complete.
    Closed,
    /// The response head was longer than [`MAX_RESPONSE_HEAD`].
    TooLong,
    /// The status line was not `HTTP/1.x 101`; holds the status line as received.
    Rejected(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "handshake i/o: {e}"),
            HandshakeError::Closed => write!(f, "handshake: server closed the connection"),
            HandshakeError::TooLong => write!(f, "handshake: response head too long"),
            HandshakeError::Rejected(line) => write!(f, "handshake rejected: {line}"),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// A small xorshift generator for handshake keys and frame masks; seeded per thread.
pub struct KeyGen(u64);

impl KeyGen {
    /// A generator seeded from the clock, the process id and `salt` (a thread or connection number),
    /// so concurrent threads and processes do not produce the same keys.
    pub fn new(salt: u64) -> KeyGen {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // Zero is the one state xorshift cannot leave.
        KeyGen(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
    pub fn websocket_key(&mut self) -> String {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        raw[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        base64(&raw)
    }
}

/// Standard base64 with padding (RFC 4648), enough for a handshake key.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 0x3F) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The upgrade request for `path` (which already carries the query), as bytes ready to write.
pub fn upgrade_request(host_header: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {host_header}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\
         \r\n"
    )
}

/// Whether a response status line accepts the upgrade.
pub fn is_switching_protocols(status_line: &str) -> bool {
    let mut parts = status_line.split_ascii_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(version), Some("101")) if version.starts_with("HTTP/1.")
    )
}

/// Sends the upgrade request and waits for a `101` answer on a blocking stream (whose read timeout
/// the caller has set). Returns the bytes that came after the response head: the start of the server's
/// first frames, which the caller must parse before anything it reads next.
pub fn client_handshake(
    stream: &mut TcpStream,
    host_header: &str,
    path: &str,
    key: &str,
) -> Result<Vec<u8>, HandshakeError> {
    stream.write_all(upgrade_request(host_header, path, key).as_bytes())?;
    read_response_head(stream, is_switching_protocols)
}

/// Opens a Server-Sent Events stream on a blocking stream: `GET path` and a `200` answer. Returns the
/// bytes after the response head, the start of the first events.
pub fn open_event_stream(
    stream: &mut TcpStream,
    host_header: &str,
    path: &str,
) -> Result<Vec<u8>, HandshakeError> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    read_response_head(stream, |status_line| {
        status_line.split_ascii_whitespace().nth(1) == Some("200")
    })
}

/// Reads a response head; if `accepted` takes its status line, returns the bytes that followed it.
fn read_response_head(
    stream: &mut TcpStream,
    accepted: impl Fn(&str) -> bool,
) -> Result<Vec<u8>, HandshakeError> {
    let mut head = Vec::with_capacity(RESPONSE_READ_CHUNK);
    let mut chunk = [0u8; RESPONSE_READ_CHUNK];
    let head_end = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&head) {
            break end;
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(HandshakeError::TooLong);
        }
    };
    let status_line = head[..head_end]
        .split(|&b| b == b'\r')
        .next()
        .unwrap_or_default();
    let status_line = String::from_utf8_lossy(status_line);
    if accepted(&status_line) {
        head.drain(..head_end);
        Ok(head)
    } else {
        Err(HandshakeError::Rejected(status_line.into_owned()))
    }
}

/// The length of the response head including its closing blank line, once it is all in `buf`.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// One complete frame found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHead {
    /// The frame's opcode (see [`opcode`]).
    pub opcode: u8,
    /// Where the payload lies in the buffer that was parsed.
    pub payload: std::ops::Range<usize>,
    /// Bytes the whole frame occupies; the next frame starts there.
    pub len: usize,
}

/// A byte stream that cannot be WebSocket frames from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A payload longer than [`MAX_FRAME_PAYLOAD`].
    TooBig(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooBig(n) => write!(f, "frame payload of {n} bytes"),
        }
    }
}

/// Parses the frame at the start of `buf`: `Ok(None)` while it is incomplete.
///
/// Server frames are unmasked, but a mask is skipped (and left applied) rather than refused: the
/// client only looks inside pings, and echoing them masked or not is the server's concern.
pub fn parse_frame(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (payload_len, mut at) = match buf[1] & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut eight = [0u8; 8];
            eight.copy_from_slice(b);
            (u64::from_be_bytes(eight), 10)
        }
        n => (u64::from(n), 2),
    };
    if payload_len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooBig(payload_len));
    }
    if masked {
        at += 4;
    }
    let end = at + payload_len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(FrameHead {
        opcode,
        payload: at..end,
        len: end,
    }))
}

/// Appends a masked client text frame carrying `payload`, as every client frame must be masked.
pub fn write_masked_text_frame(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode::TEXT);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The message protocol spoken over the WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// This server's own protocol (`/ws`, `{"action":"subscribe"}`).
    #[default]
    Native,
    /// The Pusher Channels protocol 7 (`/app/KEY`, `pusher:subscribe`).
    Pusher,
    /// Not a WebSocket: this server's Server-Sent Events stream
    /// (`GET /api/v1/notifications/stream`), subscribed by its `channels=` parameter.
    Sse,
}

impl Protocol {
    /// The subscribe request for `channel`, and what the server's success answer contains.
    fn subscribe(self, channel: &str) -> (String, &'static [u8]) {
        match self {
            // The channel both as `channels` (this server's form) and `channel`, so a reference hub
            // that takes the singular form understands it too.
            // An SSE stream subscribes through its URL and never sends a message.
            Protocol::Native | Protocol::Sse => (
                format!(
                    "{{\"action\":\"subscribe\",\"channels\":[\"{channel}\"],\"channel\":\"{channel}\"}}"
                ),
                b"subscribed",
            ),
            Protocol::Pusher => (
                crate::pusher::subscribe_message(channel),
                crate::pusher::SUBSCRIBED_EVENT,
            ),
        }
    }

    /// Whether a text frame is the server refusing something.
    fn is_error(self, payload: &[u8]) -> bool {
        match self {
            Protocol::Native | Protocol::Sse => {
                memchr::memmem::find(payload, b"\"error\"").is_some()
            }
            Protocol::Pusher => crate::pusher::ERROR_EVENTS
                .iter()
                .any(|e| memchr::memmem::find(payload, e).is_some()),
        }
    }
}

/// Subscribes a freshly upgraded blocking stream to `channel` in `protocol` and waits (within the
/// stream's read timeout) for the server's answer, so nothing published afterwards can be missed.
/// `pending` holds bytes already read (from [`client_handshake`]); on return it holds whatever came
/// after the answer.
pub fn subscribe_and_wait(
    stream: &mut TcpStream,
    channel: &str,
    pending: &mut Vec<u8>,
    keys: &mut KeyGen,
    protocol: Protocol,
) -> Result<(), HandshakeError> {
    let (request, success) = protocol.subscribe(channel);
    let mut frame = Vec::with_capacity(request.len() + 8);
    write_masked_text_frame(
        &mut frame,
        request.as_bytes(),
        (keys.next_u64() as u32).to_ne_bytes(),
    );
    stream.write_all(&frame)?;
    let mut chunk = [0u8; RESPONSE_READ_CHUNK];
    loop {
        while let Some(head) =
            parse_frame(pending).map_err(|e| HandshakeError::Rejected(e.to_string()))?
        {
            let payload = &pending[head.payload.clone()];
            let acked =
                head.opcode == opcode::TEXT && memchr::memmem::find(payload, success).is_some();
            if head.opcode == opcode::CLOSE {
                return Err(HandshakeError::Closed);
            }
            if let Some(error) = (head.opcode == opcode::TEXT && protocol.is_error(payload))
                .then(|| String::from_utf8_lossy(payload).into_owned())
            {
                return Err(HandshakeError::Rejected(error));
            }
            pending.drain(..head.len);
            if acked {
                return Ok(());
            }
        }
        if pending.len() > MAX_RESPONSE_HEAD {
            return Err(HandshakeError::TooLong);
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// A pong frame echoing `payload`, masked with `mask` as every client frame must be.
pub fn pong_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    // A longer ping breaks RFC 6455; echo what fits rather than fail the connection.
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | opcode::PONG);
    frame.push(0x80 | payload.len() as u8);
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn a_websocket_key_is_16_bytes_of_base64_and_changes() {
        let mut keys = KeyGen::new(1);
        let a = keys.websocket_key();
        let b = keys.websocket_key();
        assert_eq!(a.len(), 24);
        assert!(a.ends_with("=="));
        assert_ne!(a, b);
    }

    #[test]
    fn the_upgrade_request_carries_the_headers_rfc_6455_requires() {
        let req = upgrade_request(
            "127.0.0.1:8080",
            "/ws?user_id=u1",
            "dGhlIHNhbXBsZSBub25jZQ==",
        );
        assert!(req.starts_with("GET /ws?user_id=u1 HTTP/1.1\r\n"));
        for header in [
            "Host: 127.0.0.1:8080\r\n",
            "Upgrade: websocket\r\n",
            "Connection: Upgrade\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Version: 13\r\n",
        ] {
            assert!(req.contains(header), "missing {header:?}");
        }
        assert!(req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn only_a_101_status_accepts_the_upgrade() {
        assert!(is_switching_protocols("HTTP/1.1 101 Switching Protocols"));
        assert!(is_switching_protocols("HTTP/1.0 101"));
        assert!(!is_switching_protocols("HTTP/1.1 200 OK"));
        assert!(!is_switching_protocols("HTTP/1.1 400 Bad Request"));
        assert!(!is_switching_protocols("SSH-2.0-OpenSSH 101"));
        assert!(!is_switching_protocols(""));
    }

    #[test]
    fn frames_are_parsed_once_complete() {
        let text = [0x81, 0x02, b'h', b'i', 0x89, 0x01];
        let first = parse_frame(&text).unwrap().unwrap();
        assert_eq!(first.opcode, 0x1);
        assert_eq!(&text[first.payload.clone()], b"hi");
        assert_eq!(first.len, 4);
        // The ping after it is missing its payload byte.
        assert_eq!(parse_frame(&text[4..]).unwrap(), None);
        assert_eq!(parse_frame(&[0x81]).unwrap(), None);
    }

    #[test]
    fn extended_lengths_are_read() {
        let mut medium = vec![0x82, 126, 0x01, 0x00];
        medium.extend(std::iter::repeat_n(7u8, 256));
        let head = parse_frame(&medium).unwrap().unwrap();
        assert_eq!(head.payload, 4..260);
        assert_eq!(parse_frame(&medium[..100]).unwrap(), None);

        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_FRAME_PAYLOAD + 1).to_be_bytes());
        assert_eq!(
            parse_frame(&huge),
            Err(FrameError::TooBig(MAX_FRAME_PAYLOAD + 1))
        );
    }

    #[test]
    fn a_pong_echoes_the_ping_payload_masked() {
        let mask = [1, 2, 3, 4];
        let pong = pong_frame(b"abc", mask);
        assert_eq!(pong[0], 0x8A);
        assert_eq!(pong[1], 0x80 | 3);
        assert_eq!(&pong[2..6], &mask);
        let unmasked: Vec<u8> = pong[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, b"abc");
    }
}
