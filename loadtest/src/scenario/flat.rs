//! `loadtest flat`: whether the server's cost per operation stays flat as idle connections pile up.
//!
//! The requirement it checks: a lone send, a new-connection request and a cross-node delivery cost the
//! same with 18,000 idle connections open as with none, within 10 %. A server whose per-operation work
//! walks its connections (a scan, a timer wheel that grows, a cache blown by connection state) fails it.
//!
//! The run, in order:
//! 1. connect the subscriber, user [`SUBSCRIBER_USER`], to the `--url` node (one WebSocket held by this
//!    process, see [`crate::subscriber`]); with `--warmup-s`, run every phase below briefly, unmeasured,
//!    so the first level does not pay for cold caches;
//! 2. for each `--idle` level N, in the order given: bring the idle WebSocket connections on the `--url`
//!    node up to N (each its own user, opened by worker processes as `loadtest idle` opens them; they
//!    stay open, and a higher level adds to them), wait `--settle-s` (its second half measures the
//!    server's idle CPU, for context), then run the phases, each measuring the server's CPU time over
//!    exactly the phase, from the first send to the last delivery:
//!    - `lone_send`: durable `POST /api/v1/notifications/send` to the subscriber over one keep-alive
//!      connection (`--senders`), open-loop at `--rate` for `--seconds`, each message alone; CPU per
//!      send and send→deliver latency;
//!    - `new_connection`: `--new-connections` of the same sends, each on a fresh TCP connection with
//!      `Connection: close`, paced at `--new-connection-rate`; CPU per request and request latency
//!      (from its due time to the whole answer);
//!    - `cross_node` (with `--peer-url`): the lone sends posted to the peer node while the subscriber
//!      sits on the `--url` node; the receiving node's CPU per delivery and send→deliver latency;
//! 3. print one table per phase (a row per level, the cost's ratio to the first level), a verdict per
//!    phase, and the JSON lines.
//!
//! Every send must reach the subscriber; a lost one fails the run (exit 1), as do more than
//! [`MAX_ERROR_FRACTION`] refused sends or lost idle connections. The verdict is a figure, not a failure.
//!
//! The CPU figure is whole-process: work the idle connections cause by themselves (heartbeat rounds)
//! lands in whichever phase it falls in, which is part of what "cost the same" means; the idle CPU column
//! tells how much of it there is.

use std::fmt;
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::fleet::{Fleet, FleetTotals};
use crate::plan;
use crate::progress::ProgressLine;
use crate::publisher::{self, BodyWriter, Published, RestClient};
use crate::scenario::delivery::load_average;
use crate::scenario::idle::{MAX_FAILED_FRACTION, MAX_PHASE_S};
use crate::scenario::receivers::{self, Layout, ReceiverArgs, MAX_CONNECTIONS};
use crate::scenario::{self, round_to};
use crate::server_probe::{self, ServerProcesses};
use crate::stamp::{self, now_ns};
use crate::subscriber::{Delivery, Subscriber};
use crate::target::WsTarget;
use crate::worker::holder::new_latency_histogram;
use crate::worker::CONNECT_TIMEOUT;

/// The user every send goes to, held by this process on the `--url` node.
pub const SUBSCRIBER_USER: &str = "flat-sub";

/// How far from the first level's cost a level may be and still count as flat.
pub const FLAT_FRACTION: f64 = 0.10;

/// Share of sends that may be refused before the run exits 1.
pub const MAX_ERROR_FRACTION: f64 = 0.01;

/// Highest `--rate` and `--new-connection-rate`: a bound against typos, far above what one
/// connection sends.
pub const MAX_RATE: u64 = 100_000;

/// Most `--new-connections`. Each leaves a socket in TIME_WAIT for a minute on `127.0.0.1`, whose
/// ephemeral range (about 28,000 ports) it shares with everything else on the machine.
pub const MAX_NEW_CONNECTIONS: u64 = 10_000;

/// Most `--senders`.
pub const MAX_SENDERS: u32 = 64;

/// How much longer than planned the sends of a phase may take before the run says the senders fell
/// behind `--rate` (then the latency is mostly queueing in the client): this share of the plan, plus
/// [`BEHIND_SLACK`] for the last answer.
pub const BEHIND_FRACTION: f64 = 0.10;

/// See [`BEHIND_FRACTION`].
pub const BEHIND_SLACK: Duration = Duration::from_millis(200);

/// Longest `--settle-s`, `--drain-s` and `--warmup-s`.
pub const MAX_WAIT_S: u64 = 600;

/// Threads sending the new-connection requests. Several, so one connect that waits for a SYN retry
/// delays only its own request instead of every one queued behind it.
const NEW_CONNECTION_CLIENTS: u32 = 4;

/// How often a phase looks at the subscriber's count while waiting for the last deliveries.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// How often the progress line is redrawn and the worker reports read.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// How long the idle workers get to exit after `quit`.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `--idle` levels: idle connection counts, never decreasing (connections are only added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleLevels(pub Vec<u64>);

/// Parses `--idle`: comma-separated counts, at least two, never decreasing, each at most
/// [`MAX_CONNECTIONS`]. A level may repeat (`0,0,18000`), which shows the noise between two runs of
/// the same level.
pub fn parse_idle_levels(text: &str) -> Result<IdleLevels, String> {
    let levels = text
        .split(',')
        .map(|item| {
            let item = item.trim();
            item.parse::<u64>()
                .map_err(|_| format!("{item:?} is not a number of connections"))
        })
        .collect::<Result<Vec<u64>, String>>()?;
    if levels.len() < 2 {
        return Err("give at least two levels to compare, such as 0,18000".into());
    }
    if let Some(&too_many) = levels.iter().find(|&&n| n > MAX_CONNECTIONS) {
        return Err(format!(
            "{too_many} is more than {MAX_CONNECTIONS} connections"
        ));
    }
    if let Some(pair) = levels.windows(2).find(|pair| pair[1] < pair[0]) {
        return Err(format!(
            "levels must not decrease ({} after {}): idle connections are only ever added",
            pair[1], pair[0]
        ));
    }
    Ok(IdleLevels(levels))
}

