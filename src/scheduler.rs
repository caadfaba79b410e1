//! The maintenance policy of the store writer: when scheduled notifications fire, when retention
//! runs, and how long an `Idempotency-Key` is remembered.
//!
//! This module only decides; the store writer executes. After each batch it drains, the writer asks
//! [`Scheduler::due`] what maintenance to append and adds it as the last requests of that batch, in
//! the same transaction as everything else, so maintenance needs no lock and no thread of its own,
//! and the notifications a fire stores get ids above every other id of the batch (commit order). Kept
//! apart from the writer so the timings are plain logic, tested without a database or a thread; it
//! knows nothing of the store (which depends on it), only times and counts.

use std::time::{Duration, Instant};

use crate::model::Millis;

/// How often due scheduled notifications are claimed (API.md promises firing within 1 s). An idle
/// writer wakes this often, so an idle server commits about ten small transactions a second.
pub const SCHEDULER_TICK: Duration = Duration::from_millis(100);
/// Most scheduled notifications one fire stores, so one batch never grows without bound when many
/// fell due at once (after a restart, say); the rest fire at the next ticks.
pub const FIRE_BATCH: usize = 1000;
/// How often retention runs when the previous run found nothing more to delete.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Most notifications one retention run deletes, so it never holds the write lock long.
pub const RETENTION_BATCH: usize = 1000;
/// How long an `Idempotency-Key` is remembered (API.md: 24 hours).
pub const IDEMPOTENCY_TTL_MS: Millis = 24 * 60 * 60 * 1000;

/// An idempotency record created at or before this time has expired at `now`: its key is free
/// again, and the next purge deletes it.
pub fn idempotency_expired_before(now: Millis) -> Millis {
    now.saturating_sub(IDEMPOTENCY_TTL_MS)
}

/// A retention run: what the writer asks the database to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purge {
    /// Delete notifications created before this time; `None` (no `RETENTION_DAYS`) keeps them, and
    /// only expired idempotency records go.
    pub created_before: Option<Millis>,
    /// Most notifications to delete in this run.
    pub limit: usize,
}

/// What the writer appends to the batch it is about to commit, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Maintenance {
    /// A retention run (which also expires idempotency records), if one is due.
    pub purge: Option<Purge>,
    /// Fire up to this many due scheduled notifications, if the tick is due. Always the last request
    /// of the batch: its ids must be above every other id the batch assigned.
    pub fire_due: Option<usize>,
}

/// The writer's maintenance clock.
#[derive(Debug, Clone)]
pub struct Scheduler {
    /// `RETENTION_DAYS`, if set.
    retention: Option<Duration>,
    /// When the next tick is due.
    next_fire: Instant,
    /// When retention (and the expiry of idempotency records) next runs.
    next_purge: Instant,
}

impl Scheduler {
    /// A scheduler whose first tick and first retention run are due at `start`: whatever fell due
    /// while the server was down fires at once.
    pub fn new(retention: Option<Duration>, start: Instant) -> Scheduler {
        Scheduler {
            retention,
            next_fire: start,
            next_purge: start,
        }
    }

    /// When the next tick is due: an idle writer waits for requests until then, and then commits
    /// a batch of maintenance alone.
    pub fn next_tick(&self) -> Instant {
        self.next_fire
    }

    /// The maintenance due at `clock` for a batch about to commit at `now` (wall-clock), and the
    /// next times reckoned from `clock`. A tick is due at the end of any batch committed after it
    /// was due, busy or idle. No retention run is started in the last batch before the writer
    /// stops (`closing`): shutdown should not wait for a purge.
    pub fn due(&mut self, clock: Instant, now: Millis, closing: bool) -> Maintenance {
        let mut maintenance = Maintenance::default();
        if clock >= self.next_purge && !closing {
            let created_before = self
                .retention
                .map(|keep| now.saturating_sub(keep.as_millis() as Millis));
            maintenance.purge = Some(Purge {
                created_before,
                limit: RETENTION_BATCH,
            });
            self.next_purge = clock + RETENTION_INTERVAL;
        }
        if clock >= self.next_fire {
            maintenance.fire_due = Some(FIRE_BATCH);
            self.next_fire = clock + SCHEDULER_TICK;
        }
        maintenance
    }

