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

use crate::audit::Audit;
use crate::auth::Auth;
use crate::bus::redis_bus::{self, BusCmd, RedisBus, RedisBusConfig};
use crate::bus::Fanout;
use crate::config::Config;
use crate::connection;
use crate::delivery::inbox::inbox;
use crate::metrics::Metrics;
use crate::preferences::{Preferences, Registry};
use crate::shard::{spawn_shard, ShardSetup};
use crate::store::{OpenError, Store, StoreConfig, StoreUrl};

/// Accept backlog per listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;
/// How long start-up waits for every shard's executor to run.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server did not start (or stopped abnormally), with what was being done and its cause. The
/// `Display` is the one line `main` logs before exiting 1, cause included; `source()` is the cause.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listening socket could not be made.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The system's error.
        #[source]
        cause: std::io::Error,
    },
    /// Another process already listens on the port (see [`listening_port_owner`]).
    #[error(
        "cannot listen on {addr}: Address already in use (port {} is already served by {owner}; \
         SO_REUSEPORT would split the connections between both)",
        addr.port()
    )]
    PortTaken {
        /// Our address.
        addr: SocketAddr,
        /// `pid N (name)` of the holder, or `another process`.
        owner: String,
    },
    /// A setting that only fails once used (`DATABASE_URL`, the Redis target).
    #[error("{0}")]
    Setting(String),
    /// The store could not be opened.
    #[error("cannot open the store {url}: {cause}")]
    Store {
        /// `DATABASE_URL` as logged (without a password).
        url: String,
        /// Why.
        #[source]
        cause: crate::store::OpenError,
    },
    /// The Redis bus thread could not start.
    #[error("{0}")]
    Bus(String),
    /// A shard could not be spawned.
    #[error("{0}")]
    Shard(String),
    /// A shard's executor did not report running in time.
    #[error(
        "a shard failed to start (is io_uring available? Docker's default seccomp profile \
         blocks it: see tuning.md)"
    )]
    ShardStart,
    /// The signal handlers or their thread could not be installed.
    #[error("cannot {what}: {cause}")]
    Signals {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        cause: std::io::Error,
    },
    /// The audit log's file could not be opened, or its thread started.
    #[error("{0}")]
    Audit(std::io::Error),
    /// A shard ended abnormally; the server shut down after it.
    #[error("stopped after a shard failed")]
    ShardFailed,
}

/// How often start-up binds again when `PORT=0` landed on a port someone else already listens on.
const PORT_ZERO_ATTEMPTS: usize = 5;

/// Binds one `SO_REUSEPORT` listener per shard on the same address, and makes sure no other process
/// listens on that port (see [`listening_port_owner`]). With port 0 the first bind picks the port and
/// the others join it.
fn bind_listeners(
    config: &Config,
    count: usize,
) -> Result<(Vec<OwnedFd>, SocketAddr), StartupError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (fds, addr) = bind_group(config, count)?;
        let inodes: Vec<u64> = fds.iter().filter_map(socket_inode).collect();
        let Some(owner) = listening_port_owner(addr, &inodes) else {
            return Ok((fds, addr));
        };
        // With PORT=0 the port is the kernel's choice, not the operator's: choose again.
        if config.port == 0 && attempt < PORT_ZERO_ATTEMPTS {
            continue;
        }
        return Err(StartupError::PortTaken { addr, owner });
    }
}

/// Binds and listens on `count` `SO_REUSEPORT` sockets on the configured address.
fn bind_group(config: &Config, count: usize) -> Result<(Vec<OwnedFd>, SocketAddr), StartupError> {
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
            .map_err(|cause| StartupError::Listen { addr, cause })?;
        if let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            addr = bound;
        }
        fds.push(OwnedFd::from(socket));
    }
    Ok((fds, addr))
}

/// The inode of a socket, as `/proc/net/tcp` and `/proc/<pid>/fd` name it.
fn socket_inode(fd: &OwnedFd) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed stat is a valid out-parameter; fstat fills it for an open descriptor.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } == 0).then_some(stat.st_ino)
}

