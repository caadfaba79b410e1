//! `loadtest idle`: many connected, silent users, and what they cost the server.
//!
//! The run, in order:
//! 1. find the server's process(es) and read their `VmRSS` (the baseline);
//! 2. start the workers, which open every connection as a distinct user, at no more than
//!    `--connect-rate` per second in total, showing progress on stderr;
//! 3. wait `--settle-s` for the server to finish whatever connecting triggered, read `VmRSS` again;
//! 4. hold for `--hold-s` seconds, measuring the server's CPU time over that period: the cost of idle
//!    connections (heartbeats, timers) that should be near zero;
//! 5. tell the workers to quit, wait `--settle-s` again and read `VmRSS` a last time: whether the server
//!    gave the memory of the connections back;
//! 6. print a summary and one JSON line.
//!
//! Bytes per connection is `(rss_after - rss_before) / connections held`, the figure the ~1 KiB budget
//! is stated in (docs/architecture.md, "Memory per connection").

use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::fleet::{Fleet, FleetTotals};
use crate::scenario::receivers::{self, ReceiverArgs};
use crate::scenario::{self, round_to};
use crate::server_probe::{self, ServerProcesses};

/// Longest `--hold-s`, so every run ends within hours at worst.
pub const MAX_PHASE_S: u64 = 3_600;

/// Default pause between the last connection and the "after" RSS reading (and between the close and
/// the last reading), for the server to finish the work connecting caused and the allocator to settle.
pub const DEFAULT_SETTLE_S: u64 = 5;

/// Share of connections that may fail (or be dropped) before the run exits non-zero.
pub const MAX_FAILED_FRACTION: f64 = 0.01;

/// How long workers get to exit after `quit` before they are killed. Closing 20,000 sockets takes a
/// moment, but not this long.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Options of `loadtest idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Total connections to open, each as its own user.
    #[arg(long)]
    pub connections: u64,

    /// Seconds to hold the connections open after they are all up (and settled), measuring the
    /// server's CPU use while idle. Hold past the server's HEARTBEAT_S to include a heartbeat round.
    #[arg(long, default_value_t = 10)]
    pub hold_s: u64,

    /// Seconds to wait after the last connection before the "after" RSS reading, and after the
    /// connections close before the last one.
    #[arg(long, default_value_t = DEFAULT_SETTLE_S)]
    pub settle_s: u64,

    /// How the connections are opened.
    #[command(flatten)]
    pub receivers: ReceiverArgs,
}

/// Why an idle run could not start.
#[derive(Debug)]
pub enum IdleError {
    /// An option is out of range or malformed.
    Invalid(String),
    /// The workers could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for IdleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdleError::Invalid(msg) => write!(f, "{msg}"),
            IdleError::Spawn(e) => write!(f, "cannot start workers: {e}"),
        }
    }
}

impl std::error::Error for IdleError {}

/// The figures one run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleReport {
    /// Connections asked for.
    pub target: u64,
    /// Final worker totals.
    pub totals: FleetTotals,
    /// Connections open when the "after" RSS was read: the divisor of bytes per connection.
    pub held_at_measure: u64,
    /// Server RSS before connecting, KiB.
    pub rss_before_kb: Option<u64>,
    /// Server RSS after connecting and settling, KiB.
    pub rss_after_kb: Option<u64>,
    /// Server RSS after the connections closed and the server settled, KiB.
    pub rss_closed_kb: Option<u64>,
    /// Server CPU over the hold, as a percentage of one core.
    pub cpu_pct_idle: Option<f64>,
    /// Seconds held.
    pub hold_s: u64,
    /// Seconds from starting the workers to every connection attempted.
    pub connect_s: f64,
}

impl IdleReport {
    /// RSS growth per held connection, in bytes; `None` without both readings or connections.
    pub fn bytes_per_connection(&self) -> Option<i64> {
        let (before, after) = (self.rss_before_kb?, self.rss_after_kb?);
        if self.held_at_measure == 0 {
            return None;
        }
        let growth_bytes = (after as i64 - before as i64) * 1024;
        Some(growth_bytes / self.held_at_measure as i64)
    }

