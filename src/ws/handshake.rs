//! The WebSocket opening handshake (RFC 6455 section 4.2), as two pure functions.
//!
//! The HTTP layer already parses requests with httparse for the REST API, so the upgrade does not go
//! through tungstenite's `accept`, which would parse the request a second time and allocate an
//! `http::Request`. The HTTP layer extracts the few headers that matter and calls [`validate`], which
//! answers with the `Sec-WebSocket-Accept` value (computed by tungstenite's `derive_accept_key`), then
//! writes [`switching_protocols`]. After that the socket speaks frames (see `codec`).
//!
//! The checks are deliberately those of RFC 6455 section 4.2.1 and no more: `Origin` is a browser
//! policy decided by the caller, and the key's content is not checked beyond its shape (it is a nonce
//! that we only hash back). The key check follows what common servers accept: 22 base64 characters and
//! `==`, i.e. 16 bytes, without insisting that the unused low bits of the last character are zero.

use tungstenite::handshake::derive_accept_key;

/// The only protocol version RFC 6455 defines.
const SUPPORTED_VERSION: &[u8] = b"13";

/// Length of a base64-encoded 16-byte key: 22 data characters and `==`.
const KEY_LEN: usize = 24;

/// The base64 padding that ends a 16-byte key.
const KEY_PADDING: &[u8] = b"==";

/// Why an upgrade request is refused. The caller answers `400 Bad Request`, or `426 Upgrade Required`
/// with `Sec-WebSocket-Version: 13` for [`HandshakeError::BadVersion`], as RFC 6455 section 4.4 asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// No `Sec-WebSocket-Key` header.
    MissingKey,
    /// `Sec-WebSocket-Key` is not the base64 encoding of 16 bytes.
    BadKey,
    /// `Sec-WebSocket-Version` is absent or not `13`.
    BadVersion,
    /// The request method is not GET.
    NotGet,
    /// `Upgrade: websocket` or `Connection: upgrade` is missing.
    NotUpgrade,
}

