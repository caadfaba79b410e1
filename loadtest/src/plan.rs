//! How a run's connections are divided over worker processes and client source addresses.
//!
//! Two limits of the machine shape this. A process may hold at most 20,000 open files (a hard limit
//! nobody can raise), so connections are spread over worker processes. And one (source address,
//! destination address, destination port) tuple has only the kernel's ephemeral port range to tell its
//! connections apart (about 28,000 ports by default), so past that the client sockets are bound to
//! further loopback source addresses, `127.0.0.2`, `127.0.0.3`, ... .
//!
//! Connection `i` (a global index from 0) belongs to exactly one worker and one source address, and is
//! user `{prefix}{i}`; both are pure functions of `i`, so the parent and its workers agree without
//! talking.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;

/// Connections given to one source address when the user names none. Well inside the default
/// ephemeral port range (32768-60999, 28,232 ports), leaving room for ports still in TIME_WAIT.
pub const DEFAULT_CONNECTIONS_PER_SOURCE: u64 = 20_000;

/// First default source address. `127.0.0.1` is left to the server and to everything else on the box,
/// so a loadtest run never competes with them for ephemeral ports.
pub const FIRST_DEFAULT_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The contiguous range of connection indexes that one worker process opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerShare {
    /// Global index of the worker's first connection (it is also the first user id's number).
    pub first: u64,
    /// How many connections the worker opens.
    pub count: u64,
}

impl WorkerShare {
    /// The global indexes this worker owns.
    pub fn indexes(&self) -> Range<u64> {
        self.first..self.first + self.count
    }
}

/// Source addresses and how many consecutive connection indexes go to each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpread {
    /// Loopback addresses client sockets are bound to, in order of use.
    pub addrs: Vec<Ipv4Addr>,
    /// Connections `[k * per_addr, (k + 1) * per_addr)` use `addrs[k]`.
    pub per_addr: u64,
}

impl SourceSpread {
    /// Spreads `total` connections evenly over `addrs`, in consecutive blocks.
    pub fn even(total: u64, addrs: Vec<Ipv4Addr>) -> SourceSpread {
        let per_addr = total.div_ceil(addrs.len().max(1) as u64).max(1);
        SourceSpread { addrs, per_addr }
    }

    /// The default: `127.0.0.2` onwards, one address per [`DEFAULT_CONNECTIONS_PER_SOURCE`].
    pub fn default_for(total: u64) -> SourceSpread {
        let needed = total.div_ceil(DEFAULT_CONNECTIONS_PER_SOURCE).max(1);
        let first = u32::from(FIRST_DEFAULT_SOURCE);
        let addrs = (0..needed as u32)
            .map(|k| Ipv4Addr::from(first + k))
            .collect();
        SourceSpread {
            addrs,
            per_addr: DEFAULT_CONNECTIONS_PER_SOURCE,
        }
    }

    /// The source address of connection `index`.
    pub fn for_index(&self, index: u64) -> Ipv4Addr {
        let k = (index / self.per_addr) as usize;
        // Indexes past the plan never occur; clamping keeps this total rather than panicking.
        self.addrs[k.min(self.addrs.len() - 1)]
    }

    /// The addresses as one comma-separated argument, for a worker's command line.
    pub fn addrs_arg(&self) -> String {
        let texts: Vec<String> = self.addrs.iter().map(Ipv4Addr::to_string).collect();
        texts.join(",")
    }
}