/// Options of `loadtest flat`.
#[derive(Debug, Clone, Args)]
pub struct FlatArgs {
    /// Idle connection counts to measure at, comma-separated, in order (never decreasing).
    #[arg(long, default_value = "0,18000", value_parser = parse_idle_levels)]
    pub idle: IdleLevels,
    /// A second node sharing the `--url` node's database and Redis: adds the cross-node phase, whose
    /// sends are posted there (loopback only).
    #[arg(long)]
    pub peer_url: Option<String>,
    /// API key for the sends (`Authorization: Bearer`), when the nodes run with API_KEY.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Lone sends per second (open-loop) in the lone-send and cross-node phases.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of sending in the lone-send and cross-node phases.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Keep-alive connections sharing the lone sends (lone-send and cross-node phases). With one,
    /// every message is alone; more only when one connection cannot keep up with --rate (a store
    /// whose commit takes longer than 1/rate, as PostgreSQL's may).
    #[arg(long, default_value_t = 1)]
    pub senders: u32,
    /// Requests in the new-connection phase, each on a fresh connection.
    #[arg(long, default_value_t = 1_000)]
    pub new_connections: u64,
    /// New-connection requests per second (open-loop).
    #[arg(long, default_value_t = 200)]
    pub new_connection_rate: u64,
    /// Seconds to wait after reaching an idle level before measuring; the second half measures the
    /// server's idle CPU.
    #[arg(long, default_value_t = 5)]
    pub settle_s: u64,
    /// Before the first level, run each phase for this many seconds, unmeasured (0: no warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// After a phase's last send, how long to wait with no new delivery before counting the rest lost.
    #[arg(long, default_value_t = 5)]
    pub drain_s: u64,
    /// Print only the JSON lines on stdout (the tables go to stderr).
    #[arg(long)]
    pub json: bool,
    /// How the idle connections are opened (and `--url`, the node measured).
    #[command(flatten)]
    pub receivers: ReceiverArgs,
}

impl FlatArgs {
    /// Checks every option that needs neither the network nor the machine's limits.
    pub fn check(&self) -> Result<(), String> {
        let url = WsTarget::parse(&self.receivers.url).map_err(|e| format!("--url: {e}"))?;
        if let Some(peer) = &self.peer_url {
            let peer = WsTarget::parse(peer).map_err(|e| format!("--peer-url: {e}"))?;
            if peer.addr == url.addr {
                return Err("--peer-url must name another node than --url".into());
            }
        }
        if let Some(key) = &self.api_key {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("--api-key must be non-empty printable ASCII without spaces".into());
            }
        }
        let in_range = |name: &str, value: u64, most: u64| {
            if (1..=most).contains(&value) {
                Ok(())
            } else {
                Err(format!("{name} must be between 1 and {most}"))
            }
        };
        in_range("--rate", self.rate, MAX_RATE)?;
        in_range("--seconds", self.seconds, MAX_PHASE_S)?;
        in_range("--senders", u64::from(self.senders), u64::from(MAX_SENDERS))?;
        in_range(
            "--new-connections",
            self.new_connections,
            MAX_NEW_CONNECTIONS,
        )?;
        in_range("--new-connection-rate", self.new_connection_rate, MAX_RATE)?;
        in_range("--drain-s", self.drain_s, MAX_WAIT_S)?;
        if self.settle_s > MAX_WAIT_S || self.warmup_s > MAX_WAIT_S {
            return Err(format!(
                "--settle-s and --warmup-s must be at most {MAX_WAIT_S}"
            ));
        }
        Ok(())
    }

    fn client(&self, target: &WsTarget, connections: u32, per_request: bool) -> RestClient {
        RestClient {
            addr: target.addr,
            connections,
            api_key: self.api_key.clone(),
            connection_per_request: per_request,
            pusher: None,
        }
    }
}

/// What a phase measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Lone sends over one keep-alive connection.
    LoneSend,
    /// Sends each on a fresh connection.
    NewConnection,
    /// Lone sends posted to the peer node, delivered on the measured one.
    CrossNode,
}

impl Phase {
    /// The name in JSON lines and in the sends' messages.
    pub fn key(self) -> &'static str {
        match self {
            Phase::LoneSend => "lone_send",
            Phase::NewConnection => "new_connection",
            Phase::CrossNode => "cross_node",
        }
    }

    /// What one operation of the phase is, for the table's cost column.
    fn unit(self) -> &'static str {
        match self {
            Phase::LoneSend => "send",
            Phase::NewConnection => "request",
            Phase::CrossNode => "delivery",
        }
    }

    /// The operations of the phase, for the table's count column.
    fn units(self) -> &'static str {
        match self {
            Phase::LoneSend => "sends",
            Phase::NewConnection => "requests",
            Phase::CrossNode => "deliveries",
        }
    }
}

/// How the cost of every level compares with the first level's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every level within [`FLAT_FRACTION`] of the first.
    Flat,
    /// Some level costs more than the first by more than [`FLAT_FRACTION`].
    Grows,
    /// None costs more, but some level costs less by more than [`FLAT_FRACTION`]: not flat, and more
    /// likely a noisy or cold first level than idle connections making sends cheaper.
    Shrinks,
    /// A cost is missing (no CPU reading, or nothing sent).
    Unknown,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Flat => "flat",
            Verdict::Grows => "grows",
            Verdict::Shrinks => "shrinks",
            Verdict::Unknown => "unknown",
        })
    }
}