/// Who else listens on `addr`'s port, if anyone: a listening TCP socket in `/proc/net/tcp` or
/// `/proc/net/tcp6` on the same port, on an address that overlaps ours (the same, or a wildcard on
/// either side), whose inode is not one of `ours`. Described as `pid N (name)` when a process of ours
/// to read holds it, else as `another process`.
///
/// Why look after binding rather than bind a probe socket without `SO_REUSEPORT` first: `SO_REUSEPORT`
/// lets any process of the same user join a port, which is exactly how a second `notification-service`
/// started silently and took half the connections. A probe would have to be closed before our
/// `SO_REUSEPORT` sockets can bind (the kernel lets a port be shared only by sockets that all set the
/// option), so two servers starting together could both probe a free port and then both bind it: the
/// sharing this check exists to prevent. Checking after our own `listen` has no such gap: of two
/// servers racing, the one that listens second always sees the first (still listening) when it looks,
/// so at least one refuses, and possibly both do, which is acceptable; they never go on sharing. The
/// loser may take a few connections in the instant before it exits; the kernel resets those.
fn listening_port_owner(addr: SocketAddr, ours: &[u64]) -> Option<String> {
    /// `st` of a listening socket in `/proc/net/tcp`.
    const TCP_LISTEN: &str = "0A";
    let mut foreign = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // A kernel without IPv6 has no tcp6 table; an unreadable table hides nothing we could act on.
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let Ok(inode) = inode.parse::<u64>() else {
                continue;
            };
            if *state != TCP_LISTEN || inode == 0 || ours.contains(&inode) {
                continue;
            }
            let Some(theirs) = parse_proc_net_addr(local) else {
                continue;
            };
            if theirs.port() == addr.port() && addresses_overlap(theirs.ip(), addr.ip()) {
                foreign.push(inode);
            }
        }
    }
    if foreign.is_empty() {
        return None;
    }
    Some(socket_holder(&foreign).unwrap_or_else(|| "another process".to_owned()))
}

/// Whether two listening addresses on one port catch the same connections: equal, or either a
/// wildcard (an IPv6 wildcard also takes IPv4 unless the socket is v6-only, which we cannot see here,
/// so it counts).
fn addresses_overlap(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    let plain = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (plain(a), plain(b));
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// Parses a `local_address` of `/proc/net/tcp{,6}`: the address as 32-bit words printed in hex in
/// the host's byte order, a colon, the port in hex.
fn parse_proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in ip_hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `pid N (name)` of the first process found holding one of the socket `inodes`, by reading the
/// descriptors under `/proc/*/fd` (only a process we may inspect: our own user's, or any as root).
fn socket_holder(inodes: &[u64]) -> Option<String> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let own = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .is_some_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
        });
        if holds {
            // The executable's file name; `comm` (cut to 15 bytes) when the link is not readable.
            let name = std::fs::read_link(entry.path().join("exe"))
                .ok()
                .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
                .or_else(|| {
                    std::fs::read_to_string(entry.path().join("comm"))
                        .ok()
                        .map(|c| c.trim().to_owned())
                })
                .unwrap_or_else(|| "?".to_owned());
            return Some(format!("pid {pid} ({name})"));
        }
    }
    None
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

/// Fills the node's registry with every user's stored preferences, before any shard serves: the
/// delivery path reads them from memory only (see `crate::preferences`). A row that no longer reads
/// (written by a newer version, say) is logged and skipped, rather than keep the node from starting.
fn load_preferences(store: &Store, registry: &Registry) -> Result<(), OpenError> {
    let rows = wait_for(store.all_preferences()).map_err(|e| OpenError::Io {
        context: "cannot read the users' preferences".to_owned(),
        cause: std::io::Error::other(e.to_string()),
    })?;
    let count = rows.len();
    for (user, stored) in rows {
        match Preferences::from_stored(&stored.json) {
            Ok(p) => registry.set(&user, Some(Arc::new(p))),
            Err(error) => warn!(user, error, "skipped a user's unreadable preferences"),
        }
    }
    info!(users = count, "preferences loaded");
    Ok(())
}

