//! A bound on how deeply untrusted JSON nests, checked before it is parsed.
//!
//! Turning JSON into `serde_json::Value` (a notification's `data`, a publish's `data`) recurses once per
//! level of nesting, and so do re-encoding, the U+0000 check and dropping the value. A 64 KiB body of
//! `[[[[…` is 65,536 levels: enough to overflow a shard's stack and abort the whole process, every
//! connection with it. simd-json has no depth limit of its own, so every parse of client JSON (HTTP
//! bodies in `api`, WebSocket messages in `ws::protocol`) first calls [`within_depth`].
//!
//! The check is a single byte scan that tracks only strings (so brackets inside them do not count) and
//! the depth; it does not validate anything else, which the parser does right after.

/// Default of `MAX_JSON_DEPTH`: deepest nesting of arrays and objects accepted in a request body or
/// WebSocket message. The envelope itself is one level, `data` a second; 64 leaves plenty for real
/// payloads.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;

/// Largest `MAX_JSON_DEPTH` an operator may set (serde_json's own recursion limit). The recursion it
/// allows stays far below a shard thread's stack, even in a debug build.
pub const MAX_MAX_JSON_DEPTH: usize = 128;

/// Whether the arrays and objects of `json` nest at most `max_depth` levels (`{}` is one level, a
/// scalar zero). Brackets inside strings are not counted. Input that is not JSON gets an answer too
/// (an unbalanced `]` never lowers the depth below zero), and the parser refuses it afterwards.
pub fn within_depth(json: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return false;
                }
            }
            // Saturating: extra closers must not hide later openers.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_arrays_and_objects() {
        assert!(within_depth(b"1", 0));
        assert!(within_depth(b"\"x\"", 0));
        assert!(!within_depth(b"{}", 0));
        assert!(within_depth(b"{}", 1));
        assert!(within_depth(br#"{"a":[1,{"b":2}],"c":{}}"#, 3));
        assert!(!within_depth(br#"{"a":[1,{"b":2}],"c":{}}"#, 2));
    }

    #[test]
    fn exact_limit_is_accepted_one_more_is_not() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(within_depth(nest(64).as_bytes(), 64));
        assert!(!within_depth(nest(65).as_bytes(), 64));
        // Unclosed openers count the same: the parser never sees the end.
        assert!(!within_depth("[".repeat(65_536).as_bytes(), 64));
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert!(within_depth(br#"{"k":"[[[[{{{{"}"#, 1));
        // An escaped quote does not end the string; an escaped backslash does not escape the quote.
        assert!(within_depth(br#"{"k":"\"[[[["}"#, 1));
        assert!(!within_depth(br#"{"k":"\\"[[}"#, 1));
    }

    #[test]
    fn extra_closers_do_not_hide_depth() {
        assert!(!within_depth(b"]]]]]][[[", 2));
        assert!(within_depth(b"]]]]]][[", 2));
    }
}