/// A level's cost over the first level's: `None` unless both are known and the first is positive.
pub fn ratio(first: Option<f64>, this: Option<f64>) -> Option<f64> {
    match (first, this) {
        (Some(first), Some(this)) if first > 0.0 => Some(this / first),
        _ => None,
    }
}

/// The verdict over every level's ratio to the first (the first's own included).
pub fn verdict(ratios: &[Option<f64>]) -> Verdict {
    if ratios.is_empty() || ratios.iter().any(Option::is_none) {
        return Verdict::Unknown;
    }
    let ratios = ratios.iter().flatten();
    if ratios.clone().any(|&r| r > 1.0 + FLAT_FRACTION) {
        Verdict::Grows
    } else if ratios.clone().any(|&r| r < 1.0 - FLAT_FRACTION) {
        Verdict::Shrinks
    } else {
        Verdict::Flat
    }
}

/// What one phase at one idle level measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseResult {
    /// Which phase.
    pub phase: Phase,
    /// The idle level asked for.
    pub idle: u64,
    /// Idle connections open when the phase began.
    pub idle_held: u64,
    /// Sends attempted.
    pub attempted: u64,
    /// Sends answered 2xx.
    pub ok: u64,
    /// Sends refused or failed.
    pub errors: u64,
    /// The first of those, described.
    pub first_error: Option<String>,
    /// The phase's sends that reached the subscriber.
    pub delivered: u64,
    /// Seconds from the first send to the last delivery (or the end of the drain).
    pub seconds: f64,
    /// Seconds the sends were planned to take (sends / rate).
    pub planned_send_s: f64,
    /// Seconds they took, to the last answer.
    pub send_s: f64,
    /// CPU time of the measured node over the phase, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// CPU time of the node the sends were posted to, when that is another one (cross-node).
    pub sender_cpu_ns: Option<u64>,
    /// Send→deliver latency p50 and p99, milliseconds.
    pub deliver_ms: Option<[f64; 2]>,
    /// Latency of the 2xx answers p50 and p99 (from each send's due time), milliseconds.
    pub answer_ms: Option<[f64; 2]>,
    /// The measured node's CPU while idle before this level's phases, percent of one core.
    pub idle_cpu_pct: Option<f64>,
    /// The machine's 1-minute load average when the phase ended.
    pub load: Option<f64>,
}

impl PhaseResult {
    /// 2xx sends that never reached the subscriber.
    pub fn lost(&self) -> u64 {
        self.ok.saturating_sub(self.delivered)
    }

    /// The operations the cost is divided by: deliveries for cross-node (the receiving node's work),
    /// accepted sends otherwise.
    pub fn operations(&self) -> u64 {
        match self.phase {
            Phase::CrossNode => self.delivered,
            Phase::LoneSend | Phase::NewConnection => self.ok,
        }
    }

    /// The measured node's CPU microseconds per operation.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        per_op(self.cpu_ns, self.operations())
    }

    /// The sending node's CPU microseconds per send (cross-node only).
    pub fn sender_cpu_us_per_op(&self) -> Option<f64> {
        per_op(self.sender_cpu_ns, self.ok)
    }

    /// The phase's latency figure: the request's for new connections, send→deliver otherwise.
    pub fn latency_ms(&self) -> Option<[f64; 2]> {
        match self.phase {
            Phase::NewConnection => self.answer_ms,
            Phase::LoneSend | Phase::CrossNode => self.deliver_ms,
        }
    }

    /// Whether the senders could not keep to the rate: the sends took more than [`BEHIND_FRACTION`]
    /// longer than planned (plus [`BEHIND_SLACK`]).
    pub fn fell_behind(&self) -> bool {
        self.send_s > self.planned_send_s * (1.0 + BEHIND_FRACTION) + BEHIND_SLACK.as_secs_f64()
    }

    /// Whether this phase fails the run: a lost delivery, or too many refused sends.
    pub fn failed(&self) -> bool {
        self.lost() > 0 || self.errors as f64 > self.attempted as f64 * MAX_ERROR_FRACTION
    }

    /// The JSON line of this phase at this level; `vs_first` is its cost over the first level's.
    pub fn json_line(&self, vs_first: Option<f64>) -> String {
        let round = |v: Option<f64>, d: i32| v.map(|v| round_to(v, d));
        let pair = |v: Option<[f64; 2]>, i: usize| v.map(|v| v[i]);
        scenario::json_line(&[
            ("scenario", json!("flat")),
            ("phase", json!(self.phase.key())),
            ("idle", json!(self.idle)),
            ("idle_held", json!(self.idle_held)),
            ("attempted", json!(self.attempted)),
            ("ok", json!(self.ok)),
            ("errors", json!(self.errors)),
            ("delivered", json!(self.delivered)),
            ("lost", json!(self.lost())),
            ("seconds", json!(round_to(self.seconds, 3))),
            ("send_s", json!(round_to(self.send_s, 3))),
            ("planned_send_s", json!(round_to(self.planned_send_s, 3))),
            ("fell_behind", json!(self.fell_behind())),
            (
                "server_cpu_s",
                json!(self.cpu_ns.map(|ns| round_to(ns as f64 / 1e9, 4))),
            ),
            ("cpu_us_per_op", json!(round(self.cpu_us_per_op(), 2))),
            ("vs_first", json!(round(vs_first, 3))),
            ("p50_ms", json!(pair(self.latency_ms(), 0))),
            ("p99_ms", json!(pair(self.latency_ms(), 1))),
            ("deliver_p50_ms", json!(pair(self.deliver_ms, 0))),
            ("deliver_p99_ms", json!(pair(self.deliver_ms, 1))),
            ("answer_p50_ms", json!(pair(self.answer_ms, 0))),
            ("answer_p99_ms", json!(pair(self.answer_ms, 1))),
            (
                "sender_cpu_us_per_op",
                json!(round(self.sender_cpu_us_per_op(), 2)),
            ),
            ("idle_cpu_pct", json!(round(self.idle_cpu_pct, 3))),
            ("load", json!(self.load)),
            ("first_error", json!(self.first_error)),
        ])
    }
}

