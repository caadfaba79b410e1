//! Incremental parsing of HTTP/1.x request heads.
//!
//! The heavy lifting (tokenizing the request line and header fields) is done
//! by httparse, which is zero-copy and SIMD-accelerated. This file adds the
//! policy httparse leaves to us: size limits, message framing
//! (`Content-Length` only, see the module doc of `http` for why chunked is
//! refused), persistence (`Connection`), and WebSocket upgrade detection.
//!
//! The parser is stateless. Each call looks at the start of the caller's
//! buffer and either finds a complete head or does not; nothing is remembered
//! between calls. httparse needs a fixed array of header slots, so a request
//! with more than [`MAX_HEADERS`] fields is treated like one whose head is too
//! large (431): a legitimate client never needs that many.
//!
//! Once a head is complete it is copied into an owned [`RequestHead`] (header
//! names lowercased once, here, so lookups never have to). That costs a few
//! small allocations per request but frees the caller to drop or compact its
//! read buffer while the handler runs, which matters more in a server that
//! parks requests across awaits.
//!
//! Errors are decided as early as possible and in a fixed order: head size and
//! syntax, then protocol version, then framing (`Transfer-Encoding`,
//! `Content-Length`, body size). Every error is final for the connection,
//! because after a framing error we no longer know where the next request
//! starts.

use std::fmt;

/// Default cap on the request head (request line plus header fields), as
/// promised by the API contract (431 above it).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;

/// Default cap on a request body, as promised by the API contract (413 above it).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Number of header slots handed to httparse. More fields than this is
/// answered with 431, like an oversized head.
pub const MAX_HEADERS: usize = 64;

/// Optional whitespace as defined by RFC 9110 (`OWS = *( SP / HTAB )`).
const OWS: [char; 2] = [' ', '\t'];

/// Size limits applied while parsing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted head, request line and blank line included (default 8 KiB).
    pub max_header_bytes: usize,
    /// Largest accepted `Content-Length` (default 64 KiB).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    /// The limits promised by the API contract: 8 KiB of head, 64 KiB of body.
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Request method. Only the methods the router can dispatch on get a variant;
/// anything else (TRACE, CONNECT, extension methods) is `Other` and ends up as
/// 405 or 404 in the router. Methods are case-sensitive (RFC 9110 9.1), so
/// `get` is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: answered like GET, with the body left out by the writer.
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `OPTIONS`
    Options,
    /// `PATCH`
    Patch,
    /// Any other syntactically valid method token.
    Other,
}

impl Method {
    /// Maps a method token to its variant, exactly (methods are case-sensitive).
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }

    /// The method's name, for logs, metrics and `Allow` headers. `Other` is
    /// `"OTHER"`, since the original token is not kept.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Other => "OTHER",
        }
    }

    /// Whether a request with this method must say how long its body is (411
    /// otherwise). Only POST: every POST route of the API takes a JSON body,
    /// while `PUT …/read` and `PUT …/read-all` take none, and `curl -X PUT`
    /// (the seeds' own example) sends no Content-Length at all. A missing
    /// length on the other methods means an empty body, never read-until-close.
    fn requires_length(&self) -> bool {
        matches!(self, Method::Post)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One header field. Values are bytes because HTTP allows obs-text (bytes
/// 0x80-0xFF) in values; [`RequestHead::header_str`] gives the UTF-8 view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Field name, lowercased so lookups can compare bytes directly.
    pub name: String,
    /// Field value as sent, without the surrounding whitespace httparse strips.
    pub value: Vec<u8>,
}

/// A parsed, owned request head. The body, if any, is the
/// `content_length` bytes that follow the head in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The request method.
    pub method: Method,
    /// Raw request-target, e.g. `/api/v1/x?user_id=1`, not percent-decoded.
    pub target: String,
    /// `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
    /// All header fields, in the order received, duplicates kept.
    pub headers: Vec<Header>,
    /// Declared body length; `0` when there is no `Content-Length`.
    pub content_length: usize,
    /// Whether the connection may carry another request after this one:
    /// HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Upgrade: websocket` together with an `upgrade` token in `Connection`.
    /// Only detection; the handshake itself validates the key and version.
    pub websocket_upgrade: bool,
}

