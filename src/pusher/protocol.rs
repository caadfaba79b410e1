//! The WebSocket messages of the Pusher protocol (version 7): client messages parsed, server
//! messages encoded as JSON payloads (the session puts them in text frames).
//!
//! Every message is `{"event": …, "data": …, "channel": …}`. The protocol encodes the `data` of most
//! server messages as a JSON *string* holding JSON (`"data":"{\"socket_id\":…}"`), and pusher-js
//! parses such a string back; client messages carry objects. Both are followed here as pusher-js
//! sends and expects them.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::json_depth::within_depth;
use crate::model::write_json_str;

/// The protocol version this server speaks (`?protocol=7`).
pub const PROTOCOL_VERSION: u32 = 7;

/// Close and error codes of the protocol (4000–4299) this server uses.
pub mod code {
    /// The app key is not one of this server's apps: do not reconnect.
    pub const APP_NOT_FOUND: u16 = 4001;
    /// Over a connection quota (the node's or the app's): do not reconnect as is.
    pub const OVER_QUOTA: u16 = 4004;
    /// The protocol version is not 7, or missing.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// An operation the connection is not authorized for (a client event where none may go).
    pub const UNAUTHORIZED: u16 = 4009;
    /// The server is going away (shutdown) or the client is too slow: reconnect.
    pub const RECONNECT: u16 = 4200;
    /// The client did not answer pings: reconnect.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Over a capacity: the presence channel has `PUSHER_MAX_PRESENCE_MEMBERS` members already (the
    /// status of the subscription error, as Pusher-compatible servers send it).
    pub const OVER_CAPACITY: u16 = 4100;
    /// Client events over the rate limit.
    pub const CLIENT_EVENT_RATE: u16 = 4301;
}

/// What kind of channel a name is, by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Anyone may subscribe; no client events.
    Public,
    /// `private-`: a signed subscription; client events allowed.
    Private,
    /// `private-encrypted-`: signed; payloads encrypted end to end by the apps; no client events.
    PrivateEncrypted,
    /// `presence-`: signed with the member's `channel_data`; its members are listed to subscribers
    /// (`crate::presence`, shared with native presence channels).
    Presence,
}

impl ChannelKind {
    /// The kind of `channel`.
    pub fn of(channel: &str) -> ChannelKind {
        if channel.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if channel.starts_with("private-") {
            ChannelKind::Private
        } else if channel.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }
}

/// Whether `name` is a channel name the protocol allows: 1 to `max_len` bytes of
/// `A-Z a-z 0-9 _ - = @ , . ;`.
pub fn is_valid_channel_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// Longest event name, as Pusher documents it.
pub const MAX_EVENT_NAME: usize = 200;

/// A message from a client, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// `pusher:subscribe`.
    Subscribe {
        /// The channel.
        channel: String,
        /// `key:signature` for private channels.
        auth: Option<String>,
        /// The member data of a presence subscription (signed with the rest).
        channel_data: Option<String>,
    },
    /// `pusher:unsubscribe`.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// `pusher:ping`: answered with `pusher:pong`.
    Ping,
    /// `pusher:pong`: the answer to the server's ping.
    Pong,
    /// `pusher:signin`: the connection belongs to a user from now on.
    Signin {
        /// `key:signature` over `socket_id::user::user_data`.
        auth: String,
        /// The user's JSON object, as text (what was signed), with at least an `id`.
        user_data: String,
    },
    /// A `client-` event for the channel's other subscribers.
    ClientEvent {
        /// The event name (`client-…`).
        event: String,
        /// The channel.
        channel: String,
        /// The data, as the JSON text the client sent.
        data: String,
    },
}

/// A client message that cannot be acted on: answered with `pusher:error`, the connection stays.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The protocol's code, when one fits; `null` otherwise.
    pub code: Option<u16>,
    /// What was wrong.
    pub message: String,
}