/// Waits on this (non-shard) thread for a future, parking between polls.
fn wait_for<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully.
pub fn run(mut config: Config) -> Result<(), StartupError> {
    config.load_pusher().map_err(StartupError::Setting)?;
    if let Ok(pattern) = crate::pusher::UserChannelPattern::parse(&config.pusher_user_channel) {
        crate::delivery::set_pusher_user_channel(&pattern.prefix, &pattern.suffix);
    }
    let config = Arc::new(config);
    let shards = config.shard_count();
    let (listeners, addr) = bind_listeners(&config, shards)?;

    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards).map(|_| inbox()).unzip();
    // The Redis bus's queue exists before the store (whose commits it publishes); its thread starts
    // after the store (which it reads to catch up after an outage).
    let redis_target = config.redis_target().map_err(StartupError::Setting)?;
    let bus = redis_target.is_some().then(RedisBus::new);
    let (audit, audit_thread) =
        Audit::start(&config.audit_log, config.audit_queue).map_err(StartupError::Audit)?;
    let preferences = Arc::new(Registry::new());
    let fanout = Fanout::new(senders.clone(), bus.as_ref().map(|(b, _)| b.clone()))
        .with_audit(audit.clone())
        .with_preferences(preferences.clone());
    let metrics = Arc::new(Metrics::new(shards));

    let url =
        StoreUrl::parse(&config.database_url).map_err(|e| StartupError::Setting(e.to_string()))?;
    if matches!(url, StoreUrl::Postgres(_))
        && config.sqlite_synchronous != crate::store::SqliteSynchronous::default()
    {
        warn!("SQLITE_SYNCHRONOUS has no effect with PostgreSQL: a commit is as durable as the database makes it");
    }
    // Its Debug form hides a PostgreSQL password; the raw DATABASE_URL must never reach a log.
    let shown_url = format!("{url:?}");
    let store_config = StoreConfig {
        url,
        reader_threads: config.store_readers,
        max_batch: config.store_max_batch,
        retention: config.retention(),
        sqlite_synchronous: config.sqlite_synchronous,
        preferences: preferences.clone(),
    };
    let (store, store_threads) = Store::open(&store_config, Box::new(fanout.commit_listener()))
        .map_err(|cause| StartupError::Store {
            url: shown_url.clone(),
            cause,
        })?;

    load_preferences(&store, &preferences).map_err(|cause| StartupError::Store {
        url: shown_url.clone(),
        cause,
    })?;

    let auth = Arc::new(Auth::from_config(
        &config,
        audit,
        metrics.refusals().clone(),
    ));
    let bus_thread = match (bus, redis_target) {
        (Some((bus, queue)), Some(target)) => {
            let bus_config = RedisBusConfig {
                target,
                prefix: config.redis_prefix.clone(),
                max_replay: config.max_replay,
                node_timeout: Duration::from_millis(config.redis_node_timeout_ms),
                survey_timeout: Duration::from_millis(config.survey_timeout_ms),
            };
            let thread = redis_bus::spawn_bus_thread(
                bus_config,
                &bus,
                queue,
                senders,
                store.clone(),
                fanout.presence().clone(),
                preferences.clone(),
            )
            .map_err(StartupError::Bus)?;
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
                store: store.for_shard(index),
                fanout: fanout.clone(),
                metrics: metrics.clone(),
                auth: auth.clone(),
                cpu: if shards <= cpus.len() {
                    cpus.get(index).copied()
                } else {
                    None
                },
                ready: ready_tx.clone(),
                serve: connection::serve,
            })
            .map_err(StartupError::Shard)?,
        );
    }
    drop(ready_tx);
    for _ in 0..shards {
        if ready_rx.recv_timeout(SHARD_START_TIMEOUT).is_err() {
            store.close();
            return Err(StartupError::ShardStart);
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

    let signal_fanout = fanout.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|cause| StartupError::Signals {
        what: "install signal handlers",
        cause,
    })?;
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
        .map_err(|cause| StartupError::Signals {
            what: "start the signal thread",
            cause,
        })?;
    // Only now: whoever waits for this line (a supervisor, a test) may send SIGTERM at once, and it must
    // find the handlers installed, not the default action that kills the process.
    info!(%addr, shards, store = %shown_url, "notification-service listening");

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
    audit_thread.finish();
    if failed {
        return Err(StartupError::ShardFailed);
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn proc_net_addresses_parse_in_host_byte_order() {
        // As the kernel prints them on a little-endian machine.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_net_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_proc_net_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(
            parse_proc_net_addr("00000000:0050"),
            Some("0.0.0.0:80".parse().unwrap())
        );
        assert_eq!(parse_proc_net_addr("zz:1"), None);
        assert_eq!(parse_proc_net_addr("0100007F"), None);
    }

    #[test]
    fn wildcards_overlap_everything_and_distinct_addresses_do_not() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(addresses_overlap(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(addresses_overlap(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(addresses_overlap(ip("::"), ip("10.0.0.1")));
        assert!(addresses_overlap(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(!addresses_overlap(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(!addresses_overlap(ip("::1"), ip("127.0.0.1")));
    }

    #[test]
    fn our_own_listeners_are_not_a_conflict_and_a_second_group_is() {
        let config = Config::parse_from(["x", "--host", "127.0.0.1", "--port", "0"]);
        let (first, addr) = bind_group(&config, 2).unwrap();
        let first_inodes: Vec<u64> = first.iter().filter_map(socket_inode).collect();
        assert_eq!(first_inodes.len(), 2);
        assert_eq!(listening_port_owner(addr, &first_inodes), None);
        // A second group on the same port, as a second server would bind it: each sees the other.
        let same_port = Config::parse_from([
            "x",
            "--host",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
        ]);
        let (second, _) = bind_group(&same_port, 1).unwrap();
        let second_inodes: Vec<u64> = second.iter().filter_map(socket_inode).collect();
        assert!(listening_port_owner(addr, &second_inodes).is_some());
        assert!(listening_port_owner(addr, &first_inodes).is_some());
    }
}
