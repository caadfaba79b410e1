//! When live WebSocket connections' tokens run out: one queue per shard, swept once a second.
//!
//! A timer per connection would cost memory on every idle connection (docs/architecture.md, "Memory per
//! connection": the ~1 KiB budget), so each shard keeps a min-heap of (expiry, connection) and one sweep
//! pops what is due. Entries are never removed early: a connection that refreshed its token or went away
//! leaves a stale entry, which the sweep recognizes because the connection's current expiry (kept in the
//! hub) no longer equals the entry's. A slot reused by a new connection with, by chance, the same expiry
//! second is due at that very second anyway, so a stale entry can never close a connection early.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A shard's pending token expiries, earliest first.
#[derive(Debug, Default)]
pub struct ExpiryQueue<C: Ord + Copy> {
    heap: BinaryHeap<Reverse<(u64, C)>>,
}

impl<C: Ord + Copy> ExpiryQueue<C> {
    /// An empty queue.
    pub fn new() -> ExpiryQueue<C> {
        ExpiryQueue {
            heap: BinaryHeap::new(),
        }
    }

    /// Remembers that `conn`'s token expires at `at` (seconds since the epoch).
    pub fn push(&mut self, at: u64, conn: C) {
        self.heap.push(Reverse((at, conn)));
    }

    /// Removes and returns the next entry due at or before `now`, if any.
    pub fn pop_due(&mut self, now: u64) -> Option<(u64, C)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_in_order() {
        let mut q = ExpiryQueue::new();
        q.push(30, 1u32);
        q.push(10, 2);
        q.push(20, 3);
        assert_eq!(q.pop_due(5), None);
        assert_eq!(q.pop_due(25), Some((10, 2)));
        assert_eq!(q.pop_due(25), Some((20, 3)));
        assert_eq!(q.pop_due(25), None);
        assert_eq!(q.len(), 1);
    }
}
