//! Client JSON in (request bodies and WebSocket messages): the checks made before simd-json parses
//! it, the parse, and one wording for every way it can fail.
//!
//! Messages are for the people who read them in a log or a console: `duplicate key "user_id"`,
//! `title must be a string`, `number out of range at byte 41 (data.x)`, never a parser's enum name.
//! Positions are byte offsets from the start of the JSON text, counting from 0; the field is named
//! wherever there is one, as the path from the top (`notifications[3].user_id`).
//!
//! Why a scan of our own before simd-json ([`check_strings`]): simd-json 0.17 decodes some invalid
//! escapes into other characters instead of refusing them. A lone high surrogate (`"\ud800"`)
//! becomes U+0000, and a high surrogate followed by an escape that is not a low surrogate
//! (`"\ud800\ue000"`) becomes an unrelated character (U+10400), which would then be stored. Other
//! escape errors are reported at byte 0. So every string's escapes are checked here first, by the JSON
//! grammar (RFC 8259 §7) and UTF-16's pairing rule, and simd-json only ever sees escapes it decodes
//! right. The same scan finds unescaped control characters and unterminated strings, which simd-json
//! reports without a usable position. Input is untouched when a check fails, so the path of the field
//! can be worked out from the bytes ([`path_at`]).

use serde::de::DeserializeOwned;
use simd_json::ErrorType;

use crate::json_depth::within_depth;

/// Why client JSON was refused: one sentence (API.md's `invalid_json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(pub String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `json` (modified: simd-json parses in place) as a JSON object into `T`. `what` names the
/// text in messages (`the body`, `the message`). Nesting deeper than `max_depth` is refused before
/// anything else (see `json_depth`).
pub fn parse_object<T: DeserializeOwned>(
    json: &mut [u8],
    max_depth: usize,
    what: &str,
) -> Result<T, JsonError> {
    if !within_depth(json, max_depth) {
        return Err(JsonError(format!(
            "{what} nests arrays and objects deeper than {max_depth} levels (MAX_JSON_DEPTH)"
        )));
    }
    match json.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(JsonError(format!(
                "{what} is empty: expected a JSON object"
            )))
        }
        // Checked here because serde lets a struct be read from an array of its fields in order,
        // and `["info","title","message"]` is not a notification anybody meant to send.
        Some(b'{') => {}
        Some(_) => return Err(JsonError(format!("{what} must be a JSON object"))),
    }
    if let Err(e) = check_strings(json) {
        return Err(JsonError(format!(
            "{what} is not valid JSON: {}{}",
            e.problem,
            located(json, e.at)
        )));
    }
    if opens_more_than_it_closes(json) {
        // simd-json reports this at the last value read, as an unexpected character.
        return Err(JsonError(format!(
            "{what} is not valid JSON: it ends before every object and array is closed"
        )));
    }
    let mut deserializer = match simd_json::Deserializer::from_slice(json) {
        Ok(d) => d,
        // Parse errors come before any string is decoded, so `json` is still the client's text.
        Err(e) => return Err(syntax_error(json, &e, what)),
    };
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        shape_error(&path, e.inner(), what)
    })
}

/// Whether `json` (whose strings [`check_strings`] found well formed) opens more objects and arrays
/// than it closes.
fn opens_more_than_it_closes(json: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth > 0
}

/// ` at byte N`, and ` (path)` when the position is inside a field.
fn located(json: &[u8], at: usize) -> String {
    let path = path_at(json, at);
    if path.is_empty() {
        format!(" at byte {at}")
    } else {
        format!(" at byte {at} ({path})")
    }
}

/// A problem found by [`check_strings`], at a byte offset.
#[derive(Debug, PartialEq, Eq)]
pub struct StringError {
    /// What is wrong, e.g. `lone surrogate "\ud800"`.
    pub problem: String,
    /// Where it starts.
    pub at: usize,
}

/// The escape text starting at `at` (a backslash), cut to `len` bytes and to the input, for messages.
fn escape_text(json: &[u8], at: usize, len: usize) -> String {
    let end = (at + len).min(json.len());
    String::from_utf8_lossy(&json[at..end]).into_owned()
}