impl ProtocolError {
    fn new(message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code: None,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    event: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    channel: Option<String>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// Reads `data` as an object of type `T`; a JSON string holding the object is accepted too.
fn data_object<T: for<'de> Deserialize<'de>>(
    data: Option<&RawValue>,
    event: &str,
) -> Result<T, ProtocolError> {
    let bad = || ProtocolError::new(format!("{event}: data must be an object with its fields"));
    let raw = data.ok_or_else(bad)?.get();
    if raw.starts_with('"') {
        let inner: String = serde_json::from_str(raw).map_err(|_| bad())?;
        return serde_json::from_str(&inner).map_err(|_| bad());
    }
    serde_json::from_str(raw).map_err(|_| bad())
}

/// Parses one client text message (nesting bounded by `max_depth` before parsing).
pub fn parse_client_message(text: &[u8], max_depth: usize) -> Result<ClientMessage, ProtocolError> {
    if !within_depth(text, max_depth) {
        return Err(ProtocolError::new(format!(
            "the message nests deeper than {max_depth} levels"
        )));
    }
    let envelope: Envelope = serde_json::from_slice(text).map_err(|e| {
        ProtocolError::new(format!(
            "a message is a JSON object with \"event\" (and \"data\", \"channel\"): {e}"
        ))
    })?;
    let event = envelope.event.as_str();
    match event {
        "pusher:subscribe" => {
            let d: SubscribeData = data_object(envelope.data, event)?;
            Ok(ClientMessage::Subscribe {
                channel: d.channel,
                auth: d.auth,
                channel_data: d.channel_data,
            })
        }
        "pusher:unsubscribe" => {
            #[derive(Deserialize)]
            struct Channel {
                channel: String,
            }
            let d: Channel = data_object(envelope.data, event)?;
            Ok(ClientMessage::Unsubscribe { channel: d.channel })
        }
        "pusher:ping" => Ok(ClientMessage::Ping),
        "pusher:pong" => Ok(ClientMessage::Pong),
        "pusher:signin" => {
            let d: SigninData = data_object(envelope.data, event)?;
            Ok(ClientMessage::Signin {
                auth: d.auth,
                user_data: d.user_data,
            })
        }
        _ if event.starts_with("client-") => {
            if event.len() > MAX_EVENT_NAME {
                return Err(ProtocolError::new(format!(
                    "event names are at most {MAX_EVENT_NAME} bytes"
                )));
            }
            let channel = envelope
                .channel
                .ok_or_else(|| ProtocolError::new("a client event names its channel"))?;
            Ok(ClientMessage::ClientEvent {
                event: envelope.event,
                channel,
                data: envelope
                    .data
                    .map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
            })
        }
        _ => Err(ProtocolError::new(format!(
            "unknown event {event:?}: clients send pusher:subscribe, pusher:unsubscribe, \
             pusher:ping, pusher:pong, pusher:signin or client-* events"
        ))),
    }
}

/// Starts `{"event":<event>` (the caller appends the rest and the closing brace).
fn start(event: &str, hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + event.len() + hint);
    out.extend_from_slice(b"{\"event\":");
    write_json_str(&mut out, event);
    out
}

/// `pusher:connection_established`, with the socket id and the seconds of silence after which the
/// client pings.
pub fn connection_established(socket_id: &str, activity_timeout_s: u64) -> Vec<u8> {
    let inner =
        format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout_s}}}");
    let mut out = start("pusher:connection_established", inner.len() + 16);
    out.extend_from_slice(b",\"data\":");
    write_json_str(&mut out, &inner);
    out.push(b'}');
    out
}

/// `pusher_internal:subscription_succeeded` for `channel`.
pub fn subscription_succeeded(channel: &str) -> Vec<u8> {
    let mut out = start("pusher_internal:subscription_succeeded", channel.len() + 24);
    out.extend_from_slice(b",\"channel\":");
    write_json_str(&mut out, channel);
    out.extend_from_slice(b",\"data\":\"{}\"}");
    out
}

/// `pusher_internal:subscription_succeeded` for presence channel `channel`, with its members
/// (user id, `user_info` JSON text): `data` is the JSON text of
/// `{"presence":{"ids":[…],"hash":{id:user_info},"count":N}}`, as pusher-js reads it. A member
/// without `user_info` (a native one) has `null`.
pub fn presence_subscription_succeeded<'a>(
    channel: &str,
    members: impl Iterator<Item = (&'a str, Option<&'a str>)> + Clone,
) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut hash = Vec::new();
    let mut count = 0usize;
    for (id, info) in members {
        if count > 0 {
            ids.push(b',');
            hash.push(b',');
        }
        count += 1;
        write_json_str(&mut ids, id);
        write_json_str(&mut hash, id);
        hash.push(b':');
        hash.extend_from_slice(info.unwrap_or("null").as_bytes());
    }
    let mut data = Vec::with_capacity(ids.len() + hash.len() + 48);
    data.extend_from_slice(b"{\"presence\":{\"ids\":[");
    data.extend_from_slice(&ids);
    data.extend_from_slice(b"],\"hash\":{");
    data.extend_from_slice(&hash);
    data.extend_from_slice(format!("}},\"count\":{count}}}}}").as_bytes());
    let data = String::from_utf8(data).unwrap_or_default();
    let mut out = start(
        "pusher_internal:subscription_succeeded",
        channel.len() + data.len() + 32,
    );
    out.extend_from_slice(b",\"channel\":");
    write_json_str(&mut out, channel);
    out.extend_from_slice(b",\"data\":");
    write_json_str(&mut out, &data);
    out.push(b'}');
    out
}

