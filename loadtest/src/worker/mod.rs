//! A worker process: opens its share of the connections, holds them, and reports on stdout.
//!
//! The parent re-executes its own binary as `loadtest worker ...` once per share, because one process
//! may hold at most 20,000 open files. A worker:
//! 1. raises its soft open-files limit to the hard limit;
//! 2. opens connections `first..first+count` from a few threads, at its part of the total connect-rate
//!    cap, each bound to its planned loopback source address and upgraded as user `{prefix}{index}`;
//!    With `--channel` each connection then subscribes (to the channel, or with `--room-size` to its
//!    room `{channel}-{index / room_size}`) and waits for the server's `subscribed` answer;
//! 3. hands each upgraded socket to the [`holder`] thread, which answers pings, counts closes, and
//!    records every stamped message it receives (count and latency);
//! 4. prints `ready <ok> <failed>`, then holds until its stdin says `quit` or closes, reporting
//!    `delivered` (and, publishing after `start` in the chat scenario, `published`) as they change;
//! 5. prints its latency histogram as `hist` lines and `done`, and exits (closing every socket at once).
//!
//! Network errors are counted, never fatal: a load test must survive the thing it is loading.

pub mod holder;
pub mod report;

use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use socket2::{Domain, Protocol, Socket, Type};

use crate::limits::{self, FD_RESERVE};
use crate::plan::{self, SourceSpread};
use crate::target::{self, WsTarget};
use crate::ws::{self, HandshakeError, KeyGen};
use holder::{Holder, PublishPlan, Upgraded};
use report::{WorkerReport, QUIT_COMMAND, START_COMMAND};

/// Threads opening connections in one worker. Each blocks on one connect and handshake at a time, and
/// a loopback handshake takes well under a millisecond, so a few threads reach any sensible rate.
pub const DEFAULT_CONNECT_THREADS: usize = 4;

/// Longest wait for the TCP connection itself. On loopback a connect only waits when the server's
/// accept queue is full and SYNs are being retried (after 1 s, then 3 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the `101` answer once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a worker reports progress while connecting.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// How often a holding worker checks its counters (drops, deliveries) and reports changes.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Failures a worker describes with an `error` line; the rest are only counted.
const ERROR_SAMPLES_PER_WORKER: u64 = 3;

/// Options of the hidden `worker` subcommand, which only the parent writes.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// WebSocket URL of the server (loopback only).
    #[arg(long)]
    pub url: String,
    /// Global index of this worker's first connection.
    #[arg(long)]
    pub first: u64,
    /// How many connections this worker opens.
    #[arg(long)]
    pub count: u64,
    /// Source addresses of the whole run, in order of use.
    #[arg(long, value_delimiter = ',', required = true)]
    pub source_ips: Vec<String>,
    /// Consecutive connection indexes per source address.
    #[arg(long)]
    pub per_source: u64,
    /// This worker's part of the total connect-rate cap, in connections per second.
    #[arg(long)]
    pub connect_rate: f64,
    /// User id prefix; connection `i` is user `{prefix}{i}`.
    #[arg(long)]
    pub user_prefix: String,
    /// Seconds after start past which no new connection is attempted.
    #[arg(long)]
    pub deadline_s: f64,
    /// Threads opening connections.
    #[arg(long, default_value_t = DEFAULT_CONNECT_THREADS)]
    pub threads: usize,
    /// Subscribe every connection to this channel (or, with `--room-size`, to its room of it).
    #[arg(long)]
    pub channel: Option<String>,
    /// Connections per room: connection `i` joins `{channel}-{i / room_size}`. 0: one channel for all.
    #[arg(long, default_value_t = 0)]
    pub room_size: u64,
    /// Connections in the whole run (for the size of the last room).
    #[arg(long, default_value_t = 0)]
    pub total: u64,
    /// Messages this worker publishes to its rooms after `start` (chat).
    #[arg(long, default_value_t = 0)]
    pub publish_count: u64,
    /// This worker's publish rate, messages per second.
    #[arg(long, default_value_t = 0.0)]
    pub publish_rate: f64,
    /// The protocol the connections speak (how they subscribe).
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: ws::Protocol,
}

