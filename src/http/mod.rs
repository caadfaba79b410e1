//! HTTP/1.1 for the notification service: request heads in, responses out.
//!
//! This module is deliberately pure: no sockets, no futures, no clocks. The
//! connection task owns a byte buffer, appends whatever the socket produced,
//! and calls [`parse_head`] on it. The parser never copies the buffer or keeps
//! state between calls; it either says [`Parsed::Incomplete`] (read more and
//! call again) or returns the head together with `head_len`, the number of
//! bytes the head took. The body is then simply the next
//! `head.content_length` bytes, and whatever follows is the next pipelined
//! request, so pipelining costs nothing beyond "advance by `head_len + body`".
//! Re-parsing a partial head from the start on every read is quadratic in
//! theory, but the head is capped at a few KiB and httparse scans it with
//! SIMD, so keeping the parser stateless is the better trade.
//!
//! Every limit is enforced from the head alone, before a single body byte is
//! buffered: a head that grows past [`Limits::max_header_bytes`] is refused
//! with 431 even if it never completes, and a declared `Content-Length` over
//! [`Limits::max_body_bytes`] is refused with 413 without waiting for the
//! body. That way a slow or hostile client can never make a shard hold more
//! than `max_header_bytes + max_body_bytes` for one request.
//!
//! Chunked transfer coding is refused (411 Length Required). Every client of
//! this API (PHP, browsers, k6, other services) sends small JSON bodies with a
//! length, and supporting chunked would mean a second body state machine, an
//! unbounded-until-the-end body size, and the request-smuggling ambiguities
//! of `Transfer-Encoding` next to `Content-Length`. Refusing it keeps the
//! framing rule to one line: the body is exactly `Content-Length` bytes.
//!
//! [`response::Response`] is the mirror image: a plain value that the handler
//! builds and the connection task serializes into its output buffer with
//! [`Response::write_to`], so one buffer can batch several pipelined answers
//! into a single write.

pub mod query;
pub mod request;
pub mod response;

pub use query::query_param;
pub use request::{parse_head, Header, Limits, Method, ParseError, Parsed, RequestHead};
pub use response::{reason_phrase, Response};