impl RequestHead {
    /// Value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// Like [`header`](Self::header), as text with surrounding whitespace
    /// trimmed; `None` when absent or not valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim_matches(OWS))
    }

    /// The path part of the target (before `?`). An absolute-form target
    /// (`http://host/path`, which RFC 9112 3.2.2 says servers must accept)
    /// is reduced to its path, so the router sees one shape.
    pub fn path(&self) -> &str {
        let origin = strip_scheme_and_authority(&self.target);
        let path = origin.split_once('?').map_or(origin, |(p, _)| p);
        if path.is_empty() {
            "/"
        } else {
            path
        }
    }

    /// The raw query string (after the first `?`), `""` if there is none.
    /// Decode parameters with [`query_param`](crate::http::query::query_param).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether the body is declared as JSON: `application/json` or any
    /// `type/subtype+json` (RFC 6839 suffix), case-insensitive, parameters
    /// such as `; charset=utf-8` ignored.
    pub fn content_type_is_json(&self) -> bool {
        let Some(value) = self.header_str("content-type") else {
            return false;
        };
        let media_type = value
            .split_once(';')
            .map_or(value, |(m, _)| m)
            .trim_matches(OWS);
        let Some((kind, subtype)) = media_type.split_once('/') else {
            return false;
        };
        if kind.is_empty() || subtype.is_empty() {
            return false;
        }
        if kind.eq_ignore_ascii_case("application") && subtype.eq_ignore_ascii_case("json") {
            return true;
        }
        subtype.rsplit_once('+').is_some_and(|(prefix, suffix)| {
            !prefix.is_empty() && suffix.eq_ignore_ascii_case("json")
        })
    }
}

/// Drops `http://authority` or `https://authority` from an absolute-form
/// target; returns origin-form targets unchanged.
fn strip_scheme_and_authority(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        let matches = target
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme));
        if matches {
            let rest = target.get(scheme.len()..).unwrap_or("");
            return rest
                .find(['/', '?'])
                .and_then(|i| rest.get(i..))
                .unwrap_or("");
        }
    }
    target
}

/// Why a request head was refused. Every variant maps to one status code of
/// the API contract and ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The head is over `max_header_bytes`, or has more than [`MAX_HEADERS`] fields (431).
    HeadersTooLarge,
    /// Malformed syntax; the string is a short reason such as "invalid header name" (400).
    BadRequest(&'static str),
    /// A body without a usable length: any `Transfer-Encoding`, or a
    /// POST without `Content-Length` (411).
    LengthRequired,
    /// `Content-Length` over `max_body_bytes` (413).
    BodyTooLarge,
    /// A well-formed request line naming an HTTP version other than 1.0 or 1.1 (505).
    VersionNotSupported,
}

