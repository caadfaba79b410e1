//! Fuzz target: the client JSON protocol (`ws::protocol::parse_action`) and the events the session
//! answers with.
//!
//! The input is the payload of one text message. The decoder only hands over valid UTF-8, but the
//! parser is also fed invalid UTF-8: it must refuse it cleanly, not trust the caller. Besides "never
//! panics", it asserts that an accepted action is valid (non-empty lists of valid channel names,
//! `data` that is JSON) and that every answer the session would send (`error`, `subscribed`) is a
//! text frame holding valid JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use notification_service::json_depth::MAX_MAX_JSON_DEPTH;
use notification_service::model::is_valid_channel;
use notification_service::ws::protocol::{channels_event, error_event, parse_action, Action};

fuzz_target!(|data: &[u8]| {
    // simd-json parses in place, so it gets its own copy, like the session's unmasked payload.
    let mut text = data.to_vec();
    // The deepest nesting an operator may allow, so the deepest recursion is exercised.
    match parse_action(&mut text, MAX_MAX_JSON_DEPTH) {
        Ok(Action::Subscribe(channels)) | Ok(Action::Unsubscribe(channels)) => {
            assert!(!channels.is_empty());
            assert!(channels.iter().all(|c| is_valid_channel(c)));
            let event = frame_json(&channels_event("subscribed", &channels));
            assert_eq!(
                event["channels"].as_array().map(Vec::len),
                Some(channels.len())
            );
        }
        Ok(Action::Publish { channel, data }) => {
            assert!(is_valid_channel(&channel));
            let value: serde_json::Value =
                serde_json::from_str(&data).expect("publish data is re-encoded JSON");
            assert!(!value.is_null());
        }
        Ok(Action::Refresh(token)) => assert!(!token.is_empty()),
        Ok(Action::Seen(ids)) => assert!(!ids.is_empty()),
        Ok(Action::Presence(channel)) => assert!(is_valid_channel(&channel)),
        Ok(Action::Ping | Action::Read(_) | Action::Resume(_)) => {}
        Err(e) => {
            assert!(!e.code.is_empty());
            assert!(!e.message.is_empty());
            let event = frame_json(&error_event(e.code, &e.message));
            assert_eq!(event["event"], "error");
            assert_eq!(event["message"].as_str(), Some(e.message.as_str()));
        }
    }
});

/// The JSON payload of one unmasked server text frame.
fn frame_json(frame: &[u8]) -> serde_json::Value {
    assert_eq!(frame[0], 0x81, "a final text frame");
    let (header_len, len) = match frame[1] {
        126 => (4, usize::from(u16::from_be_bytes([frame[2], frame[3]]))),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&frame[2..10]);
            (10, usize::try_from(u64::from_be_bytes(n)).unwrap())
        }
        n => (2, usize::from(n)),
    };
    assert_eq!(
        frame.len(),
        header_len + len,
        "header length matches the payload"
    );
    serde_json::from_slice(&frame[header_len..]).expect("the event is JSON")
}
