//! Query-string parameters (`application/x-www-form-urlencoded` style).
//!
//! Routes read at most a handful of parameters (`user_id`, `limit`, `before`,
//! `unread`, ...), so instead of building a map per request we scan the raw
//! query once per lookup and decode only the value asked for. Values without
//! `%` or `+` (nearly all of them: ids, numbers, booleans) are returned
//! borrowed from the request target, so the common case allocates nothing.
//!
//! Decoding is forgiving where browsers are forgiving and strict where it
//! matters: a malformed escape such as `%zz` or a trailing `%` is kept as
//! literal text, as WHATWG URL parsing does, rather than failing the whole
//! request; but bytes that decode to invalid UTF-8 give `None`, because every
//! consumer of these values (ids, channel names) needs text.

use std::borrow::Cow;

/// Percent-decoded value of the first `key=` parameter in a query string;
/// `+` means space. Invalid escapes are kept literally; invalid UTF-8 after
/// decoding → `None`. A bare `key` (no `=`) has the empty value. Keys are
/// compared exactly, after decoding, so `user_id` does not match `user_ids`.
pub fn query_param<'a>(query: &'a str, key: &str) -> Option<Cow<'a, str>> {
    // A leading '?' is tolerated so callers can pass either form.
    let query = query.strip_prefix('?').unwrap_or(query);
    for pair in query.split('&') {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        if raw_key.is_empty() || !key_matches(raw_key, key) {
            continue;
        }
        return decode(raw_value);
    }
    None
}

/// Every `key=value` pair of a query string, both form-decoded, in order; a pair whose key or value
/// is not UTF-8 once decoded is skipped. For the few callers that need the whole query (a signature
/// over all its parameters), not for looking one up.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(raw_key)?, decode(raw_value)?))
        })
}

/// Whether an encoded key names `key`. The raw comparison settles almost
/// every case without decoding; only keys with escapes pay for decoding.
fn key_matches(raw_key: &str, key: &str) -> bool {
    if raw_key == key {
        return true;
    }
    matches!(decode(raw_key), Some(Cow::Owned(decoded)) if decoded == key)
}

/// Percent-decodes one path segment (`/api/v1/notifications/user/<segment>`). Unlike a query value, a
/// `+` in a path is a literal plus (RFC 3986). Invalid UTF-8 after decoding → `None`.
pub fn decode_path_segment(raw: &str) -> Option<Cow<'_, str>> {
    percent_decode(raw, false)
}

/// Form-decodes one key or value: `+` is a space, `%XX` is a byte, anything
/// else (including a malformed escape) is copied as is.
fn decode(raw: &str) -> Option<Cow<'_, str>> {
    percent_decode(raw, true)
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`); a malformed escape is kept.
fn percent_decode(raw: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
    if !raw
        .bytes()
        .any(|b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return Some(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let escaped = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&hi), Some(&lo)) => hex_value(hi).zip(hex_value(lo)),
                    _ => None,
                };
                match escaped {
                    Some((hi, lo)) => {
                        out.push((hi << 4) | lo);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Value of one hexadecimal digit, either case.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(query: &str, key: &str) -> Option<String> {
        query_param(query, key).map(Cow::into_owned)
    }

    #[test]
    fn path_segments_keep_plus_and_decode_escapes() {
        assert_eq!(decode_path_segment("a+b%20c").as_deref(), Some("a+b c"));
        assert!(matches!(
            decode_path_segment("plain"),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(decode_path_segment("%ff"), None);
    }

    #[test]
    fn plain_values_are_borrowed() {
        let query = "user_id=123&unread=true&limit=10";
        assert!(matches!(
            query_param(query, "user_id"),
            Some(Cow::Borrowed("123"))
        ));
        assert_eq!(param(query, "unread").as_deref(), Some("true"));
        assert_eq!(param(query, "limit").as_deref(), Some("10"));
    }

    #[test]
    fn percent_and_plus_decoding() {
        assert_eq!(
            param("q=hello%20world", "q").as_deref(),
            Some("hello world")
        );
        assert_eq!(param("q=hello+world", "q").as_deref(), Some("hello world"));
        assert_eq!(param("q=a%2Bb", "q").as_deref(), Some("a+b"));
        assert_eq!(param("channels=a%2cb", "channels").as_deref(), Some("a,b"));
        assert_eq!(param("q=caf%C3%A9", "q").as_deref(), Some("caf\u{e9}"));
        assert!(matches!(query_param("q=a+b", "q"), Some(Cow::Owned(_))));
    }

    #[test]
    fn invalid_escapes_are_kept_literally() {
        assert_eq!(param("q=%zz", "q").as_deref(), Some("%zz"));
        assert_eq!(param("q=100%", "q").as_deref(), Some("100%"));
        assert_eq!(param("q=%4", "q").as_deref(), Some("%4"));
        assert_eq!(param("q=%%41", "q").as_deref(), Some("%A"));
        assert_eq!(param("q=%g1%41", "q").as_deref(), Some("%g1A"));
    }

    #[test]
    fn invalid_utf8_after_decoding_is_none() {
        assert_eq!(param("q=%ff", "q"), None);
        assert_eq!(param("q=%C3", "q"), None);
    }

    #[test]
    fn missing_key() {
        assert_eq!(param("a=1&b=2", "c"), None);
        assert_eq!(param("", "c"), None);
        assert_eq!(param("=1", ""), None);
    }

    #[test]
    fn key_that_is_a_prefix_of_another_key() {
        let query = "user_ids=9&user=8&user_id=7";
        assert_eq!(param(query, "user_id").as_deref(), Some("7"));
        assert_eq!(param(query, "user").as_deref(), Some("8"));
        assert_eq!(param("user_idx=1", "user_id"), None);
        // Nor does a value that happens to contain "key=" match.
        assert_eq!(param("a=user_id=5", "user_id"), None);
    }

    #[test]
    fn first_match_wins_and_empty_values() {
        assert_eq!(param("a=1&a=2", "a").as_deref(), Some("1"));
        assert_eq!(param("a=&b=2", "a").as_deref(), Some(""));
        assert_eq!(param("flag&b=2", "flag").as_deref(), Some(""));
        assert_eq!(param("a=1&&b=2", "b").as_deref(), Some("2"));
        assert_eq!(param("a=x=y", "a").as_deref(), Some("x=y"));
    }

    #[test]
    fn encoded_keys_and_leading_question_mark() {
        assert_eq!(param("user%5Fid=7", "user_id").as_deref(), Some("7"));
        assert_eq!(param("my+key=1", "my key").as_deref(), Some("1"));
        assert_eq!(param("?since=abc", "since").as_deref(), Some("abc"));
    }
}