impl ParseError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::HeadersTooLarge => 431,
            ParseError::BadRequest(_) => 400,
            ParseError::LengthRequired => 411,
            ParseError::BodyTooLarge => 413,
            ParseError::VersionNotSupported => 505,
        }
    }

    /// The snake_case `error.code` of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::HeadersTooLarge => "headers_too_large",
            ParseError::BadRequest(_) => "bad_request",
            ParseError::LengthRequired => "length_required",
            ParseError::BodyTooLarge => "body_too_large",
            ParseError::VersionNotSupported => "http_version_not_supported",
        }
    }

    /// The human sentence for `error.message`.
    pub fn message(&self) -> String {
        match self {
            ParseError::HeadersTooLarge => {
                "The request headers are larger than the server accepts.".to_owned()
            }
            ParseError::BadRequest(reason) => format!("Malformed HTTP request: {reason}."),
            ParseError::LengthRequired => {
                "A request body needs a Content-Length header; chunked transfer encoding is not supported."
                    .to_owned()
            }
            ParseError::BodyTooLarge => {
                "The request body is larger than the server accepts.".to_owned()
            }
            ParseError::VersionNotSupported => {
                "Only HTTP/1.0 and HTTP/1.1 are supported.".to_owned()
            }
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for ParseError {}

/// Outcome of a successful [`parse_head`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head has not fully arrived; read more bytes and call again with
    /// the same buffer start.
    Incomplete,
    /// A whole head. `head_len` bytes of the buffer belong to it (leading
    /// blank lines included); the body starts right after.
    Complete {
        /// The parsed head.
        head: RequestHead,
        /// How many bytes at the start of the buffer the head occupies.
        head_len: usize,
    },
}

/// Parses the head at the start of `buf`. The body is the next
/// `head.content_length` bytes after `head_len`; anything after that is the
/// next pipelined request.
///
/// Returns `Incomplete` while the head is unfinished and `buf` is no longer
/// than `limits.max_header_bytes`. Never panics, whatever the bytes.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    // Only the first max_header_bytes can belong to an acceptable head, so
    // httparse never scans further: a head that does not end inside this
    // window is too large, whatever follows.
    let window = buf.get(..limits.max_header_bytes).unwrap_or(buf);

    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_header_bytes {
                Err(ParseError::HeadersTooLarge)
            } else {
                Ok(Parsed::Incomplete)
            };
        }
        Err(err) => return Err(map_httparse_error(err, window)),
    };

    // httparse only reports Complete with all three set; treat anything else
    // as malformed rather than trusting that invariant with an unwrap.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(ParseError::BadRequest("invalid request line"));
    };
    if minor_version > 1 {
        return Err(ParseError::VersionNotSupported);
    }
    let method = Method::from_token(method);
    let fields: &[httparse::Header<'_>] = req.headers;

    // Refuse any Transfer-Encoding, not only "chunked": with it present,
    // Content-Length must be ignored (RFC 9112 6.3), so we could not frame
    // the body at all.
    if fields
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(ParseError::LengthRequired);
    }
    let content_length = match declared_length(fields)? {
        Some(len) if len > limits.max_body_bytes => return Err(ParseError::BodyTooLarge),
        Some(len) => len,
        None if method.requires_length() => return Err(ParseError::LengthRequired),
        None => 0,
    };

    let keep_alive = if minor_version == 0 {
        has_token(fields, "connection", "keep-alive") && !has_token(fields, "connection", "close")
    } else {
        !has_token(fields, "connection", "close")
    };
    let websocket_upgrade =
        has_token(fields, "upgrade", "websocket") && has_token(fields, "connection", "upgrade");

    let headers = fields
        .iter()
        .map(|h| Header {
            name: h.name.to_ascii_lowercase(),
            value: h.value.to_vec(),
        })
        .collect();

    Ok(Parsed::Complete {
        head: RequestHead {
            method,
            target: target.to_owned(),
            minor_version,
            headers,
            content_length,
            keep_alive,
            websocket_upgrade,
        },
        head_len,
    })
}

/// Turns an httparse error into our error, telling an unsupported but
/// well-formed version (`HTTP/2.0`, 505) from garbage (400).
fn map_httparse_error(err: httparse::Error, window: &[u8]) -> ParseError {
    match err {
        httparse::Error::TooManyHeaders => ParseError::HeadersTooLarge,
        httparse::Error::Version if names_other_http_version(window) => {
            ParseError::VersionNotSupported
        }
        httparse::Error::Version => ParseError::BadRequest("invalid HTTP version"),
        httparse::Error::HeaderName => ParseError::BadRequest("invalid header name"),
        httparse::Error::HeaderValue => ParseError::BadRequest("invalid header value"),
        httparse::Error::NewLine => ParseError::BadRequest("invalid line ending"),
        // Token covers the method and the target, including a non-UTF-8
        // target; Status is response-only but mapped for completeness.
        httparse::Error::Token | httparse::Error::Status => {
            ParseError::BadRequest("invalid request line")
        }
    }
}