    /// Whether more connections failed or were dropped than [`MAX_FAILED_FRACTION`] allows.
    pub fn too_many_failures(&self) -> bool {
        let lost = self.totals.failed + self.totals.dropped;
        lost as f64 > self.target as f64 * MAX_FAILED_FRACTION
    }

    /// The single machine-readable line printed last, fields in the documented order.
    pub fn json_line(&self) -> String {
        let fields = [
            ("scenario", json!("idle")),
            ("connections", json!(self.totals.ok)),
            ("failed", json!(self.totals.failed)),
            ("rss_before_kb", json!(self.rss_before_kb)),
            ("rss_after_kb", json!(self.rss_after_kb)),
            ("bytes_per_connection", json!(self.bytes_per_connection())),
            ("rss_closed_kb", json!(self.rss_closed_kb)),
            (
                "server_cpu_pct_idle",
                json!(self.cpu_pct_idle.map(|p| round_to(p, 2))),
            ),
            ("hold_s", json!(self.hold_s)),
            ("connect_s", json!(round_to(self.connect_s, 3))),
            ("dropped", json!(self.totals.dropped)),
        ];
        scenario::json_line(&fields)
    }

    /// The human summary, several lines.
    pub fn summary(&self) -> String {
        let kib = |v: Option<u64>| v.map_or("unknown".to_string(), |kb| format!("{kb} KiB"));
        let mut lines = vec![
            "idle summary".to_string(),
            format!(
                "  connections     {} ok, {} failed (of {}), {} dropped by the server while held",
                self.totals.ok, self.totals.failed, self.target, self.totals.dropped
            ),
            format!("  connect time    {:.2} s", self.connect_s),
            format!(
                "  server RSS      {} before, {} after, {} once closed",
                kib(self.rss_before_kb),
                kib(self.rss_after_kb),
                kib(self.rss_closed_kb)
            ),
        ];
        lines.push(match self.bytes_per_connection() {
            Some(bytes) => format!(
                "  per connection  {bytes} bytes (RSS growth / {} held connections)",
                self.held_at_measure
            ),
            None => "  per connection  unknown".to_string(),
        });
        lines.push(match self.cpu_pct_idle {
            Some(pct) => format!(
                "  server CPU idle {pct:.2} % of one core over {} s",
                self.hold_s
            ),
            None => "  server CPU idle unknown".to_string(),
        });
        lines.join("\n")
    }
}