/// The value of the four hex digits after `\u` at `at`, if there are four.
fn hex4(json: &[u8], at: usize) -> Option<u16> {
    let digits = json.get(at + 2..at + 6)?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Checks every string of `json` (keys and values): each escape is one of `\" \\ \/ \b \f \n \r \t`
/// or `\u` with four hex digits; a `\u` of a high surrogate (D800–DBFF) is followed at once by a `\u`
/// of a low surrogate (DC00–DFFF), and a low surrogate never stands alone; no raw control character
/// (below U+0020); and every string ends. Bytes outside strings are left to the parser.
pub fn check_strings(json: &[u8]) -> Result<(), StringError> {
    let mut i = 0;
    let mut string_start = None;
    while i < json.len() {
        let byte = json[i];
        let Some(start) = string_start else {
            if byte == b'"' {
                string_start = Some(i);
            }
            i += 1;
            continue;
        };
        match byte {
            b'"' => string_start = None,
            b'\\' => {
                let Some(&kind) = json.get(i + 1) else {
                    return Err(StringError {
                        problem: "unterminated string".into(),
                        at: start,
                    });
                };
                match kind {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                    b'u' => {
                        let Some(unit) = hex4(json, i) else {
                            return Err(StringError {
                                problem: format!(
                                    "incomplete escape \"\\u{}\": \\u takes four hex digits",
                                    String::from_utf8_lossy(
                                        &json[i + 2..]
                                            .iter()
                                            .take(4)
                                            .take_while(|b| b.is_ascii_hexdigit())
                                            .copied()
                                            .collect::<Vec<u8>>()
                                    )
                                ),
                                at: i,
                            });
                        };
                        match unit {
                            0xD800..=0xDBFF => {
                                let low = (json.get(i + 6) == Some(&b'\\')
                                    && json.get(i + 7) == Some(&b'u'))
                                .then(|| hex4(json, i + 6))
                                .flatten();
                                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                                    return Err(StringError {
                                        problem: format!(
                                            "lone surrogate \"{}\": an escape from \\ud800 to \\udbff \
                                             must be followed by one from \\udc00 to \\udfff",
                                            escape_text(json, i, 6)
                                        ),
                                        at: i,
                                    });
                                }
                                i += 11;
                            }
                            0xDC00..=0xDFFF => {
                                return Err(StringError {
                                    problem: format!(
                                        "lone surrogate \"{}\": an escape from \\udc00 to \\udfff \
                                         must follow one from \\ud800 to \\udbff",
                                        escape_text(json, i, 6)
                                    ),
                                    at: i,
                                });
                            }
                            _ => i += 5,
                        }
                    }
                    other => {
                        return Err(StringError {
                            problem: format!(
                                "invalid escape \"\\{}\": the escapes are \\\" \\\\ \\/ \\b \\f \\n \\r \\t \
                                 and \\u followed by four hex digits",
                                char::from(other).escape_default()
                            ),
                            at: i,
                        });
                    }
                }
            }
            0x00..=0x1F => {
                return Err(StringError {
                    problem: format!(
                        "control character U+{byte:04X} inside a string (write it as \\u{byte:04x})"
                    ),
                    at: i,
                });
            }
            _ => {}
        }
        i += 1;
    }
    match string_start {
        Some(start) => Err(StringError {
            problem: "unterminated string".into(),
            at: start,
        }),
        None => Ok(()),
    }
}

/// The path of the value that byte `at` of `json` belongs to (`notifications[2].data.x`), worked out
/// from the text before it; empty at the top level. Only for messages: it tolerates invalid input.
pub fn path_at(json: &[u8], at: usize) -> String {
    /// One open container.
    enum Frame {
        /// An object and the key whose value is being read, if one was.
        Object(Option<String>),
        /// An array and the index of the element being read.
        Array(usize),
    }
    let mut stack: Vec<Frame> = Vec::new();
    // Whether the next string in the innermost object is a key.
    let mut expecting_key = false;
    let mut i = 0;
    let end = at.min(json.len());
    while i < end {
        match json[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < end && json[i] != b'"' {
                    if json[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if expecting_key {
                    if let Some(Frame::Object(key)) = stack.last_mut() {
                        let text = &json[start..i.min(end)];
                        *key = Some(String::from_utf8_lossy(text).into_owned());
                    }
                    expecting_key = false;
                }
            }
            b'{' => {
                stack.push(Frame::Object(None));
                expecting_key = true;
            }
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
                expecting_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array(index)) => *index += 1,
                Some(Frame::Object(key)) => {
                    *key = None;
                    expecting_key = true;
                }
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object(Some(key)) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Object(None) => break,
            Frame::Array(index) => path.push_str(&format!("[{index}]")),
        }
    }
    path
}

/// Whether `token` follows JSON's number grammar (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`).
fn is_json_number(token: &[u8]) -> bool {
    let mut rest = token.strip_prefix(b"-").unwrap_or(token);
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let int = digits(rest);
    if int == 0 || (int > 1 && rest[0] == b'0') {
        return false;
    }
    rest = &rest[int..];
    if let Some(after) = rest.strip_prefix(b".") {
        let frac = digits(after);
        if frac == 0 {
            return false;
        }
        rest = &after[frac..];
    }
    if let Some(after) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let after = after
            .strip_prefix(b"+")
            .or_else(|| after.strip_prefix(b"-"))
            .unwrap_or(after);
        let exp = digits(after);
        if exp == 0 {
            return false;
        }
        rest = &after[exp..];
    }
    rest.is_empty()
}