/// A presence subscription's member, from its `channel_data`.
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceMember {
    /// `user_id`: a string, or a number taken as its text.
    pub user_id: String,
    /// `user_info` as JSON text, when there is one (not `null`).
    pub user_info: Option<String>,
}

/// Reads a presence subscription's `channel_data` (`{"user_id":…,"user_info":…}`, as the app's auth
/// endpoint signed it): the user id must be a non-empty string or a number of at most 128 bytes, and
/// `user_info`, if any, at most `max_info_bytes` of JSON. The error says what is wrong.
pub fn parse_channel_data(
    channel_data: &str,
    max_depth: usize,
    max_info_bytes: usize,
) -> Result<PresenceMember, String> {
    #[derive(Deserialize)]
    struct ChannelData<'a> {
        #[serde(borrow)]
        user_id: &'a RawValue,
        #[serde(borrow, default)]
        user_info: Option<&'a RawValue>,
    }
    if !within_depth(channel_data.as_bytes(), max_depth) {
        return Err(format!("channel_data nests deeper than {max_depth} levels"));
    }
    let data: ChannelData = serde_json::from_str(channel_data).map_err(|_| {
        "channel_data must be a JSON object with a user_id (and an optional user_info)".to_owned()
    })?;
    let user_id = match serde_json::from_str::<serde_json::Value>(data.user_id.get()) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err("channel_data's user_id must be a string or a number".to_owned()),
    };
    if user_id.is_empty() || user_id.len() > 128 || user_id.chars().any(char::is_control) {
        return Err(
            "channel_data's user_id must be 1 to 128 bytes without control characters".to_owned(),
        );
    }
    let user_info = data
        .user_info
        .map(|raw| raw.get())
        .filter(|raw| *raw != "null");
    if let Some(info) = user_info {
        if info.len() > max_info_bytes {
            return Err(format!(
                "channel_data's user_info is larger than {max_info_bytes} bytes \
                 (PUSHER_MAX_PRESENCE_INFO_BYTES)"
            ));
        }
    }
    Ok(PresenceMember {
        user_id,
        user_info: user_info.map(str::to_owned),
    })
}

/// `pusher:subscription_error` for `channel`: `kind` is pusher-js's error type (`AuthError`), `status`
/// the HTTP-like status it reports.
pub fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> Vec<u8> {
    let mut out = start(
        "pusher:subscription_error",
        channel.len() + error.len() + 64,
    );
    out.extend_from_slice(b",\"channel\":");
    write_json_str(&mut out, channel);
    out.extend_from_slice(b",\"data\":{\"type\":");
    write_json_str(&mut out, kind);
    out.extend_from_slice(b",\"error\":");
    write_json_str(&mut out, error);
    out.extend_from_slice(format!(",\"status\":{status}}}}}").as_bytes());
    out
}

/// `pusher:error` with a code (or `null`) and a message.
pub fn error(code: Option<u16>, message: &str) -> Vec<u8> {
    let mut out = start("pusher:error", message.len() + 40);
    match code {
        Some(code) => {
            out.extend_from_slice(format!(",\"data\":{{\"code\":{code},\"message\":").as_bytes())
        }
        None => out.extend_from_slice(b",\"data\":{\"code\":null,\"message\":"),
    }
    write_json_str(&mut out, message);
    out.extend_from_slice(b"}}");
    out
}

/// `pusher:pong`, the answer to a client's ping.
pub fn pong() -> Vec<u8> {
    br#"{"event":"pusher:pong","data":"{}"}"#.to_vec()
}

/// `pusher:ping`, the server's keep-alive.
pub fn ping() -> Vec<u8> {
    br#"{"event":"pusher:ping","data":"{}"}"#.to_vec()
}

/// `pusher:signin_success`, echoing the signed user data.
pub fn signin_success(user_data: &str) -> Vec<u8> {
    let mut out = start("pusher:signin_success", user_data.len() + 32);
    out.extend_from_slice(b",\"data\":{\"user_data\":");
    write_json_str(&mut out, user_data);
    out.extend_from_slice(b"}}");
    out
}

