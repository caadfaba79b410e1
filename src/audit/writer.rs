//! The audit writer thread: takes events off the queue, formats each as JSON lines (docs/audit.md),
//! and writes them to the target in chunks, flushed whenever the queue runs empty (so `tail -f` sees
//! a line within moments of its event) or a chunk grows past [`FLUSH_BYTES`].
//!
//! It also reports what the handles could not queue (see the module docs of `audit`): after each
//! drain, a `dropped` line with the count per kind of line, and a warning in the server log, at most
//! every [`WARN_INTERVAL`]. A failed write loses the chunk; its lines are counted as dropped too.
//!
//! A file target is opened for appending, so `logrotate`'s `copytruncate` works (every write goes to
//! the end, wherever the end now is), and it is reopened by path when the process gets SIGHUP, for a
//! rotation that renames the file (`postrotate kill -HUP <pid>`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use uuid::Uuid;

use super::{Counters, Credential, Event, Kind, LineCounts, Msg, Origin, Record, Target, Via};
use crate::model::{
    now_millis, write_json_str, write_json_str_array, write_time, Millis, Notification,
};

/// The name of the writer thread, as `top -H` shows it.
const THREAD_NAME: &str = "audit-writer";
/// How long the thread sleeps on an empty queue before it looks for a SIGHUP or drops to report.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// Bytes of formatted lines written in one go at most.
const FLUSH_BYTES: usize = 64 * 1024;
/// Events taken from a busy queue before drops are reported and the chunk flushed anyway.
const DRAIN_MAX: usize = 4096;
/// Least time between two warnings about dropped lines in the server log.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The running writer thread; [`AuditThread::finish`] writes what is queued and stops it.
pub struct AuditThread {
    running: Option<(Sender<Msg>, JoinHandle<()>)>,
}

impl AuditThread {
    /// No thread (the log is off).
    pub(super) fn none() -> AuditThread {
        AuditThread { running: None }
    }

    /// Writes every event queued so far, flushes, and joins the thread. Call it once nothing
    /// produces events any more (after the shards and the store stopped): it waits for room in the
    /// queue to ask the thread to stop.
    pub fn finish(self) {
        if let Some((queue, handle)) = self.running {
            // Err: the thread is gone already (it panicked); joining says so.
            let _ = queue.send(Msg::Stop);
            if handle.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        }
    }
}

/// Where the formatted lines go.
enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// Set by the SIGHUP handler: reopen `path` before the next write.
        reopen: Arc<AtomicBool>,
    },
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        match target {
            Target::Off => Err(io::Error::other("the audit log is off")),
            Target::Stdout => Ok(Sink::Stdout),
            Target::File(path) => {
                let file = open_append(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open AUDIT_LOG {}: {e}", path.display()),
                    )
                })?;
                let reopen = Arc::new(AtomicBool::new(false));
                signal_hook::flag::register(signal_hook::consts::SIGHUP, reopen.clone())?;
                Ok(Sink::File {
                    path: path.clone(),
                    file,
                    reopen,
                })
            }
        }
    }

    /// Reopens the file if SIGHUP asked for it. On failure the old file stays in use.
    fn reopen_if_asked(&mut self) {
        if let Sink::File { path, file, reopen } = self {
            if reopen.swap(false, Relaxed) {
                match open_append(path) {
                    Ok(new) => {
                        *file = new;
                        tracing::info!(path = %path.display(), "audit log reopened");
                    }
                    Err(e) => tracing::error!(
                        path = %path.display(),
                        error = %e,
                        "cannot reopen the audit log; still writing to the file open before"
                    ),
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            // One `write_all` under the lock, of whole lines, so the server's own log lines (also
            // on stdout) never land inside one of ours.
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File { file, .. } => file.write_all(bytes),
        }
    }
}

/// Starts the thread on an opened target.
pub(super) fn spawn(
    target: &Target,
    queue: Receiver<Msg>,
    stop: Sender<Msg>,
    counters: Arc<Counters>,
    capacity: usize,
) -> io::Result<AuditThread> {
    let sink = Sink::open(target)?;
    let mut writer = Writer {
        sink,
        queue,
        counters,
        capacity,
        chunk: Vec::with_capacity(FLUSH_BYTES + 4096),
        chunk_lines: LineCounts::default(),
        chunk_reports: 0,
        unwarned: 0,
        last_warning: None,
        last_write_error: None,
    };
    let handle = std::thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || writer.run())?;
    Ok(AuditThread {
        running: Some((stop, handle)),
    })
}

