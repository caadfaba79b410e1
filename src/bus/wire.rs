//! The envelope of a message on Redis: what one node tells the others.
//!
//! ```text
//! byte 0       kind: b'N' a committed notification, b'M' a client's ephemeral channel message,
//!              b'U' a user's new unread count,
//!              b'P' a Pusher event,
//!              b'J' a presence change of the origin node,
//!              b'Q' a preferences matter (byte 17 says which: b'p' a user's preferences changed,
//!              b'r' a notification released because its user's quiet hours ended),
//!              b'T' a Pusher app terminated a user's connections (b'K' is reserved beside it),
//!              b'S' a survey of the nodes' Pusher channel counts, b'R' one node's answer to it
//! bytes 1..17  the origin node's id (random per process start), so a node drops its own messages:
//!              it delivered them locally already
//! bytes 17..   N: the notification as API.md's JSON object; M: the WebSocket payload, as is;
//!              U: the count's version and the count (8 bytes each, big-endian), then the user id;
//!              P: {"channel","name","data","except_socket"}, data as its JSON text;
//!              J: {"channel","user_id","user_info"?,"present"} (the user's first connection on the
//!              origin node came, `true`, or its last one went, `false`);
//!              Q p: `{"user_id":…,"preferences":{…}|null}` (null: back to the defaults);
//!              Q r: the notification as API.md's JSON object;
//!              T: the user id, as its UTF-8 bytes;
//!              S: the survey id (8 bytes, big-endian), b'e' (one channel, exact) or b'p' (a
//!              prefix), then the channel name or prefix;
//!              R: the asking node's id (16 bytes), the survey id (8 bytes, big-endian), then the
//!              answering node's counts as a JSON object {"channel":subscribed connections,…}
//! ```
//!
//! `S` and `R` go on the broadcast channel: every node answers a survey, and a node drops answers
//! addressed to another.
//!
//! A `U` goes to the user's topic, so only nodes holding one of the user's connections get it.
//!
//! The notification travels as the same JSON the API shows, so a node decodes it once into a
//! [`Notification`] and encodes the WebSocket frame once (`Delivery::of_notification`); a client message
//! is already the frame's payload and is wrapped in a frame header without being parsed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

use crate::delivery::PusherEvent;
use crate::model::{parse_time, write_json_str, Notification};
use crate::preferences::Preferences;

/// Kind byte of a committed notification.
const KIND_NOTIFICATION: u8 = b'N';
/// Kind byte of a client's channel message.
const KIND_MESSAGE: u8 = b'M';
/// Kind byte of a user's new unread count.
const KIND_UNREAD: u8 = b'U';
/// Kind byte of a Pusher event (to one channel).
const KIND_PUSHER_EVENT: u8 = b'P';
/// Kind byte of a presence change on the origin node.
const KIND_PRESENCE: u8 = b'J';
/// Kind byte of a preferences matter (see the module docs).
const KIND_PREFERENCES: u8 = b'Q';
/// After [`KIND_PREFERENCES`]: a user's preferences changed.
const PREFERENCES_CHANGED: u8 = b'p';
/// After [`KIND_PREFERENCES`]: a notification released at the end of quiet hours.
const QUIET_RELEASED: u8 = b'r';
/// Kind byte of a Pusher `terminate_connections` of one user (to every node).
const KIND_TERMINATE: u8 = b'T';
/// Kind byte of a survey of the nodes' Pusher channel counts (to every node).
const KIND_SURVEY: u8 = b'S';
/// Kind byte of one node's answer to a survey (to the asking node).
const KIND_SURVEY_REPLY: u8 = b'R';
/// After a survey's id: the question names one channel.
const SURVEY_EXACT: u8 = b'e';
/// After a survey's id: the question names a prefix.
const SURVEY_PREFIX: u8 = b'p';
/// Bytes before the payload: the kind and the origin id.
const HEADER_LEN: usize = 1 + 16;

