//! Opening many WebSocket connections from worker processes: the options, the layout over workers and
//! source addresses, finding the server to measure, and following the connects. Shared by `idle` and
//! the delivery scenarios.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use clap::Args;

use crate::fleet::{Fleet, FleetTotals};
use crate::limits::{self, FD_RESERVE};
use crate::plan::{self, SourceSpread, WorkerShare};
use crate::progress::ProgressLine;
use crate::pusher::PusherApp;
use crate::server_probe::{self, ServerProcesses};
use crate::target::{self, WsTarget};
use crate::worker::{CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::ws::Protocol;

/// This server's Server-Sent Events route (`--sse`).
const SSE_PATH: &str = "/api/v1/notifications/stream";

/// Most connections one run may open: a bound so a typo cannot ask for millions.
pub const MAX_CONNECTIONS: u64 = 250_000;

/// Longest `--timeout-s`.
pub const MAX_TIMEOUT_S: u64 = 3_600;

/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Characters allowed in `--user-prefix`, which goes into the URL unescaped.
fn is_url_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')
}

/// How the connections are opened: the options every scenario that holds WebSockets shares.
#[derive(Debug, Clone, Args)]
pub struct ReceiverArgs {
    /// WebSocket endpoint of the server (loopback only). REST sends go to the same host and port.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Most receiving connections per worker process (a process may open at most 20,000 files here).
    #[arg(long, default_value_t = 9_000)]
    pub per_process: u64,
    /// Loopback source addresses for the receivers, comma-separated. Default: 127.0.0.2, 127.0.0.3, ...
    /// one per 20,000 connections.
    #[arg(long, value_delimiter = ',', value_name = "IPS")]
    pub source_ips: Option<Vec<String>>,
    /// Server process(es) to measure, comma-separated. Default: whoever listens on the URL's port.
    #[arg(long, value_delimiter = ',', value_name = "PID")]
    pub server_pid: Vec<u32>,
    /// Cap on new connections per second, over all workers together.
    #[arg(long, default_value_t = 5_000)]
    pub connect_rate: u64,
    /// Prefix of user ids: receiver i connects as user {prefix}{i}.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Seconds allowed for opening all connections.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Speak the Pusher Channels protocol as this app (`ID:KEY:SECRET`): receivers connect to
    /// `/app/KEY?protocol=7` on the URL's host and port (the URL's path is not used) and subscribe with
    /// `pusher:subscribe`; `fanout --via pusher` signs its events with the secret.
    #[arg(long, value_name = "ID:KEY:SECRET", conflicts_with = "sse")]
    pub pusher_app: Option<PusherApp>,
    /// Receive over Server-Sent Events instead of WebSocket: each receiver holds
    /// `GET /api/v1/notifications/stream?user_id=…` (with `channels=` when the scenario has a channel)
    /// on the URL's host and port.
    #[arg(long)]
    pub sse: bool,
}

impl ReceiverArgs {
    /// The URL the workers connect to: `--url`, or with `--pusher-app` the app's path on its host.
    pub fn receiver_url(&self) -> Result<String, String> {
        let path = match (&self.pusher_app, self.sse) {
            (None, false) => return Ok(self.url.clone()),
            (Some(app), _) => app.websocket_path(),
            (None, true) => SSE_PATH.to_string(),
        };
        let target = WsTarget::parse(&self.url).map_err(|e| e.to_string())?;
        Ok(format!("ws://{}{path}", target.host_header))
    }

    /// The protocol the receivers speak.
    pub fn protocol(&self) -> Protocol {
        match (&self.pusher_app, self.sse) {
            (Some(_), _) => Protocol::Pusher,
            (None, true) => Protocol::Sse,
            (None, false) => Protocol::Native,
        }
    }
}

/// Where the receivers go.
pub struct Layout {
    /// The server.
    pub target: WsTarget,
    /// Which source address each connection uses.
    pub sources: SourceSpread,
    /// Which worker opens which connections.
    pub shares: Vec<WorkerShare>,
}

