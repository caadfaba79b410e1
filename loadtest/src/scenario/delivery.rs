//! What the delivery scenarios (`fanout`, `targeted`, `chat`) share: receivers held by worker
//! processes, a publisher, and the measurements around them.
//!
//! A run, in order:
//! 1. lay out the receivers over worker processes and source addresses (as `idle` does) and open them,
//!    each as user `{prefix}{i}`, subscribed to the scenario's channel or room if it has one; the
//!    progress line shows the connects;
//! 2. read the server's and the workers' CPU time (`utime + stime`), then publish: from the parent
//!    ([`Publisher::Parent`]) or from the workers themselves ([`Publisher::Workers`], chat); the
//!    progress line shows published and delivered counts; the server's RSS is sampled every
//!    `--rss-every-s`;
//! 3. wait until every expected delivery arrived, or none arrived for `--drain-s`;
//! 4. read CPU times again, stop the workers (which send their latency histograms), and print the
//!    summary and one JSON line.
//!
//! The cost figures are CPU time divided by deliveries: the server's CPU-seconds per million
//! deliveries (the figure the fan-out target is stated in, which a shared machine's load distorts far
//! less than a rate), and the receiving clients' microseconds per delivery (the load generator must
//! stay well below the server it measures).

use std::ffi::OsString;
use std::fs;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::fleet::Fleet;
use crate::plan;
use crate::progress::ProgressLine;
use crate::publisher::Published;
use crate::scenario;
use crate::scenario::receivers::{self, Layout, ReceiverArgs};
use crate::server_probe::{clock_ticks_per_second, ServerProcesses};

/// Longest soak, in seconds.
pub const MAX_RUN_S: u64 = 4 * 3_600;

/// Most messages one run may publish.
pub const MAX_MESSAGES: u64 = 100_000_000;

/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// How long workers get to exit after `quit` (they print their histograms on the way).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The spread of RSS samples (after the warm-up) within which memory counts as flat.
pub const RSS_FLAT_FRACTION: f64 = 0.05;

/// What is measured around the publishing, shared by every delivery scenario.
#[derive(Debug, Clone, Args)]
pub struct MeasureArgs {
    /// Print only the JSON line on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// After the last publish, how long to wait with no new delivery before counting the rest lost.
    #[arg(long, default_value_t = 5)]
    pub drain_s: u64,
    /// Sample the server's RSS this often while publishing (soak runs: see --soak-s).
    #[arg(long, default_value_t = 10)]
    pub rss_every_s: u64,
    /// Steady load for this many seconds instead of --messages: publishes rate x soak-s messages and
    /// reports whether the server's RSS stayed flat (within 5 % after the first minute).
    #[arg(long)]
    pub soak_s: Option<u64>,
}

impl MeasureArgs {
    /// Messages to publish: `messages`, or `rate * soak_s` for a soak.
    pub fn message_count(&self, messages: u64, rate: u64) -> Result<u64, String> {
        let count = match self.soak_s {
            Some(s) if s == 0 || s > MAX_RUN_S => {
                return Err(format!("--soak-s must be between 1 and {MAX_RUN_S}"))
            }
            Some(_) if rate == 0 => return Err("--soak-s needs a --rate".into()),
            Some(s) => s * rate,
            None => messages,
        };
        if count == 0 || count > MAX_MESSAGES {
            return Err(format!("--messages must be between 1 and {MAX_MESSAGES}"));
        }
        Ok(count)
    }
}

/// The parent's publisher: given the receivers held and a counter to count its messages into, it
/// publishes and says how many deliveries its accepted messages should make.
pub type ParentPublish = dyn FnOnce(u64, Arc<AtomicU64>) -> Result<(Published, u64), String> + Send;

/// Who publishes.
pub enum Publisher {
    /// The parent, in a thread: given the receivers held, it publishes (counting into the counter)
    /// and says how many deliveries its accepted messages should make.
    Parent(Box<ParentPublish>),
    /// The workers, from their own connections, after `start` (chat); `count` messages in all.
    Workers {
        /// Messages over all workers.
        count: u64,
    },
}