/// Runs the idle scenario; the exit code says whether too many connections failed.
pub fn run(args: IdleArgs) -> Result<ExitCode, IdleError> {
    if args.hold_s > MAX_PHASE_S {
        return Err(IdleError::Invalid(format!(
            "--hold-s must be at most {MAX_PHASE_S}"
        )));
    }
    let conn = &args.receivers;
    let layout = receivers::lay_out(conn, args.connections).map_err(IdleError::Invalid)?;
    let server = receivers::find_server(conn, layout.target.addr.port());
    eprintln!(
        "idle: {} connections to {} as {}0..{}{}, {} worker(s) of at most {}, source address(es) {}, at most {}/s",
        args.connections,
        conn.url,
        conn.user_prefix,
        conn.user_prefix,
        args.connections - 1,
        layout.shares.len(),
        conn.per_process,
        layout.sources.addrs_arg(),
        conn.connect_rate
    );
    let rss_before_kb = server
        .as_ref()
        .and_then(|s| read_rss(s, "before connecting"));

    let worker_lines = layout
        .shares
        .iter()
        .map(|share| {
            let argv = receivers::worker_args(conn, &layout, share, args.connections);
            (share.count, receivers::to_argv(argv))
        })
        .collect();
    let mut fleet = Fleet::spawn("worker", worker_lines).map_err(IdleError::Spawn)?;
    let connect_s = receivers::connect_all(&mut fleet, conn, args.connections);

    // Settle, still following worker reports so drops are seen.
    let settle = Duration::from_secs(args.settle_s);
    fleet.poll(settle);
    let rss_after_kb = server
        .as_ref()
        .and_then(|s| read_rss(s, "after connecting"));
    let at_measure = fleet.totals();
    let held_at_measure = at_measure.ok.saturating_sub(at_measure.dropped);

    eprintln!(
        "holding {held_at_measure} connections for {} s",
        args.hold_s
    );
    let cpu_start = server.as_ref().and_then(|s| s.cpu_ticks().ok());
    let hold_started = Instant::now();
    let hold_until = hold_started + Duration::from_secs(args.hold_s);
    while Instant::now() < hold_until {
        fleet.poll(hold_until.saturating_duration_since(Instant::now()));
    }
    let held_for = hold_started.elapsed().as_secs_f64();
    let cpu_end = server.as_ref().and_then(|s| s.cpu_ticks().ok());
    let cpu_pct_idle = match (cpu_start, cpu_end) {
        (Some(start), Some(end)) if held_for > 0.0 && args.hold_s > 0 => {
            let cpu_s =
                end.saturating_sub(start) as f64 / server_probe::clock_ticks_per_second() as f64;
            Some(100.0 * cpu_s / held_for)
        }
        _ => None,
    };

    fleet.stop(STOP_GRACE);
    std::thread::sleep(settle);
    let rss_closed_kb = server
        .as_ref()
        .and_then(|s| read_rss(s, "after the connections closed"));
    for msg in fleet.fatal_messages() {
        eprintln!("worker failed: {msg}");
    }
    for msg in fleet.error_samples() {
        eprintln!("sample error: {msg}");
    }
    let report = IdleReport {
        target: args.connections,
        totals: fleet.totals(),
        held_at_measure,
        rss_before_kb,
        rss_after_kb,
        rss_closed_kb,
        cpu_pct_idle,
        hold_s: args.hold_s,
        connect_s,
    };
    println!("{}", report.summary());
    println!("{}", report.json_line());
    Ok(if report.too_many_failures() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn read_rss(server: &ServerProcesses, when: &str) -> Option<u64> {
    match server.rss_kb() {
        Ok(kb) => Some(kb),
        Err(e) => {
            eprintln!("server RSS {when}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ok: u64, failed: u64, dropped: u64) -> IdleReport {
        IdleReport {
            target: 20_000,
            totals: FleetTotals {
                ok,
                failed,
                dropped,
            },
            held_at_measure: ok - dropped,
            rss_before_kb: Some(2_000),
            rss_after_kb: Some(22_000),
            rss_closed_kb: Some(2_100),
            cpu_pct_idle: Some(0.4567),
            hold_s: 10,
            connect_s: 4.01234,
        }
    }

    #[test]
    fn bytes_per_connection_is_rss_growth_over_held_connections() {
        assert_eq!(report(20_000, 0, 0).bytes_per_connection(), Some(1_024));
        let mut unknown = report(20_000, 0, 0);
        unknown.rss_before_kb = None;
        assert_eq!(unknown.bytes_per_connection(), None);
    }

    #[test]
    fn more_than_one_percent_lost_fails_the_run() {
        assert!(!report(20_000, 0, 0).too_many_failures());
        assert!(!report(19_800, 200, 0).too_many_failures());
        assert!(report(19_799, 201, 0).too_many_failures());
        assert!(report(20_000, 100, 101).too_many_failures());
    }

    #[test]
    fn the_json_line_has_the_documented_fields() {
        let line = report(20_000, 0, 0).json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["scenario"], "idle");
        assert_eq!(v["connections"], 20_000);
        assert_eq!(v["failed"], 0);
        assert_eq!(v["rss_before_kb"], 2_000);
        assert_eq!(v["rss_after_kb"], 22_000);
        assert_eq!(v["bytes_per_connection"], 1_024);
        assert_eq!(v["server_cpu_pct_idle"], 0.46);
        assert_eq!(v["hold_s"], 10);
        assert_eq!(v["connect_s"], 4.012);
        assert!(!line.contains('\n'));
        assert!(line.starts_with(r#"{"scenario":"idle","connections":20000,"failed":0,"#));
    }
}
