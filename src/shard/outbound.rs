//! Writing to connections, and what to do with a client that does not read (the slow-consumer policy).
//!
//! The delivery path writes a shared frame straight to the socket with one non-blocking `send(2)` when
//! nothing is queued ahead of it: for a client that keeps up, which is almost every client, a delivery
//! costs one syscall and no allocation, and the connection's task is not even woken. Only when the kernel's
//! socket buffer is full does the frame go into the connection's [`Outbox`], a queue of shared frames
//! (reference counts, not copies), allocated on first use and freed once drained; the connection's task
//! then waits for the socket to become writable and flushes it.
//!
//! When the shard's inbox pump routes a burst of deliveries (many messages waiting at once), it does not
//! write each frame as it goes: a [`WriteBatch`] collects `(connection, frame)` pairs for the whole burst
//! and then writes each connection's frames with one `sendmsg(2)` (an iovec per frame). Each `send(2)` to
//! a loopback or LAN peer costs microseconds of kernel TCP work whatever its size, so under load N
//! messages to the same subscriber cost about one send instead of N. A lone message costs what it did.
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

use crate::delivery::inbox::ConnId;
use crate::shard::hub::{ConnState, Hub, LiveMark};
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
        crate::metrics::outbound_queue_changed(-(n.min(self.queued_bytes) as i64));
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

    pub(crate) fn push(&mut self, frame: Bytes, already_written: usize) {
        if self.frames.is_empty() {
            self.front_written = already_written;
        }
        self.queued_bytes += frame.len() - already_written;
        crate::metrics::outbound_queue_changed((frame.len() - already_written) as i64);
        self.frames.push_back(frame);
    }

    /// Drops every queued frame except the rest of a partly written one, so a close frame can follow
    /// without corrupting the stream.
    fn drop_unsent(&mut self) {
        crate::metrics::outbound_queue_changed(-(self.queued_bytes as i64));
        if self.front_written > 0 {
            self.frames.truncate(1);
            self.queued_bytes = self.frames[0].len() - self.front_written;
        } else {
            self.frames.clear();
            self.queued_bytes = 0;
        }
        crate::metrics::outbound_queue_changed(self.queued_bytes as i64);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // A connection that ends with frames unsent takes them out of the shard's queued bytes.
        crate::metrics::outbound_queue_changed(-(self.queued_bytes as i64));
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
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.writable = false,
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

/// What the resume and dedup rules decide about a live delivery before anything is written.
enum LiveGate {
    /// Decided already: held back for a resume, or dropped.
    Done(Sent),
    /// To be written (or queued) now.
    Write,
}

/// Holds a live delivery back while a resume is replaying, and drops a late copy of a replayed one.
fn live_gate(
    conn: &mut ConnState,
    id: Option<Uuid>,
    frame: &Bytes,
    max_outbound_bytes: usize,
) -> LiveGate {
    if let Some(outbox) = conn.outbox.as_mut() {
        if let Some(buffer) = outbox.resume_buffer.as_mut() {
            if outbox.resume_bytes + frame.len() > max_outbound_bytes {
                slow_consumer(conn);
                return LiveGate::Done(Sent::Dropped);
            }
            outbox.resume_bytes += frame.len();
            buffer.push((id, frame.clone()));
            return LiveGate::Done(Sent::Accepted);
        }
    }
    if let (Some(id), LiveMark::ReplayedThrough(through)) = (id, conn.live_mark) {
        if id <= through {
            // A late live copy of something the replay already sent (see `LiveMark`).
            return LiveGate::Done(Sent::Dropped);
        }
    }
    if let (Some(id), Some(through)) = (id, conn.resumed_through) {
        if id <= through {
            // A copy relayed from another node that arrived after the resume covered it.
            return LiveGate::Done(Sent::Dropped);
        }
    }
    LiveGate::Write
}

/// Remembers the first stored notification delivered live, for a later resume.
fn note_live(conn: &mut ConnState, id: Option<Uuid>) {
    if let Some(id) = id {
        if !matches!(conn.live_mark, LiveMark::FirstLive(_)) {
            conn.live_mark = LiveMark::FirstLive(id);
        }
    }
}

/// Delivers a stored or ephemeral frame to a connection, holding it back while a resume is replaying.
pub fn deliver_live(
    conn: &mut ConnState,
    id: Option<Uuid>,
    frame: &Bytes,
    max_outbound_bytes: usize,
) -> Sent {
    deliver_gated(conn, id, frame, max_outbound_bytes, |conn| {
        send_frame(conn, frame, max_outbound_bytes)
    })
}

/// The resume and dedup rules around `write`, which writes or queues the frame.
fn deliver_gated(
    conn: &mut ConnState,
    id: Option<Uuid>,
    frame: &Bytes,
    max_outbound_bytes: usize,
    write: impl FnOnce(&mut ConnState) -> Sent,
) -> Sent {
    if let LiveGate::Done(sent) = live_gate(conn, id, frame, max_outbound_bytes) {
        return sent;
    }
    let sent = write(conn);
    if sent == Sent::Accepted {
        note_live(conn, id);
    }
    sent
}

/// Most iovecs handed to one `sendmsg(2)` (Linux's `UIO_MAXIOV`); a longer group takes several calls.
const MAX_IOVECS: usize = 1024;

/// Frames collected over one burst of deliveries, written per connection when the burst ends (see the
/// module docs). Nothing else may write to a connection between [`WriteBatch::deliver`] and
/// [`WriteBatch::flush`]: the caller flushes before it yields to other tasks.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// `(connection, frame)` in delivery order.
    entries: Vec<(ConnId, Bytes)>,
    /// Reused for every `sendmsg`.
    iovecs: Vec<libc::iovec>,
}