/// Why one connection could not be opened.
#[derive(Debug)]
enum OpenError {
    /// Creating or configuring the socket failed (usually: out of file descriptors).
    Socket(io::Error),
    /// Binding to the source address failed (usually: ephemeral ports exhausted).
    Bind(Ipv4Addr, io::Error),
    /// The TCP connect failed or timed out.
    Connect(io::Error),
    /// Connected, but the upgrade failed.
    Handshake(HandshakeError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Socket(e) => write!(f, "socket: {e}"),
            OpenError::Bind(ip, e) => write!(f, "bind {ip}: {e}"),
            OpenError::Connect(e) => write!(f, "connect: {e}"),
            OpenError::Handshake(e) => write!(f, "{e}"),
        }
    }
}

/// What every connector thread shares.
struct ConnectJob {
    /// The server.
    target: WsTarget,
    /// Which source address each index uses.
    sources: SourceSpread,
    /// First global index of this worker.
    first: u64,
    /// Connections this worker opens.
    count: u64,
    /// User id prefix.
    user_prefix: String,
    /// Seconds between two scheduled connects (the inverse of the worker's rate).
    interval_s: f64,
    /// When connecting started; connect `k` is scheduled at `start + k * interval_s`.
    start: Instant,
    /// No connect starts after this.
    deadline: Instant,
    /// Next position `k` to take; shared so threads pace as one.
    next: AtomicU64,
    /// Upgraded connections.
    ok: AtomicU64,
    /// Failed connections, including those never attempted before the deadline.
    failed: AtomicU64,
    /// Set when the parent says quit.
    quit: Arc<AtomicBool>,
    /// Set when the parent says start.
    start_publishing: Arc<AtomicBool>,
    /// Channel subscription: the channel, the room size (0: no rooms), and the run's total.
    channel: Option<(String, u64, u64)>,
    /// Publishing after start: (count, rate).
    publish: Option<(u64, f64)>,
    /// How connections subscribe.
    protocol: ws::Protocol,
}

/// Runs a worker to the end; the exit code tells the parent nothing it did not already read.
pub fn run(args: WorkerArgs) -> io::Result<()> {
    match prepare(&args) {
        Ok(job) => run_job(job, args.threads),
        Err(msg) => {
            println!("{}", WorkerReport::Fatal(msg));
            Err(io::Error::other("worker could not start"))
        }
    }
}

