//! Fuzz target: the HTTP/1.1 request-head parser (`http::parse_head`) and everything the router does
//! with a parsed head (path, query parameters, percent-decoding, the WebSocket handshake checks).
//!
//! The input is the raw bytes a client sent. Each input is parsed under the default limits and under
//! tiny ones, so the limit checks are reached by short inputs too. Besides "never panics", it asserts
//! the invariants the connection task relies on (see `check`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use notification_service::http::query::decode_path_segment;
use notification_service::http::request::MAX_HEADERS;
use notification_service::http::{parse_head, query_param, Limits, Method, Parsed};
use notification_service::ws::handshake;

/// Limits small enough that short inputs reach the 431 and 413 paths.
const TINY: Limits = Limits {
    max_header_bytes: 64,
    max_body_bytes: 8,
};

/// Query parameters the routes read.
const QUERY_KEYS: [&str; 6] = ["user_id", "limit", "before", "unread", "since", "channels"];

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    check(data, &TINY);
});

fn check(buf: &[u8], limits: &Limits) {
    match parse_head(buf, limits) {
        Ok(Parsed::Complete { head, head_len }) => {
            // The connection task slices the buffer at head_len and reserves content_length bytes.
            assert!(head_len <= buf.len());
            assert!(head_len <= limits.max_header_bytes);
            assert!(head.content_length <= limits.max_body_bytes);
            assert!(head.minor_version <= 1);
            assert!(head.headers.len() <= MAX_HEADERS);
            for h in &head.headers {
                assert!(!h.name.is_empty());
                assert_eq!(h.name, h.name.to_ascii_lowercase(), "names are lowercased");
            }
            if head.method == Method::Post {
                assert!(
                    head.header("content-length").is_some(),
                    "POST without a length"
                );
            }
            assert!(head.header("transfer-encoding").is_none());

            // The parser is stateless: the head alone (without the body and pipelined bytes after
            // it) parses to the same thing.
            assert_eq!(
                parse_head(&buf[..head_len], limits),
                Ok(Parsed::Complete {
                    head: head.clone(),
                    head_len
                })
            );

            // What the router and handlers do with a head.
            let path = head.path();
            assert!(!path.is_empty());
            assert!(!path.contains('?'));
            for segment in path.split('/') {
                let _ = decode_path_segment(segment);
            }
            let query = head.query();
            for key in QUERY_KEYS {
                let _ = query_param(query, key);
            }
            let _ = head.content_type_is_json();
            let _ = head.header_str("host");
            if head.websocket_upgrade {
                let accepted = handshake::validate(
                    head.method == Method::Get,
                    true,
                    head.header("sec-websocket-key"),
                    head.header("sec-websocket-version"),
                );
                if let Ok(accept) = accepted {
                    assert_eq!(accept.len(), 28, "base64 of a SHA-1");
                    let _ = handshake::switching_protocols(&accept, None);
                }
            }
        }
        Ok(Parsed::Incomplete) => assert!(buf.len() <= limits.max_header_bytes),
        Err(err) => {
            assert!([400, 411, 413, 431, 505].contains(&err.status()), "{err:?}");
            assert!(!err.code().is_empty());
            assert!(err.message().ends_with('.'));
        }
    }
}
