//! The machine limits that decide how a run is laid out: open files per process and ephemeral ports.

use std::fs;
use std::io;

/// File descriptors a worker keeps for itself beyond its sockets: stdio, the epoll instance, and
/// whatever the runtime opens. Generous on purpose; running out mid-run turns into connect errors.
pub const FD_RESERVE: u64 = 64;

/// Size of Linux's default ephemeral range (32768-60999), used if the sysctl cannot be read.
const DEFAULT_EPHEMERAL_PORTS: u64 = 28_232;

/// Where Linux keeps the ephemeral port range.
const PORT_RANGE_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The hard limit on open files for this process (`RLIMIT_NOFILE`), which no one here can raise.
pub fn nofile_hard_limit() -> io::Result<u64> {
    Ok(nofile()?.rlim_max)
}

/// Raises this process's soft open-files limit to the hard limit and returns it. Shells often start
/// processes at a soft limit of 1,024, far below what a worker holds.
pub fn raise_nofile_soft_limit() -> io::Result<u64> {
    let mut limit = nofile()?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

fn nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// How many ports the kernel can pick from for one (source, destination) address pair.
pub fn ephemeral_port_count() -> u64 {
    fs::read_to_string(PORT_RANGE_SYSCTL)
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS)
}

/// The number of ports in an `ip_local_port_range` value such as `32768\t60999`.
pub fn parse_port_range(text: &str) -> Option<u64> {
    let mut parts = text.split_ascii_whitespace().map(str::parse::<u64>);
    let low = parts.next()?.ok()?;
    let high = parts.next()?.ok()?;
    (high >= low).then(|| high - low + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_range_counts_both_ends() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn the_open_files_limit_is_readable() {
        assert!(nofile_hard_limit().unwrap() > 0);
    }
}