/// The thread's state.
struct Writer {
    sink: Sink,
    queue: Receiver<Msg>,
    counters: Arc<Counters>,
    /// `AUDIT_QUEUE`, for the warning.
    capacity: usize,
    /// Formatted lines not yet written.
    chunk: Vec<u8>,
    /// The event lines in `chunk`, per kind (counted as dropped if the write fails).
    chunk_lines: LineCounts,
    /// The `dropped` report lines in `chunk`.
    chunk_reports: u64,
    /// Dropped lines not yet in a warning.
    unwarned: u64,
    /// When the last warning about drops was logged.
    last_warning: Option<Instant>,
    /// When the last failed write was logged.
    last_write_error: Option<Instant>,
}

impl Writer {
    fn run(&mut self) {
        loop {
            let mut stop = false;
            match self.queue.recv_timeout(IDLE_WAKE) {
                Ok(msg) => {
                    stop = self.take(msg);
                    let mut taken = 1;
                    while !stop && taken < DRAIN_MAX {
                        let Ok(msg) = self.queue.try_recv() else {
                            break;
                        };
                        stop = self.take(msg);
                        taken += 1;
                        if self.chunk.len() >= FLUSH_BYTES {
                            self.flush();
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            if stop {
                // Whatever was queued before the stop (nothing should follow it).
                while let Ok(msg) = self.queue.try_recv() {
                    self.take(msg);
                }
            }
            self.report_drops(stop);
            self.sink.reopen_if_asked();
            self.flush();
            if stop {
                return;
            }
        }
    }

    /// Formats one message into the chunk; true for [`Msg::Stop`].
    fn take(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Record(record) => {
                record.event.count_lines(&mut self.chunk_lines);
                format_record(&mut self.chunk, &record);
                false
            }
            Msg::Stop => true,
        }
    }

    /// Writes the chunk. On failure its lines are counted as dropped (and the failure logged, at
    /// most every [`WARN_INTERVAL`]).
    fn flush(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let lines: u64 = self.chunk_lines.iter().sum::<u64>() + self.chunk_reports;
        match self.sink.write(&self.chunk) {
            Ok(()) => {
                self.counters.written.fetch_add(lines, Relaxed);
            }
            Err(e) => {
                self.counters.drop_lines(&self.chunk_lines);
                let now = Instant::now();
                if self
                    .last_write_error
                    .is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL)
                {
                    tracing::error!(error = %e, lines, "cannot write the audit log; lines dropped");
                    self.last_write_error = Some(now);
                }
            }
        }
        self.chunk.clear();
        self.chunk_lines = LineCounts::default();
        self.chunk_reports = 0;
    }

    /// Adds a `dropped` line for what the handles could not queue since the last report, and warns
    /// in the server log (the first drop at once, then at most every [`WARN_INTERVAL`]; `last`: now,
    /// whatever the interval).
    fn report_drops(&mut self, last: bool) {
        let mut counts = LineCounts::default();
        for (n, slot) in counts.iter_mut().zip(&self.counters.unreported) {
            *n = slot.swap(0, Relaxed);
        }
        let total: u64 = counts.iter().sum();
        if total > 0 {
            format_dropped(&mut self.chunk, now_millis(), total, &counts);
            self.chunk_reports += 1;
            self.unwarned += total;
        }
        if self.unwarned == 0 {
            return;
        }
        let now = Instant::now();
        if last
            || self
                .last_warning
                .is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL)
        {
            tracing::warn!(
                dropped_lines = self.unwarned,
                dropped_total = self.counters.dropped.load(Relaxed),
                queue = self.capacity,
                "audit log queue full: lines dropped (counted in notif_audit_dropped_total; raise AUDIT_QUEUE or use a faster target)"
            );
            self.last_warning = Some(now);
            self.unwarned = 0;
        }
    }
}

/// Appends `"key":`.
fn key(out: &mut Vec<u8>, key: &str) {
    out.push(b',');
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

fn field_str(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    write_json_str(out, value);
}

fn field_raw(out: &mut Vec<u8>, name: &str, value: impl std::fmt::Display) {
    key(out, name);
    // Numbers, booleans: no escaping needed.
    let _ = write!(out, "{value}");
}

fn field_id(out: &mut Vec<u8>, name: &str, id: Uuid) {
    key(out, name);
    let _ = write!(out, "\"{id}\"");
}

fn field_time(out: &mut Vec<u8>, name: &str, ms: Millis) {
    key(out, name);
    out.push(b'"');
    write_time(out, ms);
    out.push(b'"');
}

/// Starts a line: `{"ts":"…","event":"…"`.
fn open_line(out: &mut Vec<u8>, ts: Millis, event: &str) {
    out.extend_from_slice(b"{\"ts\":\"");
    write_time(out, ts);
    out.extend_from_slice(b"\",\"event\":\"");
    out.extend_from_slice(event.as_bytes());
    out.push(b'"');
}

fn close_line(out: &mut Vec<u8>) {
    out.extend_from_slice(b"}\n");
}

/// The fields of who caused an event: `via`, `method` and `path` (HTTP), `auth` with `key_id` or
/// `sub`, and `ip`.
fn origin_fields(out: &mut Vec<u8>, by: &Origin) {
    match &by.via {
        Via::Http { method, path } => {
            field_str(out, "via", "http");
            field_str(out, "method", method);
            field_str(out, "path", path);
        }
        Via::WebSocket => field_str(out, "via", "ws"),
    }
    match &by.credential {
        Credential::None => field_str(out, "auth", "none"),
        Credential::ApiKey(id) => {
            field_str(out, "auth", "api_key");
            field_str(out, "key_id", &id.to_string());
        }
        Credential::Jwt(sub) => {
            field_str(out, "auth", "jwt");
            field_str(out, "sub", sub);
        }
    }
    match by.ip {
        Some(ip) => field_str(out, "ip", &ip.to_string()),
        None => {
            key(out, "ip");
            out.extend_from_slice(b"null");
        }
    }
}

/// The target fields of a stored notification: `user_id`, `channels`, `broadcast`.
fn target_fields(out: &mut Vec<u8>, n: &Notification) {
    key(out, "user_id");
    match &n.user_id {
        Some(user) => write_json_str(out, user),
        None => out.extend_from_slice(b"null"),
    }
    key(out, "channels");
    write_json_str_array(out, &n.channels);
    field_raw(out, "broadcast", n.broadcast);
}

/// Appends the lines of one event.
fn format_record(out: &mut Vec<u8>, record: &Record) {
    let ts = record.ts;
    match &record.event {
        Event::Accepted { ids, replayed, by } => {
            for id in ids {
                open_line(out, ts, Kind::Accepted.name());
                field_id(out, "id", *id);
                field_raw(out, "replayed", replayed);
                origin_fields(out, by);
                close_line(out);
            }
        }
        Event::Committed(list) => {
            for n in list {
                match n.schedule_id {
                    Some(schedule) => {
                        open_line(out, ts, Kind::Fired.name());
                        field_id(out, "id", n.id);
                        field_id(out, "schedule_id", schedule);
                    }
                    None => {
                        open_line(out, ts, Kind::Stored.name());
                        field_id(out, "id", n.id);
                    }
                }
                target_fields(out, n);
                close_line(out);
            }
        }
        Event::Delivered {
            id,
            connections,
            shard,
        } => {
            open_line(out, ts, Kind::Delivered.name());
            field_id(out, "id", *id);
            field_raw(out, "connections", connections);
            field_raw(out, "shard", shard);
            close_line(out);
        }
        Event::Read { id, user_id, by } => {
            open_line(out, ts, Kind::Read.name());
            field_id(out, "id", *id);
            field_str(out, "user_id", user_id);
            origin_fields(out, by);
            close_line(out);
        }
        Event::ReadAll {
            user_id,
            updated,
            by,
        } => {
            open_line(out, ts, Kind::ReadAll.name());
            field_str(out, "user_id", user_id);
            field_raw(out, "updated", updated);
            origin_fields(out, by);
            close_line(out);
        }
        Event::Deleted { id, user_id, by } => {
            open_line(out, ts, Kind::Deleted.name());
            field_id(out, "id", *id);
            field_str(out, "user_id", user_id);
            origin_fields(out, by);
            close_line(out);
        }
        Event::Scheduled {
            id,
            user_id,
            scheduled_at,
            replayed,
            by,
        } => {
            open_line(out, ts, Kind::Scheduled.name());
            field_id(out, "id", *id);
            key(out, "user_id");
            match user_id {
                Some(user) => write_json_str(out, user),
                None => out.extend_from_slice(b"null"),
            }
            field_time(out, "scheduled_at", *scheduled_at);
            field_raw(out, "replayed", replayed);
            origin_fields(out, by);
            close_line(out);
        }
        Event::Cancelled { id, by } => {
            open_line(out, ts, Kind::Cancelled.name());
            field_id(out, "id", *id);
            origin_fields(out, by);
            close_line(out);
        }
        Event::AuthRefused { reason, key_id, by } => {
            open_line(out, ts, Kind::AuthRefused.name());
            field_str(out, "reason", reason);
            origin_fields(out, by);
            if let Some(id) = key_id {
                // After the origin's `auth:"none"`: the key presented, which was not accepted.
                field_str(out, "presented_key_id", &id.to_string());
            }
            close_line(out);
        }
        Event::RateLimited { limit, by } => {
            open_line(out, ts, Kind::RateLimited.name());
            field_str(out, "limit", limit);
            origin_fields(out, by);
            close_line(out);
        }
    }
}

/// Appends a `dropped` line: `lines` in all, and per kind of line.
fn format_dropped(out: &mut Vec<u8>, ts: Millis, lines: u64, counts: &LineCounts) {
    open_line(out, ts, "dropped");
    field_raw(out, "lines", lines);
    key(out, "by_event");
    out.push(b'{');
    let mut first = true;
    for (kind, n) in Kind::ALL.iter().zip(counts) {
        if *n > 0 {
            if !first {
                out.push(b',');
            }
            first = false;
            let _ = write!(out, "\"{}\":{n}", kind.name());
        }
    }
    out.push(b'}');
    close_line(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Caller, KeyId};

    fn line(event: Event) -> serde_json::Value {
        let mut out = Vec::new();
        format_record(&mut out, &Record { ts: 0, event });
        assert!(out.ends_with(b"}\n"));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn every_line_is_one_json_object_with_its_origin() {
        let caller = Caller {
            credential: Credential::ApiKey(KeyId([1, 2, 3, 0xff])),
            ip: Some("10.0.0.1".parse().unwrap()),
        };
        let v = line(Event::Deleted {
            id: Uuid::nil(),
            user_id: "u \"1\"".into(),
            by: caller.origin("DELETE", "/api/v1/notifications/u/x"),
        });
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["event"], "deleted");
        assert_eq!(v["user_id"], "u \"1\"");
        assert_eq!(v["via"], "http");
        assert_eq!(v["method"], "DELETE");
        assert_eq!(v["auth"], "api_key");
        assert_eq!(v["key_id"], "010203ff");
        assert_eq!(v["ip"], "10.0.0.1");
        let v = line(Event::RateLimited {
            limit: "ws_messages",
            by: Origin::websocket(Credential::Jwt("al\nice".into()), None),
        });
        assert_eq!(v["via"], "ws");
        assert_eq!(v["sub"], "al\nice");
        assert_eq!(v["ip"], serde_json::Value::Null);
    }

    #[test]
    fn a_drop_report_counts_per_kind() {
        let mut counts = LineCounts::default();
        counts[Kind::Delivered as usize] = 7;
        counts[Kind::AuthRefused as usize] = 1;
        let mut out = Vec::new();
        format_dropped(&mut out, 0, 8, &counts);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["event"], "dropped");
        assert_eq!(v["lines"], 8);
        assert_eq!(
            v["by_event"],
            serde_json::json!({"delivered": 7, "auth_refused": 1})
        );
    }
}
