//! The JSON protocol spoken over a WebSocket (API.md, "WebSocket API"): client actions in, control events
//! out. This module knows nothing about sockets or shards: it turns text into [`Action`]s and events into
//! frames, so it can be tested (and fuzzed) alone.
//!
//! Client text is parsed in place with simd-json (the decoder hands us the unmasked payload mutably).
//! A malformed action is answered with an `error` event and the connection stays open: a client bug in
//! one message should not cost the user their live stream.

use bytes::Bytes;
use serde::Deserialize;
use uuid::Uuid;

use crate::delivery::frame::text_frame;
use crate::json_input::parse_object;
use crate::model::{validate_channel_list, write_json_str, write_json_str_array, FieldError};

/// A client request, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `{"action":"subscribe","channels":[...]}`.
    Subscribe(Vec<String>),
    /// `{"action":"unsubscribe","channels":[...]}`.
    Unsubscribe(Vec<String>),
    /// `{"action":"publish","channel":"...","data":{...}}`; `data` kept as JSON text.
    Publish {
        /// The channel to publish to (the sender must be subscribed).
        channel: String,
        /// The message's `data`, re-encoded as compact JSON.
        data: String,
    },
    /// `{"action":"ping"}`.
    Ping,
    /// `{"action":"read","id":"..."}`.
    Read(Uuid),
    /// `{"action":"resume","since":"<id>"}`.
    Resume(Uuid),
    /// `{"action":"refresh","token":"<jwt>"}`: a new token before the current one expires.
    Refresh(String),
    /// `{"action":"seen","ids":[...]}`: the ids as sent; the session checks them
    /// (`model::parse_notification_ids`) against `MAX_SEEN_IDS`, which this pure parser does not know.
    Seen(Vec<String>),
    /// `{"action":"presence","channel":"presence-…"}`: who is on a presence channel.
    Presence(String),
}

/// Why a client message was refused; sent back as an `error` event, the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// snake_case code for programs.
    pub code: &'static str,
    /// A sentence for people.
    pub message: String,
}

