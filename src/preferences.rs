//! Per-user preferences (API.md, "Preferences"): notification types and channels a user muted, and
//! quiet hours in the user's IANA time zone. A muted or quiet-hours notification is stored and counted
//! as usual; only its live push to the user's connections is held back, and a quiet-hours one addressed
//! to the user is pushed when the quiet hours end (the store keeps a row for it until then).
//!
//! What lives here: the preferences themselves ([`Preferences`]), their validation from the API's JSON
//! ([`PreferencesInput`]) and their JSON, the one rule every part applies ([`Preferences::holds_back`],
//! on shards and, for quiet hours, on the store thread) and the node's copy of every user's preferences
//! ([`Registry`]), kept current by the API and, across nodes, by the bus. The delivery path never reads
//! the store: a shard keeps each connected user's preferences beside the user's interned name, so a
//! user without preferences costs one `None` check per delivery.
//!
//! Quiet hours are decided from a notification's `timestamp` (its commit time), not from the moment a
//! shard sees it: every node and every shard, and the store thread that records what must be pushed
//! when they end, then make the same decision for the same notification.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;

use crate::model::{
    is_valid_channel, write_json_str, write_json_str_array, FieldError, Millis, Notification,
};

/// Most bytes of a muted type (a notification's `type` has no stated bound; this keeps one user's
/// preferences small).
pub const MAX_TYPE_BYTES: usize = 128;

/// A user's preferences, validated. The default (nothing muted, no quiet hours) is what a user who
/// never set any has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preferences {
    /// Notification `type`s not pushed live to the user's connections.
    pub muted_types: Vec<String>,
    /// Channels whose notifications are not pushed live to the user's connections (unless addressed
    /// to the user by `user_id`).
    pub muted_channels: Vec<String>,
    /// When notifications are held back, and in which time zone.
    pub quiet_hours: Option<QuietHours>,
}

/// A daily window of local time in a time zone, during which notifications are held back.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    /// Local start time (inclusive).
    pub start: Time,
    /// Local end time (exclusive); before `start` when the window crosses midnight.
    pub end: Time,
    /// The IANA name, as the user gave it (`Europe/Madrid`), for the JSON.
    pub time_zone_name: String,
    /// The zone itself, with its DST rules.
    pub time_zone: TimeZone,
}

/// The limits a `PUT` is checked against (configurable, see `config.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `PREFERENCES_MAX_MUTED_TYPES`.
    pub max_muted_types: usize,
    /// `PREFERENCES_MAX_MUTED_CHANNELS`.
    pub max_muted_channels: usize,
}

/// The body of `PUT /api/v1/users/:user_id/preferences`. Every field is optional: what is left out
/// takes its default, so a `PUT` always states the whole preferences.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencesInput {
    /// `muted_types`.
    pub muted_types: Option<Vec<String>>,
    /// `muted_channels`.
    pub muted_channels: Option<Vec<String>>,
    /// `quiet_hours`, or `null` for none.
    pub quiet_hours: Option<QuietHoursInput>,
}

/// `quiet_hours` as sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursInput {
    /// `"HH:MM"`, local.
    pub start: Option<String>,
    /// `"HH:MM"`, local.
    pub end: Option<String>,
    /// An IANA time zone name.
    pub time_zone: Option<String>,
}

impl PreferencesInput {
    /// Checks the input against API.md's rules and `limits`. A type or channel listed twice is kept
    /// once.
    pub fn validate(self, limits: Limits) -> Result<Preferences, FieldError> {
        let muted_types = dedup(self.muted_types.unwrap_or_default());
        if muted_types.len() > limits.max_muted_types {
            return Err(FieldError::new(
                "muted_types",
                &format!(
                    "must hold at most {} types (PREFERENCES_MAX_MUTED_TYPES)",
                    limits.max_muted_types
                ),
            ));
        }
        for (i, t) in muted_types.iter().enumerate() {
            if t.is_empty() || t.len() > MAX_TYPE_BYTES || t.contains('\0') {
                return Err(FieldError::new(
                    format!("muted_types[{i}]"),
                    &format!("must be 1 to {MAX_TYPE_BYTES} bytes without U+0000"),
                ));
            }
        }
        let muted_channels = dedup(self.muted_channels.unwrap_or_default());
        if muted_channels.len() > limits.max_muted_channels {
            return Err(FieldError::new(
                "muted_channels",
                &format!(
                    "must hold at most {} channels (PREFERENCES_MAX_MUTED_CHANNELS)",
                    limits.max_muted_channels
                ),
            ));
        }
        for (i, c) in muted_channels.iter().enumerate() {
            if !is_valid_channel(c) {
                return Err(FieldError::new(
                    format!("muted_channels[{i}]"),
                    "must be 1 to 128 bytes of [A-Za-z0-9_-=@,.;:]",
                ));
            }
        }
        let quiet_hours = self
            .quiet_hours
            .map(QuietHoursInput::validate)
            .transpose()?;
        Ok(Preferences {
            muted_types,
            muted_channels,
            quiet_hours,
        })
    }
}