/// Whether the request line is well formed and ends in `HTTP/<digit>...`,
/// i.e. the client speaks HTTP, just not a version we do. Looks at the first
/// non-empty line, as httparse skips leading blank lines.
fn names_other_http_version(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let rest = buf.get(start..).unwrap_or(&[]);
    let line = rest.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Exactly `method SP target SP version`: with a space inside the target
    // the last word may look like a version, yet the line is malformed.
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && !target.is_empty()
        && version
            .strip_prefix(b"HTTP/")
            .and_then(|v| v.first())
            .is_some_and(u8::is_ascii_digit)
}

/// The declared body length. Several `Content-Length` fields, or a list in
/// one field, are accepted only when every value is the same number
/// (RFC 9112 6.3); a value too big for `usize` saturates, which the caller
/// then rejects as too large.
fn declared_length(fields: &[httparse::Header<'_>]) -> Result<Option<usize>, ParseError> {
    // Values are compared as digit strings without leading zeros, so "007"
    // and "7" agree and two different overflowing numbers still disagree.
    let mut seen: Option<&[u8]> = None;
    let mut length = 0usize;
    for field in fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        for item in field.value.split(|&b| b == b',') {
            let digits = trim_ows(item);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(ParseError::BadRequest("invalid Content-Length"));
            }
            let significant = match digits.iter().position(|&b| b != b'0') {
                Some(first) => digits.get(first..).unwrap_or(&[]),
                None => &[],
            };
            match seen {
                Some(previous) if previous != significant => {
                    return Err(ParseError::BadRequest("conflicting Content-Length values"));
                }
                Some(_) => {}
                None => {
                    length = saturating_decimal(significant);
                    seen = Some(significant);
                }
            }
        }
    }
    Ok(seen.map(|_| length))
}

/// Decimal digits to a number, saturating at `usize::MAX` instead of
/// overflowing. The caller has checked that every byte is a digit.
fn saturating_decimal(digits: &[u8]) -> usize {
    digits.iter().fold(0usize, |acc, &d| {
        acc.saturating_mul(10)
            .saturating_add(usize::from(d.wrapping_sub(b'0')))
    })
}

/// Whether any field called `name` lists `token` in its comma-separated
/// value (case-insensitive), e.g. `Connection: keep-alive, Upgrade`.
fn has_token(fields: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|item| trim_ows(item).eq_ignore_ascii_case(token.as_bytes()))
}

