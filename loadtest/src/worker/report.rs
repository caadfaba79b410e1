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
//! delivered <total>             stamped messages received so far (delivery scenarios)
//! published <total> <expected>  messages this worker published, and the deliveries they should make
//! hist <us> <count>             one bucket of the worker's latency histogram, sent just before `done`
//! done <ok> <failed> <dropped>  the worker got `quit` and is closing its sockets
//! ```
//!
//! The parent answers on the worker's stdin with single lines: `start` (begin publishing, in the chat
//! scenario) and `quit`; closing stdin means `quit`, so workers never outlive a parent that died.

use std::fmt;

/// The line the parent sends to end a worker.
pub const QUIT_COMMAND: &str = "quit";

/// The line the parent sends when every worker is subscribed and publishing may begin.
pub const START_COMMAND: &str = "start";

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
    /// Running total of stamped messages received.
    Delivered(u64),
    /// Running totals of messages published by this worker and the deliveries they should cause.
    Published {
        /// Messages published.
        total: u64,
        /// Deliveries those messages should make (one per other member of the room).
        expected: u64,
    },
    /// One histogram bucket: `count` deliveries took about `us` microseconds.
    Hist {
        /// Latency of the bucket, microseconds.
        us: u64,
        /// Deliveries in the bucket.
        count: u64,
    },
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
            WorkerReport::Delivered(total) => write!(f, "delivered {total}"),
            WorkerReport::Published { total, expected } => {
                write!(f, "published {total} {expected}")
            }
            WorkerReport::Hist { us, count } => write!(f, "hist {us} {count}"),
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
            ("delivered", Some(&[total])) => Some(WorkerReport::Delivered(total)),
            ("published", Some(&[total, expected])) => {
                Some(WorkerReport::Published { total, expected })
            }
            ("hist", Some(&[us, count])) => Some(WorkerReport::Hist { us, count }),
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
            WorkerReport::Delivered(12_345),
            WorkerReport::Published {
                total: 10,
                expected: 90,
            },
            WorkerReport::Hist { us: 250, count: 7 },
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