impl QuietHoursInput {
    fn validate(self) -> Result<QuietHours, FieldError> {
        let start = local_time("quiet_hours.start", self.start)?;
        let end = local_time("quiet_hours.end", self.end)?;
        if start == end {
            return Err(FieldError::new(
                "quiet_hours.end",
                "must differ from quiet_hours.start (an empty or a whole-day window is not a window)",
            ));
        }
        let name = self
            .time_zone
            .ok_or_else(|| FieldError::new("quiet_hours.time_zone", "is required"))?;
        let time_zone = TimeZone::get(&name).map_err(|_| {
            FieldError::new(
                "quiet_hours.time_zone",
                "must be an IANA time zone name such as Europe/Madrid",
            )
        })?;
        Ok(QuietHours {
            start,
            end,
            time_zone_name: name,
            time_zone,
        })
    }
}

/// Parses `"HH:MM"` or `"HH:MM:SS"` (two digits each, 00:00 to 23:59:59).
fn local_time(field: &str, value: Option<String>) -> Result<Time, FieldError> {
    let value = value.ok_or_else(|| FieldError::new(field, "is required"))?;
    let bad = || {
        FieldError::new(
            field,
            "must be a local time \"HH:MM\" or \"HH:MM:SS\" from 00:00 to 23:59:59",
        )
    };
    let b = value.as_bytes();
    let shaped = (b.len() == 5 || b.len() == 8)
        && b.iter().enumerate().all(|(i, c)| {
            if i % 3 == 2 {
                *c == b':'
            } else {
                c.is_ascii_digit()
            }
        });
    if !shaped {
        return Err(bad());
    }
    let two = |at: usize| ((b[at] - b'0') * 10 + (b[at + 1] - b'0')) as i8;
    let second = if b.len() == 8 { two(6) } else { 0 };
    Time::new(two(0), two(3), second, 0).map_err(|_| bad())
}

/// A local time as the API writes it: `"HH:MM"`, with `":SS"` when the seconds are not zero.
fn write_local_time(out: &mut Vec<u8>, t: Time) {
    let text = if t.second() == 0 {
        format!("{:02}:{:02}", t.hour(), t.minute())
    } else {
        format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
    };
    write_json_str(out, &text);
}

/// Keeps the first of each repeated entry, in order.
fn dedup(list: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

impl QuietHours {
    /// If the instant `at` (milliseconds since the epoch) falls inside the window, when that window
    /// ends (milliseconds since the epoch); else `None`. Local times are read in the zone at `at`, so a
    /// DST change moves the window with the wall clock; an end that falls in a DST gap ends at the
    /// first instant after the gap, one in a repeated hour at its first occurrence.
    pub fn window_end(&self, at: Millis) -> Option<Millis> {
        let at = Timestamp::from_millisecond(at).ok()?;
        let local = at.to_zoned(self.time_zone.clone());
        let now = local.time();
        let today = local.date();
        let end_date = if self.start < self.end {
            if now < self.start || now >= self.end {
                return None;
            }
            today
        } else if now >= self.start {
            today.tomorrow().ok()?
        } else if now < self.end {
            today
        } else {
            return None;
        };
        let end = end_date
            .to_datetime(self.end)
            .to_zoned(self.time_zone.clone())
            .ok()?;
        Some(end.timestamp().as_millisecond().max(0) as Millis)
    }
}

/// What a user's preferences do to one notification reaching one of the user's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pushed as usual.
    Push,
    /// Not pushed: a muted type or channel, or quiet hours for a notification not addressed to the
    /// user (it is in no inbox of theirs; a resume replays it).
    Drop,
    /// Not pushed now: quiet hours until this instant (milliseconds since the epoch), when a
    /// notification addressed to the user is pushed to the connections the user has then.
    HoldUntil(Millis),
}