    /// A committed retention run deleted `deleted` notifications. A full run means more are waiting:
    /// come back at the next tick rather than in a minute.
    pub fn purged(&mut self, deleted: u64, clock: Instant) {
        if deleted >= RETENTION_BATCH as u64 {
            self.next_purge = clock + SCHEDULER_TICK;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: Millis = 24 * 60 * 60 * 1000;

    #[test]
    fn the_first_batch_fires_and_purges_then_the_tick_comes_every_100_ms() {
        let start = Instant::now();
        let mut s = Scheduler::new(None, start);
        let first = s.due(start, 10 * DAY_MS, false);
        assert_eq!(first.fire_due, Some(FIRE_BATCH));
        assert_eq!(
            first.purge,
            Some(Purge {
                created_before: None,
                limit: RETENTION_BATCH
            }),
            "without RETENTION_DAYS the purge still expires idempotency records"
        );
        assert_eq!(s.next_tick(), start + SCHEDULER_TICK);
        // A batch committed before the tick is due gets nothing.
        assert_eq!(
            s.due(start + SCHEDULER_TICK / 2, 0, false),
            Maintenance::default()
        );
        // Any batch committed after it is due gets the fire, at its end.
        let late = start + SCHEDULER_TICK + Duration::from_millis(7);
        assert_eq!(
            s.due(late, 0, false),
            Maintenance {
                purge: None,
                fire_due: Some(FIRE_BATCH)
            }
        );
        assert_eq!(
            s.next_tick(),
            late + SCHEDULER_TICK,
            "reckoned from the fire"
        );
    }

    #[test]
    fn retention_runs_once_a_minute_or_at_the_next_tick_while_purges_come_back_full() {
        let start = Instant::now();
        let keep = Duration::from_secs(2 * 24 * 60 * 60);
        let mut s = Scheduler::new(Some(keep), start);
        let now = 10 * DAY_MS;
        let purge = s.due(start, now, false).purge.unwrap();
        assert_eq!(purge.created_before, Some(now - 2 * DAY_MS));
        assert_eq!(purge.limit, RETENTION_BATCH);
        // Not full: the next run is a minute away, whatever ticks come meanwhile.
        s.purged(RETENTION_BATCH as u64 - 1, start);
        let tick = start + SCHEDULER_TICK;
        assert_eq!(s.due(tick, now, false).purge, None);
        assert!(s
            .due(
                start + RETENTION_INTERVAL - Duration::from_millis(1),
                now,
                false
            )
            .purge
            .is_none());
        let minute = start + RETENTION_INTERVAL;
        assert!(s.due(minute, now, false).purge.is_some());
        // Full: more to delete, so again at the next tick.
        s.purged(RETENTION_BATCH as u64, minute);
        assert!(s.due(minute + SCHEDULER_TICK, now, false).purge.is_some());
    }

    #[test]
    fn the_last_batch_before_shutdown_fires_but_does_not_purge() {
        let start = Instant::now();
        let mut s = Scheduler::new(None, start);
        assert_eq!(
            s.due(start, 0, true),
            Maintenance {
                purge: None,
                fire_due: Some(FIRE_BATCH)
            }
        );
    }

    #[test]
    fn idempotency_records_expire_after_24_hours() {
        assert_eq!(IDEMPOTENCY_TTL_MS, DAY_MS);
        assert_eq!(idempotency_expired_before(3 * DAY_MS), 2 * DAY_MS);
        assert_eq!(idempotency_expired_before(Millis::MIN), Millis::MIN);
    }
}
