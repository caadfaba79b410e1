//! The seam between the store's thread plumbing and a database.
//!
//! The store thread ([`super::writer`]) and the reader threads ([`super::reader`]) own the queues,
//! the id generator, the listener and the replies; a backend only turns requests into SQL. Keeping
//! that split means the PostgreSQL backend a later issue adds implements these two traits and nothing
//! else: group commit, commit-order delivery, flush on shutdown and error mapping stay written once.
//!
//! A write backend sees a whole drained batch at once, because what "one transaction" costs and how to
//! write many rows fast is backend-specific (one prepared statement per row on SQLite, a multi-row
//! INSERT or COPY on PostgreSQL). Ids and times are assigned before the backend is called, so every
//! backend stores exactly what the listener and the callers will be told.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use super::{HistoryPage, HistoryQuery, ReplayQuery};
use crate::model::{Millis, Notification};

/// A failure of the database, as a message for the logs and the 503 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendError(pub String);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One write of a batch, with ids and timestamps already assigned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WriteRequest {
    /// Store these notifications (ids fresh from the store thread's generator, ascending).
    Insert(Vec<Arc<Notification>>),
    /// Set `read_at` if unset, on that notification of that user's inbox.
    MarkRead {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
    },
    /// Set `read_at` on every unread notification of that user.
    MarkAllRead {
        /// Whose inbox.
        user_id: String,
    },
    /// Remove that notification from that user's inbox.
    Delete {
        /// Whose inbox.
        user_id: String,
        /// Which notification.
        id: Uuid,
    },
}

/// What one [`WriteRequest`] did, in the same position of the batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WriteOutcome {
    /// The notifications of an [`WriteRequest::Insert`] were stored.
    Inserted,
    /// The notification after [`WriteRequest::MarkRead`], or `None` if not in that inbox. Boxed: a
    /// batch holds one outcome per request, most of them small.
    MarkedRead(Option<Box<Notification>>),
    /// How many were unread before [`WriteRequest::MarkAllRead`].
    MarkedAllRead(u64),
    /// Whether [`WriteRequest::Delete`] found the notification.
    Deleted(bool),
}

/// The store thread's connection to a database.
pub(crate) trait WriteBackend: Send + 'static {
    /// Applies every request in ONE transaction, in order (a later request sees an earlier one's
    /// effect), and commits. On success returns one outcome per request, in order; on any failure rolls
    /// everything back and returns the error: all-or-nothing for the whole batch. `now` is the time
    /// written as `read_at`.
    fn apply_batch(
        &mut self,
        requests: &[WriteRequest],
        now: Millis,
    ) -> Result<Vec<WriteOutcome>, BackendError>;
}

/// A reader thread's connection to a database. Each method reads from one consistent snapshot.
pub(crate) trait ReadBackend: Send + 'static {
    /// A page of a user's history and the inbox's counts (see [`super::Store::history`]).
    fn history(&mut self, query: &HistoryQuery) -> Result<HistoryPage, BackendError>;
    /// What a resuming connection missed (see [`super::Store::replay`]).
    fn replay(&mut self, query: &ReplayQuery) -> Result<Vec<Notification>, BackendError>;
    /// A trivial query, to prove the connection works.
    fn ping(&mut self) -> Result<(), BackendError>;
}