impl Preferences {
    /// Whether these are the defaults (a user with them is stored as having none).
    pub fn is_default(&self) -> bool {
        self.muted_types.is_empty() && self.muted_channels.is_empty() && self.quiet_hours.is_none()
    }

    /// The rule of API.md ("Preferences") for notification `n` reaching a connection of `user`, who
    /// has these preferences. `released`: `n` is being pushed because its quiet hours ended, so
    /// quiet hours no longer apply to it.
    pub fn verdict(&self, user: &str, n: &Notification, released: bool) -> Verdict {
        if self.muted_types.contains(&n.kind) {
            return Verdict::Drop;
        }
        let addressed = n.user_id.as_deref() == Some(user);
        if !addressed
            && n.channels
                .iter()
                .any(|c| self.muted_channels.iter().any(|m| m == c))
        {
            return Verdict::Drop;
        }
        if released || n.urgent {
            return Verdict::Push;
        }
        match self
            .quiet_hours
            .as_ref()
            .and_then(|q| q.window_end(n.created_at))
        {
            None => Verdict::Push,
            Some(end) if addressed => Verdict::HoldUntil(end),
            Some(_) => Verdict::Drop,
        }
    }

    /// The JSON object of API.md for `user_id` (`updated_at` is `null` for the defaults).
    pub fn write_json(&self, out: &mut Vec<u8>, user_id: &str, updated_at: Option<Millis>) {
        out.extend_from_slice(b"{\"user_id\":");
        write_json_str(out, user_id);
        out.extend_from_slice(b",");
        self.write_fields(out);
        out.extend_from_slice(b",\"updated_at\":");
        match updated_at {
            Some(t) => {
                out.push(b'"');
                crate::model::write_time(out, t);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// The preferences alone, as stored and as sent between nodes: a JSON object that
    /// [`Preferences::from_stored`] reads back.
    pub fn to_stored(&self) -> String {
        let mut out = Vec::with_capacity(128);
        out.push(b'{');
        self.write_fields(&mut out);
        out.push(b'}');
        String::from_utf8(out).expect("JSON written from strings is UTF-8")
    }

    /// Reads what [`Preferences::to_stored`] wrote (the limits were checked when it was set).
    pub fn from_stored(json: &str) -> Result<Preferences, String> {
        let input: PreferencesInput =
            serde_json::from_str(json).map_err(|e| format!("stored preferences: {e}"))?;
        input
            .validate(Limits {
                max_muted_types: usize::MAX,
                max_muted_channels: usize::MAX,
            })
            .map_err(|e| format!("stored preferences: {e}"))
    }

    fn write_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\"muted_types\":");
        write_json_str_array(out, &self.muted_types);
        out.extend_from_slice(b",\"muted_channels\":");
        write_json_str_array(out, &self.muted_channels);
        out.extend_from_slice(b",\"quiet_hours\":");
        match &self.quiet_hours {
            None => out.extend_from_slice(b"null"),
            Some(q) => {
                out.extend_from_slice(b"{\"start\":");
                write_local_time(out, q.start);
                out.extend_from_slice(b",\"end\":");
                write_local_time(out, q.end);
                out.extend_from_slice(b",\"time_zone\":");
                write_json_str(out, &q.time_zone_name);
                out.push(b'}');
            }
        }
    }
}

/// The node's copy of every user's preferences (users with none are absent), read where a
/// connection's user is first interned on a shard and by the store thread when it commits; written
/// when a `PUT` commits here or another node reports one through the bus.
#[derive(Debug, Default)]
pub struct Registry {
    users: RwLock<HashMap<Box<str>, Arc<Preferences>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// `user`'s preferences, if any.
    pub fn get(&self, user: &str) -> Option<Arc<Preferences>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.get(user).cloned()
    }

