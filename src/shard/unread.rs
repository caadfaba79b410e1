//! The live `unread` event on one shard: the newest count per user, written coalesced.
//!
//! Counts reach a shard as deliveries (`delivery::Content::Unread`) from the store thread after each
//! commit that changed a user's unread count, and from other nodes through Redis. A burst of 1,000
//! sends is up to 1,000 counts of the same user, but the client needs only the last: the pump records
//! each count as the user's pending one (replacing an older pending one), and [`run_flusher`] writes
//! what is pending every `UNREAD_COALESCE_MS`, so a burst costs each connection one frame per period.
//!
//! Counts of one user come from several ways that can overtake each other (this node's store thread,
//! another node's through Redis). Each carries the version of the user's counters row (migration 4),
//! and the hub keeps the newest version it has seen per user ([`Hub::note_unread`]), so an older count
//! is dropped rather than written after a newer one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::delivery::Delivery;
use crate::shard::hub::{ConnKind, Hub};
use crate::shard::Shard;

/// The counts waiting to be written on one shard.
#[derive(Debug, Default)]
pub(crate) struct PendingUnread {
    /// The newest count of each user not written yet, as its delivery.
    by_user: RefCell<HashMap<String, Arc<Delivery>>>,
    /// The flusher's waker, while it waits for a first pending count.
    waker: RefCell<Option<Waker>>,
}

impl PendingUnread {
    /// Takes an `unread` delivery from the inbox: if it is newer than what the hub knows of the user
    /// (and the user has a connection here), it becomes the user's pending count.
    pub(crate) fn offer(&self, hub: &mut Hub, delivery: &Arc<Delivery>) {
        let (Some((count, version)), Some(user)) = (delivery.unread(), delivery.user.as_deref())
        else {
            return;
        };
        if !hub.note_unread(user, version, count) {
            return;
        }
        self.by_user
            .borrow_mut()
            .insert(user.to_owned(), delivery.clone());
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Waits until a count is pending.
    async fn any(&self) {
        poll_fn(|cx| {
            if self.by_user.borrow().is_empty() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Takes every pending count.
    fn take(&self) -> Vec<Arc<Delivery>> {
        self.by_user.borrow_mut().drain().map(|(_, d)| d).collect()
    }
}

/// The shard's flusher task: once a count is pending, waits `period` (more counts of the same users
/// replace it meanwhile), then writes every pending count to its user's connections in one write
/// batch. With a zero period, counts are written as soon as the pump has routed its burst. Counts are
/// control events: they are not counted as deliveries in `/metrics` nor written to the audit log.
pub(crate) async fn run_flusher(shard: Rc<Shard>, period: Duration) {
    let max_outbound = shard.config.max_outbound_bytes;
    loop {
        shard.unread.any().await;
        if !period.is_zero() {
            glommio::timer::sleep(period).await;
        }
        if shard.is_shutting_down() {
            return;
        }
        let pending = shard.unread.take();
        let mut batch = shard.write_batch.borrow_mut();
        let mut hub = shard.hub.borrow_mut();
        for delivery in &pending {
            hub.for_each_target(delivery, None, |id, conn, frame| {
                // The native event, and SSE's `event: unread`; a parked long-poll answers only
                // notifications, and the Pusher protocol has no such event.
                if matches!(conn.kind, ConnKind::WebSocket | ConnKind::Sse) {
                    batch.deliver(id, conn, None, frame, max_outbound);
                }
            });
        }
        if !batch.is_empty() {
            batch.flush(&mut hub, max_outbound);
        }
    }
}
