//! The parent's side of the worker processes: start them, follow their reports, stop them.
//!
//! Each worker is this same binary run as `loadtest worker ...` with its stdin and stdout piped. One
//! reader thread per worker turns its stdout into [`WorkerReport`]s on a single channel, so the
//! parent can wait on all of them at once with a timeout and keep its progress line moving.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::worker::holder::new_latency_histogram;
use crate::worker::report::{WorkerReport, QUIT_COMMAND, START_COMMAND};

/// Sample failure messages kept for the summary, over all workers.
const ERROR_SAMPLES_KEPT: usize = 5;

/// How often a stopping worker is checked for exit.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What the parent knows about one worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerState {
    /// Connections this worker was asked to open.
    pub assigned: u64,
    /// Connections upgraded, as last reported.
    pub ok: u64,
    /// Connections failed, as last reported.
    pub failed: u64,
    /// Held connections the server closed, as last reported.
    pub dropped: u64,
    /// The worker has attempted everything and is holding.
    pub ready: bool,
    /// The worker's stdout ended: it exited or crashed.
    pub exited: bool,
    /// Stamped messages received, as last reported.
    pub delivered: u64,
    /// Messages published by the worker (chat), as last reported.
    pub published: u64,
    /// Deliveries the worker's publishes should make, as last reported.
    pub expected: u64,
}

impl WorkerState {
    /// Whether this worker has nothing more to connect: ready, or gone.
    pub fn settled(&self) -> bool {
        self.ready || self.exited
    }
}

/// Sums over all workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetTotals {
    /// Connections upgraded.
    pub ok: u64,
    /// Connections that failed, including the shares of workers that died before reporting them.
    pub failed: u64,
    /// Held connections the server closed.
    pub dropped: u64,
}

/// A report from worker number `.0`, or `None` when its stdout ended.
type FleetEvent = (usize, Option<WorkerReport>);

/// The running worker processes.
pub struct Fleet {
    /// Child processes, in the order of their shares.
    children: Vec<Child>,
    /// Their stdins; taken (closed) when they are told to quit.
    stdins: Vec<Option<ChildStdin>>,
    /// What each one reported so far.
    states: Vec<WorkerState>,
    /// Reports from all reader threads.
    events: Receiver<FleetEvent>,
    /// The first few failure messages, for the summary.
    error_samples: Vec<String>,
    /// Messages of workers that could not start.
    fatal: Vec<String>,
    /// Workers have been told to quit, so their exits are expected.
    quit_sent: bool,
    /// Publish-to-receive latency over every worker's `hist` lines, microseconds.
    latency_us: Histogram<u64>,
}