fn per_op(cpu_ns: Option<u64>, operations: u64) -> Option<f64> {
    cpu_ns
        .filter(|_| operations > 0)
        .map(|ns| ns as f64 / 1_000.0 / operations as f64)
}

/// The results of one phase over every level, in level order, with their ratios and verdict.
pub struct PhaseTable<'a> {
    /// The phase.
    pub phase: Phase,
    /// One result per level.
    pub rows: Vec<&'a PhaseResult>,
}

impl PhaseTable<'_> {
    /// Each row's cost over the first row's.
    pub fn ratios(&self) -> Vec<Option<f64>> {
        let first = self.rows.first().and_then(|r| r.cpu_us_per_op());
        self.rows
            .iter()
            .map(|r| ratio(first, r.cpu_us_per_op()))
            .collect()
    }

    /// The ratio furthest from 1, either way.
    pub fn furthest(&self) -> Option<f64> {
        self.ratios()
            .into_iter()
            .flatten()
            .max_by(|a, b| (a - 1.0).abs().total_cmp(&(b - 1.0).abs()))
    }

    /// The phase's verdict.
    pub fn verdict(&self) -> Verdict {
        verdict(&self.ratios())
    }

    /// The human table, a verdict line last.
    pub fn render(&self, title: &str) -> String {
        let unit = self.phase.unit();
        let opt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
        let mut lines = vec![
            title.to_string(),
            format!(
                "  {:>7} {:>7} {:>10} {:>6} {:>5} {:>15} {:>8} {:>8} {:>8} {:>9}",
                "idle",
                "held",
                self.phase.units(),
                "errors",
                "lost",
                format!("CPU µs/{unit}"),
                "vs first",
                "p50 ms",
                "p99 ms",
                "idle CPU%"
            ),
        ];
        for (row, ratio) in self.rows.iter().zip(self.ratios()) {
            let latency = row.latency_ms();
            lines.push(format!(
                "  {:>7} {:>7} {:>10} {:>6} {:>5} {:>15} {:>8} {:>8} {:>8} {:>9}",
                row.idle,
                row.idle_held,
                row.operations(),
                row.errors,
                row.lost(),
                opt(row.cpu_us_per_op(), 1),
                opt(ratio, 3),
                opt(latency.map(|l| l[0]), 2),
                opt(latency.map(|l| l[1]), 2),
                opt(row.idle_cpu_pct, 2),
            ));
        }
        let worst = self.furthest();
        for row in self.rows.iter().filter(|r| r.fell_behind()) {
            lines.push(format!(
                "  note: at idle {} the sends took {:.2} s instead of {:.2} s: the client fell behind the \
                 rate and the latency is mostly its queue (lower the rate, or add --senders)",
                row.idle, row.send_s, row.planned_send_s
            ));
        }
        lines.push(format!(
            "  verdict: {} (every level within {:.0} % of the first is flat; furthest {})",
            self.verdict(),
            FLAT_FRACTION * 100.0,
            worst.map_or("unknown".into(), |r| format!("{:+.1} %", (r - 1.0) * 100.0))
        ));
        lines.join("\n")
    }

    /// The phase's verdict as a JSON line.
    pub fn verdict_line(&self) -> String {
        let worst = self.furthest();
        scenario::json_line(&[
            ("scenario", json!("flat")),
            ("phase", json!(self.phase.key())),
            ("verdict", json!(self.verdict().to_string())),
            ("furthest_vs_first", json!(worst.map(|r| round_to(r, 3)))),
            ("within", json!(FLAT_FRACTION)),
            (
                "levels",
                json!(self.rows.iter().map(|r| r.idle).collect::<Vec<_>>()),
            ),
        ])
    }
}

/// The idle connections: one fleet of workers per raise, all held until the end.
struct IdleConnections<'a> {
    args: &'a ReceiverArgs,
    /// Where the top level's connections go; lower levels use a prefix of it.
    layout: Option<Layout>,
    fleets: Vec<Fleet>,
    /// Connections asked for so far.
    opened: u64,
}

impl IdleConnections<'_> {
    /// Opens connections `opened..level`, as `loadtest idle` would, and waits until they are up.
    fn raise_to(&mut self, level: u64) -> Result<(), String> {
        if level <= self.opened {
            return Ok(());
        }
        let layout = self
            .layout
            .as_ref()
            .expect("a level above 0 means a layout was made");
        let shares = plan::split_range_over_workers(self.opened..level, self.args.per_process);
        let added = level - self.opened;
        let worker_lines = shares
            .iter()
            .map(|share| {
                let argv = receivers::worker_args(self.args, layout, share, added);
                (share.count, receivers::to_argv(argv))
            })
            .collect();
        eprintln!(
            "flat: opening idle connections {}..{} as {}{}.., {} worker(s)",
            self.opened,
            level,
            self.args.user_prefix,
            self.opened,
            shares.len()
        );
        let mut fleet = Fleet::spawn("worker", worker_lines)
            .map_err(|e| format!("cannot start workers: {e}"))?;
        receivers::connect_all(&mut fleet, self.args, added);
        for msg in fleet.fatal_messages() {
            eprintln!("worker failed: {msg}");
        }
        self.fleets.push(fleet);
        self.opened = level;
        Ok(())
    }

    /// Reads what the workers reported (drops, above all) for up to `wait`.
    fn poll(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            for fleet in &mut self.fleets {
                fleet.poll(Duration::ZERO);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(PROGRESS_INTERVAL));
        }
    }

    fn totals(&self) -> FleetTotals {
        self.fleets
            .iter()
            .map(Fleet::totals)
            .fold(FleetTotals::default(), |sum, t| FleetTotals {
                ok: sum.ok + t.ok,
                failed: sum.failed + t.failed,
                dropped: sum.dropped + t.dropped,
            })
    }

    /// Connections open now.
    fn held(&mut self) -> u64 {
        self.poll(Duration::ZERO);
        let totals = self.totals();
        totals.ok.saturating_sub(totals.dropped)
    }

    /// Stops every worker; returns the final totals and the workers' sample errors.
    fn stop(mut self) -> (FleetTotals, Vec<String>) {
        let mut samples = Vec::new();
        for fleet in &mut self.fleets {
            fleet.stop(STOP_GRACE);
            samples.extend(fleet.error_samples().iter().cloned());
        }
        (self.totals(), samples)
    }
}