/// Checks the arguments and the open-files limit, before any socket is opened.
fn prepare(args: &WorkerArgs) -> Result<ConnectJob, String> {
    let target = WsTarget::parse(&args.url).map_err(|e| e.to_string())?;
    let addrs = args
        .source_ips
        .iter()
        .map(|s| target::parse_source_ip(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let files = limits::raise_nofile_soft_limit()
        .map_err(|e| format!("cannot raise RLIMIT_NOFILE: {e}"))?;
    if args.count + FD_RESERVE > files {
        return Err(format!(
            "{} connections need more than the {files} open files this process may hold",
            args.count
        ));
    }
    if args.connect_rate <= 0.0 || args.per_source == 0 {
        return Err("connect rate and per-source count must be positive".into());
    }
    if args.publish_count > 0 && (args.publish_rate <= 0.0 || args.channel.is_none()) {
        return Err("publishing needs --channel and a positive --publish-rate".into());
    }
    let start = Instant::now();
    Ok(ConnectJob {
        target,
        sources: SourceSpread {
            addrs,
            per_addr: args.per_source,
        },
        first: args.first,
        count: args.count,
        user_prefix: args.user_prefix.clone(),
        interval_s: 1.0 / args.connect_rate,
        start,
        deadline: start + Duration::from_secs_f64(args.deadline_s.max(0.0)),
        next: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        quit: Arc::new(AtomicBool::new(false)),
        start_publishing: Arc::new(AtomicBool::new(false)),
        channel: args
            .channel
            .clone()
            .map(|c| (c, args.room_size, args.total.max(args.first + args.count))),
        publish: (args.publish_count > 0).then_some((args.publish_count, args.publish_rate)),
        protocol: args.protocol,
    })
}

fn run_job(job: ConnectJob, threads: usize) -> io::Result<()> {
    let job = Arc::new(job);
    let publish = job.publish.map(|(count, rate)| PublishPlan {
        rate,
        count,
        start: Arc::clone(&job.start_publishing),
    });
    let holder = Holder::spawn(Arc::clone(&job.quit), publish)?;
    let quit_signal = watch_stdin(Arc::clone(&job.quit), Arc::clone(&job.start_publishing));
    let error_samples = Arc::new(AtomicU64::new(0));

    let connectors: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let job = Arc::clone(&job);
            let to_holder = holder.sender();
            let samples = Arc::clone(&error_samples);
            thread::Builder::new()
                .name(format!("connect-{t}"))
                .spawn(move || connect_loop(&job, &to_holder, &samples, t as u64))
        })
        .collect::<io::Result<_>>()?;

    while connectors.iter().any(|c| !c.is_finished()) {
        thread::sleep(PROGRESS_INTERVAL);
        report(&WorkerReport::Progress {
            ok: job.ok.load(Ordering::Relaxed),
            failed: job.failed.load(Ordering::Relaxed),
        });
    }
    for connector in connectors {
        // A connector that panicked has already counted what it did.
        let _ = connector.join();
    }
    let (ok, failed) = (
        job.ok.load(Ordering::Relaxed),
        job.failed.load(Ordering::Relaxed),
    );
    report(&WorkerReport::Ready { ok, failed });

    // Hold until told to quit, telling the parent whenever a counter moved.
    let mut last = (0, 0, 0);
    let mut report_changes = |holder: &Holder| {
        let counters = holder.counters();
        let now = (
            counters.dropped.load(Ordering::Relaxed),
            counters.delivered.load(Ordering::Relaxed),
            counters.published.load(Ordering::Relaxed),
        );
        if now.0 != last.0 {
            report(&WorkerReport::Dropped(now.0));
        }
        if now.1 != last.1 {
            report(&WorkerReport::Delivered(now.1));
        }
        if now.2 != last.2 {
            report(&WorkerReport::Published {
                total: now.2,
                expected: counters.expected.load(Ordering::Relaxed),
            });
        }
        last = now;
    };
    while let Err(RecvTimeoutError::Timeout) = quit_signal.recv_timeout(DROP_CHECK_INTERVAL) {
        report_changes(&holder);
    }
    job.quit.store(true, Ordering::Relaxed);
    let dropped = holder.dropped();
    let counters = (
        holder.counters().delivered.load(Ordering::Relaxed),
        holder.counters().published.load(Ordering::Relaxed),
        holder.counters().expected.load(Ordering::Relaxed),
    );
    let latency = holder.join();
    report(&WorkerReport::Delivered(counters.0));
    if counters.1 > 0 {
        report(&WorkerReport::Published {
            total: counters.1,
            expected: counters.2,
        });
    }
    for bucket in latency.iter_recorded() {
        report(&WorkerReport::Hist {
            us: latency.highest_equivalent(bucket.value_iterated_to()),
            count: bucket.count_at_value(),
        });
    }
    report(&WorkerReport::Done {
        ok,
        failed,
        dropped,
    });
    // The holder thread's end dropped (closed) every held socket; the server sees them all go at once.
    Ok(())
}

