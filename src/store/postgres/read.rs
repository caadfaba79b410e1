//! The readers of the PostgreSQL backend: each read is ONE statement, so a history page and its counts
//! share one snapshot in one round trip.

use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use super::rows::{column_error, notification_from_row};
use super::session::{Failure, Link, PostgresTarget, Statements};
use super::sql::{
    COUNTERS, HISTORY_BY_FILTERS, HISTORY_COUNT_COLUMNS, PING, REPLAY, SCHEDULED, SCHEDULED_PENDING,
};
use crate::model::Notification;
use crate::store::backend::{
    history_before, history_fetch, history_filters, history_page, sql_int, BackendError,
    InboxCounters, ReadBackend, StoredPreferences,
};
use crate::store::{HistoryPage, HistoryQuery, OpenError, ReplayQuery};

/// A reader thread's prepared statements.
struct ReaderStatements {
    /// [`HISTORY_BY_FILTERS`], in its order.
    history: Vec<Statement>,
    /// [`REPLAY`].
    replay: Statement,
    /// [`SCHEDULED`].
    scheduled: Statement,
    /// [`COUNTERS`].
    counters: Statement,
    /// [`PING`].
    ping: Statement,
    /// [`SCHEDULED_PENDING`].
    scheduled_pending: Statement,
}

impl Statements for ReaderStatements {
    const READ_ONLY: bool = true;

    async fn prepare(client: &Client) -> Result<ReaderStatements, tokio_postgres::Error> {
        Ok(ReaderStatements {
            history: {
                let mut history = Vec::with_capacity(HISTORY_BY_FILTERS.len());
                for sql in HISTORY_BY_FILTERS {
                    history.push(client.prepare(sql).await?);
                }
                history
            },
            replay: client.prepare(REPLAY).await?,
            scheduled: client.prepare(SCHEDULED).await?,
            counters: client.prepare(COUNTERS).await?,
            ping: client.prepare(PING).await?,
            scheduled_pending: client.prepare(SCHEDULED_PENDING).await?,
        })
    }
}

/// A reader thread's connection.
pub(crate) struct PostgresReader {
    /// The connection (read-only sessions), reconnecting as needed.
    link: Link<ReaderStatements>,
}

impl PostgresReader {
    /// Connects reader number `index` (for logs).
    pub(crate) fn open(target: &PostgresTarget, index: usize) -> Result<PostgresReader, OpenError> {
        Ok(PostgresReader {
            link: Link::open(target, format!("reader {index}"))?,
        })
    }
}

/// Reads a count column as the API's unsigned count.
pub(super) fn count(row: &Row, index: usize) -> Result<u64, Failure> {
    let n: i64 = row.try_get(index).map_err(|e| column_error(index, e))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

impl ReadBackend for PostgresReader {
    fn history(&mut self, query: &HistoryQuery) -> Result<HistoryPage, BackendError> {
        let before = history_before(query);
        let fetch = history_fetch(query);
        self.link.run(async |client, statements| {
            let statement = &statements.history[history_filters(query)];
            let rows = client
                .query(statement, &[&query.user_id, &before, &fetch])
                .await?;
            let Some(first) = rows.first() else {
                return Err(Failure::Data("history returned no row".to_owned()));
            };
            let total = count(first, 0)?;
            let unread = count(first, 1)?;
            let mut notifications = Vec::with_capacity(rows.len());
            for row in &rows {
                // The LEFT JOIN's row for an empty page has no notification.
                let id: Option<Uuid> = row
                    .try_get(HISTORY_COUNT_COLUMNS)
                    .map_err(|e| column_error(HISTORY_COUNT_COLUMNS, e))?;
                if id.is_some() {
                    notifications.push(notification_from_row(row, HISTORY_COUNT_COLUMNS)?);
                }
            }
            Ok(history_page(query, notifications, total, unread))
        })
    }

    fn replay(&mut self, query: &ReplayQuery) -> Result<Vec<Notification>, BackendError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = sql_int(query.limit);
        self.link.run(async |client, statements| {
            let rows = client
                .query(
                    &statements.replay,
                    &[&query.user_id, &query.since, &limit, &query.channels],
                )
                .await?;
            rows.iter()
                .map(|row| notification_from_row(row, 0))
                .collect()
        })
    }

    fn scheduled(&mut self, id: Uuid) -> Result<Option<Notification>, BackendError> {
        self.link.run(async |client, statements| {
            let row = client.query_opt(&statements.scheduled, &[&id]).await?;
            row.map(|row| notification_from_row(&row, 0)).transpose()
        })
    }

    fn counters(&mut self, user: &str) -> Result<InboxCounters, BackendError> {
        self.link.run(async |client, statements| {
            let row = client.query_opt(&statements.counters, &[&user]).await?;
            let Some(row) = row else {
                return Ok(InboxCounters::default());
            };
            Ok(InboxCounters {
                total: count(&row, 0)?,
                unread: count(&row, 1)?,
                version: count(&row, 2)?,
            })
        })
    }

    fn ping(&mut self) -> Result<(), BackendError> {
        self.link.run(async |client, statements| {
            client.query_one(&statements.ping, &[]).await?;
            Ok(())
        })
    }

    fn preferences(&mut self, user_id: &str) -> Result<Option<StoredPreferences>, BackendError> {
        self.link
            .run(async |client, _| super::preferences::one(client, user_id).await)
    }

    fn all_preferences(&mut self) -> Result<Vec<(String, StoredPreferences)>, BackendError> {
        self.link
            .run(async |client, _| super::preferences::all(client).await)
    }

    fn scheduled_pending(&mut self) -> Result<u64, BackendError> {
        self.link.run(async |client, statements| {
            let row = client.query_one(&statements.scheduled_pending, &[]).await?;
            count(&row, 0)
        })
    }
}