/// The user id in a sign-in's `user_data` (`{"id":"…",…}`; a number id is taken as its text).
pub fn user_id_of(user_data: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(user_data).ok()?;
    match value.get("id")? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClientMessage, ProtocolError> {
        parse_client_message(s.as_bytes(), 32)
    }

    #[test]
    fn client_messages_parse_as_pusher_js_sends_them() {
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":{"auth":"k:s","channel":"private-a"}}"#),
            Ok(ClientMessage::Subscribe {
                channel: "private-a".into(),
                auth: Some("k:s".into()),
                channel_data: None
            })
        );
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"news\"}"}"#),
            Ok(ClientMessage::Subscribe {
                channel: "news".into(),
                auth: None,
                channel_data: None
            })
        );
        assert_eq!(
            parse(r#"{"event":"pusher:unsubscribe","data":{"channel":"news"}}"#),
            Ok(ClientMessage::Unsubscribe {
                channel: "news".into()
            })
        );
        assert_eq!(
            parse(r#"{"event":"pusher:ping","data":{}}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse(r#"{"event":"client-typing","channel":"private-a","data":{"x":[1,2]}}"#),
            Ok(ClientMessage::ClientEvent {
                event: "client-typing".into(),
                channel: "private-a".into(),
                data: r#"{"x":[1,2]}"#.into()
            })
        );
        assert_eq!(
            parse(
                r#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"7\"}"}}"#
            ),
            Ok(ClientMessage::Signin {
                auth: "k:s".into(),
                user_data: r#"{"id":"7"}"#.into()
            })
        );
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        for bad in [
            "",
            "[]",
            "{\"event\":1}",
            r#"{"event":"pusher:subscribe"}"#,
            r#"{"event":"pusher:subscribe","data":{"auth":"x"}}"#,
            r#"{"event":"client-x","data":{}}"#,
            r#"{"event":"other"}"#,
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_messages_are_the_protocols_json() {
        let v: serde_json::Value =
            serde_json::from_slice(&connection_established("1.2", 120)).unwrap();
        assert_eq!(v["event"], "pusher:connection_established");
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "1.2");
        assert_eq!(data["activity_timeout"], 120);
        let v: serde_json::Value =
            serde_json::from_slice(&error(Some(4001), "no \"app\"")).unwrap();
        assert_eq!(v["data"]["code"], 4001);
        assert_eq!(v["data"]["message"], "no \"app\"");
        let v: serde_json::Value =
            serde_json::from_slice(&subscription_error("private-a", "AuthError", "bad", 401))
                .unwrap();
        assert_eq!(v["channel"], "private-a");
        assert_eq!(v["data"]["status"], 401);
        let v: serde_json::Value = serde_json::from_slice(&subscription_succeeded("a")).unwrap();
        assert_eq!(v["data"], "{}");
        let v: serde_json::Value = serde_json::from_slice(&signin_success("{\"id\":1}")).unwrap();
        assert_eq!(v["data"]["user_data"], "{\"id\":1}");
        assert_eq!(user_id_of(r#"{"id":7,"name":"x"}"#).as_deref(), Some("7"));
        assert_eq!(user_id_of(r#"{"name":"x"}"#), None);
    }

    #[test]
    fn presence_messages_are_what_pusher_js_reads() {
        let ok = presence_subscription_succeeded(
            "presence-a",
            [("1", Some(r#"{"name":"A"}"#)), ("2", None)].into_iter(),
        );
        let v: serde_json::Value = serde_json::from_slice(&ok).unwrap();
        assert_eq!(v["event"], "pusher_internal:subscription_succeeded");
        assert_eq!(v["channel"], "presence-a");
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"presence":{"ids":["1","2"],"hash":{"1":{"name":"A"},"2":null},"count":2}})
        );
        let empty = presence_subscription_succeeded("presence-a", std::iter::empty());
        let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["presence"]["count"], 0);
        let member = parse_channel_data(r#"{"user_id":7,"user_info":{"n":1}}"#, 32, 1024).unwrap();
        assert_eq!(member.user_id, "7");
        assert_eq!(member.user_info.as_deref(), Some(r#"{"n":1}"#));
        let member = parse_channel_data(r#"{"user_id":"u"}"#, 32, 1024).unwrap();
        assert_eq!(member.user_info, None);
        for bad in [
            "",
            "{}",
            r#"{"user_id":""}"#,
            r#"{"user_id":null}"#,
            r#"{"user_id":[1]}"#,
            r#"{"user_info":{}}"#,
        ] {
            assert!(parse_channel_data(bad, 32, 1024).is_err(), "{bad}");
        }
        let big = format!(r#"{{"user_id":"u","user_info":"{}"}}"#, "x".repeat(2000));
        assert!(parse_channel_data(&big, 32, 1024)
            .unwrap_err()
            .contains("PUSHER_MAX_PRESENCE_INFO_BYTES"));
    }

    #[test]
    fn channel_names_and_kinds() {
        assert!(is_valid_channel_name("private-App.Models.User.1", 200));
        assert!(!is_valid_channel_name("a b", 200));
        assert!(!is_valid_channel_name("", 200));
        assert!(!is_valid_channel_name(&"a".repeat(201), 200));
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(ChannelKind::of("private-x"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("presence-x"), ChannelKind::Presence);
        assert_eq!(ChannelKind::of("x"), ChannelKind::Public);
    }
}