impl ProtocolError {
    fn new(code: &'static str, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

impl From<FieldError> for ProtocolError {
    fn from(e: FieldError) -> ProtocolError {
        ProtocolError::new("invalid_field", e.message)
    }
}

/// The union of every action's fields; which ones matter depends on `action`.
#[derive(Debug, Deserialize)]
struct RawAction {
    action: Option<String>,
    channels: Option<Vec<String>>,
    channel: Option<String>,
    data: Option<serde_json::Value>,
    id: Option<String>,
    since: Option<String>,
    token: Option<String>,
    ids: Option<Vec<String>>,
}

fn parse_id(field: &str, value: Option<String>) -> Result<Uuid, ProtocolError> {
    let value = value.ok_or_else(|| FieldError::new(field, "is required"))?;
    Uuid::parse_str(&value)
        .map_err(|_| FieldError::new(field, "must be a notification id (UUID)").into())
}

fn channel_list(value: Option<Vec<String>>) -> Result<Vec<String>, ProtocolError> {
    let channels = value.ok_or_else(|| FieldError::new("channels", "is required"))?;
    if channels.is_empty() {
        return Err(FieldError::new("channels", "must not be empty").into());
    }
    validate_channel_list("channels", &channels)?;
    Ok(channels)
}

/// Parses one client text message. `text` is modified (simd-json parses in place). JSON nesting deeper
/// than `max_depth` (`MAX_JSON_DEPTH`) is refused before parsing, and errors are worded as for HTTP
/// bodies (see `json_input`).
pub fn parse_action(text: &mut [u8], max_depth: usize) -> Result<Action, ProtocolError> {
    let raw: RawAction = parse_object(text, max_depth, "the message")
        .map_err(|e| ProtocolError::new("invalid_json", e.0))?;
    let action = raw
        .action
        .ok_or_else(|| ProtocolError::new("invalid_field", "action is required"))?;
    match action.as_str() {
        "subscribe" => Ok(Action::Subscribe(channel_list(raw.channels)?)),
        "unsubscribe" => Ok(Action::Unsubscribe(channel_list(raw.channels)?)),
        "publish" => {
            let channel = raw
                .channel
                .ok_or_else(|| FieldError::new("channel", "is required"))?;
            validate_channel_list("channel", std::slice::from_ref(&channel))
                .map_err(|_| FieldError::new("channel", "is not a valid channel name"))?;
            let data = match raw.data {
                None | Some(serde_json::Value::Null) => "{}".to_owned(),
                Some(v) => v.to_string(),
            };
            Ok(Action::Publish { channel, data })
        }
        "ping" => Ok(Action::Ping),
        "read" => Ok(Action::Read(parse_id("id", raw.id)?)),
        "resume" => Ok(Action::Resume(parse_id("since", raw.since)?)),
        "seen" => Ok(Action::Seen(
            raw.ids
                .ok_or_else(|| FieldError::new("ids", "is required"))?,
        )),
        "refresh" => match raw.token {
            Some(token) if !token.is_empty() => Ok(Action::Refresh(token)),
            _ => Err(FieldError::new("token", "is required").into()),
        },
        "presence" => {
            let channel = raw
                .channel
                .ok_or_else(|| FieldError::new("channel", "is required"))?;
            validate_channel_list("channel", std::slice::from_ref(&channel))
                .map_err(|_| FieldError::new("channel", "is not a valid channel name"))?;
            Ok(Action::Presence(channel))
        }
        other => Err(ProtocolError::new(
            "unknown_action",
            format!("unknown action {other:?}: expected subscribe, unsubscribe, publish, ping, read, seen, resume, refresh or presence"),
        )),
    }
}

/// `{"event":"connected","connection_id","user_id","heartbeat_s"}`, always the first frame.
pub fn connected_event(connection_id: &str, user_id: &str, heartbeat_s: u64) -> Bytes {
    text_frame(96 + user_id.len(), |out| {
        out.extend_from_slice(b"{\"event\":\"connected\",\"connection_id\":");
        write_json_str(out, connection_id);
        out.extend_from_slice(b",\"user_id\":");
        write_json_str(out, user_id);
        out.extend_from_slice(format!(",\"heartbeat_s\":{heartbeat_s}}}").as_bytes());
    })
}

/// `{"event":"subscribed"|"unsubscribed","channels":[...]}`.
pub fn channels_event(event: &str, channels: &[String]) -> Bytes {
    text_frame(
        48 + channels.iter().map(|c| c.len() + 3).sum::<usize>(),
        |out| {
            out.extend_from_slice(b"{\"event\":");
            write_json_str(out, event);
            out.extend_from_slice(b",\"channels\":");
            write_json_str_array(out, channels);
            out.push(b'}');
        },
    )
}

/// `{"event":"presence","channel","users":[...]}`: the answer to the `presence` action.
pub fn presence_event(channel: &str, users: &[String]) -> Bytes {
    text_frame(
        48 + channel.len() + users.iter().map(|u| u.len() + 3).sum::<usize>(),
        |out| {
            out.extend_from_slice(b"{\"event\":\"presence\",\"channel\":");
            write_json_str(out, channel);
            out.extend_from_slice(b",\"users\":");
            write_json_str_array(out, users);
            out.push(b'}');
        },
    )
}

/// `{"event":"pong"}`.
pub fn pong_event() -> Bytes {
    text_frame(16, |out| out.extend_from_slice(b"{\"event\":\"pong\"}"))
}

/// `{"event":"resumed","count":N,"complete":bool,"last_id":"…"|null}`: `last_id` is the last replayed
/// notification, where a client continues with another `resume` when `complete` is false.
pub fn resumed_event(count: usize, complete: bool, last_id: Option<Uuid>) -> Bytes {
    text_frame(96, |out| {
        out.extend_from_slice(
            format!(
                "{{\"event\":\"resumed\",\"count\":{count},\"complete\":{complete},\"last_id\":"
            )
            .as_bytes(),
        );
        match last_id {
            Some(id) => out.extend_from_slice(format!("\"{id}\"}}").as_bytes()),
            None => out.extend_from_slice(b"null}"),
        }
    })
}

/// `{"event":"refreshed","expires_at":N}`: the connection now lives until the new token's `exp`.
pub fn refreshed_event(expires_at: u64) -> Bytes {
    text_frame(48, |out| {
        out.extend_from_slice(
            format!("{{\"event\":\"refreshed\",\"expires_at\":{expires_at}}}").as_bytes(),
        )
    })
}

/// `{"event":"error","code","message"}`.
pub fn error_event(code: &str, message: &str) -> Bytes {
    text_frame(48 + message.len(), |out| {
        out.extend_from_slice(b"{\"event\":\"error\",\"code\":");
        write_json_str(out, code);
        out.extend_from_slice(b",\"message\":");
        write_json_str(out, message);
        out.push(b'}');
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Action, ProtocolError> {
        parse_action(
            &mut s.as_bytes().to_vec(),
            crate::json_depth::DEFAULT_MAX_JSON_DEPTH,
        )
    }

    #[test]
    fn every_action_parses() {
        assert_eq!(
            parse(r#"{"action":"subscribe","channels":["a","b"]}"#),
            Ok(Action::Subscribe(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse(r#"{"action":"unsubscribe","channels":["a"]}"#),
            Ok(Action::Unsubscribe(vec!["a".into()]))
        );
        assert_eq!(
            parse(r#"{"action":"publish","channel":"sala1","data":{"x":1}}"#),
            Ok(Action::Publish {
                channel: "sala1".into(),
                data: r#"{"x":1}"#.into()
            })
        );
        assert_eq!(parse(r#"{"action":"ping"}"#), Ok(Action::Ping));
        let id = Uuid::now_v7();
        assert_eq!(
            parse(&format!(r#"{{"action":"read","id":"{id}"}}"#)),
            Ok(Action::Read(id))
        );
        assert_eq!(
            parse(&format!(r#"{{"action":"resume","since":"{id}"}}"#)),
            Ok(Action::Resume(id))
        );
        assert_eq!(
            parse(&format!(r#"{{"action":"seen","ids":["{id}","x"]}}"#)),
            Ok(Action::Seen(vec![id.to_string(), "x".into()]))
        );
        assert_eq!(
            parse(r#"{"action":"seen"}"#).unwrap_err().code,
            "invalid_field"
        );
        assert_eq!(
            parse(r#"{"action":"refresh","token":"a.b.c"}"#),
            Ok(Action::Refresh("a.b.c".into()))
        );
        assert_eq!(
            parse(r#"{"action":"refresh"}"#).unwrap_err().code,
            "invalid_field"
        );
    }

    #[test]
    fn presence_names_one_channel() {
        assert_eq!(
            parse(r#"{"action":"presence","channel":"presence-room"}"#),
            Ok(Action::Presence("presence-room".into()))
        );
        assert_eq!(
            parse(r#"{"action":"presence"}"#).unwrap_err().code,
            "invalid_field"
        );
        assert_eq!(
            parse(r#"{"action":"presence","channel":"no spaces"}"#)
                .unwrap_err()
                .code,
            "invalid_field"
        );
        let f = presence_event("presence-room", &["u1".into(), "u\"2".into()]);
        assert_eq!(
            &f[2..],
            br#"{"event":"presence","channel":"presence-room","users":["u1","u\"2"]}"#
        );
    }

    #[test]
    fn bad_messages_get_named_errors() {
        assert_eq!(parse("not json").unwrap_err().code, "invalid_json");
        assert_eq!(parse("[1,2]").unwrap_err().code, "invalid_json");
        assert_eq!(
            parse(r#"{"action":"dance"}"#).unwrap_err().code,
            "unknown_action"
        );
        assert_eq!(
            parse(r#"{"channels":["a"]}"#).unwrap_err().code,
            "invalid_field"
        );
        let e = parse(r#"{"action":"subscribe","channels":["ok","no spaces"]}"#).unwrap_err();
        assert!(e.message.contains("channels[1]"), "{}", e.message);
        let e = parse(r#"{"action":"read","id":"nope"}"#).unwrap_err();
        assert!(e.message.contains("id"));
        assert!(parse(r#"{"action":"subscribe","channels":[]}"#).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // Regression: 30,000 nested arrays in a publish's data overflowed the shard's stack.
        let nested = |n: usize| {
            format!(
                r#"{{"action":"publish","channel":"c","data":{{"a":{}{}}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        let max = crate::json_depth::DEFAULT_MAX_JSON_DEPTH;
        // The envelope and data are two levels.
        assert!(parse(&nested(max - 2)).is_ok());
        let e = parse(&nested(max - 1)).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        assert!(e.message.contains("MAX_JSON_DEPTH"), "{}", e.message);
        assert_eq!(parse(&nested(30_000)).unwrap_err().code, "invalid_json");
        // The largest allowed setting parses without trouble.
        let max = crate::json_depth::MAX_MAX_JSON_DEPTH;
        let mut text = nested(max - 2).into_bytes();
        assert!(parse_action(&mut text, max).is_ok());
    }

    #[test]
    fn events_are_json_text_frames() {
        let f = error_event("unknown_action", "a \"quoted\" word");
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v["event"], "error");
        assert_eq!(v["message"], "a \"quoted\" word");
        let f = channels_event("subscribed", &["a".into(), "b".into()]);
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v["channels"][1], "b");
        let id = Uuid::now_v7();
        let f = resumed_event(3, false, Some(id));
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(
            (v["count"].as_u64(), v["complete"].as_bool()),
            (Some(3), Some(false))
        );
        assert_eq!(v["last_id"], id.to_string());
        let f = resumed_event(0, true, None);
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert!(v["last_id"].is_null());
    }
}
