//! The audit log (`AUDIT_LOG`, docs/audit.md): one JSON line for each step of a notification's life
//! (accepted with the credential that sent it, stored, delivered, read, read-all, deleted, scheduled,
//! fired, cancelled) and for each refused credential and rate limit.
//!
//! The events happen on the shard threads and on the store writer, which must never wait for a disk or
//! a pipe. So an event is handed, unformatted, to one writer thread ([`writer`]) through a bounded queue
//! with `try_send`: the thread formats the lines and writes them. When the queue is full the event is
//! not waited for but counted, per kind of line, and the writer reports the count: a `dropped` line in
//! the audit log itself, `notif_audit_dropped_total` in `/metrics`, and a warning in the server log at
//! most every 10 s. Nothing is lost without being counted.
//!
//! Off (the default), an [`Audit`] holds nothing: every call is one branch on a `None`, and the
//! closure that would build the event never runs, so no allocation and no formatting happen.
//!
//! A leaf: it imports only `model` (the notification and the time format), so every layer may write
//! to it.

mod writer;

pub use writer::AuditThread;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{Sender, TrySendError};
use uuid::Uuid;

use crate::model::{now_millis, Millis, Notification};

/// Events the queue holds when `AUDIT_QUEUE` is not set (about 5 MB of slots, reserved at start-up):
/// a burst of several thousand requests, each a few lines, fits; a stuck disk turns into counted drops
/// within a second rather than into memory.
pub const DEFAULT_QUEUE: usize = 65_536;
/// Largest `AUDIT_QUEUE`: its slots (about 80 bytes each, reserved at start-up) take 80 MB, and a
/// full queue's strings more; more than any burst needs.
pub const MAX_QUEUE: usize = 1 << 20;

/// Where the lines go (`AUDIT_LOG`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    /// No audit log (the default).
    #[default]
    Off,
    /// The process's standard output, between the server's own log lines.
    Stdout,
    /// A file, opened for appending (created if missing) and reopened on SIGHUP.
    File(PathBuf),
}

impl FromStr for Target {
    type Err = String;