impl HandshakeError {
    /// A human sentence for the error body of API.md.
    pub fn message(&self) -> &'static str {
        match self {
            HandshakeError::MissingKey => "missing Sec-WebSocket-Key header",
            HandshakeError::BadKey => "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            HandshakeError::BadVersion => "Sec-WebSocket-Version must be 13",
            HandshakeError::NotGet => "a WebSocket upgrade must use GET",
            HandshakeError::NotUpgrade => {
                "a WebSocket upgrade needs the headers Upgrade: websocket and Connection: Upgrade"
            }
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for HandshakeError {}

/// Validates the handshake headers and returns the `Sec-WebSocket-Accept` value.
///
/// `is_get` is whether the method is GET; `upgrade_requested` whether the request carries both
/// `Upgrade: websocket` and a `Connection` header listing `upgrade` (both case-insensitive, which the
/// HTTP layer checks while it scans headers). `key` and `version` are the raw header values, `None`
/// when absent; surrounding spaces and tabs are ignored. Errors are reported in the order of the
/// parameters' importance: method, upgrade, version, key.
pub fn validate(
    is_get: bool,
    upgrade_requested: bool,
    key: Option<&[u8]>,
    version: Option<&[u8]>,
) -> Result<String, HandshakeError> {
    if !is_get {
        return Err(HandshakeError::NotGet);
    }
    if !upgrade_requested {
        return Err(HandshakeError::NotUpgrade);
    }
    if version.map(trim_ows) != Some(SUPPORTED_VERSION) {
        return Err(HandshakeError::BadVersion);
    }
    let key = trim_ows(key.ok_or(HandshakeError::MissingKey)?);
    if !is_key_shaped(key) {
        return Err(HandshakeError::BadKey);
    }
    Ok(derive_accept_key(key))
}

/// Whether `key` is 22 base64 characters followed by `==`, the encoding of 16 bytes.
fn is_key_shaped(key: &[u8]) -> bool {
    key.len() == KEY_LEN
        && key.ends_with(KEY_PADDING)
        && key[..KEY_LEN - KEY_PADDING.len()]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Strips HTTP optional whitespace (spaces and tabs) around a header value.
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// The full `HTTP/1.1 101 Switching Protocols` response, with `Upgrade`, `Connection`,
/// `Sec-WebSocket-Accept`, and `Sec-WebSocket-Protocol` when a subprotocol was chosen.
///
/// `protocol` must be one of the tokens the client offered (so it holds no CR or LF); the caller
/// picks it from a fixed list of ours.
pub fn switching_protocols(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    debug_assert!(
        !accept.contains(['\r', '\n']) && !protocol.is_some_and(|p| p.contains(['\r', '\n'])),
        "header values must not contain CR or LF"
    );
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    out.extend_from_slice(b"Sec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(protocol) = protocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(protocol.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 6455 section 1.3.
    const RFC_KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn ok(key: &[u8]) -> Result<String, HandshakeError> {
        validate(true, true, Some(key), Some(b"13"))
    }

    #[test]
    fn rfc_example_key() {
        assert_eq!(ok(RFC_KEY), Ok(RFC_ACCEPT.to_owned()));
    }

    #[test]
    fn whitespace_around_values_is_ignored() {
        assert_eq!(
            validate(
                true,
                true,
                Some(b" dGhlIHNhbXBsZSBub25jZQ==\t"),
                Some(b" 13 ")
            ),
            Ok(RFC_ACCEPT.to_owned())
        );
    }

    #[test]
    fn not_get() {
        // Reported first, whatever else is wrong.
        assert_eq!(
            validate(false, false, None, None),
            Err(HandshakeError::NotGet)
        );
        assert_eq!(
            validate(false, true, Some(RFC_KEY), Some(b"13")),
            Err(HandshakeError::NotGet)
        );
    }

    #[test]
    fn not_upgrade() {
        assert_eq!(
            validate(true, false, Some(RFC_KEY), Some(b"13")),
            Err(HandshakeError::NotUpgrade)
        );
        assert_eq!(
            validate(true, false, None, None),
            Err(HandshakeError::NotUpgrade)
        );
    }

    #[test]
    fn bad_version() {
        for version in [
            None,
            Some(&b""[..]),
            Some(b"8"),
            Some(b"12"),
            Some(b"130"),
            Some(b"13, 8"),
        ] {
            assert_eq!(
                validate(true, true, Some(RFC_KEY), version),
                Err(HandshakeError::BadVersion),
                "{version:?}"
            );
        }
    }

    #[test]
    fn missing_key() {
        assert_eq!(
            validate(true, true, None, Some(b"13")),
            Err(HandshakeError::MissingKey)
        );
    }

    #[test]
    fn bad_keys() {
        let bad: [&[u8]; 8] = [
            b"",
            b"dGhlIHNhbXBsZSBub25jZQ",                 // No padding.
            b"dGhlIHNhbXBsZSBub25jZQ=",                // Half the padding.
            b"dGhlIHNhbXBsZSBub25jZQ===",              // Too long.
            b"dGhlIHNhbXBsZSBub25jZ===",               // Padding where data belongs.
            b"dGhlIHNhbXBsZSBub25j-Q==",               // URL-safe alphabet is not base64.
            b"dGhlIHNhbXBsZSBub25jZQZZ",               // No padding at all, 18 bytes.
            "dGhlIHNhbXBsZSBub25j\u{e9}Q=".as_bytes(), // Non-ASCII, 24 bytes.
        ];
        for key in bad {
            assert_eq!(
                ok(key),
                Err(HandshakeError::BadKey),
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn every_error_has_a_message() {
        use HandshakeError::*;
        for e in [MissingKey, BadKey, BadVersion, NotGet, NotUpgrade] {
            assert!(!e.message().is_empty());
            assert_eq!(e.to_string(), e.message());
        }
        assert_ne!(BadKey.message(), MissingKey.message());
    }

    #[test]
    fn switching_protocols_response() {
        let plain = switching_protocols(RFC_ACCEPT, None);
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let with_protocol = switching_protocols(RFC_ACCEPT, Some("notifications.v1"));
        assert_eq!(
            String::from_utf8(with_protocol).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: notifications.v1\r\n\r\n"
        );
    }
}
