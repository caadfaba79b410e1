//! Watching the server from outside, through `/proc`: which processes it is, how much memory they hold,
//! and how much CPU they burn.
//!
//! Memory is `VmRSS` from `/proc/<pid>/status`: what the connections really cost in pages touched, the
//! figure the ~1 KiB-per-connection budget is stated in. CPU is `utime + stime` from `/proc/<pid>/stat`,
//! in clock ticks, sampled at both ends of a period; or the same time in nanoseconds from the process's
//! CPU-time clock, for periods short enough that a 10 ms tick would be a visible error.
//!
//! When no pid is given, the server is found by its listening port: `/proc/net/tcp` and `/proc/net/tcp6`
//! name the inode of every socket in state LISTEN, and `/proc/<pid>/fd/*` links read `socket:[inode]`.
//! A server may be several processes sharing the port through `SO_REUSEPORT`; each found pid is watched
//! and their figures are summed.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;

/// `st` column value of a listening socket in `/proc/net/tcp` (`TCP_LISTEN` in the kernel).
const TCP_STATE_LISTEN: u8 = 0x0A;

/// The tables that list this machine's TCP sockets, IPv4 then IPv6.
const PROC_NET_TCP_TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// One row of `/proc/net/tcp`, reduced to what finding a listener needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocketRow {
    /// Local port, decoded from the hex `local_address` column.
    pub local_port: u16,
    /// The `st` column: 0x0A is LISTEN.
    pub state: u8,
    /// Socket inode, which `/proc/<pid>/fd` links name as `socket:[inode]`.
    pub inode: u64,
}

/// Parses one data row of `/proc/net/tcp` or `/proc/net/tcp6`; `None` for the header or a malformed
/// row.
///
/// ```text
///   sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode
///    0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41235 ...
/// ```
pub fn parse_tcp_row(line: &str) -> Option<TcpSocketRow> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    if fields.len() < 10 || !fields[0].ends_with(':') {
        return None;
    }
    let (_, port_hex) = fields[1].rsplit_once(':')?;
    Some(TcpSocketRow {
        local_port: u16::from_str_radix(port_hex, 16).ok()?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// Inodes of the sockets listening on `port`, from the text of the TCP tables.
pub fn listening_inodes<'a>(tables: impl IntoIterator<Item = &'a str>, port: u16) -> Vec<u64> {
    let inodes: BTreeSet<u64> = tables
        .into_iter()
        .flat_map(str::lines)
        .filter_map(parse_tcp_row)
        .filter(|row| row.state == TCP_STATE_LISTEN && row.local_port == port && row.inode != 0)
        .map(|row| row.inode)
        .collect();
    inodes.into_iter().collect()
}

/// The inode named by an fd link such as `socket:[41235]`.
pub fn socket_inode_of_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Why the server could not be found or read.
#[derive(Debug)]
pub enum ProbeError {
    /// Nothing listens on the port.
    NoListener(u16),
    /// A socket listens, but no readable process holds it (another user's process, without root).
    NoOwner(u16),
    /// Reading `/proc` failed.
    Io(String, io::Error),
    /// A `/proc` file did not have the expected shape.
    Malformed(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NoListener(port) => write!(f, "no socket listens on port {port}"),
            ProbeError::NoOwner(port) => write!(
                f,
                "a socket listens on port {port} but no process visible here holds it (pass --server-pid)"
            ),
            ProbeError::Io(path, e) => write!(f, "{path}: {e}"),
            ProbeError::Malformed(path) => write!(f, "{path}: unexpected format"),
        }
    }
}

/// Finds the processes that hold a socket listening on `port`.
pub fn find_listener_pids(port: u16) -> Result<Vec<u32>, ProbeError> {
    // tcp6 is absent when IPv6 is disabled; a missing table just lists nothing.
    let tables: Vec<String> = PROC_NET_TCP_TABLES
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .collect();
    let inodes = listening_inodes(tables.iter().map(String::as_str), port);
    if inodes.is_empty() {
        return Err(ProbeError::NoListener(port));
    }
    let proc_dir = fs::read_dir("/proc").map_err(|e| ProbeError::Io("/proc".into(), e))?;
    let mut pids = Vec::new();
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes vanish and other users' fds are unreadable while we scan: skip them.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds_listener = fds.flatten().any(|fd| {
            fs::read_link(fd.path())
                .ok()
                .and_then(|link| socket_inode_of_link(&link.to_string_lossy()))
                .is_some_and(|inode| inodes.contains(&inode))
        });
        if holds_listener {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        return Err(ProbeError::NoOwner(port));
    }
    pids.sort_unstable();
    Ok(pids)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let kb = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kb)
}

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat`.
///
/// The second field is the command name in parentheses and may itself hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    /// Positions of utime and stime among the fields after the command name (fields 14 and 15 of
    /// proc(5), counted from 1, minus the pid and the name).
    const UTIME_AFTER_COMM: usize = 11;
    const STIME_AFTER_COMM: usize = 12;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let utime: u64 = fields.get(UTIME_AFTER_COMM)?.parse().ok()?;
    let stime: u64 = fields.get(STIME_AFTER_COMM)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` CPU times.