/// A decoded envelope.
#[derive(Debug)]
pub enum Envelope<'a> {
    /// A committed notification (in an `Arc`: it is large, one allocation is made per message anyway,
    /// and the delivery made of it shares it).
    Notification(Arc<Notification>),
    /// A client message: the payload of its WebSocket text frame.
    Message(&'a [u8]),
    /// A user's unread count at a version (see `store::UnreadCount`).
    Unread {
        /// Whose.
        user_id: &'a str,
        /// The count.
        count: u64,
        /// Its version.
        version: u64,
    },
    /// A Pusher event to `channel`.
    PusherEvent {
        /// The channel it goes to.
        channel: String,
        /// The event.
        event: PusherEvent,
    },
    /// A user's presence on the origin node changed.
    Presence(NodePresence),
    /// A user's preferences changed on another node (`None`: back to the defaults).
    Preferences(String, Option<Preferences>),
    /// A notification whose user's quiet hours ended, to push to that user's connections.
    Released(Arc<Notification>),
    /// A Pusher app terminated this user's connections: close them on every node.
    Terminate(&'a str),
    /// Another node asks for this node's subscribed connections per channel.
    Survey {
        /// The survey's id, to quote in the answer.
        id: u64,
        /// The channel name prefix, or one channel's whole name with `exact`.
        prefix: &'a str,
        /// Whether `prefix` is one channel's whole name.
        exact: bool,
    },
    /// A node's answer to a survey of node `to`.
    SurveyReply {
        /// The asking node.
        to: Uuid,
        /// The survey's id.
        id: u64,
        /// The answering node's subscribed connections per channel.
        counts: BTreeMap<String, usize>,
    },
}

/// A presence change on one node: its user's first connection on the channel came, or its last one
/// went. Whether that makes the user join or leave is for each receiving node to decide.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct NodePresence {
    /// The presence channel.
    pub channel: String,
    /// The user.
    pub user_id: String,
    /// The member's `user_info` JSON text, if its connection kind gave one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "raw_json")]
    pub user_info: Option<String>,
    /// `true`: the user is on the channel on the origin node now; `false`: no longer.
    pub present: bool,
}

/// `user_info` travels as the JSON value it is, not as a string holding JSON.
mod raw_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(text) => RawValue::from_string(text.clone())
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Box<RawValue>>::deserialize(d)?.map(|raw| raw.get().to_owned()))
    }
}

/// Why an envelope could not be read (a foreign publisher on our prefix, or a bug).
#[derive(Debug, PartialEq, Eq)]
pub struct WireError(pub String);

/// Encodes a committed notification from node `origin`.
pub fn encode_notification(origin: Uuid, n: &Notification) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 320 + n.message.len() + n.data.len());
    out.push(KIND_NOTIFICATION);
    out.extend_from_slice(origin.as_bytes());
    n.write_json(&mut out, None);
    out
}

/// Encodes a client message (the payload of its text frame) from node `origin`.
pub fn encode_message(origin: Uuid, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(KIND_MESSAGE);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a user's unread count at `version` from node `origin`.
pub fn encode_unread(origin: Uuid, user_id: &str, count: u64, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 16 + user_id.len());
    out.push(KIND_UNREAD);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(user_id.as_bytes());
    out
}

/// Encodes a Pusher event to `channel` from node `origin`.
pub fn encode_pusher_event(origin: Uuid, channel: &str, event: &PusherEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64 + channel.len() + event.data.len());
    out.push(KIND_PUSHER_EVENT);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(b"{\"channel\":");
    write_json_str(&mut out, channel);
    out.extend_from_slice(b",\"name\":");
    write_json_str(&mut out, &event.name);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(event.data.as_bytes());
    if let Some(socket) = &event.except_socket {
        out.extend_from_slice(b",\"except_socket\":");
        write_json_str(&mut out, socket);
    }
    out.push(b'}');
    out
}

/// The Pusher event envelope's JSON.
#[derive(Deserialize)]
struct WirePusherEvent<'a> {
    channel: String,
    name: String,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
    #[serde(default)]
    except_socket: Option<Box<str>>,
}

/// Encodes a presence change of node `origin`.
pub fn encode_presence(origin: Uuid, change: &NodePresence) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 96 + change.channel.len());
    out.push(KIND_PRESENCE);
    out.extend_from_slice(origin.as_bytes());
    // Plain strings and a value that was valid JSON when it was accepted: this cannot fail.
    serde_json::to_writer(&mut out, change).expect("a presence change serializes");
    out
}

/// Encodes a change of `user_id`'s preferences (`stored`: their stored JSON, `None` for the
/// defaults) from node `origin`.
pub fn encode_preferences(origin: Uuid, user_id: &str, stored: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64 + user_id.len() + stored.map_or(0, str::len));
    out.push(KIND_PREFERENCES);
    out.extend_from_slice(origin.as_bytes());
    out.push(PREFERENCES_CHANGED);
    out.extend_from_slice(b"{\"user_id\":");
    write_json_str(&mut out, user_id);
    out.extend_from_slice(b",\"preferences\":");
    out.extend_from_slice(stored.unwrap_or("null").as_bytes());
    out.push(b'}');
    out
}

