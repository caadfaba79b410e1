//! The Pusher Channels protocol, as far as a load generator needs it: an app's credentials, the
//! WebSocket path and messages of a subscriber (protocol 7), and the signed HTTP API request that
//! triggers an event.
//!
//! With `--pusher-app ID:KEY:SECRET`, receivers connect to `/app/KEY?protocol=7` instead of the native
//! `/ws`, subscribe with `pusher:subscribe` and answer the server's `pusher:ping`, and `fanout --via
//! pusher` publishes with `POST /apps/ID/events`, signed as every Pusher server SDK signs it. The same
//! run then measures this server's Pusher path and any other Pusher-protocol server (sockudo, Soketi,
//! Reverb) alike.
//!
//! An event's `data` is a string in the protocol, so the send-time stamp travels escaped inside it
//! (`"data":"{\"lt_ns\":123}"`); [`crate::stamp::find_stamp`] reads both forms.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

/// The protocol version receivers ask for.
pub const PROTOCOL_VERSION: u32 = 7;

/// The text a server's application-level ping carries; receivers answer it with [`PONG_MESSAGE`].
pub const PING_EVENT: &[u8] = b"\"pusher:ping\"";

/// The answer to a server's `pusher:ping`.
pub const PONG_MESSAGE: &[u8] = br#"{"event":"pusher:pong","data":{}}"#;

/// What a server's answer to a subscribe contains when it succeeded.
pub const SUBSCRIBED_EVENT: &[u8] = b"pusher_internal:subscription_succeeded";

/// What a server's refusal contains (`pusher:error`, `pusher:subscription_error`).
pub const ERROR_EVENTS: [&[u8]; 2] = [b"pusher:error", b"pusher:subscription_error"];

/// An app's credentials, as `ID:KEY:SECRET`.
#[derive(Clone, PartialEq, Eq)]
pub struct PusherApp {
    /// The app id, in the HTTP API's path.
    pub id: String,
    /// The public key, in the WebSocket path and as `auth_key`.
    pub key: String,
    /// The secret that signs HTTP API requests.
    pub secret: String,
}

// The secret stays out of logs and error messages.
impl fmt::Debug for PusherApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PusherApp {{ id: {:?}, key: {:?} }}", self.id, self.key)
    }
}

impl FromStr for PusherApp {
    type Err = String;

    fn from_str(s: &str) -> Result<PusherApp, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("expected ID:KEY:SECRET".into());
        };
        let url_safe = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !url_safe(id) || !url_safe(key) || secret.is_empty() {
            return Err("ID and KEY must be non-empty and use only A-Z a-z 0-9 - _ .; SECRET must be non-empty".into());
        }
        Ok(PusherApp {
            id: id.into(),
            key: key.into(),
            secret: secret.into(),
        })
    }
}

impl PusherApp {
    /// The WebSocket path of a subscriber of this app.
    pub fn websocket_path(&self) -> String {
        format!(
            "/app/{}?protocol={PROTOCOL_VERSION}&client=loadtest&version=1.0",
            self.key
        )
    }

    /// The path and signed query of `POST /apps/ID/events` carrying `body`, signed at `timestamp`
    /// (seconds since the epoch): `auth_key`, `auth_timestamp`, `auth_version`, `body_md5`, then
    /// `auth_signature`, the HMAC-SHA256 of `POST\n<path>\n<query in key order>` under the secret.
    pub fn signed_events_path(&self, body: &[u8], timestamp: u64) -> String {
        let path = format!("/apps/{}/events", self.id);
        let query = format!(
            "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
            self.key,
            hex(&Md5::digest(body))
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(format!("POST\n{path}\n{query}").as_bytes());
        let signature = hex(&mac.finalize().into_bytes());
        format!("{path}?{query}&auth_signature={signature}")
    }
}

/// The subscribe message for `channel` (a public channel: no auth).
pub fn subscribe_message(channel: &str) -> String {
    format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#)
}

/// Appends the body of an event on `channel` whose `data` string holds the stamp object: the
/// object's JSON, escaped as a JSON string.
pub fn write_event_body(out: &mut Vec<u8>, channel: &str, name: &str, stamp_ns: u64) {
    out.extend_from_slice(b"{\"name\":\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\",\"channels\":[\"");
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(b"\"],\"data\":\"{\\\"lt_ns\\\":");
    crate::stamp::write_u64(out, stamp_ns);
    out.extend_from_slice(b"}\"}");
}

/// Seconds since the epoch, for `auth_timestamp` (servers accept ±600 s).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lower-case hexadecimal.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_and_refuse_what_is_not_id_key_secret() {
        let app: PusherApp = "1:key:se:cret".parse().unwrap();
        assert_eq!((app.id.as_str(), app.key.as_str()), ("1", "key"));
        assert_eq!(app.secret, "se:cret");
        assert!(format!("{app:?}").find("se:cret").is_none());
        for bad in ["1:key", "", "1::s", "a b:k:s", "1:k:"] {
            assert!(bad.parse::<PusherApp>().is_err(), "{bad}");
        }
    }

    /// The example of Pusher's own documentation of the signed HTTP API ("Generating
    /// authentication signatures"): the same key, secret, timestamp and body give its signature.
    #[test]
    fn the_signature_matches_the_protocol_documentation() {
        let app = PusherApp {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let path = app.signed_events_path(body, 1353088179);
        assert_eq!(
            path,
            "/apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=1353088179\
             &auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn an_event_body_carries_the_stamp_escaped_in_its_data_string() {
        let mut body = Vec::new();
        write_event_body(&mut body, "c", "lt", 42);
        assert_eq!(
            body,
            br#"{"name":"lt","channels":["c"],"data":"{\"lt_ns\":42}"}"#.to_vec()
        );
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["data"], r#"{"lt_ns":42}"#);
        assert_eq!(crate::stamp::find_stamp(&body), Some(42));
    }
}
