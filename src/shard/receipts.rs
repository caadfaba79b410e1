//! Delivery receipts on their way from a shard to the store: `delivered_at` without a store write per
//! delivery.
//!
//! When a stored notification is written to a live connection of its user (live, through Redis, or
//! replayed by a resume), the shard notes `(id, time)` in its [`ReceiptBuffer`]: a push onto a vector,
//! no lock, no allocation in the steady state. The shard's hand-off task ([`hand_off`]) wakes once the
//! buffer is no longer empty, waits [`HAND_OFF_INTERVAL`] so that everything delivered meanwhile
//! travels together, and queues the lot for the store thread (`Store::record_delivered`), which
//! coalesces the receipts of every shard and records them in one statement per batch. So a burst of
//! 10,000 deliveries is a few hand-offs, not 10,000 writes.
//!
//! Bounded: a buffer holds at most [`MAX_BUFFERED`] receipts. When the store's write queue is full,
//! the receipts stay in the buffer and are offered again at the next interval; only past the bound
//! (the store took nothing for a long while, so sends fail too) are new ones dropped, and that is
//! logged. At shutdown the shard hands off what it holds before it ends, ahead of the store's close.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::Shard;
use crate::model::{now_millis, Millis};
use crate::store::DeliveryReceipt;

/// How long a shard collects receipts before handing them to the store thread: the most a receipt
/// waits on the shard while the store keeps up, and what a history read may lag behind a delivery.
pub const HAND_OFF_INTERVAL: Duration = Duration::from_millis(20);

/// Most receipts one shard holds (24 bytes each: under 2 MiB). Reached only when the store thread
/// has taken none for a long time.
pub const MAX_BUFFERED: usize = 65_536;

/// How often dropped receipts are logged at most.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One shard's receipts not yet handed to the store.
#[derive(Debug, Default)]
pub struct ReceiptBuffer {
    /// `(id, first delivery time)`, in delivery order; the store thread coalesces repeats.
    pending: Vec<DeliveryReceipt>,
    /// The hand-off task, parked while the buffer is empty.
    waker: Option<Waker>,
    /// Receipts dropped past [`MAX_BUFFERED`] since the last log line.
    dropped: u64,
    /// When dropped receipts were last logged.
    drop_logged_at: Option<Instant>,
}

impl ReceiptBuffer {
    /// Notes that notification `id` was written to a live connection of its user now.
    pub fn delivered(&mut self, id: Uuid) {
        self.delivered_at(id, now_millis());
    }

    /// Notes that notification `id` was written to a live connection of its user at `at`.
    pub fn delivered_at(&mut self, id: Uuid, at: Millis) {
        if self.pending.len() >= MAX_BUFFERED {
            self.dropped += 1;
            if self
                .drop_logged_at
                .is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL)
            {
                self.drop_logged_at = Some(Instant::now());
                tracing::warn!(
                    dropped = self.dropped,
                    "delivery receipts dropped: the store has taken none for a long time"
                );
                self.dropped = 0;
            }
            return;
        }
        self.pending.push((id, at));
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Receipts waiting for the hand-off.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes everything waiting.
    fn take(&mut self) -> Vec<DeliveryReceipt> {
        std::mem::take(&mut self.pending)
    }

    /// Puts back receipts the store could not take, ahead of the newer ones.
    fn put_back(&mut self, mut receipts: Vec<DeliveryReceipt>) {
        receipts.truncate(MAX_BUFFERED);
        let room = MAX_BUFFERED - receipts.len();
        receipts.extend(self.pending.drain(..).take(room));
        self.pending = receipts;
    }
}

/// Offers the shard's receipts to the store thread; what its full queue refuses stays for next time.
pub(super) fn hand_off_now(shard: &Shard) {
    let receipts = shard.receipts.borrow_mut().take();
    if receipts.is_empty() {
        return;
    }
    if let Err(refused) = shard.store.record_delivered(receipts) {
        shard.receipts.borrow_mut().put_back(refused);
    }
}

/// The shard's hand-off task: waits for a receipt, lets [`HAND_OFF_INTERVAL`] pass, hands off.
pub(super) async fn hand_off(shard: Rc<Shard>) {
    loop {
        wait_for_receipts(&shard.receipts).await;
        glommio::timer::sleep(HAND_OFF_INTERVAL).await;
        hand_off_now(&shard);
    }
}

/// Resolves once the buffer holds a receipt.
async fn wait_for_receipts(buffer: &RefCell<ReceiptBuffer>) {
    poll_fn(|cx| {
        let mut buffer = buffer.borrow_mut();
        if buffer.is_empty() {
            buffer.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_drops_new_receipts_and_keeps_refused_ones_first() {
        let mut buffer = ReceiptBuffer::default();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        buffer.delivered_at(ids[1], 2);
        buffer.put_back(vec![(ids[0], 1)]);
        assert_eq!(buffer.take(), vec![(ids[0], 1), (ids[1], 2)]);
        for _ in 0..MAX_BUFFERED {
            buffer.delivered_at(ids[0], 1);
        }
        buffer.delivered_at(ids[2], 3);
        assert_eq!(buffer.len(), MAX_BUFFERED);
        assert!(buffer.pending.iter().all(|(id, _)| *id == ids[0]));
    }
}