/// The run of number characters around byte `at` (simd-json points at its first byte, or just past
/// it), and where it starts.
fn number_token(json: &[u8], at: usize) -> (usize, &[u8]) {
    let is_number_byte = |b: &u8| b.is_ascii_digit() || b"+-.eE".contains(b);
    let mut start = at.min(json.len());
    if json.get(start).is_none_or(|b| !is_number_byte(b)) {
        start = start.saturating_sub(1);
    }
    while start > 0 && is_number_byte(&json[start - 1]) {
        start -= 1;
    }
    let len = json[start..]
        .iter()
        .take_while(|b| is_number_byte(b))
        .count();
    (start, &json[start..start + len])
}

/// A parse error of simd-json's, in words.
fn syntax_error(json: &[u8], e: &simd_json::Error, what: &str) -> JsonError {
    let at = e.index();
    let found = match e.character() {
        Some(c) => format!("unexpected character {:?}", c),
        None => "malformed JSON".to_owned(),
    };
    let (problem, at) = match e.error() {
        ErrorType::InvalidNumber | ErrorType::InvalidExponent => {
            let (start, token) = number_token(json, at);
            if is_json_number(token) {
                ("number out of range".to_owned(), start)
            } else {
                (
                    format!("malformed number {:?}", String::from_utf8_lossy(token)),
                    start,
                )
            }
        }
        ErrorType::Eof => {
            return JsonError(format!("{what} is not valid JSON: it ends too early"));
        }
        ErrorType::ExpectedNull | ErrorType::ExpectedTrue | ErrorType::ExpectedFalse => (
            format!(
                "{found}: expected a value (a string, number, object, array, true, false or null)"
            ),
            at,
        ),
        ErrorType::ExpectedObjectColon => (format!("{found}: expected \":\" after a key"), at),
        ErrorType::ExpectedObjectKey
        | ErrorType::ExpectedObjectContent
        | ErrorType::KeyMustBeAString
        | ErrorType::BadKeyType => (format!("{found}: expected a key in double quotes"), at),
        ErrorType::ExpectedArrayComma | ErrorType::ExpectedMapComma => {
            (format!("{found}: expected \",\" or a closing bracket"), at)
        }
        ErrorType::InvalidUtf8 => ("invalid UTF-8".to_owned(), at),
        ErrorType::InputTooLarge => {
            return JsonError(format!("{what} is too large to parse"));
        }
        _ => (found, at),
    };
    JsonError(format!(
        "{what} is not valid JSON: {problem}{}",
        located(json, at)
    ))
}

/// What a type simd-json expected, in words.
fn expected(error: &ErrorType) -> Option<&'static str> {
    Some(match error {
        ErrorType::ExpectedString => "a string",
        ErrorType::ExpectedArray => "an array",
        ErrorType::ExpectedBoolean => "true or false",
        ErrorType::ExpectedMap => "an object",
        ErrorType::ExpectedInteger | ErrorType::ExpectedSigned | ErrorType::ExpectedUnsigned => {
            "an integer"
        }
        ErrorType::ExpectedNumber | ErrorType::ExpectedFloat => "a number",
        ErrorType::ExpectedNull => "null",
        _ => return None,
    })
}

/// serde's `expected …` text in words of the API (`a sequence` is an array, a struct an object).
fn expected_in_words(text: &str) -> String {
    match text {
        "a sequence" => "an array".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a map" => "an object".to_owned(),
        t if t.starts_with("struct ") => "an object".to_owned(),
        t => t.to_owned(),
    }
}

