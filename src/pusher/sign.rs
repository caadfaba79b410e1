//! The signatures of the Pusher protocol: HMAC-SHA256 under the app's secret, in lowercase hex.
//!
//! - A private (or encrypted) channel subscription carries `auth` = `key:hex(hmac(secret,
//!   "socket_id:channel"))`, made by the app's auth endpoint.
//! - A sign-in carries `auth` = `key:hex(hmac(secret, "socket_id::user::user_data"))`.
//! - An HTTP API request carries `auth_signature` = `hex(hmac(secret, "METHOD\npath\nquery"))`, the
//!   query being every other parameter, keys lowercased, sorted, `key=value` joined by `&`, with
//!   `auth_timestamp` within a window of now and `body_md5` the MD5 of the body when there is one.
//!
//! Every comparison of a presented signature is in constant time.

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::http::query::query_pairs;
use crate::pusher::PusherApp;

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length (a longer one is hashed first), so this never fails.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// The hex signature of `message` under `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    hex(&hmac_sha256(secret.as_bytes(), message.as_bytes()))
}

/// Whether `presented` is the hex signature of `message` under `secret` (constant time).
fn signature_matches(secret: &str, message: &str, presented: &str) -> bool {
    sign(secret, message)
        .as_bytes()
        .ct_eq(presented.as_bytes())
        .into()
}

/// Whether `auth` (`key:signature`) is the app's over `message`.
fn auth_matches(app: &PusherApp, message: &str, auth: &str) -> bool {
    match auth.split_once(':') {
        Some((key, signature)) => {
            key == app.key && signature_matches(&app.secret, message, signature)
        }
        None => false,
    }
}

/// Whether a subscription's `auth` is valid for `socket_id` and `channel` (with `channel_data`, for
/// the channels that carry it).
pub fn channel_auth_valid(
    app: &PusherApp,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let message = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    auth_matches(app, &message, auth)
}

/// Whether a sign-in's `auth` is valid for `socket_id` and `user_data` (the JSON text, as sent).
pub fn signin_auth_valid(app: &PusherApp, socket_id: &str, user_data: &str, auth: &str) -> bool {
    auth_matches(app, &format!("{socket_id}::user::{user_data}"), auth)
}

/// Lowercase hex MD5 of a request body.
pub fn md5_hex(body: &[u8]) -> String {
    hex(Md5::digest(body).as_slice())
}

/// Why an HTTP API request's signature was refused (each a 401 with this message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestAuthError {
    /// A required parameter is missing.
    Missing(&'static str),
    /// `auth_key` is not the app's key.
    WrongKey,
    /// `auth_version` is not `1.0`.
    Version,
    /// `auth_timestamp` is not a number within the window of now.
    Stale,
    /// `body_md5` is missing for a body, or does not match it.
    BodyMd5,
    /// `auth_signature` does not match.
    Signature,
}

impl RequestAuthError {
    /// The sentence the 401 carries.
    pub fn message(self) -> String {
        match self {
            RequestAuthError::Missing(p) => format!("the signed query lacks {p}"),
            RequestAuthError::WrongKey => "auth_key is not this app's key".into(),
            RequestAuthError::Version => "auth_version must be 1.0".into(),
            RequestAuthError::Stale => {
                "auth_timestamp is too far from the server's clock (±600 s): check the clock".into()
            }
            RequestAuthError::BodyMd5 => "body_md5 does not match the body".into(),
            RequestAuthError::Signature => "auth_signature is not valid".into(),
        }
    }
}

/// Checks the signed query of an HTTP API request to `app`: `method` and `path` as sent, the raw
/// `query`, the `body`, the server's clock `now_s` and the accepted clock difference `window_s`.
pub fn verify_request(
    app: &PusherApp,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_s: u64,
    window_s: u64,
) -> Result<(), RequestAuthError> {
    let mut params: Vec<(String, String)> = query_pairs(query)
        .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
        .collect();
    let get = |params: &[(String, String)], key: &'static str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .ok_or(RequestAuthError::Missing(key))
    };
    let signature = get(&params, "auth_signature")?;
    if get(&params, "auth_key")? != app.key {
        return Err(RequestAuthError::WrongKey);
    }
    if get(&params, "auth_version")? != "1.0" {
        return Err(RequestAuthError::Version);
    }
    let timestamp: u64 = get(&params, "auth_timestamp")?
        .parse()
        .map_err(|_| RequestAuthError::Stale)?;
    if timestamp.abs_diff(now_s) > window_s {
        return Err(RequestAuthError::Stale);
    }
    match params.iter().find(|(k, _)| k == "body_md5") {
        Some((_, md5)) if *md5 != md5_hex(body) => return Err(RequestAuthError::BodyMd5),
        None if !body.is_empty() => return Err(RequestAuthError::Missing("body_md5")),
        _ => {}
    }
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let message = format!("{method}\n{path}\n{}", query.join("&"));
    if signature_matches(&app.secret, &message, &signature) {
        Ok(())
    } else {
        Err(RequestAuthError::Signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> PusherApp {
        PusherApp {
            id: "1".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        }
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A key longer than the block is hashed first (test case 6).
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn channel_auth_is_the_documented_example() {
        // Pusher's documentation example: socket 1234.1234 on private-foobar.
        let auth =
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert!(channel_auth_valid(
            &app(),
            "1234.1234",
            "private-foobar",
            None,
            auth
        ));
        assert!(!channel_auth_valid(
            &app(),
            "1234.1235",
            "private-foobar",
            None,
            auth
        ));
        assert!(!channel_auth_valid(
            &app(),
            "1234.1234",
            "private-foobar",
            None,
            "nokey"
        ));
        let other_key = auth.replace("278d", "999d");
        assert!(!channel_auth_valid(
            &app(),
            "1234.1234",
            "private-foobar",
            None,
            &other_key
        ));
        let user = r#"{"id":"7"}"#;
        let signin = format!(
            "{}:{}",
            app().key,
            sign(&app().secret, &format!("1.2::user::{user}"))
        );
        assert!(signin_auth_valid(&app(), "1.2", user, &signin));
        assert!(!signin_auth_valid(&app(), "1.2", r#"{"id":"8"}"#, &signin));
    }

    #[test]
    fn a_signed_request_is_checked_in_every_part() {
        let app = app();
        let body = br#"{"name":"e","channels":["c"],"data":"{}"}"#;
        let md5 = md5_hex(body);
        let signed = |ts: u64, path: &str| {
            let q = format!(
                "auth_key={}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}",
                app.key
            );
            let sig = sign(&app.secret, &format!("POST\n{path}\n{q}"));
            format!("{q}&auth_signature={sig}")
        };
        let q = signed(1000, "/apps/1/events");
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &q, body, 1000, 600),
            Ok(())
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &q, body, 1700, 600),
            Err(RequestAuthError::Stale)
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/2/events", &q, body, 1000, 600),
            Err(RequestAuthError::Signature)
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &q, b"{}", 1000, 600),
            Err(RequestAuthError::BodyMd5)
        );
        assert_eq!(
            verify_request(
                &app,
                "GET",
                "/apps/1/channels",
                "auth_key=x",
                b"",
                1000,
                600
            ),
            Err(RequestAuthError::Missing("auth_signature"))
        );
        // md5 of the empty body is the documented d41d8cd98f00b204e9800998ecf8427e.
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
