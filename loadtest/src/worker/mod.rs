//! A worker process: opens its share of the connections, holds them, and reports on stdout.
//!
//! The parent re-executes its own binary as `loadtest worker ...` once per share, because one process
//! may hold at most 20,000 open files. A worker:
//! 1. raises its soft open-files limit to the hard limit;
//! 2. opens connections `first..first+count` from a few threads, at its part of the total connect-rate
//!    cap, each bound to its planned loopback source address and upgraded as user `{prefix}{index}`;
//! 3. hands each upgraded socket to the [`holder`] thread, which answers pings and counts closes;
//! 4. prints `ready <ok> <failed>`, then holds until its stdin says `quit` or closes, and exits
//!    (closing every socket at once).
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
use crate::plan::SourceSpread;
use crate::target::{self, WsTarget};
use crate::ws::{self, HandshakeError, KeyGen};
use holder::Holder;
use report::{WorkerReport, QUIT_COMMAND};

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

/// How often a holding worker checks whether the server dropped connections.
const DROP_CHECK_INTERVAL: Duration = Duration::from_millis(500);

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
    })
}

fn run_job(job: ConnectJob, threads: usize) -> io::Result<()> {
    let job = Arc::new(job);
    let holder = Holder::spawn(Arc::clone(&job.quit))?;
    let quit_signal = watch_stdin(Arc::clone(&job.quit));
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

    // Hold until told to quit, telling the parent whenever the server drops connections.
    let mut reported_drops = 0;
    while let Err(RecvTimeoutError::Timeout) = quit_signal.recv_timeout(DROP_CHECK_INTERVAL) {
        let dropped = holder.dropped();
        if dropped != reported_drops {
            reported_drops = dropped;
            report(&WorkerReport::Dropped(dropped));
        }
    }
    job.quit.store(true, Ordering::Relaxed);
    let dropped = holder.dropped();
    holder.join();
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

/// Watches stdin for `quit` or its end; sets `quit` and signals the returned channel either way.
fn watch_stdin(quit: Arc<AtomicBool>) -> mpsc::Receiver<()> {
    let (signal, receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            match line {
                Ok(line) if line.trim() == QUIT_COMMAND => break,
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
fn connect_loop(job: &ConnectJob, to_holder: &Sender<TcpStream>, samples: &AtomicU64, salt: u64) {
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
            Ok(stream) => {
                job.ok.fetch_add(1, Ordering::Relaxed);
                // The holder only stops when quitting, at which point the socket may just close.
                let _ = to_holder.send(stream);
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

/// Opens connection `index`: bind to its source address, connect, upgrade as its user, and leave the
/// socket non-blocking for the holder.
fn open_connection(
    job: &ConnectJob,
    index: u64,
    keys: &mut KeyGen,
) -> Result<TcpStream, OpenError> {
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
    ws::client_handshake(
        &mut stream,
        &job.target.host_header,
        &path,
        &keys.websocket_key(),
    )
    .map_err(OpenError::Handshake)?;
    stream.set_nonblocking(true).map_err(OpenError::Socket)?;
    Ok(stream)
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