/// The nodes a phase talks to and measures.
struct Nodes {
    /// The `--url` node: the subscriber and the idle connections are there, its CPU is the figure.
    measured: ServerProcesses,
    /// Where the sends of each phase go.
    url: WsTarget,
    /// The `--peer-url` node, if any, and its processes if they were found.
    peer: Option<(WsTarget, Option<ServerProcesses>)>,
}

/// One phase to run: what to send, where, and how fast.
struct PhaseRun {
    phase: Phase,
    client: RestClient,
    count: u64,
    rate: u64,
    /// The sending node's processes, measured too when they are not the measured node's.
    sender: Option<ServerProcesses>,
}

/// Runs the flat scenario; exits 1 on a lost delivery or too many errors, and the caller exits 2 on
/// an `Err` (nothing measured).
pub fn run(args: FlatArgs) -> Result<ExitCode, String> {
    args.check()?;
    let levels = args.idle.0.clone();
    let top = levels.last().copied().unwrap_or(0);
    let layout = if top > 0 {
        Some(receivers::lay_out(&args.receivers, top)?)
    } else {
        None
    };
    let nodes = find_nodes(&args)?;
    let subscriber = Subscriber::connect(&nodes.url, SUBSCRIBER_USER)
        .map_err(|e| format!("subscriber on {}: {e}", args.receivers.url))?;
    eprintln!(
        "flat: levels {:?} on {}, subscriber {SUBSCRIBER_USER}, server pid(s) {:?}",
        levels, args.receivers.url, nodes.measured.pids
    );

    let runs = |scale: Option<u64>| phase_runs(&args, &nodes, scale);
    if args.warmup_s > 0 {
        eprintln!(
            "flat: warm-up, {} s per phase (not measured)",
            args.warmup_s
        );
        for run in runs(Some(args.warmup_s)) {
            run_phase(&run, &subscriber, &nodes.measured, args.drain_s)?;
        }
    }

    let mut idle = IdleConnections {
        args: &args.receivers,
        layout,
        fleets: Vec::new(),
        opened: 0,
    };
    let mut results: Vec<PhaseResult> = Vec::new();
    for &level in &levels {
        idle.raise_to(level)?;
        let idle_cpu_pct = settle(&mut idle, &nodes.measured, args.settle_s);
        let held = idle.held();
        eprintln!(
            "flat: idle level {level}: {held} open, server idle CPU {}",
            idle_cpu_pct.map_or("unknown".into(), |p| format!("{p:.2} % of one core"))
        );
        for run in runs(None) {
            let mut result = run_phase(&run, &subscriber, &nodes.measured, args.drain_s)?;
            result.idle = level;
            result.idle_held = held;
            result.idle_cpu_pct = idle_cpu_pct;
            eprintln!(
                "flat: idle {level}, {}: {} µs CPU per {}, {} lost, {} errors",
                run.phase.key(),
                result
                    .cpu_us_per_op()
                    .map_or("unknown".into(), |v| format!("{v:.1}")),
                run.phase.unit(),
                result.lost(),
                result.errors
            );
            results.push(result);
        }
    }
    let (totals, samples) = idle.stop();
    for msg in samples {
        eprintln!("sample error: {msg}");
    }
    let subscriber_failure = subscriber.failure();
    drop(subscriber);

    let report = render_report(&args, &results);
    if args.json {
        eprintln!("{}", report.0);
    } else {
        println!("{}", report.0);
    }
    for line in report.1 {
        println!("{line}");
    }
    let idle_lost = totals.failed + totals.dropped;
    let idle_failed = idle_lost as f64 > top as f64 * MAX_FAILED_FRACTION;
    if idle_failed {
        eprintln!(
            "flat: {} idle connections failed and {} were dropped (of {top})",
            totals.failed, totals.dropped
        );
    }
    if let Some(e) = &subscriber_failure {
        eprintln!("flat: the subscriber's connection ended: {e}");
    }
    let failed =
        idle_failed || subscriber_failure.is_some() || results.iter().any(PhaseResult::failed);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Finds the measured node's processes (a setup error if none: CPU is the point) and checks the peer.
fn find_nodes(args: &FlatArgs) -> Result<Nodes, String> {
    let url = WsTarget::parse(&args.receivers.url).map_err(|e| e.to_string())?;
    let measured = receivers::find_server(&args.receivers, url.addr.port()).ok_or_else(|| {
        format!(
            "cannot measure the server's CPU: no process found for port {} (pass --server-pid)",
            url.addr.port()
        )
    })?;
    measured
        .cpu_ns()
        .map_err(|e| format!("cannot read the server's CPU time: {e}"))?;
    let peer = match &args.peer_url {
        Some(peer_url) => {
            let peer = WsTarget::parse(peer_url).map_err(|e| e.to_string())?;
            TcpStream::connect_timeout(&peer.addr.into(), CONNECT_TIMEOUT)
                .map_err(|e| format!("--peer-url {peer_url}: {e}"))?;
            let processes = server_probe::find_listener_pids(peer.addr.port())
                .map(|pids| ServerProcesses { pids })
                .map_err(|e| eprintln!("flat: peer node's CPU not measured: {e}"))
                .ok();
            Some((peer, processes))
        }
        None => None,
    };
    Ok(Nodes {
        measured,
        url,
        peer,
    })
}

/// The phases of one level, in order; with `warmup_s`, each shortened to that many seconds.
fn phase_runs(args: &FlatArgs, nodes: &Nodes, warmup_s: Option<u64>) -> Vec<PhaseRun> {
    let lone = warmup_s.unwrap_or(args.seconds) * args.rate;
    let fresh = match warmup_s {
        Some(s) => (s * args.new_connection_rate).min(args.new_connections),
        None => args.new_connections,
    };
    let mut runs = vec![
        PhaseRun {
            phase: Phase::LoneSend,
            client: args.client(&nodes.url, args.senders, false),
            count: lone,
            rate: args.rate,
            sender: None,
        },
        PhaseRun {
            phase: Phase::NewConnection,
            client: args.client(&nodes.url, NEW_CONNECTION_CLIENTS, true),
            count: fresh,
            rate: args.new_connection_rate,
            sender: None,
        },
    ];
    if let Some((peer, processes)) = &nodes.peer {
        runs.push(PhaseRun {
            phase: Phase::CrossNode,
            client: args.client(peer, args.senders, false),
            count: lone,
            rate: args.rate,
            sender: processes.clone(),
        });
    }
    runs
}

/// Waits `settle_s` after a level is reached, following the workers; returns the server's CPU over
/// the second half (the first lets the work connecting caused finish), percent of one core.
fn settle(idle: &mut IdleConnections, server: &ServerProcesses, settle_s: u64) -> Option<f64> {
    let half = Duration::from_secs(settle_s) / 2;
    idle.poll(half);
    let before = server.cpu_ns().ok();
    let started = Instant::now();
    idle.poll(Duration::from_secs(settle_s) - half);
    let after = server.cpu_ns().ok();
    let seconds = started.elapsed().as_secs_f64();
    match (before, after) {
        (Some(b), Some(a)) if seconds > 0.0 && settle_s > 0 => {
            Some(100.0 * a.saturating_sub(b) as f64 / 1e9 / seconds)
        }
        _ => None,
    }
}

/// The body of send `i` of a phase: to the subscriber, stamped with its due time.
fn body_writer(phase: Phase) -> Arc<BodyWriter> {
    Arc::new(move |i, stamp_ns, out: &mut Vec<u8>| {
        out.extend_from_slice(b"{\"user_id\":\"");
        out.extend_from_slice(SUBSCRIBER_USER.as_bytes());
        out.extend_from_slice(b"\",\"type\":\"load\",\"message\":\"flat ");
        out.extend_from_slice(phase.key().as_bytes());
        out.push(b' ');
        stamp::write_u64(out, i);
        out.extend_from_slice(b"\",\"data\":");
        stamp::write_stamp_object(out, stamp_ns);
        out.push(b'}');
    })
}

/// Runs one phase: CPU read, sends, wait for the deliveries, CPU read again.
fn run_phase(
    run: &PhaseRun,
    subscriber: &Subscriber,
    measured: &ServerProcesses,
    drain_s: u64,
) -> Result<PhaseResult, String> {
    // Anything still arriving from an earlier phase is not this one's.
    subscriber.take();
    let received_before = subscriber.received();
    let phase_start_ns = now_ns();
    let started = Instant::now();
    let cpu_before = measured.cpu_ns().ok();
    let sender_before = run.sender.as_ref().and_then(|s| s.cpu_ns().ok());

    let progress_count = Arc::new(AtomicU64::new(0));
    let sender = {
        let (client, count, rate) = (run.client.clone(), run.count, run.rate as f64);
        let (body, progress) = (body_writer(run.phase), Arc::clone(&progress_count));
        thread::spawn(move || publisher::publish_over_rest(&client, count, rate, body, progress))
    };
    let mut progress = ProgressLine::new();
    let line = |sent: u64| {
        format!(
            "{}: sent {sent}/{}, delivered {}, {:.1} s",
            run.phase.key(),
            run.count,
            subscriber.received() - received_before,
            started.elapsed().as_secs_f64()
        )
    };
    let mut next_update = Instant::now() + PROGRESS_INTERVAL;
    while !sender.is_finished() {
        // Short sleeps, so the end of the sending (and of the phase) is seen within milliseconds.
        thread::sleep(DRAIN_POLL);
        if Instant::now() >= next_update {
            progress.update(&line(progress_count.load(Ordering::Relaxed)));
            next_update += PROGRESS_INTERVAL;
        }
    }
    let published: Published = sender
        .join()
        .map_err(|_| "the sender panicked".to_string())?
        .map_err(|e| format!("sender: {e}"))?;
    let send_s = started.elapsed().as_secs_f64();

    // Until every accepted send is delivered, or none arrives for --drain-s.
    let mut last = (subscriber.received(), Instant::now());
    while last.0 - received_before < published.ok
        && last.1.elapsed() < Duration::from_secs(drain_s)
        && subscriber.failure().is_none()
    {
        thread::sleep(DRAIN_POLL);
        let now = subscriber.received();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let cpu_after = measured.cpu_ns().ok();
    let sender_after = run.sender.as_ref().and_then(|s| s.cpu_ns().ok());
    let seconds = started.elapsed().as_secs_f64();
    progress.finish(&line(progress_count.load(Ordering::Relaxed)));

    let deliveries: Vec<Delivery> = subscriber
        .take()
        .into_iter()
        .filter(|d| d.stamp_ns >= phase_start_ns)
        .collect();
    let mut deliver_us = new_latency_histogram();
    for d in &deliveries {
        // The histogram's range is checked when recording; a latency past a minute is clamped.
        let _ = deliver_us.record(d.latency_us().min(deliver_us.high()));
    }
    let spent = |before: Option<u64>, after: Option<u64>| Some(after?.saturating_sub(before?));
    Ok(PhaseResult {
        phase: run.phase,
        idle: 0,
        idle_held: 0,
        attempted: run.count,
        ok: published.ok,
        errors: published.errors,
        first_error: published.first_error,
        delivered: deliveries.len() as u64,
        seconds,
        planned_send_s: run.count as f64 / run.rate as f64,
        send_s,
        cpu_ns: spent(cpu_before, cpu_after),
        sender_cpu_ns: spent(sender_before, sender_after),
        deliver_ms: quantiles_ms(&deliver_us),
        answer_ms: published.answer_latency_us.as_ref().and_then(quantiles_ms),
        idle_cpu_pct: None,
        load: load_average(),
    })
}

/// p50 and p99 in milliseconds; `None` for an empty histogram.
fn quantiles_ms(h: &Histogram<u64>) -> Option<[f64; 2]> {
    (!h.is_empty())
        .then(|| [0.5, 0.99].map(|q| round_to(h.value_at_quantile(q) as f64 / 1_000.0, 3)))
}

/// The human tables (one per phase, in phase order) and every JSON line (levels, then verdicts).
fn render_report(args: &FlatArgs, results: &[PhaseResult]) -> (String, Vec<String>) {
    let mut tables = Vec::new();
    let mut level_lines = Vec::new();
    let mut verdict_lines = Vec::new();
    for phase in [Phase::LoneSend, Phase::NewConnection, Phase::CrossNode] {
        let table = PhaseTable {
            phase,
            rows: results.iter().filter(|r| r.phase == phase).collect(),
        };
        if table.rows.is_empty() {
            continue;
        }
        let title = match phase {
            Phase::LoneSend => format!(
                "lone sends: {}/s for {} s over {} keep-alive connection(s) to {}; server CPU per send",
                args.rate, args.seconds, args.senders, args.receivers.url
            ),
            Phase::NewConnection => format!(
                "new-connection requests: {} at {}/s, each on a fresh connection with Connection: close; \
                 server CPU per request, request latency",
                args.new_connections, args.new_connection_rate
            ),
            Phase::CrossNode => format!(
                "cross-node: {}/s for {} s posted to {}, delivered on {}; receiving node's CPU per delivery",
                args.rate,
                args.seconds,
                args.peer_url.as_deref().unwrap_or("-"),
                args.receivers.url
            ),
        };
        tables.push(table.render(&title));
        for (row, ratio) in table.rows.iter().zip(table.ratios()) {
            level_lines.push(row.json_line(ratio));
        }
        verdict_lines.push(table.verdict_line());
    }
    level_lines.extend(verdict_lines);
    (tables.join("\n\n"), level_lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::Value;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flat: FlatArgs,
    }

    fn parse(extra: &[&str]) -> Result<FlatArgs, String> {
        let argv = ["flat"].iter().chain(extra);
        let args = Cli::try_parse_from(argv).map_err(|e| e.to_string())?.flat;
        args.check()?;
        Ok(args)
    }

    #[test]
    fn idle_levels_are_counts_that_never_decrease() {
        assert_eq!(
            parse_idle_levels("0,18000"),
            Ok(IdleLevels(vec![0, 18_000]))
        );
        assert_eq!(
            parse_idle_levels(" 0, 0 ,5000,18000"),
            Ok(IdleLevels(vec![0, 0, 5_000, 18_000]))
        );
        assert!(parse_idle_levels("18000,0")
            .unwrap_err()
            .contains("must not decrease"));
        assert!(parse_idle_levels("0").unwrap_err().contains("at least two"));
        assert!(parse_idle_levels("0,1e4").unwrap_err().contains("\"1e4\""));
        assert!(parse_idle_levels("0,,5").is_err());
        assert!(parse_idle_levels("0,-5").is_err());
        assert!(parse_idle_levels("0,250001")
            .unwrap_err()
            .contains("250000"));
    }

    #[test]
    fn the_defaults_are_the_requirement_s_run() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.idle, IdleLevels(vec![0, 18_000]));
        assert_eq!((args.rate, args.seconds), (1_000, 10));
        assert_eq!(
            (args.new_connections, args.new_connection_rate),
            (1_000, 200)
        );
        assert_eq!((args.peer_url, args.senders), (None, 1));
    }

    #[test]
    fn bad_options_are_refused_with_the_option_named() {
        let refused = |extra: &[&str], expect: &str| {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(expect), "{extra:?}: {e}");
        };
        refused(&["--rate", "0"], "--rate must be between 1 and");
        refused(&["--seconds", "0"], "--seconds");
        refused(&["--seconds", "3601"], "--seconds");
        refused(&["--new-connections", "0"], "--new-connections");
        refused(&["--new-connections", "10001"], "--new-connections");
        refused(&["--new-connection-rate", "0"], "--new-connection-rate");
        refused(&["--drain-s", "0"], "--drain-s");
        refused(&["--senders", "0"], "--senders");
        refused(&["--senders", "65"], "--senders");
        refused(&["--settle-s", "601"], "--settle-s");
        refused(&["--api-key", ""], "--api-key");
        refused(&["--api-key", "a b"], "--api-key");
        refused(&["--api-key", "a\r\nX: y"], "--api-key");
        refused(&["--url", "ws://10.0.0.1:80/ws"], "--url");
        refused(&["--peer-url", "ws://example.com/ws"], "--peer-url");
        refused(
            &[
                "--url",
                "ws://127.0.0.1:9000/ws",
                "--peer-url",
                "ws://127.0.0.1:9000/ws",
            ],
            "another node",
        );
        refused(&["--idle", "5,1"], "must not decrease");
        refused(&["--rate", "x"], "invalid value");
        let ok = parse(&[
            "--url",
            "ws://127.0.0.1:9000/ws",
            "--peer-url",
            "ws://127.0.0.1:9001/ws",
            "--api-key",
            "k-1",
            "--warmup-s",
            "0",
            "--settle-s",
            "0",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_ratio_needs_both_costs_and_a_positive_first() {
        assert_eq!(ratio(Some(40.0), Some(44.0)), Some(1.1));
        assert_eq!(ratio(Some(40.0), None), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(0.0), Some(1.0)), None);
    }

    #[test]
    fn flat_means_every_level_within_ten_percent_of_the_first() {
        assert_eq!(verdict(&[Some(1.0), Some(1.1), Some(0.9)]), Verdict::Flat);
        assert_eq!(verdict(&[Some(1.0), Some(1.11)]), Verdict::Grows);
        assert_eq!(verdict(&[Some(1.0), Some(0.85), Some(1.2)]), Verdict::Grows);
        assert_eq!(verdict(&[Some(1.0), Some(0.85)]), Verdict::Shrinks);
        assert_eq!(verdict(&[Some(1.0), None]), Verdict::Unknown);
        assert_eq!(verdict(&[]), Verdict::Unknown);
        assert_eq!(Verdict::Grows.to_string(), "grows");
    }

    fn result(phase: Phase, idle: u64, cpu_ns: u64, ok: u64, delivered: u64) -> PhaseResult {
        PhaseResult {
            phase,
            idle,
            idle_held: idle,
            attempted: ok,
            ok,
            errors: 0,
            first_error: None,
            delivered,
            seconds: 10.0,
            planned_send_s: 10.0,
            send_s: 10.05,
            cpu_ns: Some(cpu_ns),
            sender_cpu_ns: None,
            deliver_ms: Some([0.5, 1.25]),
            answer_ms: Some([0.75, 2.0]),
            idle_cpu_pct: Some(0.5),
            load: Some(1.0),
        }
    }

    #[test]
    fn cost_is_per_send_or_per_delivery_and_a_lost_one_fails() {
        let lone = result(Phase::LoneSend, 0, 450_000_000, 10_000, 10_000);
        assert_eq!(lone.cpu_us_per_op(), Some(45.0));
        assert_eq!(lone.latency_ms(), Some([0.5, 1.25]));
        assert!(!lone.failed());
        let cross = result(Phase::CrossNode, 0, 300_000_000, 10_000, 9_999);
        assert_eq!(cross.operations(), 9_999);
        assert_eq!(cross.lost(), 1);
        assert!(cross.failed());
        let fresh = result(Phase::NewConnection, 0, 100_000_000, 1_000, 1_000);
        assert_eq!(fresh.latency_ms(), Some([0.75, 2.0]));
        let mut refused = fresh.clone();
        (
            refused.attempted,
            refused.ok,
            refused.delivered,
            refused.errors,
        ) = (1_000, 989, 989, 11);
        assert!(refused.failed());
        refused.errors = 10;
        assert!(!refused.failed());
    }

    #[test]
    fn a_phase_whose_sends_overran_the_plan_fell_behind() {
        let mut r = result(Phase::LoneSend, 0, 1, 10_000, 10_000);
        assert!(!r.fell_behind());
        r.send_s = 11.2;
        assert!(!r.fell_behind());
        r.send_s = 11.3;
        assert!(r.fell_behind());
        let table = PhaseTable {
            phase: Phase::LoneSend,
            rows: vec![&r],
        };
        assert!(table
            .render("t")
            .contains("note: at idle 0 the sends took 11.30 s instead of 10.00 s"));
    }

    #[test]
    fn a_table_compares_every_level_with_the_first() {
        let rows = [
            result(Phase::LoneSend, 0, 400_000_000, 10_000, 10_000),
            result(Phase::LoneSend, 18_000, 460_000_000, 10_000, 10_000),
        ];
        let table = PhaseTable {
            phase: Phase::LoneSend,
            rows: rows.iter().collect(),
        };
        let ratios = table.ratios();
        assert_eq!(ratios[0], Some(1.0));
        assert!((ratios[1].unwrap() - 1.15).abs() < 1e-9);
        assert_eq!(table.verdict(), Verdict::Grows);
        let text = table.render("lone sends");
        assert!(text.contains("CPU µs/send"), "{text}");
        assert!(text.contains("verdict: grows"), "{text}");
        assert!(text.contains("+15.0 %"), "{text}");
        let v: Value = serde_json::from_str(&table.verdict_line()).unwrap();
        assert_eq!(v["verdict"], "grows");
        assert_eq!(v["furthest_vs_first"], 1.15);
        assert_eq!(v["levels"], json!([0, 18_000]));
    }

    #[test]
    fn the_json_line_has_the_documented_fields() {
        let line =
            result(Phase::CrossNode, 18_000, 300_000_000, 10_000, 10_000).json_line(Some(1.04));
        assert!(line.starts_with(r#"{"scenario":"flat","phase":"cross_node","idle":18000,"#));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["cpu_us_per_op"], 30.0);
        assert_eq!(v["vs_first"], 1.04);
        assert_eq!(v["p99_ms"], 1.25);
        assert_eq!(v["answer_p99_ms"], 2.0);
        assert_eq!(v["lost"], 0);
        assert_eq!(v["server_cpu_s"], 0.3);
        assert_eq!(v["sender_cpu_us_per_op"], Value::Null);
    }
}