/// Checks the receiver options against the machine's limits before anything is opened.
pub fn lay_out(args: &ReceiverArgs, receivers: u64) -> Result<Layout, String> {
    let target = WsTarget::parse(&args.receiver_url()?).map_err(|e| e.to_string())?;
    if receivers == 0 || receivers > MAX_CONNECTIONS {
        return Err(format!(
            "connections must be between 1 and {MAX_CONNECTIONS}"
        ));
    }
    if args.timeout_s == 0 || args.timeout_s > MAX_TIMEOUT_S || args.connect_rate == 0 {
        return Err(format!(
            "--timeout-s must be between 1 and {MAX_TIMEOUT_S}, --connect-rate at least 1"
        ));
    }
    if args.user_prefix.is_empty() || !args.user_prefix.chars().all(is_url_safe) {
        return Err("--user-prefix must be non-empty and use only A-Z a-z 0-9 - _ . ~".into());
    }
    let files = limits::nofile_hard_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let most = files.saturating_sub(FD_RESERVE);
    if args.per_process == 0 || args.per_process > most {
        return Err(format!("--per-process must be between 1 and {most}"));
    }
    let sources = match &args.source_ips {
        Some(ips) => SourceSpread::even(
            receivers,
            ips.iter()
                .map(|ip| target::parse_source_ip(ip))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
        ),
        None => SourceSpread::default_for(receivers),
    };
    plan::check_spread(&sources, receivers, limits::ephemeral_port_count())
        .map_err(|e| e.to_string())?;
    Ok(Layout {
        target,
        sources,
        shares: plan::split_over_workers(receivers, args.per_process),
    })
}

/// A worker's command-line options for its share: the connect settings every scenario passes.
pub fn worker_args(
    args: &ReceiverArgs,
    layout: &Layout,
    share: &WorkerShare,
    total: u64,
) -> Vec<(&'static str, String)> {
    let rate = plan::worker_rate(args.connect_rate as f64, share.count, total);
    let protocol = match args.protocol() {
        Protocol::Native => "native",
        Protocol::Pusher => "pusher",
        Protocol::Sse => "sse",
    };
    vec![
        (
            "--url",
            format!("ws://{}{}", layout.target.host_header, layout.target.path),
        ),
        ("--protocol", protocol.to_string()),
        ("--first", share.first.to_string()),
        ("--count", share.count.to_string()),
        ("--source-ips", layout.sources.addrs_arg()),
        ("--per-source", layout.sources.per_addr.to_string()),
        ("--connect-rate", rate.to_string()),
        ("--user-prefix", args.user_prefix.clone()),
        ("--deadline-s", args.timeout_s.to_string()),
    ]
}

/// Turns `(flag, value)` pairs into a command line.
pub fn to_argv(pairs: Vec<(&'static str, String)>) -> Vec<OsString> {
    pairs
        .into_iter()
        .flat_map(|(flag, value)| [OsString::from(flag), OsString::from(value)])
        .collect()
}

/// The processes to measure: the given pids, or the port's listeners; `None` (with a note) if neither
/// works, in which case the run goes on without memory and CPU figures.
pub fn find_server(args: &ReceiverArgs, port: u16) -> Option<ServerProcesses> {
    if !args.server_pid.is_empty() {
        return Some(ServerProcesses {
            pids: args.server_pid.clone(),
        });
    }
    match server_probe::find_listener_pids(port) {
        Ok(pids) => {
            let shown: Vec<String> = pids.iter().map(u32::to_string).collect();
            eprintln!(
                "server: pid(s) {} listen on port {port}{}",
                shown.join(", "),
                if pids.len() > 1 {
                    " (figures summed)"
                } else {
                    ""
                }
            );
            Some(ServerProcesses { pids })
        }
        Err(e) => {
            eprintln!("server: not found ({e}); RSS and CPU figures will be skipped");
            None
        }
    }
}

/// Follows the workers until every connection was attempted (or the time is up), drawing progress.
/// Returns the seconds it took.
pub fn connect_all(fleet: &mut Fleet, args: &ReceiverArgs, connections: u64) -> f64 {
    let started = Instant::now();
    // Workers stop starting connects at --timeout-s; one in flight may still take its full timeouts
    // (connect, handshake, subscribe answer).
    let give_up = started
        + Duration::from_secs(args.timeout_s)
        + CONNECT_TIMEOUT
        + HANDSHAKE_TIMEOUT * 2
        + Duration::from_secs(2);
    let mut progress = ProgressLine::new();
    let line = |totals: FleetTotals| {
        format!(
            "connecting: {}/{connections} open, {} errors, {:.1} s",
            totals.ok,
            totals.failed,
            started.elapsed().as_secs_f64()
        )
    };
    while !fleet.all_settled() && Instant::now() < give_up {
        fleet.poll(PROGRESS_INTERVAL);
        progress.update(&line(fleet.totals()));
    }
    let connect_s = started.elapsed().as_secs_f64();
    progress.finish(&line(fleet.totals()));
    if !fleet.all_settled() {
        eprintln!(
            "warning: workers still connecting after {connect_s:.0} s; measuring what is open, \
             and connections never reported count as failed"
        );
    }
    connect_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_prefixes_must_be_url_safe() {
        assert!("user-1_a.b~".chars().all(is_url_safe));
        assert!(!"a b".chars().all(is_url_safe));
        assert!(!"a&b".chars().all(is_url_safe));
    }
}