/// A JSON text that parsed but does not fit the expected shape: a wrong type, a duplicate key.
fn shape_error(path: &str, e: &simd_json::Error, what: &str) -> JsonError {
    // serde_path_to_error writes `.` for the top level.
    let path = if path == "." { "" } else { path };
    let subject = if path.is_empty() { what } else { path };
    if let Some(expected) = expected(e.error()) {
        return JsonError(format!("{subject} must be {expected}"));
    }
    let ErrorType::Serde(message) = e.error() else {
        return JsonError(format!("{subject} is not valid: {e}"));
    };
    let in_path = if path.is_empty() {
        String::new()
    } else {
        format!(" in {path}")
    };
    if let Some(key) = message
        .strip_prefix("duplicate field `")
        .and_then(|k| k.strip_suffix('`'))
    {
        return JsonError(format!("duplicate key {key:?}{in_path}"));
    }
    if let Some(key) = message
        .strip_prefix("missing field `")
        .and_then(|k| k.strip_suffix('`'))
    {
        let field = if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        };
        return JsonError(format!("{field} is required"));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((_, expected)) = rest.rsplit_once(", expected ") {
                return JsonError(format!("{subject} must be {}", expected_in_words(expected)));
            }
        }
    }
    JsonError(format!("{subject}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        title: Option<String>,
        items: Option<Vec<Doc>>,
        flag: Option<bool>,
        data: Option<serde_json::Value>,
    }

    fn err(text: &str) -> String {
        parse_object::<Doc>(&mut text.as_bytes().to_vec(), 64, "the body")
            .unwrap_err()
            .0
    }

    #[test]
    fn escapes_are_checked_by_the_grammar_and_utf16_pairing() {
        for good in [
            r#"{"a":"\ud83d\ude00 \u00e9 \n\t\"\\\/\b\f\r"}"#,
            r#"{"\u0041":"\uDBFF\uDFFF"}"#,
        ] {
            assert_eq!(check_strings(good.as_bytes()), Ok(()), "{good}");
        }
        for (bad, problem, at) in [
            (r#"{"a":"\ud800"}"#, r#"lone surrogate "\ud800""#, 6),
            (r#"{"a":"\ud800\u0041"}"#, r#"lone surrogate "\ud800""#, 6),
            (r#"{"a":"\ud800\ue000"}"#, r#"lone surrogate "\ud800""#, 6),
            (r#"{"a":"\ud800\ud800"}"#, r#"lone surrogate "\ud800""#, 6),
            (r#"{"a":"x\udc00"}"#, r#"lone surrogate "\udc00""#, 7),
            (r#"{"a":"\x"}"#, r#"invalid escape "\x""#, 6),
            (r#"{"a":"\u12"}"#, r#"incomplete escape "\u12""#, 6),
            (r#"{"a":"\u12zz"}"#, r#"incomplete escape "\u12""#, 6),
            ("{\"a\":\"\u{1}\"}", "control character U+0001", 6),
            (r#"{"a":"open}"#, "unterminated string", 5),
        ] {
            let e = check_strings(bad.as_bytes()).unwrap_err();
            assert!(e.problem.starts_with(problem), "{bad}: {}", e.problem);
            assert_eq!(e.at, at, "{bad}");
        }
    }

    #[test]
    fn paths_name_the_field_at_a_byte() {
        let json = br#"{"a":1,"items":[{"x":2},{"data":{"k":[0,1e400]}}]}"#;
        let at = json.windows(5).position(|w| w == b"1e400").unwrap();
        assert_eq!(path_at(json, at), "items[1].data.k[1]");
        assert_eq!(path_at(json, 5), "a");
        assert_eq!(path_at(json, 0), "");
    }

    #[test]
    fn numbers_are_told_out_of_range_or_malformed() {
        assert_eq!(
            err(r#"{"data":{"x":1e400}}"#),
            "the body is not valid JSON: number out of range at byte 13 (data.x)"
        );
        assert_eq!(
            err(r#"{"data":{"x":123456789012345678901234567890}}"#),
            "the body is not valid JSON: number out of range at byte 13 (data.x)"
        );
        assert!(err(r#"{"data":{"x":01}}"#).contains(r#"malformed number "01" at byte 13"#));
        assert!(err(r#"{"data":{"x":1.}}"#).contains(r#"malformed number "1." at byte 13"#));
        assert!(is_json_number(b"-0.5e+3") && !is_json_number(b"+1") && !is_json_number(b"1e"));
    }

    #[test]
    fn shapes_are_told_with_the_field() {
        assert_eq!(
            err(r#"{"title":"a","title":"b"}"#),
            r#"duplicate key "title""#
        );
        assert_eq!(
            err(r#"{"items":[{},{"flag":true,"flag":false}]}"#),
            r#"duplicate key "flag" in items[1]"#
        );
        assert_eq!(err(r#"{"title":5}"#), "title must be a string");
        assert_eq!(
            err(r#"{"items":[{"flag":"yes"}]}"#),
            "items[0].flag must be true or false"
        );
        assert_eq!(err(r#"{"items":{}}"#), "items must be an array");
        assert_eq!(err("[1]"), "the body must be a JSON object");
        assert_eq!(err(" "), "the body is empty: expected a JSON object");
        assert_eq!(
            err(r#"{"a":[1"#),
            "the body is not valid JSON: it ends before every object and array is closed"
        );
        assert!(err(r#"{"a" 1}"#).contains(r#"expected ":" after a key at byte 5"#));
        assert!(err(r#"{a:1}"#).contains("expected a key in double quotes at byte 1"));
        assert!(err(r#"{"title":"\ud800"}"#).contains(r#"lone surrogate "\ud800""#));
        assert!(err(r#"{"title":"\ud800"}"#).ends_with("at byte 10 (title)"));
    }
}