impl WriteBatch {
    /// Frames collected and not yet written.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits to be flushed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// [`deliver_live`], except that a frame for a connection with nothing queued is collected for
    /// [`WriteBatch::flush`] instead of written now.
    pub fn deliver(
        &mut self,
        conn_id: ConnId,
        conn: &mut ConnState,
        id: Option<Uuid>,
        frame: &Bytes,
        max_outbound_bytes: usize,
    ) -> Sent {
        deliver_gated(conn, id, frame, max_outbound_bytes, |conn| {
            if conn.close_code.is_some() {
                Sent::Dropped
            } else if conn.outbox.as_ref().is_some_and(|o| !o.frames.is_empty()) {
                // Already waiting for the socket: queue behind what is there, as usual.
                send_frame(conn, frame, max_outbound_bytes)
            } else {
                self.entries.push((conn_id, frame.clone()));
                Sent::Accepted
            }
        })
    }

    /// Writes every collected frame: one `sendmsg` per connection for all of its frames, in order;
    /// what the socket does not take is queued as [`send_frame`] would queue it.
    pub fn flush(&mut self, hub: &mut Hub, max_outbound_bytes: usize) {
        // Stable: each connection's frames stay in delivery order.
        self.entries.sort_by_key(|(conn, _)| *conn);
        let entries = std::mem::take(&mut self.entries);
        for group in entries.chunk_by(|a, b| a.0 == b.0) {
            let conn = hub.conn_mut(group[0].0);
            if let [(_, frame)] = group {
                send_frame(conn, frame, max_outbound_bytes);
            } else {
                send_group(conn, group, &mut self.iovecs, max_outbound_bytes);
            }
        }
        // Keep the allocation for the next burst, but not the frames.
        self.entries = entries;
        self.entries.clear();
        self.iovecs.clear();
    }
}