/// Prints one report line; stdout is line-buffered, so the parent sees it at once.
fn report(line: &WorkerReport) {
    let mut out = io::stdout().lock();
    // If the parent is gone, nobody is listening and stdin will close too; nothing to do here.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Watches stdin for `quit` or its end, which set `quit` and signal the returned channel, and for
/// `start`, which sets `start`.
fn watch_stdin(quit: Arc<AtomicBool>, start: Arc<AtomicBool>) -> mpsc::Receiver<()> {
    let (signal, receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            match line {
                Ok(line) if line.trim() == QUIT_COMMAND => break,
                Ok(line) if line.trim() == START_COMMAND => start.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        quit.store(true, Ordering::Relaxed);
        let _ = signal.send(());
    });
    receiver
}

/// One connector thread: take the next position, wait for its slot in the schedule, open it.
fn connect_loop(job: &ConnectJob, to_holder: &Sender<Upgraded>, samples: &AtomicU64, salt: u64) {
    let mut keys = KeyGen::new(salt);
    loop {
        let k = job.next.fetch_add(1, Ordering::Relaxed);
        if k >= job.count {
            return;
        }
        let due = job.start + Duration::from_secs_f64(k as f64 * job.interval_s);
        if due > job.deadline || job.quit.load(Ordering::Relaxed) {
            // Everything from here on is never attempted; count it once and let the others stop.
            let remaining = job.count - job.next.swap(job.count, Ordering::Relaxed).min(job.count);
            job.failed.fetch_add(remaining + 1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let index = job.first + k;
        match open_connection(job, index, &mut keys) {
            Ok(upgraded) => {
                job.ok.fetch_add(1, Ordering::Relaxed);
                // The holder only stops when quitting, at which point the socket may just close.
                let _ = to_holder.send(upgraded);
            }
            Err(e) => {
                job.failed.fetch_add(1, Ordering::Relaxed);
                if samples.fetch_add(1, Ordering::Relaxed) < ERROR_SAMPLES_PER_WORKER {
                    report(&WorkerReport::Error(format!("connection {index}: {e}")));
                }
            }
        }
    }
}

/// Opens connection `index`: bind to its source address, connect, upgrade as its user, subscribe if
/// the run has a channel, and leave the socket non-blocking for the holder.
fn open_connection(job: &ConnectJob, index: u64, keys: &mut KeyGen) -> Result<Upgraded, OpenError> {
    let source = job.sources.for_index(index);
    let socket =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(OpenError::Socket)?;
    defer_port_choice(&socket);
    socket
        .bind(&SocketAddrV4::new(source, 0).into())
        .map_err(|e| OpenError::Bind(source, e))?;
    socket
        .connect_timeout(&job.target.addr.into(), CONNECT_TIMEOUT)
        .map_err(OpenError::Connect)?;
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(OpenError::Socket)?;
    let user = format!("{}{}", job.user_prefix, index);
    let path = job.target.path_for_user(&user);
    if job.protocol == ws::Protocol::Sse {
        return open_event_stream(job, stream, &path, index);
    }
    let mut pending = ws::client_handshake(
        &mut stream,
        &job.target.host_header,
        &path,
        &keys.websocket_key(),
    )
    .map_err(OpenError::Handshake)?;
    let room = match &job.channel {
        Some((channel, room_size, total)) => {
            let (name, members) = plan::room_of(channel, index, *room_size, *total);
            ws::subscribe_and_wait(&mut stream, &name, &mut pending, keys, job.protocol)
                .map_err(OpenError::Handshake)?;
            Some((name, members.saturating_sub(1)))
        }
        None => None,
    };
    stream.set_nonblocking(true).map_err(OpenError::Socket)?;
    Ok(Upgraded {
        stream,
        pending,
        room,
        sse: false,
    })
}

/// The Server-Sent Events form of [`open_connection`]: the stream's request (its room as `channels=`)
/// and its `200` answer instead of an upgrade and a subscribe.
fn open_event_stream(
    job: &ConnectJob,
    mut stream: TcpStream,
    path: &str,
    index: u64,
) -> Result<Upgraded, OpenError> {
    let path = match &job.channel {
        Some((channel, room_size, total)) => {
            format!(
                "{path}&channels={}",
                plan::room_of(channel, index, *room_size, *total).0
            )
        }
        None => path.to_string(),
    };
    let pending = ws::open_event_stream(&mut stream, &job.target.host_header, &path)
        .map_err(OpenError::Handshake)?;
    stream.set_nonblocking(true).map_err(OpenError::Socket)?;
    Ok(Upgraded {
        stream,
        pending,
        room: None,
        sse: true,
    })
}

/// Asks the kernel to choose the source port at connect time rather than at bind time
/// (`IP_BIND_ADDRESS_NO_PORT`). Then a port only has to be unique per destination, and ports still
/// in TIME_WAIT from the previous run can be reused, so back-to-back runs do not run out of ports.
fn defer_port_choice(socket: &Socket) {
    let on: libc::c_int = 1;
    // SAFETY: the fd is open (owned by `socket`) and `on` is a c_int of the size passed.
    // Failure only loses the optimisation (kernels before 4.2), so the result is ignored.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
