//! Writing to connections, and what to do with a client that does not read (the slow-consumer policy).
//!
//! The delivery path writes a shared frame straight to the socket with one non-blocking `send(2)` when
//! nothing is queued ahead of it: for a client that keeps up, which is almost every client, a delivery
//! costs one syscall and no allocation, and the connection's task is not even woken. Only when the kernel's
//! socket buffer is full does the frame go into the connection's [`Outbox`], a queue of shared frames
//! (reference counts, not copies), allocated on first use and freed once drained; the connection's task
//! then waits for the socket to become writable and flushes it.
//!
//! Like Redis' client output buffer limit, the queue is bounded in bytes (`MAX_OUTBOUND_BYTES`). A client
//! past the bound is a slow consumer: its queued frames are dropped (a partly written frame is finished,
//! so the stream stays valid), a close frame 1013 follows, and the client is expected to reconnect and
//! `resume` from the store, which holds everything it missed. Dropping one slow client beats letting it
//! grow the server's memory without bound.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;
use uuid::Uuid;

use crate::shard::hub::{ConnState, LiveMark};
use crate::ws::codec::close_code;

/// Frames waiting for one connection's socket, and its resume buffer.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Frames not yet fully written, oldest first.
    frames: VecDeque<Bytes>,
    /// How much of the front frame is already written.
    front_written: usize,
    /// Bytes still to write, over all queued frames.
    queued_bytes: usize,
    /// While a `resume` replays from the store, live deliveries wait here (with their ids, to drop the
    /// ones the replay already sent); `None` when not resuming.
    resume_buffer: Option<Vec<(Option<Uuid>, Bytes)>>,
    /// Bytes held in `resume_buffer` (bounded like the queue).
    resume_bytes: usize,
}

impl Outbox {
    /// The next bytes to write, if any.
    pub fn front(&self) -> Option<Bytes> {
        self.frames
            .front()
            .map(|f| f.slice(self.front_written.min(f.len())..))
    }

    /// Records that `n` bytes of the front were written.
    pub fn advance(&mut self, mut n: usize) {
        self.queued_bytes = self.queued_bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.frames.front() else {
                return;
            };
            let left = front.len() - self.front_written;
            if n >= left {
                n -= left;
                self.frames.pop_front();
                self.front_written = 0;
            } else {
                self.front_written += n;
                n = 0;
            }
        }
    }

    /// True when nothing waits to be written and no resume is in progress: the box can be freed.
    pub fn is_idle(&self) -> bool {
        self.frames.is_empty() && self.resume_buffer.is_none()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    fn push(&mut self, frame: Bytes, already_written: usize) {
        if self.frames.is_empty() {
            self.front_written = already_written;
        }
        self.queued_bytes += frame.len() - already_written;
        self.frames.push_back(frame);
    }

    /// Drops every queued frame except the rest of a partly written one, so a close frame can follow
    /// without corrupting the stream.
    fn drop_unsent(&mut self) {
        if self.front_written > 0 {
            self.frames.truncate(1);
            self.queued_bytes = self.frames[0].len() - self.front_written;
        } else {
            self.frames.clear();
            self.queued_bytes = 0;
        }
    }
}

/// What happened to a frame handed to [`send_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written to the socket, or queued behind earlier frames.
    Accepted,
    /// Not sent: the connection is closing (now or already).
    Dropped,
}

/// One non-blocking `send(2)`: the fast path of every delivery.
fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice for its length; the fd belongs to a live connection (the
    // hub entry is removed before the socket is closed).
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends `frame` to a connection: straight to the socket if nothing is queued before it, otherwise
/// queued (and the connection's task woken to flush). A queue over `max_outbound_bytes` closes the
/// connection with 1013.
pub fn send_frame(conn: &mut ConnState, frame: &Bytes, max_outbound_bytes: usize) -> Sent {
    if conn.close_code.is_some() {
        return Sent::Dropped;
    }
    let queue_empty = conn.outbox.as_ref().is_none_or(|o| o.frames.is_empty());
    let mut written = 0;
    if queue_empty {
        match send_now(conn.fd, frame) {
            Ok(n) if n == frame.len() => return Sent::Accepted,
            Ok(n) => written = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                // The peer is gone (reset, broken pipe): close without a close frame.
                conn.request_close(0);
                return Sent::Dropped;
            }
        }
    }
    let outbox = conn.outbox.get_or_insert_with(Box::default);
    if outbox.queued_bytes + (frame.len() - written) > max_outbound_bytes && written == 0 {
        slow_consumer(conn);
        return Sent::Dropped;
    }
    outbox.push(frame.clone(), written);
    conn.wake();
    Sent::Accepted
}

/// Closes a connection that stopped reading: drop its queue, then close with 1013 (see module docs).
fn slow_consumer(conn: &mut ConnState) {
    if let Some(outbox) = conn.outbox.as_mut() {
        outbox.drop_unsent();
        outbox.resume_buffer = None;
    }
    conn.request_close(close_code::TRY_AGAIN_LATER);
}

/// Delivers a stored or ephemeral frame to a connection, holding it back while a resume is replaying.
pub fn deliver_live(
    conn: &mut ConnState,
    id: Option<Uuid>,
    frame: &Bytes,
    max_outbound_bytes: usize,
) -> Sent {
    if let Some(outbox) = conn.outbox.as_mut() {
        if let Some(buffer) = outbox.resume_buffer.as_mut() {
            if outbox.resume_bytes + frame.len() > max_outbound_bytes {
                slow_consumer(conn);
                return Sent::Dropped;
            }
            outbox.resume_bytes += frame.len();
            buffer.push((id, frame.clone()));
            return Sent::Accepted;
        }
    }
    if let (Some(id), LiveMark::ReplayedThrough(through)) = (id, conn.live_mark) {
        if id <= through {
            // A late live copy of something the replay already sent (see `LiveMark`).
            return Sent::Dropped;
        }
    }
    let sent = send_frame(conn, frame, max_outbound_bytes);
    if let (Sent::Accepted, Some(id)) = (sent, id) {
        if !matches!(conn.live_mark, LiveMark::FirstLive(_)) {
            conn.live_mark = LiveMark::FirstLive(id);
        }
    }
    sent
}

