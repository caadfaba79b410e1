//! The ids of notifications this node delivered lately, so that no connection gets one twice.
//!
//! A notification can reach a node more than once: through its user's Redis channel and again through
//! each of its channels' (one publish per topic), and once more when the node catches up from the store
//! after a Redis outage. The node keeps one set of the ids it delivered (committed locally or received
//! from Redis) instead of any per-connection state. Entries expire after [`RECENT_WINDOW`], except that
//! nothing newer than the start of a Redis outage expires until the catch-up that follows it is done:
//! the catch-up must know every id delivered during the outage. [`RECENT_MAX_IDS`] bounds the memory of
//! a very long outage under heavy traffic (the oldest ids go first; a client that then sees a duplicate
//! can still tell it by its id).

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// How long an id is remembered in normal operation: far longer than the copies of one message take to
/// arrive through Redis, and than the catch-up margin before an outage (`CATCH_UP_MARGIN`, 2 s), yet
/// short enough that a node ingesting 100k notifications/s stays near the cap below.
pub const RECENT_WINDOW: Duration = Duration::from_secs(10);
/// Most ids remembered (16 bytes each plus the set's overhead: about 50 MiB at the cap).
pub const RECENT_MAX_IDS: usize = 1_000_000;

/// See the module docs.
#[derive(Debug, Default)]
pub struct RecentIds {
    ids: HashSet<Uuid>,
    /// Insertion order with the time of insertion, for expiry.
    order: VecDeque<(Instant, Uuid)>,
    /// While set, nothing inserted at or after this instant expires (an outage awaiting catch-up).
    pinned_since: Option<Instant>,
}

impl RecentIds {
    /// Records `id`; returns `false` if it was already there (a duplicate to drop).
    pub fn insert(&mut self, id: Uuid, now: Instant) -> bool {
        self.expire(now);
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((now, id));
        true
    }

    /// Whether `id` was delivered lately.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Keeps everything inserted from `since` on until [`RecentIds::unpin`] (outage start).
    pub fn pin(&mut self, since: Instant) {
        self.pinned_since.get_or_insert(since);
    }

    /// Lets pinned entries expire again (the catch-up is done).
    pub fn unpin(&mut self) {
        self.pinned_since = None;
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            let old = now.saturating_duration_since(at) > RECENT_WINDOW
                && self.pinned_since.is_none_or(|pin| at < pin);
            if !old && self.order.len() < RECENT_MAX_IDS {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_caught_and_old_ids_expire_unless_pinned() {
        let start = Instant::now();
        let mut recent = RecentIds::default();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert!(recent.insert(a, start));
        assert!(!recent.insert(a, start), "second copy");
        recent.pin(start + Duration::from_secs(1));
        assert!(recent.insert(b, start + Duration::from_secs(1)));
        let later = start + RECENT_WINDOW * 3;
        assert!(recent.insert(c, later));
        assert!(!recent.contains(&a), "expired");
        assert!(recent.contains(&b), "pinned by the outage");
        recent.unpin();
        recent.insert(Uuid::now_v7(), later + RECENT_WINDOW * 2);
        assert!(!recent.contains(&b) && !recent.contains(&c));
    }
}