    /// Whether any user has preferences (the store thread skips its check when none has).
    pub fn is_empty(&self) -> bool {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Sets (or with `None`, forgets) `user`'s preferences.
    pub fn set(&self, user: &str, prefs: Option<Arc<Preferences>>) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        match prefs {
            Some(p) => {
                users.insert(user.into(), p);
            }
            None => {
                users.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(start: &str, end: &str, zone: &str) -> QuietHours {
        QuietHoursInput {
            start: Some(start.into()),
            end: Some(end.into()),
            time_zone: Some(zone.into()),
        }
        .validate()
        .unwrap()
    }

    fn ms(rfc3339: &str) -> Millis {
        rfc3339.parse::<Timestamp>().unwrap().as_millisecond() as Millis
    }

    #[test]
    fn a_window_across_midnight_ends_the_next_morning_in_local_time() {
        let q = quiet("22:00", "07:00", "Europe/Madrid");
        // 23:30 in Madrid (UTC+1 in January) → 07:00 the next day, 06:00 UTC.
        assert_eq!(
            q.window_end(ms("2026-01-10T22:30:00Z")),
            Some(ms("2026-01-11T06:00:00Z"))
        );
        // 03:00 local → 07:00 the same day.
        assert_eq!(
            q.window_end(ms("2026-01-11T02:00:00Z")),
            Some(ms("2026-01-11T06:00:00Z"))
        );
        assert_eq!(
            q.window_end(ms("2026-01-11T06:00:00Z")),
            None,
            "end is exclusive"
        );
        assert_eq!(q.window_end(ms("2026-01-11T12:00:00Z")), None);
    }

    #[test]
    fn a_window_within_a_day_and_the_dst_change() {
        let q = quiet("01:00", "04:00", "Europe/Madrid");
        // 2026-03-29: clocks go from 02:00 to 03:00 in Madrid. 01:30 local is 00:30 UTC (UTC+1);
        // 04:00 local is then UTC+2, 02:00 UTC: the window is two real hours long that night.
        assert_eq!(
            q.window_end(ms("2026-03-29T00:30:00Z")),
            Some(ms("2026-03-29T02:00:00Z"))
        );
        assert_eq!(q.window_end(ms("2026-03-28T23:59:00Z")), None);
        // An end inside the gap ends at the first instant after it.
        let gap = quiet("01:00", "02:30", "Europe/Madrid");
        assert_eq!(
            gap.window_end(ms("2026-03-29T00:30:00Z")),
            Some(ms("2026-03-29T01:30:00Z"))
        );
    }

    #[test]
    fn validation_names_the_field() {
        let limits = Limits {
            max_muted_types: 2,
            max_muted_channels: 1,
        };
        let err = |input: PreferencesInput| input.validate(limits).unwrap_err().message;
        assert!(err(PreferencesInput {
            muted_types: Some(vec!["a".into(), "b".into(), "c".into()]),
            ..Default::default()
        })
        .contains("at most 2"));
        assert!(err(PreferencesInput {
            muted_channels: Some(vec!["bad channel".into()]),
            ..Default::default()
        })
        .starts_with("muted_channels[0]"));
        let q = |s: &str, e: &str, z: &str| PreferencesInput {
            quiet_hours: Some(QuietHoursInput {
                start: Some(s.into()),
                end: Some(e.into()),
                time_zone: Some(z.into()),
            }),
            ..Default::default()
        };
        assert!(err(q("25:00", "07:00", "UTC")).starts_with("quiet_hours.start"));
        assert!(err(q("22:00", "7:00", "UTC")).starts_with("quiet_hours.end"));
        assert!(err(q("22:00", "07:00:60", "UTC")).starts_with("quiet_hours.end"));
        assert!(err(q("22:00", "07-00", "UTC")).starts_with("quiet_hours.end"));
        assert!(q("22:00:30", "07:00", "UTC").validate(limits).is_ok());
        assert!(err(q("22:00", "22:00", "UTC")).starts_with("quiet_hours.end"));
        assert!(err(q("22:00", "07:00", "Mars/Olympus")).starts_with("quiet_hours.time_zone"));
        let ok = q("22:00", "07:00", "America/New_York")
            .validate(limits)
            .unwrap();
        assert_eq!(Preferences::from_stored(&ok.to_stored()).unwrap(), ok);
    }
}
