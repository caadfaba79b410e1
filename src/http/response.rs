//! HTTP/1.1 responses as plain values, serialized into a caller-owned buffer.
//!
//! A handler returns a [`Response`]; it never writes to a socket. The
//! connection task calls [`Response::write_to`] with the request's
//! keep-alive and HEAD-ness, which are connection concerns the handler should
//! not have to thread through. Appending to a `Vec<u8>` (rather than
//! returning a fresh one) lets the task serialize several pipelined responses
//! back to back and flush them with one write.
//!
//! The writer owns the framing headers so no handler can get them wrong:
//! `Content-Length` is always the body's real length, `Connection` always
//! matches what the task will actually do, and bodies are never emitted for
//! statuses that must not have one (1xx, 204, 304), since a stray body there
//! would be read by the client as the start of the next response. We always
//! answer `HTTP/1.1`, also to 1.0 clients, as RFC 9110 2.5 recommends; the
//! explicit `Connection` header keeps that safe for them.
//!
//! Header names are `&'static str` because they come from code, never from
//! input. Values are `String`s and may echo input (an id in `Location`, say),
//! so CR and LF in them are replaced by spaces: a response must never be
//! splittable by a crafted request.

use crate::http::request::ParseError;

/// Media type of every JSON body, errors included.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Value of the `Server` header.
pub const SERVER_NAME: &str = "notification-service";

/// Protocol version on every status line.
const STATUS_LINE_VERSION: &[u8] = b"HTTP/1.1 ";

/// Room for the fixed headers, reserved up front so the common response is
/// serialized without growing the buffer more than once.
const FIXED_HEAD_ESTIMATE: usize = 128;

/// An HTTP response ready to be serialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, expected in 100..=599.
    pub status: u16,
    /// `Content-Type` value; `None` writes no such header.
    pub content_type: Option<&'static str>,
    /// Extra headers in the order they are written. The writer adds
    /// `Content-Type`, `Content-Length`, `Connection` and `Server` itself; a
    /// `Connection` header given here (for `101 Switching Protocols`)
    /// replaces the automatic one.
    pub headers: Vec<(&'static str, String)>,
    /// Body bytes; left out on the wire for HEAD requests and bodiless statuses.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a JSON body (`Content-Type: application/json`).
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response::text(status, JSON_CONTENT_TYPE, body)
    }

    /// The contract's error shape, `{"error":{"code":...,"message":...}}`,
    /// with both strings JSON-escaped by serde_json.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        // Display on a Value cannot fail (it has no non-string keys), unlike
        // serde_json::to_vec, which would need an unwrap.
        Response::json(status, body.to_string().into_bytes())
    }

    /// A response without body or content type, e.g. `204 No Content`.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A response with a body of the given media type (metrics, plain text).
    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type: Some(content_type),
            headers: Vec::new(),
            body,
        }
    }

    /// Adds a header (`Allow`, `Retry-After`, `Upgrade`, ...), builder style.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Serializes status line, headers (Content-Length always except for
    /// 1xx/204/304; Content-Type if any; `Connection: keep-alive` or
    /// `Connection: close`; `Server: notification-service`), blank line and
    /// body (omitted when head_only, e.g. HEAD requests, but Content-Length
    /// still the body's). Appends to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
        let bodiless = status_forbids_body(self.status);
        let write_body = !bodiless && !head_only;
        out.reserve(
            FIXED_HEAD_ESTIMATE
                + self
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 4)
                    .sum::<usize>()
                + if write_body { self.body.len() } else { 0 },
        );

        out.extend_from_slice(STATUS_LINE_VERSION);
        push_decimal(out, usize::from(self.status));
        out.push(b' ');
        out.extend_from_slice(reason_phrase(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");

        if let Some(content_type) = self.content_type {
            push_header(out, "Content-Type", content_type);
        }
        if !bodiless {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, self.body.len());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in &self.headers {
            push_header(out, name, value);
        }
        let has_connection = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("connection"));
        if !has_connection {
            let value = if keep_alive { "keep-alive" } else { "close" };
            push_header(out, "Connection", value);
        }
        push_header(out, "Server", SERVER_NAME);
        out.extend_from_slice(b"\r\n");

        if write_body {
            out.extend_from_slice(&self.body);
        }
    }
}

impl From<&ParseError> for Response {
    /// The error response for a request that could not be parsed.
    fn from(err: &ParseError) -> Response {
        Response::error(err.status(), err.code(), &err.message())
    }
}