/// Why a run cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// More connections per source address than the ephemeral port range can tell apart.
    TooManyPerSource {
        /// Connections the spread would give each address.
        per_addr: u64,
        /// Ports in the ephemeral range.
        ports: u64,
    },
    /// No source addresses were named.
    NoSources,
    /// A source address would be past `127.255.255.255`.
    OutOfLoopback,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::TooManyPerSource { per_addr, ports } => write!(
                f,
                "{per_addr} connections per source address, but the ephemeral port range has only {ports} ports: \
                 name more --source-ips"
            ),
            PlanError::NoSources => write!(f, "--source-ips names no address"),
            PlanError::OutOfLoopback => {
                write!(f, "too many connections: default source addresses would leave 127.0.0.0/8")
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// Checks that a spread fits the ephemeral port range and stays in loopback.
pub fn check_spread(spread: &SourceSpread, total: u64, ports: u64) -> Result<(), PlanError> {
    if spread.addrs.is_empty() {
        return Err(PlanError::NoSources);
    }
    if spread.addrs.iter().any(|ip| !ip.is_loopback()) {
        return Err(PlanError::OutOfLoopback);
    }
    let busiest = spread.per_addr.min(total);
    if busiest > ports {
        return Err(PlanError::TooManyPerSource {
            per_addr: busiest,
            ports,
        });
    }
    Ok(())
}

/// Splits `total` connections over as few workers as hold at most `per_process` each, with shares that
/// differ by at most one, so every worker finishes connecting at about the same time.
pub fn split_over_workers(total: u64, per_process: u64) -> Vec<WorkerShare> {
    split_range_over_workers(0..total, per_process)
}

/// [`split_over_workers`] for the connections `indexes` only: the workers a run starts when it adds
/// connections to those it already holds (`loadtest flat` raising its idle level).
pub fn split_range_over_workers(indexes: Range<u64>, per_process: u64) -> Vec<WorkerShare> {
    let total = indexes.end.saturating_sub(indexes.start);
    let per_process = per_process.max(1);
    let workers = total.div_ceil(per_process);
    let mut shares = Vec::with_capacity(workers as usize);
    let mut first = indexes.start;
    for w in 0..workers {
        let count = total / workers + u64::from(w < total % workers);
        shares.push(WorkerShare { first, count });
        first += count;
    }
    shares
}

/// The part of a total connection rate that a worker with `share` of `total` connections may use, so
/// the sum over workers stays at the cap and they all finish together.
pub fn worker_rate(total_rate: f64, share: u64, total: u64) -> f64 {
    if total == 0 {
        return total_rate;
    }
    total_rate * share as f64 / total as f64
}

/// The channel connection `index` subscribes to, and how many connections share it. With `room_size`
/// 0 every connection shares `channel`; otherwise connections are grouped in consecutive rooms of
/// `room_size`, `{channel}-0`, `{channel}-1`, ... (the last one smaller if `total` is not a multiple).
pub fn room_of(channel: &str, index: u64, room_size: u64, total: u64) -> (String, u64) {
    if room_size == 0 {
        return (channel.to_string(), total);
    }
    let room = index / room_size;
    let first = room * room_size;
    let members = room_size.min(total.saturating_sub(first)).max(1);
    (format!("{channel}-{room}"), members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, d)
    }

    #[test]
    fn twenty_thousand_at_eight_thousand_per_process_makes_three_balanced_workers() {
        let shares = split_over_workers(20_000, 8_000);
        assert_eq!(
            shares,
            vec![
                WorkerShare {
                    first: 0,
                    count: 6_667
                },
                WorkerShare {
                    first: 6_667,
                    count: 6_667
                },
                WorkerShare {
                    first: 13_334,
                    count: 6_666
                },
            ]
        );
    }

    #[test]
    fn an_exact_multiple_fills_each_worker() {
        let shares = split_over_workers(18_000, 9_000);
        assert_eq!(shares.len(), 2);
        assert!(shares.iter().all(|s| s.count == 9_000));
    }

    #[test]
    fn worker_shares_cover_every_index_once() {
        for (total, per) in [(1, 9_000), (9_001, 9_000), (50_000, 7_000), (5, 1)] {
            let shares = split_over_workers(total, per);
            let mut next = 0;
            for s in &shares {
                assert_eq!(s.first, next);
                assert!(s.count <= per && s.count > 0);
                next = s.indexes().end;
            }
            assert_eq!(next, total);
        }
        assert!(split_over_workers(0, 9_000).is_empty());
    }

    #[test]
    fn a_range_is_split_like_a_run_starting_at_its_first_index() {
        let shares = split_range_over_workers(5_000..23_000, 9_000);
        assert_eq!(
            shares,
            vec![
                WorkerShare {
                    first: 5_000,
                    count: 9_000
                },
                WorkerShare {
                    first: 14_000,
                    count: 9_000
                },
            ]
        );
        assert!(split_range_over_workers(7..7, 9_000).is_empty());
    }

    #[test]
    fn default_sources_start_at_127_0_0_2_one_per_twenty_thousand() {
        assert_eq!(SourceSpread::default_for(18_000).addrs, vec![ip(2)]);
        assert_eq!(SourceSpread::default_for(20_000).addrs, vec![ip(2)]);
        let spread = SourceSpread::default_for(45_000);
        assert_eq!(spread.addrs, vec![ip(2), ip(3), ip(4)]);
        assert_eq!(spread.for_index(19_999), ip(2));
        assert_eq!(spread.for_index(20_000), ip(3));
        assert_eq!(spread.for_index(44_999), ip(4));
    }

    #[test]
    fn named_sources_share_the_connections_evenly() {
        let spread = SourceSpread::even(20_000, vec![ip(2), ip(3)]);
        assert_eq!(spread.per_addr, 10_000);
        assert_eq!(spread.for_index(0), ip(2));
        assert_eq!(spread.for_index(9_999), ip(2));
        assert_eq!(spread.for_index(10_000), ip(3));
        assert_eq!(spread.for_index(19_999), ip(3));
        assert_eq!(spread.addrs_arg(), "127.0.0.2,127.0.0.3");
    }

    #[test]
    fn a_spread_must_fit_the_port_range() {
        let one = SourceSpread::even(30_000, vec![ip(2)]);
        assert_eq!(
            check_spread(&one, 30_000, 28_232),
            Err(PlanError::TooManyPerSource {
                per_addr: 30_000,
                ports: 28_232
            })
        );
        let two = SourceSpread::even(30_000, vec![ip(2), ip(3)]);
        assert_eq!(check_spread(&two, 30_000, 28_232), Ok(()));
        // The default block size is larger than a small run; only the real count matters.
        assert_eq!(
            check_spread(&SourceSpread::default_for(100), 100, 1_000),
            Ok(())
        );
    }

    #[test]
    fn rooms_group_consecutive_connections_and_the_last_may_be_smaller() {
        assert_eq!(room_of("lt", 7, 0, 100), ("lt".to_string(), 100));
        assert_eq!(room_of("lt", 0, 10, 25), ("lt-0".to_string(), 10));
        assert_eq!(room_of("lt", 19, 10, 25), ("lt-1".to_string(), 10));
        assert_eq!(room_of("lt", 24, 10, 25), ("lt-2".to_string(), 5));
    }

    #[test]
    fn worker_rates_add_up_to_the_cap() {
        let shares = split_over_workers(20_000, 8_000);
        let sum: f64 = shares
            .iter()
            .map(|s| worker_rate(5_000.0, s.count, 20_000))
            .sum();
        assert!((sum - 5_000.0).abs() < 1e-6);
    }
}
