//! `loadtest`: the load generator for notification-service.
//!
//! # What it measures
//!
//! The server's headline claim is about 1 KiB of server memory per idle WebSocket connection (see
//! docs/architecture.md, "Memory per connection"). `loadtest idle` checks it from outside: it reads the server's
//! `VmRSS` from `/proc/<pid>/status`, opens N WebSocket connections, each as a distinct user
//! (`GET /ws?user_id=u0`, `u1`, ...), lets the server settle, reads `VmRSS` again and divides the
//! growth by the connections held. While the connections sit idle it also samples the server's CPU
//! time (`utime + stime` in `/proc/<pid>/stat`), which should be near zero. It ends with a human summary
//! and one JSON line for scripts and benchmark records.
//!
//! The delivery scenarios (`fanout`, `targeted`, `chat`) measure what the server is for: receivers held
//! by the same worker processes, a publisher stamping each message's send time into its `data`, and
//! per-delivery latency (hdrhistogram p50/p90/p99/p99.9/max), deliveries per second, the server's
//! CPU-seconds per million deliveries and the clients' CPU per delivery. `--soak-s` turns any of them
//! into a steady-load soak that samples the server's RSS.
//!
//! # Why several processes and source addresses
//!
//! This machine caps every process at 20,000 open files, a hard limit that cannot be raised, so one
//! process holds about 19,000 sockets at most. The parent therefore re-executes its own binary as
//! hidden `worker` processes, each holding a share (`--per-process`), and talks to them over pipes.
//! Separately, the kernel tells connections to one server address apart by source port, and the
//! ephemeral range has about 28,000 ports per source address; loopback is all of `127.0.0.0/8`, so
//! client sockets are bound to `127.0.0.2`, `127.0.0.3`, ... to go past one range.
//!
//! Every run is bounded in connections and in time, and targets loopback only.
//!
//! # Layout
//!
//! - [`scenario`]: one module per scenario; [`scenario::idle`] drives the run described above,
//!   [`scenario::ingest`] measures REST send/batch throughput and latency, [`scenario::history`]
//!   history page latency for a user with a large inbox, [`scenario::crossnode`] delivery from one
//!   node to WebSockets on another; [`scenario::flat`] whether a send costs the same with many idle
//!   connections open as with none; [`scenario::fanout`],
//!   [`scenario::targeted`] and [`scenario::chat`] delivery latency and cost, through
//!   [`scenario::delivery`].
//! - [`publisher`]: the parent's WebSocket and REST publishers, open-loop at a set rate.
//! - [`subscriber`]: one WebSocket the parent holds for a single user, timing what it receives
//!   (`flat`).
//! - [`stamp`]: the send-time stamp in `data` and the clock it is read from.
//! - [`plan`]: which worker and which source address each connection index gets.
//! - [`fleet`]: the parent's side of the workers: spawn, follow their reports, stop.
//! - [`worker`]: the worker process: connect at a paced rate, hold and answer pings, report.
//! - [`ws`]: the hand-written WebSocket bits: upgrade request, frame parsing, pong, subscribing.
//! - [`pusher`]: the Pusher Channels protocol's bits (`--pusher-app`): the subscriber's path and
//!   messages, the signed HTTP API request.
//! - [`http`]: reading keep-alive HTTP/1.1 responses for the REST scenarios.
//! - [`target`]: the `ws://` URL and the loopback-only check.
//! - [`server_probe`]: finding the server's pid by port, reading its RSS and CPU time.
//! - [`limits`]: open-files limit and ephemeral port range.
//! - [`progress`]: the progress line on stderr.

pub mod fleet;
pub mod http;
pub mod limits;
pub mod plan;
pub mod progress;
pub mod publisher;
pub mod pusher;
pub mod scenario;
pub mod server_probe;
pub mod stamp;
pub mod subscriber;
pub mod target;
pub mod worker;
pub mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when a run could not start (bad options, no workers); 1 means too many failures.
const EXIT_SETUP_ERROR: u8 = 2;

/// Load generator for notification-service (loopback only).
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The scenarios, plus the hidden worker the parent runs itself as.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open many idle WebSocket connections (one user each) and measure the server's RSS per
    /// connection and its CPU use while they sit idle.
    Idle(scenario::idle::IdleArgs),
    /// REST `send` or `batch` throughput with the latency of the 2xx, closed-loop or at a set rate.
    Ingest(scenario::ingest::IngestArgs),
    /// Seed one user with many notifications, then measure history page latency.
    History(scenario::history::HistoryArgs),
    /// Delivery rate and send→deliver latency from one node to WebSockets on another.
    Crossnode(scenario::crossnode::CrossNodeArgs),
    /// C subscribers of one channel, M messages published to it (WebSocket or REST): deliveries/s,
    /// publish-to-deliver latency, server CPU per million deliveries.
    Fanout(scenario::fanout::FanoutArgs),
    /// C users, REST sends to random ones at a set rate (open-loop): delivery latency and cost.
    Targeted(scenario::targeted::TargetedArgs),
    /// Clients in rooms publishing to each other over WebSocket: delivery latency and cost.
    Chat(scenario::chat::ChatArgs),
    /// Whether a lone send, a new-connection request and a cross-node delivery cost the server the
    /// same with many idle connections open as with none.
    Flat(scenario::flat::FlatArgs),
    /// Internal: one worker process of a run, started by the parent. Not for direct use.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Idle(args) => scenario::idle::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest idle: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Ingest(args) => scenario::ingest::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest ingest: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::History(args) => scenario::history::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest history: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Crossnode(args) => scenario::crossnode::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest crossnode: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Fanout(args) => scenario::fanout::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest fanout: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Targeted(args) => scenario::targeted::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest targeted: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Chat(args) => scenario::chat::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest chat: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Flat(args) => scenario::flat::run(args).unwrap_or_else(|e| {
            eprintln!("loadtest flat: {e}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }),
        Command::Worker(args) => match worker::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadtest worker: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