/// A delivery scenario, as the scenario module describes it to [`run`].
pub struct DeliveryRun {
    /// `fanout`, `targeted` or `chat`.
    pub scenario: &'static str,
    /// Receiving connections.
    pub receivers: u64,
    /// The channel the receivers subscribe to (with `room_size`, the prefix of their rooms).
    pub channel: Option<String>,
    /// Receivers per room (chat); 0 for one channel.
    pub room_size: u64,
    /// Messages to publish (what the progress line counts up to).
    pub messages: u64,
    /// Publish rate, messages per second over the whole run (0: as fast as possible).
    pub rate: u64,
    /// Who publishes.
    pub publisher: Publisher,
    /// Scenario-specific fields for the JSON line (after `scenario`).
    pub params: Vec<(&'static str, Value)>,
}

/// Runs a delivery scenario; the exit code says whether anything was lost or refused.
pub fn run(
    receiver: &ReceiverArgs,
    measure: &MeasureArgs,
    mut run: DeliveryRun,
) -> Result<ExitCode, String> {
    let layout = receivers::lay_out(receiver, run.receivers)?;
    let server = receivers::find_server(receiver, layout.target.addr.port());
    let load_before = load_average();
    eprintln!(
        "{}: {} receivers on {}, {} worker(s), source address(es) {}",
        run.scenario,
        run.receivers,
        receiver.url,
        layout.shares.len(),
        layout.sources.addrs_arg()
    );
    let worker_lines = worker_command_lines(receiver, &run, &layout);
    let mut fleet =
        Fleet::spawn("worker", worker_lines).map_err(|e| format!("cannot start workers: {e}"))?;
    receivers::connect_all(&mut fleet, receiver, run.receivers);
    let connected = fleet.totals();
    let held = connected.ok.saturating_sub(connected.dropped);
    if held == 0 {
        fleet.stop(STOP_GRACE);
        return Err(format!(
            "no receiver connected ({} failed){}",
            connected.failed,
            fleet
                .error_samples()
                .first()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }

    let clients = ServerProcesses { pids: fleet.pids() };
    let server_cpu_before = server.as_ref().and_then(|s| s.cpu_ticks().ok());
    let client_cpu_before = clients.cpu_ticks().ok();
    let mut rss = RssSamples::default();
    rss.sample(server.as_ref(), Duration::ZERO);

    let started = Instant::now();
    let progress_count = Arc::new(AtomicU64::new(0));
    let parent = match std::mem::replace(&mut run.publisher, Publisher::Workers { count: 0 }) {
        Publisher::Parent(publish) => {
            let counter = Arc::clone(&progress_count);
            Some(thread::spawn(move || publish(held, counter)))
        }
        Publisher::Workers { .. } => {
            fleet.start_publishing();
            None
        }
    };
    let publish_budget = publish_time_budget(run.messages, run.rate);
    let mut progress = ProgressLine::new();
    let mut next_rss = started + rss_interval(measure);
    let line = |fleet: &Fleet, published: u64, started: Instant| {
        let secs = started.elapsed().as_secs_f64();
        format!(
            "{}: published {published}/{}, delivered {} ({:.0}/s), {:.1} s",
            run.scenario,
            run.messages,
            fleet.delivered(),
            fleet.delivered() as f64 / secs.max(1e-3),
            secs
        )
    };
    // Publishing: until the parent's publisher returns, or the workers have published everything.
    let published_by_parent = loop {
        fleet.poll(PROGRESS_INTERVAL);
        let published = match &parent {
            Some(_) => progress_count.load(Ordering::Relaxed),
            None => fleet.published().0,
        };
        progress.update(&line(&fleet, published, started));
        if Instant::now() >= next_rss {
            rss.sample(server.as_ref(), started.elapsed());
            next_rss += rss_interval(measure);
        }
        match &parent {
            Some(thread) if thread.is_finished() => {
                let thread = parent.expect("matched Some");
                break Some(
                    thread
                        .join()
                        .map_err(|_| "the publisher panicked".to_string())??,
                );
            }
            Some(_) => {}
            None if published >= run.messages || started.elapsed() > publish_budget => break None,
            None => {}
        }
    };
    let publish_s = started.elapsed().as_secs_f64();
    let (published, expected) = match &published_by_parent {
        Some((p, expected)) => (p.ok, *expected),
        None => fleet.published(),
    };

    // Draining: until every expected delivery arrived, or none came for --drain-s.
    let mut last_change = (fleet.delivered(), Instant::now());
    while fleet.delivered() < expected
        && last_change.1.elapsed() < Duration::from_secs(measure.drain_s)
    {
        fleet.poll(PROGRESS_INTERVAL);
        let delivered = fleet.delivered();
        if delivered != last_change.0 {
            last_change = (delivered, Instant::now());
        }
        progress.update(&line(&fleet, published, started));
    }
    let delivered_at = if fleet.delivered() >= expected {
        last_change
            .1
            .max(started + Duration::from_secs_f64(publish_s))
    } else {
        last_change.1
    };
    let run_s = delivered_at.duration_since(started).as_secs_f64();
    progress.finish(&line(&fleet, published, started));
    let server_cpu_after = server.as_ref().and_then(|s| s.cpu_ticks().ok());
    let client_cpu_after = clients.cpu_ticks().ok();
    rss.sample(server.as_ref(), started.elapsed());
    let load_after = load_average();

    fleet.stop(STOP_GRACE);
    for msg in fleet.fatal_messages() {
        eprintln!("worker failed: {msg}");
    }
    for msg in fleet.error_samples() {
        eprintln!("sample error: {msg}");
    }
    let totals = fleet.totals();
    let delivered = fleet.delivered();
    let ticks = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / clock_ticks_per_second() as f64),
        _ => None,
    };
    let (publish_errors, first_error, answer_latency) = match published_by_parent {
        Some((p, _)) => (p.errors, p.first_error, p.answer_latency_us),
        None => (0, None, None),
    };
    let report = DeliveryReport {
        scenario: run.scenario,
        params: run.params,
        receivers: run.receivers,
        connected: totals.ok,
        connect_failed: totals.failed,
        dropped: totals.dropped,
        published,
        publish_errors,
        first_error,
        expected,
        delivered,
        publish_s,
        run_s,
        latency_us: fleet.latency_us().clone(),
        answer_latency_us: answer_latency,
        server_cpu_s: ticks(server_cpu_before, server_cpu_after),
        client_cpu_s: ticks(client_cpu_before, client_cpu_after),
        rss,
        load: (load_before, load_after),
    };
    if measure.json {
        eprintln!("{}", report.summary());
    } else {
        println!("{}", report.summary());
    }
    println!("{}", report.json_line());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How long worker publishers (chat) get before the run stops waiting: the schedule plus a margin.
fn publish_time_budget(messages: u64, rate: u64) -> Duration {
    let schedule = if rate == 0 {
        MAX_RUN_S as f64
    } else {
        messages as f64 / rate as f64
    };
    Duration::from_secs_f64(schedule * 1.5 + 10.0)
}

fn rss_interval(measure: &MeasureArgs) -> Duration {
    Duration::from_secs(measure.rss_every_s.max(1))
}

/// The 1-minute load average, to note how busy the shared machine was.
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Each worker's command line: its share, the connect settings, and the channel and publishing.
fn worker_command_lines(
    args: &ReceiverArgs,
    run: &DeliveryRun,
    layout: &Layout,
) -> Vec<(u64, Vec<OsString>)> {
    layout
        .shares
        .iter()
        .map(|share| {
            let mut argv = receivers::worker_args(args, layout, share, run.receivers);
            argv.extend([
                ("--total", run.receivers.to_string()),
                ("--room-size", run.room_size.to_string()),
            ]);
            if let Some(channel) = &run.channel {
                argv.push(("--channel", channel.clone()));
            }
            if let Publisher::Workers { count } = run.publisher {
                // Each worker publishes its share of the messages at its share of the rate.
                // Cumulative rounding, so the parts add up to exactly `count`.
                let upto =
                    |i: u64| (u128::from(count) * u128::from(i) / u128::from(run.receivers)) as u64;
                let part = upto(share.first + share.count) - upto(share.first);
                argv.push(("--publish-count", part.to_string()));
                argv.push((
                    "--publish-rate",
                    plan::worker_rate(run.rate as f64, share.count, run.receivers).to_string(),
                ));
            }
            (share.count, receivers::to_argv(argv))
        })
        .collect()
}

/// The server's RSS over a run.
#[derive(Debug, Clone, Default)]
pub struct RssSamples {
    /// (seconds since publishing started, KiB).
    pub samples: Vec<(f64, u64)>,
}

impl RssSamples {
    fn sample(&mut self, server: Option<&ServerProcesses>, at: Duration) {
        if let Some(kb) = server.and_then(|s| s.rss_kb().ok()) {
            self.samples.push((at.as_secs_f64(), kb));
        }
    }

    /// Samples after the warm-up: the first minute, or (for a run shorter than two minutes) none.
    fn steady(&self) -> impl Iterator<Item = u64> + '_ {
        let run_s = self.samples.last().map_or(0.0, |s| s.0);
        let warm_up = if run_s >= 120.0 { 60.0 } else { 0.0 };
        self.samples
            .iter()
            .filter(move |s| s.0 >= warm_up)
            .map(|s| s.1)
    }

    /// Highest over lowest steady sample, minus one: 0.03 means the RSS moved within 3 %.
    pub fn spread(&self) -> Option<f64> {
        let min = self.steady().min()?;
        let max = self.steady().max()?;
        (min > 0).then(|| max as f64 / min as f64 - 1.0)
    }
}

/// Everything one delivery run measured.
pub struct DeliveryReport {
    scenario: &'static str,
    params: Vec<(&'static str, Value)>,
    receivers: u64,
    connected: u64,
    connect_failed: u64,
    dropped: u64,
    published: u64,
    publish_errors: u64,
    first_error: Option<String>,
    expected: u64,
    delivered: u64,
    publish_s: f64,
    run_s: f64,
    latency_us: hdrhistogram::Histogram<u64>,
    answer_latency_us: Option<hdrhistogram::Histogram<u64>>,
    server_cpu_s: Option<f64>,
    client_cpu_s: Option<f64>,
    rss: RssSamples,
    load: (Option<f64>, Option<f64>),
}

fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

impl DeliveryReport {
    /// Deliveries expected but never received.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    /// Whether the run is clean: everything connected and delivered, nothing refused or dropped.
    pub fn ok(&self) -> bool {
        self.lost() == 0
            && self.publish_errors == 0
            && self.connect_failed == 0
            && self.dropped == 0
            && self.delivered > 0
    }