/// Encodes a notification released at the end of its user's quiet hours, from node `origin`.
pub fn encode_released(origin: Uuid, n: &Notification) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 321 + n.message.len() + n.data.len());
    out.push(KIND_PREFERENCES);
    out.extend_from_slice(origin.as_bytes());
    out.push(QUIET_RELEASED);
    n.write_json(&mut out, None);
    out
}

/// Encodes a Pusher `terminate_connections` of `user_id`, from node `origin`.
pub fn encode_terminate(origin: Uuid, user_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + user_id.len());
    out.push(KIND_TERMINATE);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(user_id.as_bytes());
    out
}

/// Encodes survey `id` of node `origin`: the channels starting with `prefix` (or, with `exact`,
/// the one channel `prefix` names).
pub fn encode_survey(origin: Uuid, id: u64, prefix: &str, exact: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 9 + prefix.len());
    out.push(KIND_SURVEY);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.push(if exact { SURVEY_EXACT } else { SURVEY_PREFIX });
    out.extend_from_slice(prefix.as_bytes());
    out
}

/// Encodes node `origin`'s answer `counts` to survey `id` of node `to`.
pub fn encode_survey_reply(
    origin: Uuid,
    to: Uuid,
    id: u64,
    counts: &BTreeMap<String, usize>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 24 + 32 * counts.len());
    out.push(KIND_SURVEY_REPLY);
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    // A map of strings to integers cannot fail to serialize.
    let _ = serde_json::to_writer(&mut out, counts);
    out
}

fn decode_survey(payload: &[u8]) -> Result<Envelope<'_>, WireError> {
    let bad = || WireError("bad survey".into());
    let (id, rest) = payload.split_first_chunk::<8>().ok_or_else(bad)?;
    let (&how, prefix) = rest.split_first().ok_or_else(bad)?;
    let exact = match how {
        SURVEY_EXACT => true,
        SURVEY_PREFIX => false,
        _ => return Err(bad()),
    };
    let prefix = std::str::from_utf8(prefix).map_err(|_| bad())?;
    Ok(Envelope::Survey {
        id: u64::from_be_bytes(*id),
        prefix,
        exact,
    })
}

fn decode_survey_reply(payload: &[u8]) -> Result<Envelope<'_>, WireError> {
    let bad = |why: String| WireError(format!("bad survey answer: {why}"));
    let (to, rest) = payload
        .split_first_chunk::<16>()
        .ok_or_else(|| bad("too short".into()))?;
    let (id, json) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| bad("too short".into()))?;
    let counts = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    Ok(Envelope::SurveyReply {
        to: Uuid::from_bytes(*to),
        id: u64::from_be_bytes(*id),
        counts,
    })
}

/// The origin node of an envelope, read without decoding the rest (to drop our own messages first).
pub fn origin_of(bytes: &[u8]) -> Option<Uuid> {
    bytes
        .get(1..HEADER_LEN)
        .and_then(|b| Uuid::from_slice(b).ok())
}

/// Decodes an envelope.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError("envelope shorter than its header".into()));
    }
    let payload = &bytes[HEADER_LEN..];
    match bytes[0] {
        KIND_NOTIFICATION => {
            decode_notification(payload).map(|n| Envelope::Notification(Arc::new(n)))
        }
        KIND_MESSAGE => Ok(Envelope::Message(payload)),
        KIND_UNREAD => decode_unread(payload),
        KIND_PUSHER_EVENT => {
            let w: WirePusherEvent = serde_json::from_slice(payload)
                .map_err(|e| WireError(format!("bad Pusher event: {e}")))?;
            Ok(Envelope::PusherEvent {
                channel: w.channel,
                event: PusherEvent {
                    name: w.name,
                    data: w.data.get().to_owned(),
                    except_socket: w.except_socket,
                },
            })
        }
        KIND_PRESENCE => serde_json::from_slice(payload)
            .map(Envelope::Presence)
            .map_err(|e| WireError(format!("bad presence change: {e}"))),
        KIND_PREFERENCES => match payload.split_first() {
            Some((&PREFERENCES_CHANGED, json)) => decode_preferences(json),
            Some((&QUIET_RELEASED, json)) => {
                decode_notification(json).map(|n| Envelope::Released(Arc::new(n)))
            }
            _ => Err(WireError("unknown preferences envelope".into())),
        },
        KIND_TERMINATE => std::str::from_utf8(payload)
            .ok()
            .filter(|user| !user.is_empty())
            .map(Envelope::Terminate)
            .ok_or_else(|| WireError("bad terminate: the user id is not UTF-8 text".into())),
        KIND_SURVEY => decode_survey(payload),
        KIND_SURVEY_REPLY => decode_survey_reply(payload),
        other => Err(WireError(format!("unknown envelope kind {other}"))),
    }
}

