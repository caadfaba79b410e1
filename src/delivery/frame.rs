//! The server's WebSocket text frame, built once per delivery and written as is to every native
//! WebSocket that receives it.
//!
//! Only the header of a final, unmasked text frame is needed here (RFC 6455 section 5.2; server frames
//! are never masked or fragmented), so the JSON is serialized straight after it into one buffer. It is
//! in this leaf, not in `ws::codec`, because the threads that encode deliveries (the store thread's
//! fan-out, the bus thread) must not depend on the WebSocket session's side of the crate.

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Appends a text frame header for a payload of `len` bytes, so a caller can serialize the JSON right
/// after it in the same buffer instead of copying it into a frame afterwards.
pub fn write_text_header(len: usize, out: &mut Vec<u8>) {
    let header = FrameHeader {
        is_final: true,
        opcode: OpCode::Data(Data::Text),
        mask: None,
        ..FrameHeader::default()
    };
    header
        .format(len as u64, out)
        .expect("writing to a Vec cannot fail");
}

/// Builds a complete server text frame around a JSON payload written by `write`.
pub fn text_frame(payload_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut payload = Vec::with_capacity(payload_hint);
    write(&mut payload);
    let mut frame = Vec::with_capacity(payload.len() + 10);
    write_text_header(payload.len(), &mut frame);
    frame.extend_from_slice(&payload);
    Bytes::from(frame)
}

/// The payload of a complete server text frame built by [`text_frame`] (unmasked, so the header is 2, 4
/// or 10 bytes by the length's size), shared with the frame rather than copied.
pub fn frame_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}
