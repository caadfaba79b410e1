//! The notification: its stored shape, the producer's input, validation, and its JSON encoding.
//!
//! One shape serves REST responses, history and WebSocket delivery (API.md, "Notification object"), so
//! it is encoded by one hand-written writer, [`Notification::write_json`]. The writer is on the hot path
//! (every committed notification is encoded once, then shared by every connection that receives it), and
//! `data` is kept as compact JSON text, made once at validation and spliced in as is afterwards. That
//! text is re-encoded from the parsed value, not copied: keys keep the producer's order, whitespace is
//! dropped, and numbers are normalized to 64-bit integers or doubles (`1.10` becomes `1.1`).
//!
//! Validation happens once, at the edge ([`SendInput::validate`]), and reports the offending field by name
//! so a producer can fix its request from the error message alone.

use serde::Deserialize;
use uuid::Uuid;

/// Longest accepted `user_id`, in bytes (API.md).
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted channel name, in bytes (API.md).
pub const MAX_CHANNEL_BYTES: usize = 128;
/// Most channels one notification may target; a bound so one request cannot fan out without limit.
pub const MAX_CHANNELS_PER_NOTIFICATION: usize = 100;
/// The `type` a notification gets when the producer names none.
pub const DEFAULT_TYPE: &str = "info";

/// Milliseconds since the Unix epoch, the unit every stored time uses.
pub type Millis = i64;

/// A stored notification, as the store returns it and as it is delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// UUIDv7, assigned at commit by the store thread, so id order is commit order on one node and a
    /// client can resume "after id X".
    pub id: Uuid,
    /// The producer's category (`type` in JSON; `type` is a Rust keyword).
    pub kind: String,
    /// Short headline; empty when the producer sent none.
    pub title: String,
    /// The body text; the one required field.
    pub message: String,
    /// The inbox this notification belongs to; `None` for channel-only or broadcast notifications,
    /// which are stored for replay but appear in no user's history.
    pub user_id: Option<String>,
    /// Channels it was published to; their subscribers receive it.
    pub channels: Vec<String>,
    /// Sent to every connection of the node (and of every node, with a bus).
    pub broadcast: bool,
    /// The producer's `data` object as compact JSON text (see the module docs), spliced into the
    /// encoding unchanged.
    pub data: String,
    /// Creation (commit) time; `timestamp` in JSON.
    pub created_at: Millis,
    /// When the user read it; `None` while unread.
    pub read_at: Option<Millis>,
    /// When it was first written to a live connection of its user (not tracked yet: always `None`).
    pub delivered_at: Option<Millis>,
    /// When a client reported it seen (not tracked yet: always `None`).
    pub seen_at: Option<Millis>,
    /// The time it was scheduled for, for scheduled notifications.
    pub scheduled_at: Option<Millis>,
    /// For a notification a schedule fired: the schedule's id (what `POST /schedule` answered), since
    /// firing gives the notification a new id of its own. `None` for sends and batches, and for a
    /// schedule still pending (whose own `id` is the schedule's id).
    pub schedule_id: Option<Uuid>,
    /// The producer's `"urgent": true`: pushed live even in the user's quiet hours (API.md,
    /// "Preferences"). Decided at commit, so it is carried live and between nodes, not stored.
    pub urgent: bool,
}

/// A validated notification that has no id or timestamp yet: the store assigns both at commit.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// See [`Notification::kind`].
    pub kind: String,
    /// See [`Notification::title`].
    pub title: String,
    /// See [`Notification::message`].
    pub message: String,
    /// See [`Notification::user_id`].
    pub user_id: Option<String>,
    /// See [`Notification::channels`].
    pub channels: Vec<String>,
    /// See [`Notification::broadcast`].
    pub broadcast: bool,
    /// See [`Notification::data`]; `{}` when the producer sent none.
    pub data: String,
    /// See [`Notification::scheduled_at`].
    pub scheduled_at: Option<Millis>,
    /// See [`Notification::urgent`].
    pub urgent: bool,
}