/// Starts holding back live deliveries for a resume.
pub fn begin_resume(conn: &mut ConnState) {
    let outbox = conn.outbox.get_or_insert_with(Box::default);
    outbox.resume_buffer = Some(Vec::new());
    outbox.resume_bytes = 0;
}

/// Ends a resume and returns the deliveries held back meanwhile, in arrival order.
pub fn end_resume(conn: &mut ConnState) -> Vec<(Option<Uuid>, Bytes)> {
    match conn.outbox.as_mut() {
        Some(outbox) => {
            outbox.resume_bytes = 0;
            outbox.resume_buffer.take().unwrap_or_default()
        }
        None => Vec::new(),
    }
}

/// Appends a frame after everything queued, ignoring the byte limit (a close frame must go out), and
/// wakes the task to flush it.
pub fn queue_final_frame(conn: &mut ConnState, frame: Bytes) {
    conn.outbox.get_or_insert_with(Box::default).push(frame, 0);
    conn.wake();
}

/// Frees the outbox of a connection that has nothing left in it (back to the idle memory footprint).
pub fn release_if_idle(conn: &mut ConnState) {
    if conn.outbox.as_ref().is_some_and(|o| o.is_idle()) {
        conn.outbox = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn conn_over_socketpair() -> (ConnState, UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hub = crate::shard::hub::Hub::new();
        let id = hub.add(ours.as_raw_fd());
        (hub.remove(id), ours, theirs)
    }

    #[test]
    fn a_reader_that_keeps_up_gets_frames_directly_with_no_queue() {
        let (mut conn, _ours, mut theirs) = conn_over_socketpair();
        let frame = Bytes::from_static(b"hello");
        assert_eq!(send_frame(&mut conn, &frame, 1024), Sent::Accepted);
        assert!(conn.outbox.is_none(), "no queue allocated on the fast path");
        let mut buf = [0u8; 5];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_reader_that_stops_is_closed_with_1013_and_its_queue_dropped() {
        let (mut conn, _ours, _theirs) = conn_over_socketpair();
        let frame = Bytes::from(vec![7u8; 64 * 1024]);
        let mut accepted = 0;
        while send_frame(&mut conn, &frame, 256 * 1024) == Sent::Accepted {
            accepted += 1;
            assert!(accepted < 10_000, "the limit never triggered");
        }
        assert_eq!(conn.close_code, Some(close_code::TRY_AGAIN_LATER));
        let outbox = conn.outbox.as_ref().unwrap();
        assert!(
            outbox.queued_bytes() < frame.len(),
            "at most a partial frame is kept"
        );
        assert_eq!(send_frame(&mut conn, &frame, 256 * 1024), Sent::Dropped);
    }

    #[test]
    fn advance_walks_partial_and_whole_frames() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"abcdef"), 2);
        o.push(Bytes::from_static(b"ghi"), 0);
        assert_eq!(o.queued_bytes(), 7);
        assert_eq!(&o.front().unwrap()[..], b"cdef");
        o.advance(5);
        assert_eq!(&o.front().unwrap()[..], b"hi");
        o.advance(2);
        assert!(o.front().is_none());
        assert!(o.is_idle());
    }

    #[test]
    fn a_late_live_copy_of_a_replayed_notification_is_dropped() {
        let (mut conn, _ours, mut theirs) = conn_over_socketpair();
        let frame = Bytes::from_static(b"n");
        let (older, replayed, newer) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        conn.live_mark = LiveMark::ReplayedThrough(replayed);
        assert_eq!(
            deliver_live(&mut conn, Some(older), &frame, 1024),
            Sent::Dropped
        );
        assert_eq!(
            deliver_live(&mut conn, Some(replayed), &frame, 1024),
            Sent::Dropped
        );
        assert_eq!(
            deliver_live(&mut conn, None, &frame, 1024),
            Sent::Accepted,
            "ephemeral messages pass"
        );
        assert_eq!(
            deliver_live(&mut conn, Some(newer), &frame, 1024),
            Sent::Accepted
        );
        assert_eq!(conn.live_mark, LiveMark::FirstLive(newer));
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"nn");
    }

    #[test]
    fn the_first_live_notification_is_remembered_for_a_later_resume() {
        let (mut conn, _ours, _theirs) = conn_over_socketpair();
        let frame = Bytes::from_static(b"n");
        deliver_live(&mut conn, Some(Uuid::from_u128(5)), &frame, 1024);
        deliver_live(&mut conn, Some(Uuid::from_u128(6)), &frame, 1024);
        assert_eq!(conn.live_mark, LiveMark::FirstLive(Uuid::from_u128(5)));
    }

    #[test]
    fn resume_holds_back_live_frames_in_order() {
        let (mut conn, _ours, _theirs) = conn_over_socketpair();
        begin_resume(&mut conn);
        let a = Bytes::from_static(b"a");
        deliver_live(&mut conn, Some(Uuid::nil()), &a, 1024);
        deliver_live(&mut conn, None, &a, 1024);
        let held = end_resume(&mut conn);
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].0, Some(Uuid::nil()));
        release_if_idle(&mut conn);
        assert!(conn.outbox.is_none());
    }
}
