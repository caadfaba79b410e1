//! The reader threads: history, replay and liveness, off the write path.
//!
//! Each reader thread owns one read-only connection and takes requests from one queue shared by the
//! pool, so whichever reader is free answers next and one slow query (a deep history page, a long
//! replay) delays only the reader running it. With WAL, a reader sees the last committed snapshot and
//! never waits for the store thread's transaction, so reads stay fast during a large write batch; and
//! the store thread never waits for them. A small pool (two by default) is enough: reads are short
//! indexed range scans, and each connection costs its own page cache.
//!
//! A read whose caller stopped waiting (the future was dropped, e.g. its connection closed) before a
//! reader took it is skipped rather than run for nobody.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use futures_channel::oneshot;

use super::backend::{ReadBackend, StoredPreferences};
use super::{Counters, HistoryPage, HistoryQuery, ReplayQuery, StoreError, UnreadCount};
use crate::model::Notification;

/// Reader threads are named this, then their index.
const THREAD_NAME_PREFIX: &str = "store-reader-";

/// Where a request's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A read request as shards queue it.
pub(crate) enum ReadOp {
    /// See [`super::Store::history`].
    History {
        /// Which page.
        query: HistoryQuery,
        /// The page.
        reply: Reply<HistoryPage>,
    },
    /// See [`super::Store::replay`].
    Replay {
        /// What was missed.
        query: ReplayQuery,
        /// The notifications, ascending.
        reply: Reply<Vec<Arc<Notification>>>,
    },
    /// See [`super::Store::scheduled`].
    Scheduled {
        /// The schedule's id.
        id: uuid::Uuid,
        /// The pending notification, if any.
        reply: Reply<Option<Notification>>,
    },
    /// See [`super::Store::unread`].
    Unread {
        /// Whose inbox.
        user_id: String,
        /// The count and its version.
        reply: Reply<UnreadCount>,
    },
    /// See [`super::Store::ping`].
    Ping {
        /// Whether the query worked.
        reply: Reply<()>,
    },
    /// See [`super::Store::scheduled_pending`].
    PendingScheduled {
        /// How many are pending.
        reply: Reply<u64>,
    },
    /// See [`super::Store::preferences`].
    Preferences {
        /// Whose.
        user_id: String,
        /// The stored preferences, if any.
        reply: Reply<Option<StoredPreferences>>,
    },
    /// See [`super::Store::all_preferences`].
    AllPreferences {
        /// Every user's.
        reply: Reply<Vec<(String, StoredPreferences)>>,
    },
    /// See [`super::Store::close`]: this reader stops.
    Close,
}

/// Starts reader thread number `index` over `backend`, taking requests from the shared `queue`.
pub(crate) fn spawn<R: ReadBackend>(
    index: usize,
    mut backend: R,
    queue: Receiver<ReadOp>,
    counters: Arc<Counters>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("{THREAD_NAME_PREFIX}{index}"))
        .spawn(move || {
            // Ends once every Store clone is gone and the queue is empty.
            while let Ok(op) = queue.recv() {
                if matches!(op, ReadOp::Close) {
                    break;
                }
                serve(&mut backend, op, &counters);
            }
        })
}

/// Answers one read request.
fn serve<R: ReadBackend>(backend: &mut R, op: ReadOp, counters: &Counters) {
    match op {
        ReadOp::History { query, reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let _ = reply.send(backend.history(&query).map_err(unavailable));
            }
        }
        ReadOp::Replay { query, reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let result = backend
                    .replay(&query)
                    .map(|found| found.into_iter().map(Arc::new).collect())
                    .map_err(unavailable);
                let _ = reply.send(result);
            }
        }
        ReadOp::Scheduled { id, reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let _ = reply.send(backend.scheduled(id).map_err(unavailable));
            }
        }
        ReadOp::Unread { user_id, reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let result = backend.counters(&user_id).map(|c| UnreadCount {
                    user_id,
                    unread: c.unread,
                    version: c.version,
                });
                let _ = reply.send(result.map_err(unavailable));
            }
        }
        ReadOp::Ping { reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let _ = reply.send(backend.ping().map_err(unavailable));
            }
        }
        ReadOp::PendingScheduled { reply } => {
            if !reply.is_canceled() {
                let _ = reply.send(backend.scheduled_pending().map_err(unavailable));
            }
        }
        ReadOp::Preferences { user_id, reply } => {
            if !reply.is_canceled() {
                Counters::add(&counters.reads, 1);
                let _ = reply.send(backend.preferences(&user_id).map_err(unavailable));
            }
        }
        ReadOp::AllPreferences { reply } => {
            if !reply.is_canceled() {
                let _ = reply.send(backend.all_preferences().map_err(unavailable));
            }
        }
        // Handled by the loop, which stops.
        ReadOp::Close => {}
    }
}

/// A failed read is a 503 for its caller; logged here because the caller only sees the message.
fn unavailable(e: super::backend::BackendError) -> StoreError {
    tracing::warn!(error = %e, "store read failed");
    StoreError::Unavailable(Arc::new(e))
}