    /// `off`, `stdout`, or a file path (anything else).
    fn from_str(value: &str) -> Result<Target, String> {
        match value.trim() {
            "" => Err("must be off, stdout or a file path".into()),
            v if v.eq_ignore_ascii_case("off") => Ok(Target::Off),
            v if v.eq_ignore_ascii_case("stdout") => Ok(Target::Stdout),
            path => Ok(Target::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Off => f.write_str("off"),
            Target::Stdout => f.write_str("stdout"),
            Target::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What `check-config` says of the target, without creating or changing anything: a file must be
/// appendable if it exists, else its folder must exist and be writable. `Ok` describes the target.
pub fn probe(target: &Target) -> Result<String, String> {
    let Target::File(path) = target else {
        return Ok(format!("AUDIT_LOG={target}"));
    };
    let shown = path.display();
    if path.exists() {
        // Opening for appending writes nothing.
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(|_| format!("AUDIT_LOG {shown} can be appended to"))
            .map_err(|e| format!("AUDIT_LOG {shown} cannot be opened for appending: {e}"));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(format!(
            "AUDIT_LOG {shown}: the folder {} does not exist",
            folder.display()
        ));
    }
    let folder_c = std::ffi::CString::new(folder.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("AUDIT_LOG {shown}: the path holds a NUL byte"))?;
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(folder_c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "AUDIT_LOG {shown}: the folder {} is not writable: {}",
            folder.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(format!(
        "AUDIT_LOG {shown} does not exist yet; start-up will create it"
    ))
}

/// Names an API key without revealing it: the first 4 bytes (8 hex digits) of its SHA-256, which
/// `auth` computes anyway to compare keys in constant time. An operator finds which key it is by
/// hashing the configured keys (`printf %s "$KEY" | sha256sum | cut -c1-8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 4]);

impl KeyId {
    /// The id of the key whose SHA-256 is `digest`.
    pub fn of_digest(digest: &[u8; 32]) -> KeyId {
        KeyId([digest[0], digest[1], digest[2], digest[3]])
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The credential a request or connection was accepted with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credential {
    /// None was needed (no `API_KEY`, or no `JWT_SECRET` for WebSockets).
    #[default]
    None,
    /// An API key of `API_KEY`.
    ApiKey(KeyId),
    /// A JWT; the string is its `sub`.
    Jwt(String),
}

/// Who sent an HTTP request, as the connection knows it before the API handles it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The credential the request passed with.
    pub credential: Credential,
    /// The peer's address (known only while the audit log is on: nobody else needs it per request).
    pub ip: Option<IpAddr>,
}

impl Caller {
    /// The origin of an event caused by this caller's `method path` request.
    pub fn origin(&self, method: &'static str, path: &str) -> Box<Origin> {
        Box::new(Origin {
            via: Via::Http {
                method,
                path: path.to_owned(),
            },
            credential: self.credential.clone(),
            ip: self.ip,
        })
    }
}

/// How an event's request came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// An HTTP request; the path without its query (a WebSocket's `?token=` never reaches the log).
    Http {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
    },
    /// A WebSocket upgrade or a message on a live WebSocket.
    WebSocket,
}

/// Who caused an event, and how. Boxed in an [`Event`], which keeps the queue's slots (reserved
/// at start-up, `AUDIT_QUEUE` of them) small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// HTTP or WebSocket.
    pub via: Via,
    /// The credential presented and accepted (`None` on a refusal: it was not accepted).
    pub credential: Credential,
    /// The peer's address, when known.
    pub ip: Option<IpAddr>,
}

impl Origin {
    /// An event on a WebSocket of `credential` from `ip`.
    pub fn websocket(credential: Credential, ip: Option<IpAddr>) -> Box<Origin> {
        Box::new(Origin {
            via: Via::WebSocket,
            credential,
            ip,
        })
    }
}

/// One event, as the thread where it happened hands it over; the writer turns it into lines.
#[derive(Debug)]
pub enum Event {
    /// A send or batch was answered 2xx: one `accepted` line per notification.
    Accepted {
        /// The notifications' ids.
        ids: Vec<Uuid>,
        /// True for a retry with an `Idempotency-Key` answered from the first request's receipt.
        replayed: bool,
        /// Who sent it.
        by: Box<Origin>,
    },
    /// A commit stored these notifications: a `stored` line each, or `fired` for a schedule's.
    Committed(Vec<Arc<Notification>>),
    /// A shard wrote a notification to some of its connections.
    Delivered {
        /// The notification.
        id: Uuid,
        /// To how many connections of the shard.
        connections: usize,
        /// Which shard.
        shard: usize,
    },
    /// A notification was marked read.
    Read {
        /// The notification.
        id: Uuid,
        /// Whose inbox.
        user_id: String,
        /// Who asked.
        by: Box<Origin>,
    },
    /// A user's inbox was marked read.
    ReadAll {
        /// Whose inbox.
        user_id: String,
        /// How many were unread.
        updated: u64,
        /// Who asked.
        by: Box<Origin>,
    },
    /// A notification was deleted.
    Deleted {
        /// The notification.
        id: Uuid,
        /// Whose inbox.
        user_id: String,
        /// Who asked.
        by: Box<Origin>,
    },
    /// A notification was scheduled.
    Scheduled {
        /// The schedule's id.
        id: Uuid,
        /// Its user, if any.
        user_id: Option<String>,
        /// When it is due.
        scheduled_at: Millis,
        /// True for a retry answered from the first request's receipt.
        replayed: bool,
        /// Who scheduled it.
        by: Box<Origin>,
    },
    /// A pending schedule was cancelled.
    Cancelled {
        /// The schedule's id.
        id: Uuid,
        /// Who cancelled it.
        by: Box<Origin>,
    },
    /// A credential was refused (401).
    AuthRefused {
        /// Why, as a stable code (docs/audit.md).
        reason: &'static str,
        /// The id of a refused API key (so a client with a stale or mistyped key can be found).
        key_id: Option<KeyId>,
        /// Where it came from.
        by: Box<Origin>,
    },
    /// A rate limit refused a request (429) or a WebSocket message.
    RateLimited {
        /// Which limit: `api_key` or `ws_messages`.
        limit: &'static str,
        /// Whose.
        by: Box<Origin>,
    },
}

/// The kinds of line, in the order their counters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Accepted,
    Stored,
    Delivered,
    Read,
    ReadAll,
    Deleted,
    Scheduled,
    Fired,
    Cancelled,
    AuthRefused,
    RateLimited,
}

impl Kind {
    /// How many kinds there are.
    const COUNT: usize = 11;
    /// Every kind, by index.
    const ALL: [Kind; Kind::COUNT] = [
        Kind::Accepted,
        Kind::Stored,
        Kind::Delivered,
        Kind::Read,
        Kind::ReadAll,
        Kind::Deleted,
        Kind::Scheduled,
        Kind::Fired,
        Kind::Cancelled,
        Kind::AuthRefused,
        Kind::RateLimited,
    ];

    /// The `event` of its lines.
    fn name(self) -> &'static str {
        match self {
            Kind::Accepted => "accepted",
            Kind::Stored => "stored",
            Kind::Delivered => "delivered",
            Kind::Read => "read",
            Kind::ReadAll => "read_all",
            Kind::Deleted => "deleted",
            Kind::Scheduled => "scheduled",
            Kind::Fired => "fired",
            Kind::Cancelled => "cancelled",
            Kind::AuthRefused => "auth_refused",
            Kind::RateLimited => "rate_limited",
        }
    }
}

/// Lines per kind.
type LineCounts = [u64; Kind::COUNT];

impl Event {
    /// Adds the lines this event makes, per kind, to `counts`.
    fn count_lines(&self, counts: &mut LineCounts) {
        let (kind, n) = match self {
            Event::Accepted { ids, .. } => (Kind::Accepted, ids.len()),
            Event::Committed(list) => {
                let fired = list.iter().filter(|n| n.schedule_id.is_some()).count();
                counts[Kind::Fired as usize] += fired as u64;
                (Kind::Stored, list.len() - fired)
            }
            Event::Delivered { .. } => (Kind::Delivered, 1),
            Event::Read { .. } => (Kind::Read, 1),
            Event::ReadAll { .. } => (Kind::ReadAll, 1),
            Event::Deleted { .. } => (Kind::Deleted, 1),
            Event::Scheduled { .. } => (Kind::Scheduled, 1),
            Event::Cancelled { .. } => (Kind::Cancelled, 1),
            Event::AuthRefused { .. } => (Kind::AuthRefused, 1),
            Event::RateLimited { .. } => (Kind::RateLimited, 1),
        };
        counts[kind as usize] += n as u64;
    }
}

/// An event with the time it happened.
#[derive(Debug)]
struct Record {
    /// Milliseconds since the epoch, taken where the event happened (not when it was written).
    ts: Millis,
    event: Event,
}

/// What the writer thread receives.
enum Msg {
    Record(Record),
    /// Write what is queued, flush, and exit (sent once, at shutdown).
    Stop,
}

/// What the handles and the writer thread count together.
#[derive(Debug, Default)]
struct Counters {
    /// Lines written to the target (drop reports included).
    written: AtomicU64,
    /// Lines dropped since start: queue full, or a failed write.
    dropped: AtomicU64,
    /// Lines dropped per kind since the writer last reported them.
    unreported: [AtomicU64; Kind::COUNT],
}

impl Counters {
    /// Counts `counts` as dropped.
    fn drop_lines(&self, counts: &LineCounts) {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        self.dropped.fetch_add(total, Relaxed);
        for (slot, n) in self.unreported.iter().zip(counts) {
            if *n > 0 {
                slot.fetch_add(*n, Relaxed);
            }
        }
    }
}

/// The handle every thread writes events to. Cheap to clone (an `Arc`, or nothing when off).
#[derive(Clone, Default)]
pub struct Audit {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    queue: Sender<Msg>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_on() {
            "Audit(on)"
        } else {
            "Audit(off)"
        })
    }
}