impl NewNotification {
    /// Turns the validated input into a stored notification with the id and time the store assigned.
    pub fn into_notification(self, id: Uuid, created_at: Millis) -> Notification {
        Notification {
            id,
            kind: self.kind,
            title: self.title,
            message: self.message,
            user_id: self.user_id,
            channels: self.channels,
            broadcast: self.broadcast,
            data: self.data,
            created_at,
            read_at: None,
            delivered_at: None,
            seen_at: None,
            scheduled_at: self.scheduled_at,
            schedule_id: None,
            urgent: self.urgent,
        }
    }
}

/// A user id as producers send it: a string, or an integer (Laravel's user ids are integers).
#[derive(Debug)]
pub enum UserIdInput {
    /// `"user_id": "user123"`.
    Text(String),
    /// `"user_id": 42`, stored as `"42"`.
    Integer(i64),
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum's error says only that no variant
/// matched, and this one says what is expected (`user_id must be a string or an integer`).
impl<'de> Deserialize<'de> for UserIdInput {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Accepts a string or an integer.
        struct UserIdVisitor;

        impl serde::de::Visitor<'_> for UserIdVisitor {
            type Value = UserIdInput;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UserIdInput, E> {
                Ok(UserIdInput::Text(v.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<UserIdInput, E> {
                Ok(UserIdInput::Text(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UserIdInput, E> {
                Ok(UserIdInput::Integer(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UserIdInput, E> {
                // Above i64::MAX: still an integer id, kept as its decimal string.
                Ok(i64::try_from(v)
                    .map(UserIdInput::Integer)
                    .unwrap_or_else(|_| UserIdInput::Text(v.to_string())))
            }
        }

        deserializer.deserialize_any(UserIdVisitor)
    }
}

/// The JSON body of a send (and of each element of a batch), before validation.
///
/// Every field is optional here so that a missing `message` is reported as a field error by
/// [`SendInput::validate`] rather than as an opaque deserialization failure.
#[derive(Debug, Default, Deserialize)]
pub struct SendInput {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `title`.
    pub title: Option<String>,
    /// `message`, required.
    pub message: Option<String>,
    /// `user_id`, string or integer.
    pub user_id: Option<UserIdInput>,
    /// `channels`.
    pub channels: Option<Vec<String>>,
    /// `broadcast`.
    pub broadcast: Option<bool>,
    /// `data`, which must be a JSON object.
    pub data: Option<serde_json::Value>,
    /// `scheduled_at`, read by the schedule route only (RFC 3339, any offset).
    pub scheduled_at: Option<String>,
    /// `urgent`: pushed even in the user's quiet hours.
    pub urgent: Option<bool>,
}

/// A field that failed validation, named so the producer knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The JSON field at fault (`message`, `user_id`, `channels[2]`, ...), or `target` when no target
    /// was named at all.
    pub field: String,
    /// A human sentence that names the field.
    pub message: String,
}

impl FieldError {
    /// A field error whose message is `"<field> <problem>"`.
    pub fn new(field: impl Into<String>, problem: &str) -> FieldError {
        let field = field.into();
        let message = format!("{field} {problem}");
        FieldError { field, message }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The notification ids of a `seen` request (WebSocket action or `PUT …/seen`), checked: at least
/// one and at most `max` (`MAX_SEEN_IDS`), each a UUID; a bad one is named by its place (`ids[2]`).
pub fn parse_notification_ids(
    field: &str,
    raw: &[String],
    max: usize,
) -> Result<Vec<Uuid>, FieldError> {
    if raw.is_empty() {
        return Err(FieldError::new(
            field,
            "must list at least one notification id",
        ));
    }
    if raw.len() > max {
        return Err(FieldError::new(
            field,
            &format!(
                "lists {} ids; at most {max} are accepted at once",
                raw.len()
            ),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, id)| {
            Uuid::parse_str(id).map_err(|_| {
                FieldError::new(format!("{field}[{i}]"), "must be a notification id (UUID)")
            })
        })
        .collect()
}

impl SendInput {
    /// Checks a send (not a schedule) against API.md's rules and fills in the defaults. A
    /// `scheduled_at` is refused here rather than ignored: delivering at once what the producer meant
    /// for later would be the worse surprise.
    pub fn validate(self) -> Result<NewNotification, FieldError> {
        if self.scheduled_at.is_some() {
            return Err(FieldError::new(
                "scheduled_at",
                "is only accepted by POST /api/v1/notifications/schedule",
            ));
        }
        self.validate_content()
    }

    /// The checks shared by sends and schedules.
    fn validate_content(self) -> Result<NewNotification, FieldError> {
        let message = match self.message {
            Some(m) if !m.is_empty() => m,
            Some(_) => return Err(FieldError::new("message", "must not be empty")),
            None => return Err(FieldError::new("message", "is required")),
        };
        let user_id = match self.user_id {
            None => None,
            Some(UserIdInput::Integer(n)) => Some(n.to_string()),
            Some(UserIdInput::Text(s)) => {
                validate_user_id(&s)?;
                Some(s)
            }
        };
        let channels = self.channels.unwrap_or_default();
        validate_channel_list("channels", &channels)?;
        let broadcast = self.broadcast.unwrap_or(false);
        if user_id.is_none() && channels.is_empty() && !broadcast {
            return Err(FieldError {
                field: "target".into(),
                message: "no target: set user_id, a non-empty channels list, or broadcast: true"
                    .into(),
            });
        }
        if self.data.as_ref().is_some_and(json_holds_nul) {
            return Err(FieldError::new(
                "data",
                "must not contain the character U+0000",
            ));
        }
        let data = match self.data {
            None | Some(serde_json::Value::Null) => "{}".to_owned(),
            Some(v @ serde_json::Value::Object(_)) => v.to_string(),
            // PHP encodes an empty array (`'data' => []`, as the seeds' Laravel code sends) as `[]`.
            Some(serde_json::Value::Array(a)) if a.is_empty() => "{}".to_owned(),
            Some(_) => return Err(FieldError::new("data", "must be a JSON object")),
        };
        // PostgreSQL's text and jsonb cannot hold U+0000, and one such row would fail the whole
        // group-commit batch it rides in; refuse it here, on both stores, so the contract is one.
        reject_nul("message", &message)?;
        reject_nul("title", self.title.as_deref().unwrap_or(""))?;
        reject_nul("type", self.kind.as_deref().unwrap_or(""))?;
        Ok(NewNotification {
            kind: self
                .kind
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| DEFAULT_TYPE.to_owned()),
            title: self.title.unwrap_or_default(),
            message,
            user_id,
            channels,
            broadcast,
            data,
            scheduled_at: None,
            urgent: self.urgent.unwrap_or(false),
        })
    }
}

/// How far ahead a notification may be scheduled (API: more than a year ahead is refused).
pub const MAX_SCHEDULE_AHEAD_MS: Millis = 366 * 24 * 60 * 60 * 1000;

impl SendInput {
    /// Validates a schedule request: everything [`SendInput::validate`] checks, plus a required
    /// `scheduled_at` no more than a year ahead. A time in the past is accepted (it fires at once).
    pub fn validate_scheduled(mut self, now: Millis) -> Result<NewNotification, FieldError> {
        let scheduled_at = match self.scheduled_at.take() {
            None => return Err(FieldError::new("scheduled_at", "is required")),
            Some(s) => parse_time(&s).ok_or_else(|| {
                FieldError::new(
                    "scheduled_at",
                    "must be an RFC 3339 time such as 2024-01-29T17:00:00Z or 2024-01-29T17:00:00+00:00",
                )
            })?,
        };
        if scheduled_at > now + MAX_SCHEDULE_AHEAD_MS {
            return Err(FieldError::new(
                "scheduled_at",
                "must be at most a year ahead",
            ));
        }
        let mut n = self.validate_content()?;
        n.scheduled_at = Some(scheduled_at);
        Ok(n)
    }
}

/// Refuses a text field holding U+0000 (see [`SendInput::validate`]'s content checks).
fn reject_nul(field: &str, text: &str) -> Result<(), FieldError> {
    if text.contains('\0') {
        return Err(FieldError::new(
            field,
            "must not contain the character U+0000",
        ));
    }
    Ok(())
}

/// Whether any string or key inside a JSON value holds U+0000.
fn json_holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_holds_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains('\0') || json_holds_nul(v)),
        _ => false,
    }
}

/// Checks a user id: non-empty, at most [`MAX_USER_ID_BYTES`], no control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), FieldError> {
    if user_id.is_empty() {
        return Err(FieldError::new("user_id", "must not be empty"));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(FieldError::new("user_id", "must be at most 128 bytes"));
    }
    if user_id.chars().any(char::is_control) {
        return Err(FieldError::new(
            "user_id",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks one channel name: 1 to [`MAX_CHANNEL_BYTES`] bytes of `[A-Za-z0-9_\-=@,.;:]`.
pub fn is_valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b))
}

/// Checks a list of channel names, naming the first bad element (`channels[2]`).
pub fn validate_channel_list(field: &str, channels: &[String]) -> Result<(), FieldError> {
    if channels.len() > MAX_CHANNELS_PER_NOTIFICATION {
        return Err(FieldError::new(field, "must list at most 100 channels"));
    }
    for (i, c) in channels.iter().enumerate() {
        if !is_valid_channel(c) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                "must be 1 to 128 bytes of A-Z a-z 0-9 _ - = @ , . ; :",
            ));
        }
    }
    Ok(())
}

/// Formats milliseconds since the epoch as API.md's time: RFC 3339 UTC with milliseconds
/// (`2024-01-29T10:30:00.000Z`).
pub fn format_time(ms: Millis) -> String {
    let mut out = Vec::with_capacity(24);
    write_time(&mut out, ms);
    // Only ASCII digits and separators were written.
    String::from_utf8(out).unwrap_or_default()
}

/// The civil date (year, month, day) of a day count since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Appends `ms` in API.md's time format. Hand-written: it runs for every notification encoded (once
/// per frame and per history entry), and a general formatter re-reads its format string each time,
/// which cost two thirds of a notification's encoding (bench/README.md).
pub fn write_time(out: &mut Vec<u8>, ms: Millis) {
    const MS_PER_DAY: i64 = 86_400_000;
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        // Outside what four digits can say (never a real notification time): the epoch, as before.
        out.extend_from_slice(b"1970-01-01T00:00:00.000Z");
        return;
    }
    let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    // (value, position of its last digit, width)
    let fields = [
        (year, 3, 4),
        (i64::from(month), 6, 2),
        (i64::from(day), 9, 2),
        (hour, 12, 2),
        (minute, 15, 2),
        (second, 18, 2),
        (milli, 22, 3),
    ];
    for (mut value, last, width) in fields {
        for i in 0..width {
            text[last - i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    out.extend_from_slice(&text);
}

/// Parses an RFC 3339 time with any offset (`Z`, `+00:00`, `-05:00`) into milliseconds since the epoch.
pub fn parse_time(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The current wall-clock time in milliseconds since the epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Appends `items` as a JSON array of strings.
pub fn write_json_str_array(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, item);
    }
    out.push(b']');
}

/// Appends `s` as a JSON string literal (quoted and escaped).
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is correct for every code point; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_opt_time(out: &mut Vec<u8>, key: &str, ms: Option<Millis>) {
    out.extend_from_slice(key.as_bytes());
    match ms {
        Some(ms) => {
            out.push(b'"');
            write_time(out, ms);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

impl Notification {
    /// Appends the notification object of API.md to `out`. With `channel`, the object also carries the
    /// `"channel"` it arrived through (WebSocket delivery through a channel subscription).
    pub fn write_json(&self, out: &mut Vec<u8>, channel: Option<&str>) {
        out.extend_from_slice(b"{\"id\":\"");
        let mut id_buf = Uuid::encode_buffer();
        out.extend_from_slice(self.id.hyphenated().encode_lower(&mut id_buf).as_bytes());
        out.extend_from_slice(b"\",\"type\":");
        write_json_str(out, &self.kind);
        out.extend_from_slice(b",\"title\":");
        write_json_str(out, &self.title);
        out.extend_from_slice(b",\"message\":");
        write_json_str(out, &self.message);
        out.extend_from_slice(b",\"user_id\":");
        match &self.user_id {
            Some(u) => write_json_str(out, u),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"channels\":");
        write_json_str_array(out, &self.channels);
        if self.broadcast {
            out.extend_from_slice(b",\"broadcast\":true");
        }
        // Like `broadcast`, only when set: the object of a plain send stays what it was.
        if self.urgent {
            out.extend_from_slice(b",\"urgent\":true");
        }
        if let Some(channel) = channel {
            out.extend_from_slice(b",\"channel\":");
            write_json_str(out, channel);
        }
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(self.data.as_bytes());
        out.extend_from_slice(b",\"timestamp\":\"");
        write_time(out, self.created_at);
        out.extend_from_slice(b"\",\"read\":");
        out.extend_from_slice(if self.read_at.is_some() {
            b"true"
        } else {
            b"false"
        });
        write_opt_time(out, ",\"read_at\":", self.read_at);
        write_opt_time(out, ",\"delivered_at\":", self.delivered_at);
        write_opt_time(out, ",\"seen_at\":", self.seen_at);
        write_opt_time(out, ",\"scheduled_at\":", self.scheduled_at);
        // Only on fired schedules: the object of a plain send stays byte for byte what it was.
        if let Some(schedule_id) = self.schedule_id {
            out.extend_from_slice(b",\"schedule_id\":\"");
            out.extend_from_slice(
                schedule_id
                    .hyphenated()
                    .encode_lower(&mut id_buf)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        out.push(b'}');
    }

    /// The notification object as a standalone JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.message.len() + self.data.len());
        self.write_json(&mut out, None);
        out
    }
}

/// Generates UUIDv7 ids that strictly increase, even within one millisecond.
///
/// The store thread owns one, so on one node id order is commit order; with several nodes on one
/// PostgreSQL, each batch first moves its generator past the last id any node committed (the id
/// clock, migration 7, see [`IdGenerator::skip_past`]), so id order is commit order across nodes too.
///
/// Layout (RFC 9562 §5.7, "method 1" with a 26-bit counter): 48 bits of milliseconds, version, then a
/// counter that restarts every millisecond (67 million ids per millisecond before it would carry), then
/// 48 random bits per id. Several nodes writing to one PostgreSQL create ids independently; with 48
/// random bits, two ids of the same millisecond and counter collide with probability 2^-48.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last_ms: u64,
    counter: u64,
}

/// Bits of the per-millisecond counter.
const ID_COUNTER_BITS: u32 = 26;
/// Random bits at the end of every id.
const ID_RANDOM_BITS: u32 = 48;

impl IdGenerator {
    /// A generator whose first id is from the current millisecond.
    pub fn new() -> IdGenerator {
        IdGenerator::default()
    }

    /// The next id, and the millisecond timestamp embedded in it.
    pub fn next_id(&mut self) -> (Uuid, Millis) {
        let now = now_millis().max(0) as u64;
        if now > self.last_ms {
            self.last_ms = now;
            self.counter = 0;
        } else {
            // Same millisecond (or the clock stepped back): keep the last timestamp and count up.
            self.counter += 1;
            if self.counter >> ID_COUNTER_BITS != 0 {
                // The counter would carry: borrow the next millisecond, as RFC 9562 allows.
                self.last_ms += 1;
                self.counter = 0;
            }
        }
        // The random part comes from uuid's own v7 generator (a CSPRNG-seeded source).
        let random = Uuid::now_v7().as_u128() as u64 & ((1 << ID_RANDOM_BITS) - 1);
        // 12 bits of the counter in rand_a; 14 bits + 48 random bits in rand_b.
        let counter_hi = self.counter >> 14;
        let counter_lo = self.counter & 0x3fff;
        let hi: u64 = (self.last_ms << 16) | 0x7000 | counter_hi;
        let lo: u64 = (0b10 << 62) | (counter_lo << ID_RANDOM_BITS) | random;
        (Uuid::from_u64_pair(hi, lo), self.last_ms as Millis)
    }

    /// Makes every later id greater than `id`, an id another node issued (the PostgreSQL id clock,
    /// migration 7): the generator moves up to `id`'s millisecond and counter when it is behind them,
    /// so its next id has a greater millisecond or counter whatever the random bits. A generator
    /// already past `id` is left alone.
    pub fn skip_past(&mut self, id: Uuid) {
        let (hi, lo) = id.as_u64_pair();
        let ms = hi >> 16;
        let counter = ((hi & 0x0fff) << 14) | ((lo >> ID_RANDOM_BITS) & 0x3fff);
        if (ms, counter) > (self.last_ms, self.counter) {
            self.last_ms = ms;
            self.counter = counter;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> SendInput {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn message_is_required_and_named() {
        let err = input(r#"{"user_id":"u1"}"#).validate().unwrap_err();
        assert_eq!(err.field, "message");
        assert!(err.message.contains("message"));
    }

    #[test]
    fn seen_ids_are_counted_and_each_named_when_bad() {
        let id = Uuid::now_v7();
        let raw = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = parse_notification_ids("ids", &raw(&[&id.to_string()]), 2).unwrap();
        assert_eq!(ok, vec![id]);
        let bad = parse_notification_ids("ids", &raw(&[&id.to_string(), "x"]), 2).unwrap_err();
        assert_eq!(bad.field, "ids[1]");
        let empty = parse_notification_ids("ids", &[], 2).unwrap_err();
        assert_eq!(empty.message, "ids must list at least one notification id");
        let many = parse_notification_ids("ids", &raw(&["a", "b", "c"]), 2).unwrap_err();
        assert_eq!(
            many.message,
            "ids lists 3 ids; at most 2 are accepted at once"
        );
    }

    #[test]
    fn a_target_is_required() {
        let err = input(r#"{"message":"hi"}"#).validate().unwrap_err();
        assert_eq!(err.field, "target");
        let ok = input(r#"{"message":"hi","broadcast":true}"#)
            .validate()
            .unwrap();
        assert!(ok.broadcast);
    }

    #[test]
    fn integer_user_ids_are_stored_as_decimal_strings() {
        let n = input(r#"{"message":"hi","user_id":42}"#)
            .validate()
            .unwrap();
        assert_eq!(n.user_id.as_deref(), Some("42"));
        assert_eq!(n.kind, "info");
        assert_eq!(n.data, "{}");
    }

    #[test]
    fn bad_channel_names_are_reported_by_index() {
        let err = input(r#"{"message":"hi","channels":["ok","bad name"]}"#)
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "channels[1]");
        let long = "x".repeat(129);
        let err = input(&format!(r#"{{"message":"hi","user_id":"{long}"}}"#))
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "user_id");
    }

    #[test]
    fn data_must_be_an_object() {
        let err = input(r#"{"message":"hi","user_id":"u","data":[1]}"#)
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "data");
    }

    #[test]
    fn encoding_is_valid_json_with_every_field() {
        let n = input(r#"{"message":"a \"quoted\" line\n","user_id":"u1","channels":["c"],"data":{"k":[1,2]}}"#)
            .validate()
            .unwrap()
            .into_notification(Uuid::now_v7(), 1_706_524_200_000);
        let mut out = Vec::new();
        n.write_json(&mut out, Some("c"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "a \"quoted\" line\n");
        assert_eq!(v["channel"], "c");
        assert_eq!(v["data"]["k"][1], 2);
        assert_eq!(v["timestamp"], "2024-01-29T10:30:00.000Z");
        assert_eq!(v["read"], false);
        assert!(v["read_at"].is_null());
        assert_eq!(v["id"], n.id.to_string());
    }

    #[test]
    fn schedules_need_a_parseable_time_at_most_a_year_ahead() {
        let now = 1_706_524_200_000;
        let ok =
            input(r#"{"message":"m","user_id":"u","scheduled_at":"2024-01-29T17:00:00+00:00"}"#)
                .validate_scheduled(now)
                .unwrap();
        assert_eq!(ok.scheduled_at, Some(1_706_547_600_000));
        let past = input(r#"{"message":"m","user_id":"u","scheduled_at":"2001-01-01T00:00:00Z"}"#)
            .validate_scheduled(now);
        assert!(past.is_ok(), "a time in the past fires at once");
        for bad in [
            r#"{"message":"m","user_id":"u"}"#,
            r#"{"message":"m","user_id":"u","scheduled_at":"tomorrow"}"#,
            r#"{"message":"m","user_id":"u","scheduled_at":"2030-01-01T00:00:00Z"}"#,
        ] {
            assert_eq!(
                input(bad).validate_scheduled(now).unwrap_err().field,
                "scheduled_at",
                "{bad}"
            );
        }
    }

    #[test]
    fn time_formatting_matches_chrono_everywhere() {
        // Every day from 1970 to 2400 (leap years, centuries, 2000), at varied times of day, and a
        // few instants before the epoch.
        let mut ms: i64 = -86_400_000 * 3 + 1;
        while ms < 13_569_465_600_000 {
            let expected = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(format_time(ms), expected, "{ms}");
            ms += 86_400_000 + 3_723_456;
        }
        assert_eq!(format_time(1_706_524_200_000), "2024-01-29T10:30:00.000Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn times_parse_with_any_offset() {
        assert_eq!(
            parse_time("2024-01-29T10:30:00.000Z"),
            Some(1_706_524_200_000)
        );
        assert_eq!(
            parse_time("2024-01-29T10:30:00+00:00"),
            Some(1_706_524_200_000)
        );
        assert_eq!(
            parse_time("2024-01-29T05:30:00-05:00"),
            Some(1_706_524_200_000)
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn ids_strictly_increase_within_a_millisecond() {
        let mut ids = IdGenerator::new();
        let mut last = ids.next_id().0;
        for _ in 0..10_000 {
            let (id, _) = ids.next_id();
            assert!(id > last, "{id} <= {last}");
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            last = id;
        }
    }

    #[test]
    fn after_skip_past_every_id_is_above_the_other_nodes() {
        let mut ahead = IdGenerator::new();
        // Another node far ahead in its clock, deep into its millisecond's counter.
        ahead.last_ms = now_millis() as u64 + 60_000;
        ahead.counter = (1 << 20) + 5;
        let (theirs, _) = ahead.next_id();
        let mut ours = IdGenerator::new();
        let (before, _) = ours.next_id();
        ours.skip_past(theirs);
        let (after, _) = ours.next_id();
        assert!(
            before < theirs && theirs < after,
            "{before} {theirs} {after}"
        );
        // Skipping past an older id changes nothing.
        ours.skip_past(before);
        assert!(ours.next_id().0 > after);
    }

    #[test]
    fn ids_carry_48_random_bits_and_their_millisecond() {
        let mut a = IdGenerator::new();
        let mut b = IdGenerator::new();
        let (x, ms) = a.next_id();
        let (y, _) = b.next_id();
        let random = |id: Uuid| id.as_u128() & ((1 << 48) - 1);
        assert_ne!(
            random(x),
            random(y),
            "two generators (nodes) differ in the random part"
        );
        assert_eq!((x.as_u128() >> 80) as i64, ms);
    }
}
