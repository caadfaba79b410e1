//! Readiness for all of a shard's sockets from one place: an epoll set per shard, itself a single poll
//! in glommio's io_uring.
//!
//! Why not glommio's own streams: a glommio socket waits with one io_uring poll request of its own, so a
//! shard with 18,000 idle connections has 18,000 pending polls in its ring, and in the kernels we run on,
//! every io_uring cancellation (a connection closing, glommio re-arming its timers) first searches the
//! ring's poll requests. Request cost grew with the number of open connections (1.8× for a keep-alive
//! send, 2.7× for a request on a new connection at 18,000 idle; `io_poll_find` was 43 % of the CPU).
//! Here the ring holds one poll whatever the number of sockets, and nothing is ever cancelled per socket.
//!
//! How it works:
//! - every socket of the shard (the listener, and each accepted connection) is registered once, when it
//!   arrives, edge-triggered for reading and writing; the event carries the connection's slot in the hub;
//!   closing the socket takes it out of the set (no `epoll_ctl` on the way out);
//! - the shard's readiness task waits for the epoll descriptor itself to become readable (one io_uring
//!   poll, re-armed once per burst, see [`epoll_ready`]), then drains `epoll_wait` without blocking and,
//!   for each event, sets the connection's `readable`/`writable` flags in the hub and wakes its task;
//! - a connection's task reads or writes only while its flag is set, and clears it when the socket says
//!   `EAGAIN` (or a read comes back shorter than asked, which for TCP means the queue is empty): the next
//!   edge sets it again. So an idle connection costs a slab entry, its parked task and its socket; no
//!   poll, no timer, no buffer.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;

use futures_util::io::AsyncReadExt;

use crate::delivery::inbox::ConnId;

/// The event token of the shard's listening socket (connections use their slot, a `u32`).
pub(crate) const LISTENER: u64 = u64::MAX;

/// Events taken from the kernel per `epoll_wait`; a longer burst takes several calls.
const EVENTS_PER_WAIT: usize = 256;

/// What an event says about a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ready {
    /// Reading will not block (data, EOF, or an error to collect).
    pub readable: bool,
    /// Writing will not block (room, or an error to collect).
    pub writable: bool,
}

/// One shard's epoll set.
pub(crate) struct Reactor {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Reactor {
    /// A new, empty epoll set.
    pub(crate) fn new() -> io::Result<Reactor> {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reactor {
            // SAFETY: a fresh descriptor that nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            events: Vec::with_capacity(EVENTS_PER_WAIT),
        })
    }

    /// Watches a connection's socket, edge-triggered, for the rest of its life (closing it unregisters
    /// it).
    pub(crate) fn register(&self, fd: RawFd, id: ConnId) -> io::Result<()> {
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.control(fd, events as u32, u64::from(id))
    }

    /// Watches the listening socket, level-triggered: the accept loop takes a bounded number of
    /// connections per turn, and what it left is reported again.
    pub(crate) fn register_listener(&self, fd: RawFd) -> io::Result<()> {
        self.control(fd, libc::EPOLLIN as u32, LISTENER)
    }

    fn control(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open; `event` is a valid epoll_event.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes every pending event without blocking and hands each to `on_event` (its token and what it
    /// says). Returns how many there were.
    pub(crate) fn drain(&mut self, mut on_event: impl FnMut(u64, Ready)) -> usize {
        let mut total = 0;
        loop {
            self.events.clear();
            // SAFETY: the buffer has room for EVENTS_PER_WAIT events; the kernel fills `n` of them.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    EVENTS_PER_WAIT as i32,
                    0,
                )
            };
            if n <= 0 {
                // 0: nothing left; < 0: EINTR (retried at the next wake) or a bug (EBADF), which a
                // readiness task cannot fix by spinning.
                return total;
            }
            // SAFETY: the kernel initialized the first `n` entries.
            unsafe { self.events.set_len(n as usize) };
            for event in &self.events {
                let bits = event.events as i32;
                let failed = bits & (libc::EPOLLERR | libc::EPOLLHUP) != 0;
                let ready = Ready {
                    readable: failed || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0,
                    writable: failed || bits & libc::EPOLLOUT != 0,
                };
                // Copy out of the packed struct before use.
                let token = event.u64;
                on_event(token, ready);
            }
            total += n as usize;
            if (n as usize) < EVENTS_PER_WAIT {
                return total;
            }
        }
    }

    /// Resolves once the epoll set has events to take (see [`epoll_ready`]).
    pub(crate) fn ready(&self) -> impl Future<Output = ()> {
        epoll_ready(self.epoll.as_raw_fd())
    }
}

/// Waits, in glommio's ring, until the epoll descriptor `epfd` is readable (some watched socket has an
/// event).
///
/// glommio has no public way to wait for an arbitrary descriptor, but its socket type arms exactly such
/// a wait, a single-shot readiness poll, the moment one is made from a descriptor, and its first read
/// waits for that poll before it touches the descriptor. So a glommio socket is made from a duplicate of
/// the epoll descriptor and read once: the read stays pending until the poll fires, then fails (an epoll
/// descriptor is no socket: `ENOTSOCK`), which is the signal. Dropping it afterwards closes only the
/// duplicate and cancels nothing (the poll has completed). One `dup` and one `close` per burst of events,
/// instead of one poll per socket.
async fn epoll_ready(epfd: RawFd) {
    // SAFETY: plain syscall on an open descriptor; the result is checked.
    let dup = unsafe { libc::fcntl(epfd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        // Out of descriptors: wait a little rather than spin, then the caller drains anyway.
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        return;
    }
    // SAFETY: `dup` is a fresh descriptor owned by nothing else; the stream owns it from here on.
    let mut waiter = unsafe { glommio::net::TcpStream::from_raw_fd(dup) };
    let mut byte = [0u8; 1];
    let _ = pin!(waiter.read(&mut byte)).await;
}
