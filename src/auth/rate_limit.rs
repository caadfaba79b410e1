//! Rate limits as GCRA (the generic cell rate algorithm), the token bucket written as one timestamp.
//!
//! A bucket of `burst` tokens refilled at `rate` per second is the same as remembering one "theoretical
//! arrival time" (TAT): each allowed event pushes it one emission interval (`1/rate`) further, and an
//! event is refused when that would put the TAT more than `burst` intervals ahead of now. One `u64` of
//! state, no refill timer, and the wait until the next allowed event falls out of the arithmetic (the
//! `Retry-After` of a 429).
//!
//! Two holders of that state: [`SharedBucket`], an `AtomicU64` updated by compare-and-swap, for limits
//! that span shards (one per API key, node-wide, lock-free); and [`LocalBucket`], a plain `u64` for a
//! limit one task owns alone (one WebSocket connection's messages).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A rate and a burst, as the GCRA's two intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Nanoseconds between two events at the sustained rate.
    interval_ns: u64,
    /// How far ahead of now the TAT may run: `burst` intervals.
    tolerance_ns: u64,
}

impl Rate {
    /// `per_second` events a second, `burst` at once (0: one second's worth). `None` when
    /// `per_second` is 0, which means no limit.
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        if per_second == 0 {
            return None;
        }
        let burst = if burst == 0 { per_second } else { burst };
        let interval_ns = NANOS_PER_SECOND / u64::from(per_second);
        Some(Rate {
            interval_ns,
            tolerance_ns: interval_ns * u64::from(burst),
        })
    }

    /// The burst, in events.
    pub fn burst(&self) -> u32 {
        (self.tolerance_ns / self.interval_ns.max(1)) as u32
    }

    /// The GCRA step: the new TAT if an event at `now` is allowed, else how long until it would be.
    fn step(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let next = tat.max(now) + self.interval_ns;
        let ahead = next - now;
        if ahead > self.tolerance_ns {
            Err(Duration::from_nanos(ahead - self.tolerance_ns))
        } else {
            Ok(next)
        }
    }
}

/// A monotonic clock in nanoseconds since a fixed start, the time base of every bucket.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the clock started. Starts at one full second so that a fresh bucket (TAT 0)
    /// holds its whole burst from the first event.
    pub fn now_ns(&self) -> u64 {
        NANOS_PER_SECOND.saturating_add(self.start.elapsed().as_nanos() as u64)
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// A bucket shared by threads (one API key on every shard): lock-free, one CAS per allowed event.
#[derive(Debug, Default)]
pub struct SharedBucket {
    tat: AtomicU64,
}

impl SharedBucket {
    /// Takes one token at `now`, or says how long until one is free.
    pub fn take(&self, rate: &Rate, now: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = rate.step(tat, now)?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// A bucket owned by one task (one WebSocket connection).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalBucket {
    tat: u64,
}

impl LocalBucket {
    /// Takes one token at `now`, or says how long until one is free.
    pub fn take(&mut self, rate: &Rate, now: u64) -> Result<(), Duration> {
        self.tat = rate.step(self.tat, now)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = NANOS_PER_SECOND;

    #[test]
    fn zero_rate_means_no_limit_and_zero_burst_means_one_second() {
        assert_eq!(Rate::new(0, 5), None);
        assert_eq!(Rate::new(10, 0).unwrap().burst(), 10);
        assert_eq!(Rate::new(10, 3).unwrap().burst(), 3);
    }

    #[test]
    fn a_burst_passes_then_the_sustained_rate() {
        let rate = Rate::new(10, 3).unwrap();
        let mut bucket = LocalBucket::default();
        let now = SECOND;
        for _ in 0..3 {
            assert_eq!(bucket.take(&rate, now), Ok(()));
        }
        let wait = bucket.take(&rate, now).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One interval later exactly one more fits.
        assert_eq!(bucket.take(&rate, now + SECOND / 10), Ok(()));
        assert!(bucket.take(&rate, now + SECOND / 10).is_err());
        // After a long pause the burst is back, not more.
        let later = now + 60 * SECOND;
        for _ in 0..3 {
            assert_eq!(bucket.take(&rate, later), Ok(()));
        }
        assert!(bucket.take(&rate, later).is_err());
    }

    #[test]
    fn the_shared_bucket_counts_across_threads() {
        let rate = Rate::new(1, 1000).unwrap();
        let bucket = std::sync::Arc::new(SharedBucket::default());
        let allowed: usize = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|_| bucket.take(&rate, SECOND).is_ok())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(allowed, 1000, "exactly the burst, however the threads race");
    }
}
