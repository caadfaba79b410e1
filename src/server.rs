//! Start-up and shutdown: binds the listeners, opens the store, starts the shards, waits for a signal,
//! and tears everything down in the order that loses nothing.
//!
//! Order matters on the way down: shards stop first (no new requests, WebSockets closed with 1001,
//! in-flight requests answered); then the last `Store` handle is dropped, which lets the store thread
//! commit whatever is still queued before it exits. Only then does the process exit 0.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info, warn};

use crate::auth::Auth;
use crate::bus::redis_bus::{self, BusCmd, RedisBus, RedisBusConfig};
use crate::bus::Fanout;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shard::inbox::inbox;
use crate::shard::{spawn_shard, ShardSetup};
use crate::store::{Store, StoreConfig, StoreUrl};

/// Accept backlog per listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// How long start-up waits for every shard's executor to run.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Reader threads of the store (history, replay, health).
const STORE_READER_THREADS: usize = 2;
/// Most write operations the store thread commits in one transaction.
const STORE_MAX_BATCH: usize = 4096;

/// A start-up failure, with what was being done.
#[derive(Debug)]
pub struct StartupError(pub String);

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartupError {}

/// Binds one `SO_REUSEPORT` listener per shard on the same address. With port 0 the first bind picks the
/// port and the others join it.
fn bind_listeners(
    config: &Config,
    count: usize,
) -> Result<(Vec<OwnedFd>, SocketAddr), StartupError> {
    let mut addr = SocketAddr::new(config.host, config.port);
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|s| {
                s.set_reuse_address(true)?;
                s.set_reuse_port(true)?;
                s.bind(&addr.into())?;
                s.listen(LISTEN_BACKLOG)?;
                Ok(s)
            })
            .map_err(|e| StartupError(format!("cannot listen on {addr}: {e}")))?;
        if let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            addr = bound;
        }
        fds.push(OwnedFd::from(socket));
    }
    Ok((fds, addr))
}

/// The CPUs this process may run on (its affinity mask, which `taskset`, cgroups' cpusets and
/// container runtimes set), in order. Shards are pinned to these, not to 0..n.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it for this process.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    if !ok {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully.
pub fn run(config: Config) -> Result<(), StartupError> {
    let config = Arc::new(config);
    let shards = config.shard_count();
    let (listeners, addr) = bind_listeners(&config, shards)?;

    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| inbox()).unzip();
    // The Redis bus's queue exists before the store (whose commits it publishes); its thread starts
    // after the store (which it reads to catch up after an outage).
    let redis_target = config.redis_target().map_err(StartupError)?;
    let bus = redis_target.is_some().then(RedisBus::new);
    let fanout = Fanout::new(senders.clone(), bus.as_ref().map(|(b, _)| b.clone()));
    let metrics = Arc::new(Metrics::new(shards));

    let url = StoreUrl::parse(&config.database_url).map_err(StartupError)?;
    if matches!(url, StoreUrl::Postgres(_))
        && config.sqlite_synchronous != crate::store::SqliteSynchronous::default()
    {
        warn!("SQLITE_SYNCHRONOUS has no effect with PostgreSQL: a commit is as durable as the database makes it");
    }
    // Its Debug form hides a PostgreSQL password; the raw DATABASE_URL must never reach a log.
    let shown_url = format!("{url:?}");
    let store_config = StoreConfig {
        url,
        reader_threads: STORE_READER_THREADS,
        max_batch: STORE_MAX_BATCH,
        retention: config.retention(),
        sqlite_synchronous: config.sqlite_synchronous,
    };
    let (store, store_threads) = Store::open(&store_config, Box::new(fanout.clone()))
        .map_err(|e| StartupError(format!("cannot open the store {shown_url}: {e}")))?;

    let auth = Arc::new(Auth::from_config(&config));
    let bus_thread = match (bus, redis_target) {
        (Some((bus, queue)), Some(target)) => {
            let bus_config = RedisBusConfig {
                target,
                prefix: config.redis_prefix.clone(),
                max_replay: config.max_replay,
            };
            let thread =
                redis_bus::spawn_bus_thread(bus_config, &bus, queue, senders, store.clone())
                    .map_err(StartupError)?;
            Some((bus, thread))
        }
        _ => None,
    };

    let cpus = allowed_cpus();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(shards);
    for (index, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        threads.push(
            spawn_shard(ShardSetup {
                index,
                listener,
                inbox,
                config: config.clone(),
                store: store.clone(),
                fanout: fanout.clone(),
                metrics: metrics.clone(),
                auth: auth.clone(),
                cpu: if shards <= cpus.len() {
                    cpus.get(index).copied()
                } else {
                    None
                },
                ready: ready_tx.clone(),
            })
            .map_err(StartupError)?,
        );
    }
    drop(ready_tx);
    for _ in 0..shards {
        if ready_rx.recv_timeout(SHARD_START_TIMEOUT).is_err() {
            store.close();
            return Err(StartupError(
                "a shard failed to start (is io_uring available? Docker's default seccomp profile \
                 blocks it: see tuning.md)"
                    .to_owned(),
            ));
        }
    }

    match (config.api_key.is_some(), config.jwt_secret.is_some()) {
        (false, false) => warn!(
            "running open: neither API_KEY nor JWT_SECRET is set, so anyone can send, read any \
             inbox and connect as any user (fine for development only)"
        ),
        (true, false) => {
            warn!("JWT_SECRET is not set: WebSockets are open, anyone can connect as any user_id")
        }
        (false, true) => {
            warn!("API_KEY is not set: the HTTP API is open, anyone can send and read any inbox")
        }
        (true, true) => {}
    }
    if config.rate_limit_api > 0 && config.api_key.is_none() {
        warn!("RATE_LIMIT_API is set without API_KEY: it limits per key, so it has no effect");
    }
    info!(%addr, shards, store = %shown_url, "notification-service listening");

    let signal_fanout = fanout.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| StartupError(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut count = 0;
            for signal in signals.forever() {
                count += 1;
                if count == 1 {
                    info!(signal, "shutting down gracefully");
                    signal_fanout.shutdown_all_shards();
                } else {
                    warn!(signal, "second signal: exiting now");
                    std::process::exit(1);
                }
            }
        })
        .map_err(|e| StartupError(format!("cannot start the signal thread: {e}")))?;

    let mut failed = false;
    for thread in threads {
        if let Err(e) = thread.join() {
            error!(error = %e, "a shard ended abnormally");
            failed = true;
        }
    }
    drop(fanout);
    // The store thread commits everything queued, then exits, whether or not every handle is gone.
    store.close();
    store_threads.join();
    // After the store: its last commits were handed to the bus to publish.
    if let Some((bus, thread)) = bus_thread {
        bus.send_to_bus(BusCmd::Stop);
        let _ = thread.join();
    }
    if failed {
        return Err(StartupError("stopped after a shard failed".to_owned()));
    }
    info!("stopped");
    Ok(())
}
