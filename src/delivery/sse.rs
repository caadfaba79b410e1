//! The Server-Sent Events wire (the `text/event-stream` format of the HTML standard) of API.md's
//! "Streams without WebSocket": a notification is `event: notification`, `id: <its id>` and `data:
//! <its JSON>`; every control event is `event: <name>` and `data: <the same JSON as on a WebSocket>`.
//!
//! Here, in the delivery leaf, because the shards encode deliveries in it (`Encoding::Sse`) and the SSE
//! session writes its control events and replays in it, and neither may depend on the other. JSON never
//! holds a raw line break (the serializer escapes them in strings), so each event's data is one line.

use bytes::Bytes;
use uuid::Uuid;

use crate::delivery::frame::frame_payload;

/// The heartbeat: a comment line, which `EventSource` ignores, so a proxy or a client sees traffic on an
/// idle stream and a dead peer shows as a send error. Made once per shard, like the WebSocket ping.
pub const PING: &[u8] = b": ping\n\n";

/// Builds one event named `name` (with `id`, when the event is a stored notification) whose data is the
/// JSON written by `write`.
pub fn event(
    name: &str,
    id: Option<Uuid>,
    json_hint: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Bytes {
    let mut out = Vec::with_capacity(json_hint + name.len() + 64);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(
            id.hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    write(&mut out);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// A stored notification's event: `event: notification`, its id, its JSON.
pub fn notification(id: Uuid, json_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    event("notification", Some(id), json_hint, write)
}

/// The event of a control JSON object (`{"event":"<name>",…}`): named by its `event` field, with the
/// object as its data. Every control event the WebSocket protocol makes becomes an SSE event this way,
/// so an event added there needs nothing here.
pub fn control(json: &[u8]) -> Bytes {
    let name = event_name(json).unwrap_or("message");
    event(name, None, json.len(), |out| out.extend_from_slice(json))
}

/// [`control`] of a native WebSocket control frame (`ws::protocol`'s events), from its payload.
pub fn control_of_frame(frame: &Bytes) -> Bytes {
    control(&frame_payload(frame))
}

/// The name in a control object's leading `{"event":"<name>"`, as `ws::protocol` and the delivery's
/// client messages write it. A name is a plain word, so no escape needs decoding.
fn event_name(json: &[u8]) -> Option<&str> {
    let rest = json.strip_prefix(b"{\"event\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let name = std::str::from_utf8(&rest[..end]).ok()?;
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .then_some(name)
}

/// The `retry:` line that opens a stream: how many milliseconds an `EventSource` waits before it
/// reconnects after the stream ends.
pub fn retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::frame::text_frame;

    #[test]
    fn a_notification_is_one_event_with_its_id_and_one_data_line() {
        let id = Uuid::now_v7();
        let e = notification(id, 8, |out| out.extend_from_slice(b"{\"a\":1}"));
        assert_eq!(
            std::str::from_utf8(&e).unwrap(),
            format!("event: notification\nid: {id}\ndata: {{\"a\":1}}\n\n")
        );
    }

    #[test]
    fn a_control_frame_is_named_by_its_event_field() {
        let frame = text_frame(32, |out| {
            out.extend_from_slice(b"{\"event\":\"resumed\",\"count\":0}")
        });
        assert_eq!(
            &control_of_frame(&frame)[..],
            b"event: resumed\ndata: {\"event\":\"resumed\",\"count\":0}\n\n"
        );
        assert!(control(b"{\"x\":1}").starts_with(b"event: message\n"));
        assert!(control(b"{\"event\":\"a b\"}").starts_with(b"event: message\n"));
    }
}