/// One non-blocking `sendmsg(2)` of several buffers.
fn send_vectored_now(fd: RawFd, iovecs: &mut [libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data); its iovecs point into frames the
    // caller keeps alive for the call, and the fd belongs to a live connection.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iovecs.as_mut_ptr();
        msg.msg_iovlen = iovecs.len() as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes a connection's frames (whose queue is empty) with as few `sendmsg` calls as the socket
/// allows, then queues the rest, closing a slow consumer as [`send_frame`] does.
fn send_group(
    conn: &mut ConnState,
    group: &[(ConnId, Bytes)],
    iovecs: &mut Vec<libc::iovec>,
    max_outbound_bytes: usize,
) {
    // The next frame to write and how much of it is written.
    let (mut next, mut written) = (0, 0);
    while next < group.len() {
        iovecs.clear();
        let mut offered = 0;
        for (k, (_, frame)) in group[next..].iter().take(MAX_IOVECS).enumerate() {
            let part = if k == 0 { &frame[written..] } else { frame };
            offered += part.len();
            iovecs.push(libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            });
        }
        let mut n = match send_vectored_now(conn.fd, iovecs) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.writable = false;
                0
            }
            Err(_) => {
                // The peer is gone (reset, broken pipe): close without a close frame.
                conn.request_close(0);
                return;
            }
        };
        let full = n == offered;
        while n > 0 {
            let left = group[next].1.len() - written;
            if n >= left {
                n -= left;
                next += 1;
                written = 0;
            } else {
                written += n;
                n = 0;
            }
        }
        if !full {
            break;
        }
    }
    if next == group.len() {
        return;
    }
    for (k, (_, frame)) in group[next..].iter().enumerate() {
        let already = if k == 0 { written } else { 0 };
        let outbox = conn.outbox.get_or_insert_with(Box::default);
        if already == 0 && outbox.queued_bytes + frame.len() > max_outbound_bytes {
            slow_consumer(conn);
            return;
        }
        outbox.push(frame.clone(), already);
    }
    conn.wake();
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

    #[test]
    fn a_batch_writes_each_connections_frames_in_order_with_one_call() {
        let (ours_a, mut theirs_a) = UnixStream::pair().unwrap();
        let (ours_b, mut theirs_b) = UnixStream::pair().unwrap();
        ours_a.set_nonblocking(true).unwrap();
        ours_b.set_nonblocking(true).unwrap();
        let mut hub = crate::shard::hub::Hub::new();
        let a = hub.add(ours_a.as_raw_fd());
        let b = hub.add(ours_b.as_raw_fd());
        let mut batch = WriteBatch::default();
        for frame in [&b"1"[..], b"2", b"3"] {
            let frame = Bytes::copy_from_slice(frame);
            for id in [a, b] {
                let sent = batch.deliver(id, hub.conn_mut(id), None, &frame, 1024);
                assert_eq!(sent, Sent::Accepted);
            }
        }
        assert_eq!(batch.len(), 6);
        batch.flush(&mut hub, 1024);
        assert!(batch.is_empty());
        for theirs in [&mut theirs_a, &mut theirs_b] {
            let mut got = [0u8; 3];
            theirs.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"123");
        }
        assert!(hub.conn(a).outbox.is_none(), "everything fit in the socket");
    }

    #[test]
    fn what_a_full_socket_does_not_take_is_queued_and_a_slow_consumer_closed() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hub = crate::shard::hub::Hub::new();
        let id = hub.add(ours.as_raw_fd());
        let frame = Bytes::from(vec![9u8; 64 * 1024]);
        let mut batch = WriteBatch::default();
        // Far more than a socket buffer, but within the outbound limit: the rest is queued.
        for _ in 0..8 {
            batch.deliver(id, hub.conn_mut(id), None, &frame, 4 * 1024 * 1024);
        }
        batch.flush(&mut hub, 4 * 1024 * 1024);
        let conn = hub.conn(id);
        assert_eq!(conn.close_code, None);
        let queued = conn.outbox.as_ref().unwrap().queued_bytes();
        assert!(queued > 0 && queued < 8 * frame.len(), "queued {queued}");
        // Past the limit, the connection is closed with 1013 like any slow consumer.
        for _ in 0..8 {
            batch.deliver(id, hub.conn_mut(id), None, &frame, 256 * 1024);
        }
        batch.flush(&mut hub, 256 * 1024);
        assert_eq!(hub.conn(id).close_code, Some(close_code::TRY_AGAIN_LATER));
    }
}
