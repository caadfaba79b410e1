//! The line protocol a worker speaks on its stdout, and the parent reads.
//!
//! Plain text, one report a line, so a worker can be run and read by hand while debugging:
//!
//! ```text
//! progress <ok> <failed>        while connecting, every few hundred milliseconds
//! error <message>               a sample of what went wrong, the first few failures only
//! ready <ok> <failed>           every connection attempted; the worker now holds its sockets
//! dropped <total>               the server closed some held connections (running total)
//! fatal <message>               the worker cannot go on (it exits next)
//! done <ok> <failed> <dropped>  the worker got `quit` and is closing its sockets
//! ```
//!
//! The parent answers on the worker's stdin with a single line, `quit`; closing stdin means the same,
//! so workers never outlive a parent that died.

use std::fmt;

/// The line the parent sends to end a worker.
pub const QUIT_COMMAND: &str = "quit";

/// One line of a worker's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerReport {
    /// Running counts while connecting.
    Progress {
        /// Connections upgraded so far.
        ok: u64,
        /// Connections that failed so far.
        failed: u64,
    },
    /// A sample failure message, for the parent's summary.
    Error(String),
    /// Every connection has been attempted; final connect counts.
    Ready {
        /// Connections upgraded.
        ok: u64,
        /// Connections that failed (or were never attempted before the deadline).
        failed: u64,
    },
    /// Running total of held connections the server closed.
    Dropped(u64),
    /// The worker cannot continue.
    Fatal(String),
    /// Final counts, sent on the way out.
    Done {
        /// Connections upgraded.
        ok: u64,
        /// Connections that failed.
        failed: u64,
        /// Held connections the server closed.
        dropped: u64,
    },
}

impl fmt::Display for WorkerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerReport::Progress { ok, failed } => write!(f, "progress {ok} {failed}"),
            // Messages are kept on one line so one report stays one line.
            WorkerReport::Error(msg) => write!(f, "error {}", one_line(msg)),
            WorkerReport::Ready { ok, failed } => write!(f, "ready {ok} {failed}"),
            WorkerReport::Dropped(total) => write!(f, "dropped {total}"),
            WorkerReport::Fatal(msg) => write!(f, "fatal {}", one_line(msg)),
            WorkerReport::Done {
                ok,
                failed,
                dropped,
            } => write!(f, "done {ok} {failed} {dropped}"),
        }
    }
}

fn one_line(msg: &str) -> String {
    msg.replace(['\r', '\n'], " ")
}

impl WorkerReport {
    /// Parses one stdout line; `None` for anything that is not a report.
    pub fn parse(line: &str) -> Option<WorkerReport> {
        let line = line.trim_end();
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let numbers = || -> Option<Vec<u64>> {
            rest.split_ascii_whitespace()
                .map(|n| n.parse().ok())
                .collect()
        };
        match (word, numbers().as_deref()) {
            ("progress", Some(&[ok, failed])) => Some(WorkerReport::Progress { ok, failed }),
            ("ready", Some(&[ok, failed])) => Some(WorkerReport::Ready { ok, failed }),
            ("dropped", Some(&[total])) => Some(WorkerReport::Dropped(total)),
            ("done", Some(&[ok, failed, dropped])) => Some(WorkerReport::Done {
                ok,
                failed,
                dropped,
            }),
            ("error", _) => Some(WorkerReport::Error(rest.to_string())),
            ("fatal", _) => Some(WorkerReport::Fatal(rest.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_survives_a_round_trip() {
        for report in [
            WorkerReport::Progress { ok: 10, failed: 1 },
            WorkerReport::Error("connect: Connection refused (os error 111)".into()),
            WorkerReport::Ready {
                ok: 9000,
                failed: 0,
            },
            WorkerReport::Dropped(3),
            WorkerReport::Fatal("RLIMIT_NOFILE too low".into()),
            WorkerReport::Done {
                ok: 9000,
                failed: 0,
                dropped: 3,
            },
        ] {
            assert_eq!(WorkerReport::parse(&report.to_string()), Some(report));
        }
    }

    #[test]
    fn messages_stay_on_one_line() {
        let line = WorkerReport::Error("a\nb".into()).to_string();
        assert_eq!(line, "error a b");
    }

    #[test]
    fn stray_output_is_not_a_report() {
        assert_eq!(WorkerReport::parse("hello"), None);
        assert_eq!(WorkerReport::parse("ready 1"), None);
        assert_eq!(WorkerReport::parse("progress x y"), None);
        assert_eq!(WorkerReport::parse(""), None);
    }
}