impl Audit {
    /// A handle that records nothing.
    pub fn off() -> Audit {
        Audit::default()
    }

    /// Starts the writer thread for `target` with a queue of `capacity` events (at least 1). For
    /// [`Target::Off`] no thread starts and the handle records nothing. Fails when the file cannot be
    /// opened for appending or the thread cannot start.
    pub fn start(target: &Target, capacity: usize) -> std::io::Result<(Audit, AuditThread)> {
        if *target == Target::Off {
            return Ok((Audit::off(), AuditThread::none()));
        }
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let thread = writer::spawn(target, rx, tx.clone(), counters.clone(), capacity)?;
        let audit = Audit {
            shared: Some(Arc::new(Shared {
                queue: tx,
                counters,
            })),
        };
        Ok((audit, thread))
    }

    /// Whether events are recorded: callers check it before gathering what only the log needs (the
    /// peer's address).
    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Records the event `make` builds; `make` runs only when the log is on. Never blocks: with the
    /// queue full, the event's lines are counted as dropped.
    #[inline]
    pub fn emit(&self, make: impl FnOnce() -> Event) {
        if let Some(shared) = &self.shared {
            shared.send(make());
        }
    }

    /// A shard wrote notification `id` to `connections` of its connections (client publishes, with
    /// no id, are not notifications and are not recorded).
    #[inline]
    pub fn delivered(&self, id: Option<Uuid>, connections: usize, shard: usize) {
        if let (Some(shared), Some(id)) = (&self.shared, id) {
            shared.send(Event::Delivered {
                id,
                connections,
                shard,
            });
        }
    }

