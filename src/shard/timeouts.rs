//! Connection deadlines (the HTTP keep-alive and header timeouts, the time a closing connection gets
//! to take its last bytes), kept by the shard in one queue and checked by one sweep, as the WebSocket
//! heartbeat is: no timer per connection, so nothing per connection for the runtime to arm or cancel.
//!
//! A connection's deadline lives in its hub entry ([`ConnState::deadline`]), in ticks of
//! [`TICK`] since the shard started. The queue holds `(tick, slot)` entries; setting a deadline pushes
//! an entry only when none is queued for that connection at or before it, so a keep-alive connection
//! that moves its deadline forward on every request costs nothing here until its old entry comes due,
//! when the sweep re-queues it at its current deadline. A connection whose deadline passed is woken;
//! its task sees the deadline behind it and gives up the wait.
//!
//! [`ConnState::deadline`]: crate::shard::hub::ConnState

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::delivery::inbox::ConnId;
use crate::shard::hub::Hub;

/// The resolution of deadlines, and how often the sweep runs while any deadline is set.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// A point in time in ticks since the shard started; 0 means "no deadline". A `u32` of 100 ms ticks
/// lasts 13 years.
pub(crate) type Tick = u32;

/// One shard's queue of deadlines.
pub(crate) struct Timeouts {
    epoch: Instant,
    queue: BinaryHeap<Reverse<(Tick, ConnId)>>,
    /// The sweep's waker while it waits for a first deadline.
    sweep: Option<Waker>,
}

impl Timeouts {
    /// An empty queue, counting from now.
    pub(crate) fn new() -> Timeouts {
        Timeouts {
            epoch: Instant::now(),
            queue: BinaryHeap::new(),
            sweep: None,
        }
    }

    /// The current tick (at least 1, so that 0 can mean "none").
    pub(crate) fn now(&self) -> Tick {
        (self.epoch.elapsed().as_millis() / TICK.as_millis()) as Tick + 1
    }

    /// The tick `after` from now, rounded up: a deadline never comes early.
    pub(crate) fn tick_after(&self, after: Duration) -> Tick {
        let ticks = after.as_millis().div_ceil(TICK.as_millis()).max(1);
        self.now()
            .saturating_add(ticks.min(u128::from(Tick::MAX)) as Tick)
    }

    /// Sets connection `id`'s deadline to `at` (0: none), queueing it if needed.
    pub(crate) fn set(&mut self, hub: &mut Hub, id: ConnId, at: Tick) {
        let conn = hub.conn_mut(id);
        conn.deadline = at;
        if at != 0 && (conn.deadline_queued == 0 || at < conn.deadline_queued) {
            conn.deadline_queued = at;
            self.queue.push(Reverse((at, id)));
            if let Some(sweep) = self.sweep.take() {
                sweep.wake();
            }
        }
    }

    /// Sets connection `id`'s deadline to `after` from now (`None`: no deadline).
    pub(crate) fn set_after(&mut self, hub: &mut Hub, id: ConnId, after: Option<Duration>) {
        let at = after.map_or(0, |d| self.tick_after(d));
        self.set(hub, id, at);
    }

    /// Wakes the connections whose deadline passed and re-queues those whose deadline moved. Returns
    /// whether any deadline is still queued.
    pub(crate) fn sweep(&mut self, hub: &mut Hub) -> bool {
        let now = self.now();
        while let Some(&Reverse((at, id))) = self.queue.peek() {
            if at > now {
                break;
            }
            self.queue.pop();
            // Entries of connections that are gone, or that were queued again earlier, are stale.
            let Some(conn) = hub.get_mut(id) else {
                continue;
            };
            if conn.deadline_queued != at {
                continue;
            }
            conn.deadline_queued = 0;
            match conn.deadline {
                0 => {}
                d if d <= now => conn.wake(),
                d => {
                    conn.deadline_queued = d;
                    self.queue.push(Reverse((d, id)));
                }
            }
        }
        if self.queue.len() < self.queue.capacity() / 4 {
            // Give back what a burst of connections left behind.
            self.queue.shrink_to(self.queue.len() * 2);
        }
        !self.queue.is_empty()
    }

    /// Registers the sweep's waker, to be woken by the next deadline set while the queue is empty.
    pub(crate) fn park_sweep(&mut self, waker: &Waker) -> bool {
        if !self.queue.is_empty() {
            return false;
        }
        self.sweep = Some(waker.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_is_rounded_up_and_never_zero() {
        let t = Timeouts::new();
        assert!(t.now() >= 1);
        assert_eq!(t.tick_after(Duration::from_millis(1)), t.now() + 1);
        assert_eq!(t.tick_after(Duration::from_millis(250)), t.now() + 3);
    }

    #[test]
    fn a_moved_deadline_is_requeued_and_a_passed_one_wakes() {
        let mut hub = Hub::new();
        let id = hub.add(-1);
        let mut t = Timeouts::new();
        let now = t.now();
        t.set(&mut hub, id, now);
        // Moving it later queues nothing new.
        t.set(&mut hub, id, now + 50);
        assert_eq!(t.queue.len(), 1);
        // The old entry comes due: re-queued at the current deadline.
        assert!(t.sweep(&mut hub));
        assert_eq!(hub.conn(id).deadline_queued, now + 50);
        // Cleared: the entry is dropped when due.
        t.set(&mut hub, id, 0);
        t.queue = BinaryHeap::from(vec![Reverse((now, id))]);
        hub.conn_mut(id).deadline_queued = now;
        assert!(!t.sweep(&mut hub));
        // Earlier than the queued one: queued again.
        t.set(&mut hub, id, now + 100);
        t.set(&mut hub, id, now + 10);
        assert_eq!(t.queue.len(), 2);
        assert_eq!(hub.conn(id).deadline_queued, now + 10);
    }
}