/// The payload of a `U` envelope.
fn decode_unread(payload: &[u8]) -> Result<Envelope<'_>, WireError> {
    let number = |range: std::ops::Range<usize>| {
        payload
            .get(range)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| WireError("unread envelope too short".into()))
    };
    let version = number(0..8)?;
    let count = number(8..16)?;
    let user_id = std::str::from_utf8(&payload[16..])
        .map_err(|e| WireError(format!("bad unread user: {e}")))?;
    Ok(Envelope::Unread {
        user_id,
        count,
        version,
    })
}

/// The notification object of API.md, as far as a freshly committed notification has it.
#[derive(Deserialize)]
struct WireNotification<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: String,
    title: String,
    message: String,
    user_id: Option<String>,
    channels: Vec<String>,
    #[serde(default)]
    broadcast: bool,
    /// Kept as the exact text it was sent as (no float or big-number rewriting).
    data: &'a serde_json::value::RawValue,
    timestamp: &'a str,
    scheduled_at: Option<&'a str>,
    /// Present only on a fired schedule.
    #[serde(default)]
    schedule_id: Option<&'a str>,
    /// Present only when the producer said so.
    #[serde(default)]
    urgent: bool,
}

/// A change of preferences as sent between nodes.
#[derive(Deserialize)]
struct WirePreferences<'a> {
    user_id: String,
    #[serde(borrow)]
    preferences: Option<&'a serde_json::value::RawValue>,
}

fn decode_preferences(payload: &[u8]) -> Result<Envelope<'_>, WireError> {
    let w: WirePreferences =
        serde_json::from_slice(payload).map_err(|e| WireError(format!("bad preferences: {e}")))?;
    let preferences = w
        .preferences
        .map(|raw| Preferences::from_stored(raw.get()).map_err(WireError))
        .transpose()?;
    Ok(Envelope::Preferences(w.user_id, preferences))
}