/// `bytes` without leading and trailing spaces and tabs.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
        parse_head(buf, &Limits::default())
    }

    /// Parses a buffer expected to hold a complete head.
    fn complete(buf: &[u8]) -> (RequestHead, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { head, head_len }) => (head, head_len),
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let buf = b"GET /api/v1/notifications/user/u1?limit=10&unread=true HTTP/1.1\r\nHost: localhost:8080\r\nAccept: */*\r\n\r\n";
        let (head, head_len) = complete(buf);
        assert_eq!(head_len, buf.len());
        assert_eq!(head.method, Method::Get);
        assert_eq!(head.method.as_str(), "GET");
        assert_eq!(
            head.target,
            "/api/v1/notifications/user/u1?limit=10&unread=true"
        );
        assert_eq!(head.path(), "/api/v1/notifications/user/u1");
        assert_eq!(head.query(), "limit=10&unread=true");
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.content_length, 0);
        assert!(head.keep_alive);
        assert!(!head.websocket_upgrade);
        assert_eq!(head.headers.len(), 2);
        assert_eq!(head.headers[0].name, "host");
        assert_eq!(head.header("HOST"), Some(&b"localhost:8080"[..]));
        assert_eq!(head.header_str("accept"), Some("*/*"));
        assert_eq!(head.header("missing"), None);
    }

    #[test]
    fn target_without_query() {
        let (head, _) = complete(b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!(head.path(), "/health");
        assert_eq!(head.query(), "");
    }

    #[test]
    fn absolute_form_target_is_reduced_to_path() {
        let (head, _) = complete(b"GET http://example.com:8080/health?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(head.path(), "/health");
        assert_eq!(head.query(), "x=1");
        let (head, _) = complete(b"GET HTTPS://example.com HTTP/1.1\r\n\r\n");
        assert_eq!(head.path(), "/");
    }

    #[test]
    fn post_with_body() {
        let body = br#"{"user_id":"u1","message":"hola"}"#;
        let mut buf = format!(
            "POST /api/v1/notifications/send HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head_end = buf.len();
        buf.extend_from_slice(body);
        let (head, head_len) = complete(&buf);
        assert_eq!(head.method, Method::Post);
        assert_eq!(head_len, head_end);
        assert_eq!(head.content_length, body.len());
        assert_eq!(&buf[head_len..head_len + head.content_length], body);
        assert!(head.content_type_is_json());
    }

    #[test]
    fn methods() {
        for (token, method) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("TRACE", Method::Other),
            ("get", Method::Other),
        ] {
            let buf = format!("{token} / HTTP/1.1\r\n\r\n");
            let (head, _) = complete(buf.as_bytes());
            assert_eq!(head.method, method, "{token}");
        }
        for (token, method) in [
            ("PUT", Method::Put),
            ("PATCH", Method::Patch),
            ("POST", Method::Post),
        ] {
            let buf = format!("{token} / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
            let (head, _) = complete(buf.as_bytes());
            assert_eq!(head.method, method, "{token}");
            assert_eq!(head.method.as_str(), token);
        }
    }

    #[test]
    fn pipelined_requests() {
        let first = b"POST /notifications HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let second = b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n";
        let buf = [&first[..], &second[..]].concat();

        let (head, head_len) = complete(&buf);
        assert_eq!(head.path(), "/notifications");
        let body_end = head_len + head.content_length;
        assert_eq!(&buf[head_len..body_end], b"hello");

        let (next, next_len) = complete(&buf[body_end..]);
        assert_eq!(next.method, Method::Get);
        assert_eq!(next.path(), "/health");
        assert!(!next.keep_alive);
        assert_eq!(body_end + next_len, buf.len());
    }

    #[test]
    fn every_prefix_of_pipelined_input() {
        let first: &[u8] =
            b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n{}{}";
        let second: &[u8] =
            b"GET /ws?user_id=u1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let buf = [first, second].concat();
        let (full_first, first_len) = complete(&buf);
        let rest = &buf[first_len + full_first.content_length..];
        let (full_second, second_len) = complete(rest);
        assert!(full_second.websocket_upgrade);

        for (input, expected, expected_len) in [
            (&buf[..], &full_first, first_len),
            (rest, &full_second, second_len),
        ] {
            for end in 0..=input.len() {
                match parse(&input[..end]) {
                    Ok(Parsed::Incomplete) => assert!(end < expected_len, "prefix {end}"),
                    Ok(Parsed::Complete { head, head_len }) => {
                        assert!(end >= expected_len, "prefix {end}");
                        assert_eq!(head_len, expected_len);
                        assert_eq!(&head, expected);
                    }
                    Err(err) => panic!("prefix {end} gave {err:?}"),
                }
            }
        }
    }

    #[test]
    fn every_strict_prefix_of_a_request_is_incomplete() {
        let buf = b"PUT /api/v1/notifications/u1/read-all HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-A: b\r\n\r\n";
        for end in 0..buf.len() {
            assert_eq!(parse(&buf[..end]), Ok(Parsed::Incomplete), "prefix {end}");
        }
        assert!(matches!(parse(buf), Ok(Parsed::Complete { .. })));
    }

    #[test]
    fn leading_blank_lines_count_in_head_len() {
        let buf = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (head, head_len) = complete(buf);
        assert_eq!(head.path(), "/");
        assert_eq!(head_len, buf.len());
    }

    #[test]
    fn keep_alive_rules() {
        let cases: [(&[u8], bool); 7] = [
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive-ish\r\n\r\n",
                false,
            ),
        ];
        for (buf, expected) in cases {
            let (head, _) = complete(buf);
            assert_eq!(
                head.keep_alive,
                expected,
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
        let (head, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(head.minor_version, 0);
    }

    #[test]
    fn websocket_upgrade_detection() {
        let cases: [(&[u8], bool); 6] = [
            (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", true),
            (b"GET /ws HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, upgrade\r\n\r\n", true),
            (b"GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: keep-alive\r\nConnection: Upgrade\r\n\r\n", true),
            (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", false),
            (b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\n\r\n", false),
            (b"GET /ws HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", false),
        ];
        for (buf, expected) in cases {
            let (head, _) = complete(buf);
            assert_eq!(
                head.websocket_upgrade,
                expected,
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn json_content_types() {
        let cases = [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/json;charset=UTF-8", true),
            ("application/problem+json", true),
            ("application/vnd.api+JSON ; charset=utf-8", true),
            ("text/plain", false),
            ("application/jsonx", false),
            ("application/+json", false),
            ("json", false),
            ("application/x-www-form-urlencoded", false),
        ];
        for (value, expected) in cases {
            let buf =
                format!("POST / HTTP/1.1\r\nContent-Type: {value}\r\nContent-Length: 0\r\n\r\n");
            let (head, _) = complete(buf.as_bytes());
            assert_eq!(head.content_type_is_json(), expected, "{value}");
        }
        let (head, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(!head.content_type_is_json());
    }

    #[test]
    fn header_str_rejects_non_utf8_and_trims() {
        let (head, _) =
            complete(b"GET / HTTP/1.1\r\nX-Bin: \xff\xfe\r\nX-Pad: \t value \t\r\n\r\n");
        assert_eq!(head.header("x-bin"), Some(&b"\xff\xfe"[..]));
        assert_eq!(head.header_str("x-bin"), None);
        assert_eq!(head.header_str("x-pad"), Some("value"));
    }

    #[test]
    fn duplicate_headers_first_match_wins() {
        let (head, _) = complete(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(head.header_str("X-A"), Some("1"));
        assert_eq!(head.headers.len(), 2);
    }

    #[test]
    fn error_transfer_encoding_is_length_required() {
        for buf in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\nabc",
            b"GET / HTTP/1.1\r\ntransfer-encoding: identity\r\n\r\n",
        ] {
            assert_eq!(parse(buf), Err(ParseError::LengthRequired));
        }
    }

    #[test]
    fn error_missing_length_on_post() {
        let buf = b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parse(buf), Err(ParseError::LengthRequired));
        // Other methods without a length have an empty body (`curl -X PUT`).
        for method in ["PUT", "PATCH", "DELETE", "GET"] {
            let buf = format!("{method} /x HTTP/1.1\r\n\r\n");
            let (head, _) = complete(buf.as_bytes());
            assert_eq!(head.content_length, 0, "{method}");
        }
    }

    #[test]
    fn error_bad_content_length() {
        for value in ["abc", "-1", "+5", "1.0", "0x10", "", "5 5", "1,", "2, 3"] {
            let buf = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert!(
                matches!(parse(buf.as_bytes()), Err(ParseError::BadRequest(_))),
                "{value:?}"
            );
        }
        let differing = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(
            parse(differing),
            Err(ParseError::BadRequest("conflicting Content-Length values"))
        );
    }

    #[test]
    fn identical_content_lengths_are_accepted() {
        let (head, _) =
            complete(b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabc");
        assert_eq!(head.content_length, 3);
        let (head, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: 7 , 7\r\n\r\n");
        assert_eq!(head.content_length, 7);
        let (head, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(head.content_length, 0);
    }

    #[test]
    fn error_body_too_large_decided_from_head() {
        let limits = Limits::default();
        let at_limit = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            limits.max_body_bytes
        );
        let (head, _) = complete(at_limit.as_bytes());
        assert_eq!(head.content_length, DEFAULT_MAX_BODY_BYTES);

        // No body byte has arrived yet; the head alone decides.
        let over = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            limits.max_body_bytes + 1
        );
        assert_eq!(parse(over.as_bytes()), Err(ParseError::BodyTooLarge));
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge), Err(ParseError::BodyTooLarge));
    }

    #[test]
    fn error_version_not_supported() {
        for buf in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\r\nGET /x HTTP/3",
        ] {
            assert_eq!(parse(buf), Err(ParseError::VersionNotSupported));
        }
        for buf in [
            &b"GET / FTP/1.1\r\n\r\n"[..],
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET / HTTP/x.1\r\n\r\n",
        ] {
            assert_eq!(
                parse(buf),
                Err(ParseError::BadRequest("invalid HTTP version"))
            );
        }
    }

    #[test]
    fn error_bad_syntax() {
        let cases: [&[u8]; 6] = [
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\rX\r\n\r\n",
            b"GET /caf\xc3 HTTP/1.1\r\n\r\n",
        ];
        for buf in cases {
            assert!(
                matches!(parse(buf), Err(ParseError::BadRequest(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(buf),
                parse(buf)
            );
        }
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(ParseError::BadRequest("invalid header name"))
        );
    }

    #[test]
    fn utf8_target_is_accepted() {
        let (head, _) = complete("GET /caf\u{e9} HTTP/1.1\r\n\r\n".as_bytes());
        assert_eq!(head.path(), "/caf\u{e9}");
    }

    /// A head of exactly `len` bytes, padded with one header.
    fn head_of_len(len: usize) -> Vec<u8> {
        let base = b"GET / HTTP/1.1\r\nX-Pad: \r\n\r\n".len();
        let pad = "a".repeat(len - base);
        format!("GET / HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n").into_bytes()
    }

    #[test]
    fn header_limit_boundary() {
        let limit = DEFAULT_MAX_HEADER_BYTES;
        let exact = head_of_len(limit);
        assert_eq!(exact.len(), limit);
        let (_, head_len) = complete(&exact);
        assert_eq!(head_len, limit);

        // Body bytes after an at-limit head do not count against the head.
        let mut with_body = head_of_len(limit);
        with_body.extend_from_slice(b"trailing pipelined bytes");
        assert!(
            matches!(parse(&with_body), Ok(Parsed::Complete { head_len, .. }) if head_len == limit)
        );

        let over = head_of_len(limit + 1);
        assert_eq!(parse(&over), Err(ParseError::HeadersTooLarge));

        // An unfinished head is Incomplete up to the limit, and too large past it.
        let unfinished = &over[..limit];
        assert_eq!(parse(unfinished), Ok(Parsed::Incomplete));
        assert_eq!(parse(&over[..limit + 1]), Err(ParseError::HeadersTooLarge));
    }

    #[test]
    fn custom_small_limits() {
        let limits = Limits {
            max_header_bytes: 20,
            max_body_bytes: 2,
        };
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n", &limits),
            Ok(Parsed::Complete { .. })
        ));
        assert_eq!(
            parse_head(b"GET /abcdef HTTP/1.1\r\n\r\n", &limits),
            Err(ParseError::HeadersTooLarge)
        );
        assert_eq!(
            parse_head(
                b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
                &Limits {
                    max_header_bytes: 64,
                    ..limits
                }
            ),
            Err(ParseError::BodyTooLarge)
        );
    }

    #[test]
    fn too_many_headers() {
        let mut buf = String::from("GET / HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            buf.push_str(&format!("X-{i}: v\r\n"));
        }
        let at_max = format!("{buf}\r\n");
        let (head, _) = complete(at_max.as_bytes());
        assert_eq!(head.headers.len(), MAX_HEADERS);

        buf.push_str("X-One-More: v\r\n\r\n");
        assert_eq!(parse(buf.as_bytes()), Err(ParseError::HeadersTooLarge));
    }

    #[test]
    fn error_status_codes_and_messages() {
        let cases = [
            (ParseError::HeadersTooLarge, 431, "headers_too_large"),
            (ParseError::BadRequest("x"), 400, "bad_request"),
            (ParseError::LengthRequired, 411, "length_required"),
            (ParseError::BodyTooLarge, 413, "body_too_large"),
            (
                ParseError::VersionNotSupported,
                505,
                "http_version_not_supported",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status(), status);
            assert_eq!(err.code(), code);
            assert!(err.message().ends_with('.'));
            assert_eq!(err.to_string(), err.message());
        }
        assert_eq!(
            ParseError::BadRequest("invalid header name").message(),
            "Malformed HTTP request: invalid header name."
        );
    }

    /// xorshift64: deterministic, dependency-free randomness for the fuzz loop.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Whatever parse_head returns must respect the limits it was given.
    fn check_invariants(buf: &[u8], limits: &Limits) {
        match parse_head(buf, limits) {
            Ok(Parsed::Complete { head, head_len }) => {
                assert!(head_len <= buf.len());
                assert!(head_len <= limits.max_header_bytes);
                assert!(head.content_length <= limits.max_body_bytes);
                assert!(head.minor_version <= 1);
                assert!(head.headers.len() <= MAX_HEADERS);
                // Exercise the accessors too: they must not panic either.
                let _ = (head.path(), head.query(), head.content_type_is_json());
            }
            Ok(Parsed::Incomplete) => assert!(buf.len() <= limits.max_header_bytes),
            Err(err) => {
                assert!([400, 411, 413, 431, 505].contains(&err.status()));
            }
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        const ITERATIONS: usize = 20_000;
        const ALPHABET: &[u8] = b"GET POST HTTP/1.1 \r\n:,;/?%+=-abcXYZ019 \t\x00\x7f\xff\xc3\xa9Content-Length: Transfer-Encoding Connection: close upgrade";
        let seeds: [&[u8]; 4] = [
            b"GET /api/v1/notifications/user/u1?limit=5 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
            b"POST /notifications HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n\r\n",
            b"GET http://h/?a HTTP/1.0\r\nContent-Length: 1, 1\r\n\r\nx",
        ];
        let limit_choices = [
            Limits::default(),
            Limits {
                max_header_bytes: 0,
                max_body_bytes: 0,
            },
            Limits {
                max_header_bytes: 32,
                max_body_bytes: 1,
            },
        ];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for i in 0..ITERATIONS {
            let buf: Vec<u8> = match i % 3 {
                // Uniformly random bytes.
                0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
                // Random HTTP-ish characters, more likely to get past the request line.
                1 => (0..rng.below(200))
                    .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                    .collect(),
                // A valid request, mutated and truncated.
                _ => {
                    let mut buf = seeds[rng.below(seeds.len())].to_vec();
                    for _ in 0..rng.below(4) {
                        let at = rng.below(buf.len());
                        match rng.below(3) {
                            0 => buf[at] = rng.next() as u8,
                            1 => buf.insert(at, ALPHABET[rng.below(ALPHABET.len())]),
                            _ => {
                                buf.remove(at);
                            }
                        }
                    }
                    // Truncate only half the time, so mutated but complete
                    // heads reach the framing checks too.
                    if rng.below(2) == 0 {
                        let keep = rng.below(buf.len() + 1);
                        buf.truncate(keep);
                    }
                    buf
                }
            };
            for limits in &limit_choices {
                check_invariants(&buf, limits);
            }
        }
    }
}