impl Fleet {
    /// Starts one worker per entry of `worker_args`: this executable, run with `subcommand` and the
    /// entry's arguments; `assigned` gives each one's connection count.
    pub fn spawn(subcommand: &str, worker_args: Vec<(u64, Vec<OsString>)>) -> io::Result<Fleet> {
        let exe = std::env::current_exe()?;
        let (sender, events) = mpsc::channel();
        let mut fleet = Fleet {
            children: Vec::new(),
            stdins: Vec::new(),
            states: Vec::new(),
            events,
            error_samples: Vec::new(),
            fatal: Vec::new(),
            quit_sent: false,
            latency_us: new_latency_histogram(),
        };
        for (index, (assigned, args)) in worker_args.into_iter().enumerate() {
            let spawned = Command::new(&exe)
                .arg(subcommand)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    // Workers already started must not outlive the failed start.
                    fleet.stop(Duration::ZERO);
                    return Err(e);
                }
            };
            let stdout = child.stdout.take().expect("stdout was piped");
            fleet.stdins.push(child.stdin.take());
            fleet.children.push(child);
            fleet.states.push(WorkerState {
                assigned,
                ..WorkerState::default()
            });
            let sender = sender.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(report) = WorkerReport::parse(&line) {
                        if sender.send((index, Some(report))).is_err() {
                            return;
                        }
                    }
                }
                let _ = sender.send((index, None));
            });
        }
        Ok(fleet)
    }

    /// Applies every report that arrives within `wait`.
    pub fn poll(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((index, report)) => self.apply(index, report),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= until {
                // Drain what is already queued without waiting any longer.
                while let Ok((index, report)) = self.events.try_recv() {
                    self.apply(index, report);
                }
                return;
            }
        }
    }

    fn apply(&mut self, index: usize, report: Option<WorkerReport>) {
        let state = &mut self.states[index];
        match report {
            Some(WorkerReport::Progress { ok, failed }) => {
                state.ok = ok;
                state.failed = failed;
            }
            Some(WorkerReport::Ready { ok, failed }) => {
                state.ok = ok;
                state.failed = failed;
                state.ready = true;
            }
            Some(WorkerReport::Dropped(total)) => state.dropped = total,
            Some(WorkerReport::Done {
                ok,
                failed,
                dropped,
            }) => {
                state.ok = ok;
                state.failed = failed;
                state.dropped = dropped;
            }
            Some(WorkerReport::Error(msg)) => {
                if self.error_samples.len() < ERROR_SAMPLES_KEPT {
                    self.error_samples.push(msg);
                }
            }
            Some(WorkerReport::Fatal(msg)) => self.fatal.push(format!("worker {index}: {msg}")),
            Some(WorkerReport::Delivered(total)) => state.delivered = total,
            Some(WorkerReport::Published { total, expected }) => {
                state.published = total;
                state.expected = expected;
            }
            Some(WorkerReport::Hist { us, count }) => {
                // Values come from a histogram of the same bounds; an out-of-range one is clamped.
                let _ = self
                    .latency_us
                    .record_n(us.clamp(1, self.latency_us.high()), count);
            }
            None => state.exited = true,
        }
    }

    /// Whether every worker is holding its connections or gone.
    pub fn all_settled(&self) -> bool {
        self.states.iter().all(WorkerState::settled)
    }

    /// Current totals. A worker that is gone without holding everything it was given has its
    /// unaccounted connections counted as failed; while connecting, missing ones are just pending.
    pub fn totals(&self) -> FleetTotals {
        let mut totals = FleetTotals::default();
        for state in &self.states {
            totals.ok += state.ok;
            let unaccounted = state.assigned.saturating_sub(state.ok + state.failed);
            totals.failed += state.failed;
            if state.exited && !state.ready {
                totals.failed += unaccounted;
            }
            // A worker that died while holding, before being told to quit, lost all it held.
            totals.dropped += if state.exited && state.ready && !self.quit_sent {
                state.ok
            } else {
                state.dropped
            };
        }
        totals
    }

    /// Stamped messages received over all workers, as last reported.
    pub fn delivered(&self) -> u64 {
        self.states.iter().map(|s| s.delivered).sum()
    }

    /// Messages published by workers and the deliveries they should make, as last reported.
    pub fn published(&self) -> (u64, u64) {
        self.states
            .iter()
            .fold((0, 0), |(p, e), s| (p + s.published, e + s.expected))
    }

    /// Publish-to-receive latency of every delivery, in microseconds; complete once the workers have
    /// stopped (they send their histograms on the way out).
    pub fn latency_us(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// The workers' process ids, for reading their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Tells every worker to start publishing (chat).
    pub fn start_publishing(&mut self) {
        for pipe in self.stdins.iter_mut().flatten() {
            // A worker that already exited is counted by its missing deliveries.
            let _ = writeln!(pipe, "{START_COMMAND}");
            let _ = pipe.flush();
        }
    }

    /// The first few failure messages from workers.
    pub fn error_samples(&self) -> &[String] {
        &self.error_samples
    }

    /// Messages of workers that could not start.
    pub fn fatal_messages(&self) -> &[String] {
        &self.fatal
    }

    /// Tells every worker to quit and waits up to `grace` for them to exit, then kills stragglers.
    /// Reports that arrive meanwhile (the final `done` counts) are applied.
    pub fn stop(&mut self, grace: Duration) {
        self.quit_sent = true;
        for stdin in &mut self.stdins {
            if let Some(mut pipe) = stdin.take() {
                // A worker that already exited has closed its end; that is fine.
                let _ = writeln!(pipe, "{QUIT_COMMAND}");
            }
        }
        let until = Instant::now() + grace;
        loop {
            self.poll(Duration::ZERO);
            let any_running = self
                .children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)));
            if !any_running || Instant::now() >= until {
                break;
            }
            thread::sleep(EXIT_POLL_INTERVAL);
        }
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                // Only our own children, by handle; their sockets close with them.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Collect the last lines the reader threads had in flight.
        self.poll(EXIT_POLL_INTERVAL);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // On any early return, leave no worker holding sockets.
        if self
            .children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            self.stop(Duration::ZERO);
        }
    }
}