fn decode_notification(payload: &[u8]) -> Result<Notification, WireError> {
    let w: WireNotification =
        serde_json::from_slice(payload).map_err(|e| WireError(format!("bad notification: {e}")))?;
    let time = |s: &str| parse_time(s).ok_or_else(|| WireError(format!("bad time {s:?}")));
    Ok(Notification {
        id: Uuid::parse_str(w.id).map_err(|e| WireError(format!("bad id: {e}")))?,
        kind: w.kind,
        title: w.title,
        message: w.message,
        user_id: w.user_id,
        channels: w.channels,
        broadcast: w.broadcast,
        data: w.data.get().to_owned(),
        created_at: time(w.timestamp)?,
        // Just committed: nobody has read it yet.
        read_at: None,
        delivered_at: None,
        seen_at: None,
        scheduled_at: w.scheduled_at.map(time).transpose()?,
        urgent: w.urgent,
        schedule_id: w
            .schedule_id
            .map(|s| Uuid::parse_str(s).map_err(|e| WireError(format!("bad schedule_id: {e}"))))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SendInput, UserIdInput};

    #[test]
    fn a_notification_survives_the_trip_exactly() {
        let n = SendInput {
            message: Some("caf\u{e9} \"quoted\"".into()),
            title: Some("t".into()),
            user_id: Some(UserIdInput::Text("u1".into())),
            channels: Some(vec!["news".into(), "sport".into()]),
            data: Some(serde_json::from_str(r#"{"k":[1,{"x":null}],"f":1.5}"#).unwrap()),
            ..Default::default()
        }
        .validate()
        .unwrap()
        .into_notification(Uuid::now_v7(), 1_700_000_000_123);
        let origin = Uuid::now_v7();
        let bytes = encode_notification(origin, &n);
        assert_eq!(origin_of(&bytes), Some(origin));
        match decode(&bytes).unwrap() {
            Envelope::Notification(back) => {
                assert_eq!(*back, n);
                assert_eq!(back.to_json(), n.to_json(), "the frame is the same bytes");
            }
            other => panic!("{other:?}"),
        }
        // A fired schedule carries its schedule's id across nodes too.
        let fired = Notification {
            scheduled_at: Some(1_700_000_000_000),
            schedule_id: Some(Uuid::now_v7()),
            ..n
        };
        match decode(&encode_notification(origin, &fired)).unwrap() {
            Envelope::Notification(back) => assert_eq!(*back, fired),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unread_count_survives_the_trip_and_a_short_one_is_an_error() {
        let origin = Uuid::now_v7();
        let bytes = encode_unread(origin, "caf\u{e9}", 12, 345);
        assert_eq!(origin_of(&bytes), Some(origin));
        match decode(&bytes).unwrap() {
            Envelope::Unread {
                user_id,
                count,
                version,
            } => assert_eq!((user_id, count, version), ("caf\u{e9}", 12, 345)),
            other => panic!("{other:?}"),
        }
        assert!(decode(&bytes[..HEADER_LEN + 12]).is_err());
    }

    #[test]
    fn a_pusher_event_survives_the_trip() {
        let origin = Uuid::now_v7();
        let event = PusherEvent {
            name: "my-event".into(),
            data: r#""{\"a\":1}""#.into(),
            except_socket: Some("1.2".into()),
        };
        match decode(&encode_pusher_event(origin, "private-a", &event)).unwrap() {
            Envelope::PusherEvent {
                channel,
                event: back,
            } => {
                assert_eq!(channel, "private-a");
                assert_eq!(back, event);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_presence_change_survives_the_trip_with_its_user_info_as_json() {
        let origin = Uuid::now_v7();
        for user_info in [None, Some(r#"{"name":"Ann","tags":[1,2]}"#.to_owned())] {
            let change = NodePresence {
                channel: "presence-room".into(),
                user_id: "u\"1".into(),
                user_info,
                present: true,
            };
            let bytes = encode_presence(origin, &change);
            assert_eq!(origin_of(&bytes), Some(origin));
            match decode(&bytes).unwrap() {
                Envelope::Presence(back) => assert_eq!(back, change),
                other => panic!("{other:?}"),
            }
        }
        let mut bad = encode_presence(
            origin,
            &NodePresence {
                channel: "presence-a".into(),
                user_id: "u".into(),
                user_info: None,
                present: false,
            },
        );
        bad.truncate(HEADER_LEN + 3);
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn a_message_is_carried_as_is_and_garbage_is_an_error() {
        let origin = Uuid::now_v7();
        let bytes = encode_message(origin, br#"{"event":"message"}"#);
        assert!(
            matches!(decode(&bytes), Ok(Envelope::Message(p)) if p == br#"{"event":"message"}"#)
        );
        assert!(decode(b"N").is_err());
        let mut q = encode_preferences(origin, "u1", None);
        assert!(matches!(decode(&q), Ok(Envelope::Preferences(u, None)) if u == "u1"));
        q = encode_preferences(origin, "u1", Some(r#"{"muted_types":["promo"]}"#));
        assert!(
            matches!(decode(&q), Ok(Envelope::Preferences(_, Some(p))) if p.muted_types == ["promo"])
        );
        q.truncate(HEADER_LEN + 1);
        assert!(decode(&q).is_err());
        let mut bad = encode_message(origin, b"{}");
        bad[0] = b'N';
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn a_terminate_carries_its_user() {
        let origin = Uuid::from_u128(9);
        let t = encode_terminate(origin, "user-7");
        assert_eq!(origin_of(&t), Some(origin));
        assert!(matches!(decode(&t), Ok(Envelope::Terminate("user-7"))));
        let mut empty = t[..HEADER_LEN].to_vec();
        assert!(decode(&empty).is_err());
        empty.extend_from_slice(&[0xff, 0xfe]);
        assert!(decode(&empty).is_err());
    }

    #[test]
    fn a_survey_and_its_answer_round_trip() {
        let origin = Uuid::from_u128(3);
        let s = encode_survey(origin, 42, "presence-", false);
        assert!(matches!(
            decode(&s),
            Ok(Envelope::Survey {
                id: 42,
                prefix: "presence-",
                exact: false
            })
        ));
        let s = encode_survey(origin, 7, "room", true);
        assert!(matches!(
            decode(&s),
            Ok(Envelope::Survey {
                id: 7,
                prefix: "room",
                exact: true
            })
        ));
        let counts = BTreeMap::from([("a".to_string(), 2), ("b\"c".to_string(), 5)]);
        let r = encode_survey_reply(Uuid::from_u128(4), origin, 7, &counts);
        assert_eq!(origin_of(&r), Some(Uuid::from_u128(4)));
        match decode(&r) {
            Ok(Envelope::SurveyReply {
                to,
                id,
                counts: got,
            }) => {
                assert_eq!((to, id, got), (origin, 7, counts));
            }
            other => panic!("{other:?}"),
        }
        assert!(decode(&r[..HEADER_LEN + 20]).is_err());
        assert!(decode(&s[..HEADER_LEN + 8]).is_err());
    }
}