    fn server_cpu_s_per_million(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|_| self.delivered > 0)
            .map(|s| s * 1e6 / self.delivered as f64)
    }

    fn client_cpu_us_per_delivery(&self) -> Option<f64> {
        self.client_cpu_s
            .filter(|_| self.delivered > 0)
            .map(|s| s * 1e6 / self.delivered as f64)
    }

    fn quantiles(h: &hdrhistogram::Histogram<u64>) -> [f64; 5] {
        [
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
        ]
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let q = Self::quantiles(&self.latency_us);
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("unknown".into(), |v| format!("{v:.3}{unit}"));
        let mut lines = vec![
            format!("{} summary", self.scenario),
            format!(
                "  receivers       {} connected (of {}), {} failed, {} dropped by the server",
                self.connected, self.receivers, self.connect_failed, self.dropped
            ),
            format!(
                "  published       {} ok, {} refused, in {:.2} s",
                self.published, self.publish_errors, self.publish_s
            ),
            format!(
                "  delivered       {} of {} expected, {} lost; {:.0} deliveries/s over {:.2} s",
                self.delivered,
                self.expected,
                self.lost(),
                self.delivered as f64 / self.run_s.max(1e-3),
                self.run_s
            ),
            format!(
                "  latency (ms)    publish->deliver p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                q[0], q[1], q[2], q[3], q[4]
            ),
        ];
        if let Some(h) = &self.answer_latency_us {
            let a = Self::quantiles(h);
            lines.push(format!(
                "  REST 2xx (ms)   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                a[0], a[1], a[2], a[3], a[4]
            ));
        }
        lines.push(format!(
            "  server CPU      {} s, {} CPU-s per million deliveries",
            opt(self.server_cpu_s, ""),
            opt(self.server_cpu_s_per_million(), "")
        ));
        lines.push(format!(
            "  client CPU      {} s, {} per delivery (receiving workers)",
            opt(self.client_cpu_s, ""),
            opt(self.client_cpu_us_per_delivery(), " µs")
        ));
        if let (Some(first), Some(last)) = (self.rss.samples.first(), self.rss.samples.last()) {
            lines.push(format!(
                "  server RSS      {} KiB at start, {} KiB at end, {} samples, steady spread {}",
                first.1,
                last.1,
                self.rss.samples.len(),
                opt(self.rss.spread().map(|s| s * 100.0), " %")
            ));
        }
        lines.push(format!(
            "  machine load    {} -> {} (1-minute average)",
            opt(self.load.0, ""),
            opt(self.load.1, "")
        ));
        if let Some(e) = &self.first_error {
            lines.push(format!("  first error     {e}"));
        }
        lines.join("\n")
    }

