//! A shard's inbox: how other threads (the store thread, the bus thread, other shards, the signal thread)
//! hand work to a shard without locks on the delivery path. It lives beside [`Delivery`] rather than in
//! `shard`, so that the senders (`bus`, `server`) need nothing of the shard.
//!
//! A lock-free MPSC queue (crossbeam) carries the messages; an [`AtomicWaker`] wakes the shard's pump
//! task. The pump registers its waker only while it waits on an empty queue, and `AtomicWaker::wake`
//! takes it, so a burst of a thousand pushes costs one cross-thread wakeup (glommio turns a foreign
//! wake into an eventfd write when the shard sleeps), however many arrive while the pump drains, and
//! the pump drains the whole burst in one go. An idle shard sleeps in the kernel: nothing spins.

use std::sync::Arc;
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::delivery::Delivery;
use crate::preferences::Preferences;

/// A connection's slot in its shard's hub (`shard::hub`), which hands it out. Valid only on that
/// shard, and only until the connection goes away; it is here because a shard's own inbox names the
/// sender of a client publish ([`ShardMsg::DeliverExcept`]).
pub type ConnId = u32;

/// Work sent to a shard from another thread.
#[derive(Debug)]
pub enum ShardMsg {
    /// Deliveries to route to this shard's interested connections, in order.
    Deliver(Arc<[Arc<Delivery>]>),
    /// Everything one commit of the store thread has for this shard, in one hand-off (one wake): its
    /// deliveries (notifications, unread counts, releases; shared by every shard), then the answers
    /// to the writes this shard queued, run after the deliveries are written so that a producer that
    /// hears back finds the notification already on this shard's sockets.
    Commit {
        /// The commit's deliveries, in order.
        deliveries: Arc<[Arc<Delivery>]>,
        /// The answers to this shard's writes of the commit.
        replies: Vec<Completion>,
    },
    /// A client's publish, sent by a connection of this same shard to its own inbox so that it is
    /// written in the pump's batches too; the sender (a connection of this shard) is skipped.
    DeliverExcept(Arc<Delivery>, ConnId),
    /// Begin a graceful shutdown: stop accepting, close WebSockets with 1001, finish requests.
    Shutdown,
    /// The Pusher HTTP API asks how many of this shard's connections are subscribed to each channel
    /// whose name starts with `prefix` (with `exact`, to that one channel only); the shard answers
    /// with `(channel, subscribed connections)` pairs, leaving out empty channels.
    ChannelCounts {
        /// The channel name prefix (`filter_by_prefix`), or the whole name with `exact`.
        prefix: String,
        /// Whether `prefix` is one channel's whole name.
        exact: bool,
        /// Where the answer goes.
        reply: futures_channel::oneshot::Sender<Vec<(String, usize)>>,
    },
    /// Close this shard's Pusher connections signed in as this user (the Pusher HTTP API's
    /// `terminate_connections`).
    TerminateUser(Box<str>),
    /// A user's preferences changed (here or on another node): the shard's copy, kept beside the
    /// user's interned name, follows (`None`: back to the defaults).
    Preferences(Arc<str>, Option<Arc<Preferences>>),
}

/// An answer another thread hands to a shard to give on the shard's own thread (the store thread's
/// reply to a write): completing it there wakes the waiting task as a local wake, not as one more
/// wake from another thread.
pub struct Completion(Box<dyn FnOnce() + Send>);

impl Completion {
    /// An answer that `give` gives.
    pub fn new(give: impl FnOnce() + Send + 'static) -> Completion {
        Completion(Box::new(give))
    }

    /// Gives the answer. A completion dropped without this drops its answer (the waiting side sees
    /// its channel closed).
    pub fn run(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

/// The sending side of a shard's inbox; cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct ShardInbox {
    queue: crossbeam_channel::Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// The receiving side, owned by the shard's pump task.
#[derive(Debug)]
pub struct InboxReceiver {
    queue: crossbeam_channel::Receiver<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// Creates a connected inbox pair.
pub fn inbox() -> (ShardInbox, InboxReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        ShardInbox {
            queue: tx,
            waker: waker.clone(),
        },
        InboxReceiver { queue: rx, waker },
    )
}

impl ShardInbox {
    /// Queues a message for the shard and wakes it. A shard that has already exited drops the message.
    pub fn send_to_shard(&self, msg: ShardMsg) {
        if self.queue.send(msg).is_ok() {
            self.waker.wake();
        }
    }
}

impl InboxReceiver {
    /// Waits until at least one message is queued. The pump's waker is registered only while it
    /// waits on an empty queue, so messages pushed while it drains wake nothing: a burst costs one
    /// wake, whatever its length.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            if !self.queue.is_empty() {
                return Poll::Ready(());
            }
            // Register before checking again, so a push between the check and the return is not
            // missed.
            self.waker.register(cx.waker());
            if self.queue.is_empty() {
                Poll::Pending
            } else {
                // Not waiting after all: no sender should wake a pump that is about to drain.
                drop(self.waker.take());
                Poll::Ready(())
            }
        })
        .await
    }

    /// Takes one queued message, if any.
    pub fn try_next(&self) -> Option<ShardMsg> {
        self.queue.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[test]
    fn a_message_from_another_thread_wakes_the_receiver() {
        let (tx, rx) = inbox();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send_to_shard(ShardMsg::Shutdown);
        });
        futures_executor::block_on(rx.ready());
        assert!(matches!(rx.try_next(), Some(ShardMsg::Shutdown)));
        assert!(rx.try_next().is_none());
        sender.join().unwrap();
    }

    /// Counts the wakes of a task, as glommio would turn each foreign one into an eventfd write.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_burst_into_a_waiting_inbox_wakes_the_shard_once() {
        let (tx, rx) = inbox();
        let counter = Arc::new(CountingWaker(0.into()));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut ready = Box::pin(rx.ready());
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        for _ in 0..3 {
            tx.send_to_shard(ShardMsg::Shutdown);
        }
        let wakes = || counter.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(wakes(), 1, "three messages, one wake");
        assert!(ready.as_mut().poll(&mut cx).is_ready());
        // Until the shard waits again, more messages wake nothing: it drains them all.
        tx.send_to_shard(ShardMsg::Shutdown);
        assert_eq!(wakes(), 1);
        while rx.try_next().is_some() {}
        let mut again = Box::pin(rx.ready());
        assert!(again.as_mut().poll(&mut cx).is_pending());
        tx.send_to_shard(ShardMsg::Shutdown);
        assert_eq!(
            wakes(),
            2,
            "a message into an inbox waited on again wakes it again"
        );
    }
}