pub fn clock_ticks_per_second() -> u64 {
    /// The value on every common Linux build, used if sysconf fails.
    const USUAL_CLK_TCK: u64 = 100;
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        USUAL_CLK_TCK
    }
}

/// CPU time of process `pid` in nanoseconds from its CPU-time clock; `None` if the kernel refuses.
fn process_cpu_clock_ns(pid: u32) -> Option<u64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid clockid_t for clock_getcpuclockid to fill in; it returns an error
    // number (not -1 and errno) for a pid that does not exist.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill in; an unusable clock id makes it return -1.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The server's processes, read through `/proc`.
#[derive(Debug, Clone)]
pub struct ServerProcesses {
    /// Pids whose figures are summed: one for a single-process server.
    pub pids: Vec<u32>,
}

impl ServerProcesses {
    /// Total resident memory of the server's processes, in KiB.
    pub fn rss_kb(&self) -> Result<u64, ProbeError> {
        self.sum_over_pids("status", parse_vm_rss_kb)
    }

    /// Total CPU time (user + system) of the server's processes, in clock ticks.
    pub fn cpu_ticks(&self) -> Result<u64, ProbeError> {
        self.sum_over_pids("stat", parse_cpu_ticks)
    }

    /// Total CPU time (user + system) of the server's processes, in nanoseconds.
    ///
    /// Read from each process's CPU-time clock (`clock_getcpuclockid`), which counts the time
    /// `utime + stime` counts (every thread, exited ones included) without rounding it to clock ticks:
    /// a 10 ms tick is a few percent of a short phase's cost, too coarse to tell 10 % apart. Falls back
    /// to [`ServerProcesses::cpu_ticks`] where the clock cannot be read.
    pub fn cpu_ns(&self) -> Result<u64, ProbeError> {
        let mut total = 0;
        for &pid in &self.pids {
            total += match process_cpu_clock_ns(pid) {
                Some(ns) => ns,
                None => {
                    let one = ServerProcesses { pids: vec![pid] };
                    one.cpu_ticks()? * 1_000_000_000 / clock_ticks_per_second()
                }
            };
        }
        Ok(total)
    }

    fn sum_over_pids(&self, file: &str, parse: fn(&str) -> Option<u64>) -> Result<u64, ProbeError> {
        let mut total = 0;
        for pid in &self.pids {
            let path = format!("/proc/{pid}/{file}");
            let text = fs::read_to_string(&path).map_err(|e| ProbeError::Io(path.clone(), e))?;
            total += parse(&text).ok_or(ProbeError::Malformed(path))?;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_TABLE: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41235 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0200007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 41999 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
";

    const TCP6_TABLE: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52000 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn a_listening_row_gives_port_state_and_inode() {
        let row = parse_tcp_row(TCP_TABLE.lines().nth(1).unwrap()).unwrap();
        assert_eq!(
            row,
            TcpSocketRow {
                local_port: 8080,
                state: TCP_STATE_LISTEN,
                inode: 41235
            }
        );
    }

    #[test]
    fn the_header_and_garbage_are_not_rows() {
        assert_eq!(parse_tcp_row(TCP_TABLE.lines().next().unwrap()), None);
        assert_eq!(parse_tcp_row(""), None);
        assert_eq!(parse_tcp_row("   0: nonsense"), None);
    }

    #[test]
    fn only_listeners_on_the_port_count_in_both_tables() {
        assert_eq!(
            listening_inodes([TCP_TABLE, TCP6_TABLE], 8080),
            vec![41235, 52000]
        );
        assert_eq!(listening_inodes([TCP_TABLE], 22), vec![1234]);
        assert!(listening_inodes([TCP_TABLE, TCP6_TABLE], 9999).is_empty());
    }

    #[test]
    fn fd_links_name_socket_inodes() {
        assert_eq!(socket_inode_of_link("socket:[41235]"), Some(41235));
        assert_eq!(socket_inode_of_link("pipe:[41235]"), None);
        assert_eq!(socket_inode_of_link("/dev/null"), None);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tserver\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_kb(status), Some(12345));
        assert_eq!(parse_vm_rss_kb("Name:\tkthread\n"), None);
    }

    #[test]
    fn cpu_ticks_survive_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (my (odd) srv) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 1000 100";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = ServerProcesses {
            pids: vec![std::process::id()],
        };
        assert!(me.rss_kb().unwrap() > 0);
        assert!(me.cpu_ticks().is_ok());
        // Burn a little CPU: the nanosecond clock must see it and agree with the ticks.
        let before = me.cpu_ns().unwrap();
        let mut x = 0u64;
        while me.cpu_ns().unwrap() < before + 20_000_000 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(7));
        }
        std::hint::black_box(x);
        let ticks_ns = me.cpu_ticks().unwrap() * 1_000_000_000 / clock_ticks_per_second();
        assert!(ticks_ns.abs_diff(me.cpu_ns().unwrap()) < 100_000_000);
        assert!(ServerProcesses {
            pids: vec![u32::MAX]
        }
        .cpu_ns()
        .is_err());
        assert!(clock_ticks_per_second() > 0);
    }
}