/// Statuses that never carry a body or a `Content-Length` (RFC 9110 6.4.1,
/// 8.6): informational, 204 No Content and 304 Not Modified.
fn status_forbids_body(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Appends `name: value\r\n`, with CR and LF in the value turned into spaces.
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(
        value
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal without going through `fmt` (no `Result` to
/// ignore, no temporary `String`).
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    // usize::MAX has 20 decimal digits on 64-bit targets.
    const MAX_DIGITS: usize = 20;
    let mut digits = [0u8; MAX_DIGITS];
    let mut start = MAX_DIGITS;
    loop {
        start -= 1;
        if let Some(slot) = digits.get_mut(start) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or(&[]));
}

/// Writes the head of a `200` stream response (Server-Sent Events): no `Content-Length` and no chunked
/// framing, and `Connection: close`, so the body is everything until the connection closes (RFC 9112
/// section 6.3), which lets every stream write the same shared event bytes.
pub fn write_stream_head(out: &mut Vec<u8>, content_type: &str, headers: &[(&str, &str)]) {
    out.extend_from_slice(STATUS_LINE_VERSION);
    out.extend_from_slice(b"200 OK\r\n");
    push_header(out, "Content-Type", content_type);
    for (name, value) in headers {
        push_header(out, name, value);
    }
    push_header(out, "Connection", "close");
    push_header(out, "Server", SERVER_NAME);
    out.extend_from_slice(b"\r\n");
}

/// Reason phrase for a status code: every code the API contract uses, a few
/// common neighbours, and `"Unknown"` otherwise (clients ignore the phrase).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(response: &Response, keep_alive: bool, head_only: bool) -> String {
        let mut out = Vec::new();
        response.write_to(&mut out, keep_alive, head_only);
        String::from_utf8(out).expect("test responses are UTF-8")
    }

    #[test]
    fn json_response_byte_for_byte() {
        let response = Response::json(201, br#"{"id":"x"}"#.to_vec()).with_header("Location", "/x");
        let mut out = Vec::new();
        response.write_to(&mut out, true, false);
        let expected: &[u8] = b"HTTP/1.1 201 Created\r\n\
Content-Type: application/json\r\n\
Content-Length: 10\r\n\
Location: /x\r\n\
Connection: keep-alive\r\n\
Server: notification-service\r\n\
\r\n\
{\"id\":\"x\"}";
        assert_eq!(out, expected);
    }

    #[test]
    fn close_and_head_only() {
        let response = Response::json(200, b"{}".to_vec());
        let text = written(&response, false, true);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\nServer: notification-service\r\n\r\n"
        );
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let text = written(&Response::empty(204), true, false);
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\nServer: notification-service\r\n\r\n"
        );
        // Even a body set by mistake must not reach the wire.
        let mut wrong = Response::empty(304);
        wrong.body = b"oops".to_vec();
        let text = written(&wrong, true, false);
        assert!(!text.contains("oops"));
        assert!(!text.contains("Content-Length"));
    }

    #[test]
    fn empty_non_204_has_zero_length() {
        let text = written(&Response::empty(200), true, false);
        assert!(text.contains("\r\nContent-Length: 0\r\n"));
        assert!(!text.contains("Content-Type"));
    }

    #[test]
    fn switching_protocols_keeps_its_own_connection_header() {
        let response = Response::empty(101)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade")
            .with_header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let text = written(&response, true, false);
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nServer: notification-service\r\n\r\n"
        );
    }

    #[test]
    fn error_body_shape_and_escaping() {
        let response =
            Response::error(400, "invalid_field", "field \"user_id\" is bad\n\\ <\u{1}>");
        assert_eq!(response.status, 400);
        assert_eq!(response.content_type, Some("application/json"));
        let body = String::from_utf8(response.body.clone()).expect("JSON is UTF-8");
        assert_eq!(
            body,
            r#"{"error":{"code":"invalid_field","message":"field \"user_id\" is bad\n\\ <\u0001>"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(
            parsed["error"]["message"],
            "field \"user_id\" is bad\n\\ <\u{1}>"
        );
    }

    #[test]
    fn parse_error_to_response() {
        let response = Response::from(&ParseError::BodyTooLarge);
        assert_eq!(response.status, 413);
        let parsed: serde_json::Value = serde_json::from_slice(&response.body).expect("valid JSON");
        assert_eq!(parsed["error"]["code"], "body_too_large");
        let text = written(&response, false, false);
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
    }

    #[test]
    fn header_values_cannot_split_the_response() {
        let response = Response::empty(302).with_header("Location", "/a\r\nSet-Cookie: x=1");
        let text = written(&response, true, false);
        assert!(text.contains("Location: /a  Set-Cookie: x=1\r\n"));
        assert!(!text.contains("\r\nSet-Cookie"));
    }

    #[test]
    fn text_response_and_length() {
        let body = vec![b'a'; 12345];
        let response = Response::text(200, "text/plain; version=0.0.4", body);
        let text = written(&response, true, false);
        assert!(text.contains("Content-Type: text/plain; version=0.0.4\r\n"));
        assert!(text.contains("Content-Length: 12345\r\n"));
        assert!(text.ends_with(&"a".repeat(12345)));
    }

    #[test]
    fn write_to_appends() {
        let mut out = b"previous".to_vec();
        Response::empty(204).write_to(&mut out, true, false);
        Response::empty(204).write_to(&mut out, false, false);
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(text.starts_with("previousHTTP/1.1 204 No Content\r\n"));
        assert_eq!(text.matches("HTTP/1.1 204").count(), 2);
        assert!(text.ends_with("Connection: close\r\nServer: notification-service\r\n\r\n"));
    }

    #[test]
    fn decimal_formatting() {
        for n in [0usize, 7, 10, 99, 100, 65_536, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn reason_phrases_cover_the_contract() {
        let used = [
            101, 200, 201, 204, 400, 401, 403, 404, 405, 408, 411, 413, 415, 422, 429, 431, 500,
            503, 505,
        ];
        for status in used {
            assert_ne!(reason_phrase(status), "Unknown", "{status}");
        }
        assert_eq!(reason_phrase(404), "Not Found");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(299), "Unknown");
        assert_eq!(reason_phrase(0), "Unknown");
    }
}