    /// The single JSON line printed last.
    pub fn json_line(&self) -> String {
        let q = Self::quantiles(&self.latency_us);
        let a = self.answer_latency_us.as_ref().map(Self::quantiles);
        let round = |v: Option<f64>, d: i32| v.map(|v| scenario::round_to(v, d));
        let mut fields: Vec<(&str, Value)> = vec![("scenario", json!(self.scenario))];
        fields.extend(self.params.iter().cloned());
        fields.extend([
            ("receivers", json!(self.connected)),
            ("connect_failed", json!(self.connect_failed)),
            ("dropped", json!(self.dropped)),
            ("published", json!(self.published)),
            ("publish_errors", json!(self.publish_errors)),
            ("expected", json!(self.expected)),
            ("delivered", json!(self.delivered)),
            ("lost", json!(self.lost())),
            ("seconds", json!(round(Some(self.run_s), 3))),
            (
                "deliveries_per_s",
                json!((self.delivered as f64 / self.run_s.max(1e-3)).round()),
            ),
            ("p50_ms", json!(q[0])),
            ("p90_ms", json!(q[1])),
            ("p99_ms", json!(q[2])),
            ("p999_ms", json!(q[3])),
            ("max_ms", json!(q[4])),
            ("rest_p50_ms", json!(a.map(|a| a[0]))),
            ("rest_p99_ms", json!(a.map(|a| a[2]))),
            ("server_cpu_s", json!(round(self.server_cpu_s, 3))),
            (
                "server_cpu_s_per_million",
                json!(round(self.server_cpu_s_per_million(), 3)),
            ),
            ("client_cpu_s", json!(round(self.client_cpu_s, 3))),
            (
                "client_cpu_us_per_delivery",
                json!(round(self.client_cpu_us_per_delivery(), 3)),
            ),
            ("rss_start_kb", json!(self.rss.samples.first().map(|s| s.1))),
            ("rss_end_kb", json!(self.rss.samples.last().map(|s| s.1))),
            (
                "rss_max_kb",
                json!(self.rss.samples.iter().map(|s| s.1).max()),
            ),
            (
                "rss_spread_pct",
                json!(round(self.rss.spread().map(|s| s * 100.0), 2)),
            ),
            (
                "rss_flat",
                json!(self.rss.spread().map(|s| s <= RSS_FLAT_FRACTION)),
            ),
            (
                "rss_samples",
                json!(self
                    .rss
                    .samples
                    .iter()
                    .map(|(at, kb)| json!([at.round(), kb]))
                    .collect::<Vec<_>>()),
            ),
            ("load_before", json!(self.load.0)),
            ("load_after", json!(self.load.1)),
        ]);
        scenario::json_line(&fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_flat_when_steady_samples_stay_within_five_percent() {
        // A short run: every sample counts.
        let mut rss = RssSamples {
            samples: vec![(0.0, 100_000), (10.0, 103_000), (20.0, 104_000)],
        };
        assert!((rss.spread().unwrap() - 0.04).abs() < 1e-9);
        // A long run: the first minute is warm-up and does not count.
        rss.samples = vec![(0.0, 50_000), (60.0, 100_000), (300.0, 106_000)];
        assert!((rss.spread().unwrap() - 0.06).abs() < 1e-9);
        assert_eq!(RssSamples::default().spread(), None);
    }

    #[test]
    fn a_soak_publishes_rate_times_seconds() {
        let measure = MeasureArgs {
            json: false,
            drain_s: 5,
            rss_every_s: 10,
            soak_s: Some(600),
        };
        assert_eq!(measure.message_count(10, 100), Ok(60_000));
        assert!(measure.message_count(10, 0).is_err());
        let plain = MeasureArgs {
            soak_s: None,
            ..measure
        };
        assert_eq!(plain.message_count(10, 100), Ok(10));
        assert!(plain.message_count(0, 100).is_err());
    }
}