    /// A commit stored `inserted` (sends, batches and fired schedules).
    #[inline]
    pub fn committed(&self, inserted: &[Arc<Notification>]) {
        if let Some(shared) = &self.shared {
            if !inserted.is_empty() {
                shared.send(Event::Committed(inserted.to_vec()));
            }
        }
    }

    /// Lines written since start.
    pub fn lines_written(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.counters.written.load(Relaxed))
    }

    /// Lines dropped since start (queue full or a failed write).
    pub fn lines_dropped(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.counters.dropped.load(Relaxed))
    }
}

impl Shared {
    fn send(&self, event: Event) {
        let record = Record {
            ts: now_millis(),
            event,
        };
        match self.queue.try_send(Msg::Record(record)) {
            Ok(()) => {}
            Err(
                TrySendError::Full(Msg::Record(r)) | TrySendError::Disconnected(Msg::Record(r)),
            ) => {
                let mut counts = LineCounts::default();
                r.event.count_lines(&mut counts);
                self.counters.drop_lines(&counts);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_their_setting() {
        assert_eq!("off".parse::<Target>(), Ok(Target::Off));
        assert_eq!("OFF".parse::<Target>(), Ok(Target::Off));
        assert_eq!("stdout".parse::<Target>(), Ok(Target::Stdout));
        assert_eq!(
            "/var/log/ns/audit.log".parse::<Target>(),
            Ok(Target::File("/var/log/ns/audit.log".into()))
        );
        assert!(" ".parse::<Target>().is_err());
    }

    #[test]
    fn the_probe_creates_nothing_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let said = probe(&Target::File(file.clone())).unwrap();
        assert!(said.contains("will create it"), "{said}");
        assert!(!file.exists());
        std::fs::write(&file, "").unwrap();
        assert!(probe(&Target::File(file))
            .unwrap()
            .contains("can be appended to"));
        let missing = probe(&Target::File(dir.path().join("no/such/audit.log"))).unwrap_err();
        assert!(missing.contains("does not exist"), "{missing}");
        assert_eq!(probe(&Target::Off).unwrap(), "AUDIT_LOG=off");
    }

    #[test]
    fn key_ids_are_eight_hex_digits_of_the_digest() {
        let mut digest = [0u8; 32];
        digest[..5].copy_from_slice(&[0x0a, 0xbc, 0xde, 0xf0, 0x99]);
        assert_eq!(KeyId::of_digest(&digest).to_string(), "0abcdef0");
    }

    #[test]
    fn a_queue_slot_stays_small() {
        // docs/audit.md promises about 80 bytes a slot (the channel adds an 8-byte stamp).
        assert!(
            std::mem::size_of::<Msg>() <= 72,
            "{}",
            std::mem::size_of::<Msg>()
        );
    }

    #[test]
    fn off_builds_nothing() {
        let audit = Audit::off();
        audit.emit(|| unreachable!("the event of a log that is off is never built"));
        audit.delivered(Some(Uuid::nil()), 1, 0);
        assert_eq!((audit.lines_written(), audit.lines_dropped()), (0, 0));
    }
}
