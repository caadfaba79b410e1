//! The store's errors: what a request is told ([`StoreError`]), what a database said
//! ([`BackendError`]), and why the store could not be opened ([`OpenError`]).
//!
//! Each keeps its cause as a typed `source()`. Their `Display` is already the whole story on one line
//! (the cause's text included), because that one line is what the logs, the start-up failure and the
//! API's 503 show; `source()` is there for code that needs the cause itself.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

/// A failure of the database, for the logs and the 503 answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// SQLite refused or failed.
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// PostgreSQL refused or failed, did not answer, or cannot be reached; `message` says which.
    #[error("{message}")]
    Postgres {
        /// What happened, with the server's own words when it said something.
        message: String,
        /// The client library's error, when there is one (not for a timeout or a backoff).
        #[source]
        cause: Option<tokio_postgres::Error>,
    },
    /// Data that could not be encoded or decoded: a bug or a corrupt row, not an outage.
    #[error("{0}")]
    Data(String),
}

impl From<rusqlite::Error> for BackendError {
    fn from(e: rusqlite::Error) -> BackendError {
        BackendError::Sqlite(e)
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not commit or read. The API answers 503. Shared: one failed batch fails
    /// every request in it with the same cause.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Arc<BackendError>),
    /// Too many requests are waiting (a queue is full): the API answers 503, a signal to back off.
    #[error("store unavailable: {0}")]
    Overloaded(&'static str),
    /// The store has shut down.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// A store failure that is no database's: a bug between the store's own parts.
    pub(crate) fn internal(why: &str) -> StoreError {
        StoreError::Unavailable(Arc::new(BackendError::Data(why.to_owned())))
    }
}

/// Why the store could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused: what was being done, and SQLite's error.
    #[error("{context}: {cause}")]
    Sqlite {
        /// What was being done (`cannot open sqlite database <path>`).
        context: String,
        /// SQLite's error.
        #[source]
        cause: rusqlite::Error,
    },
    /// The operating system refused (a folder, a thread): what was being done, and its error.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        #[source]
        cause: std::io::Error,
    },
    /// `DATABASE_URL` cannot work: a wrong scheme, no file, an in-memory SQLite (our own checks, with no
    /// cause), or a PostgreSQL URL its client library cannot parse (its error is the cause).
    #[error("{reason}")]
    Url {
        /// What is wrong, without echoing the URL (it may hold a password).
        reason: String,
        /// The client library's parse error, when it was the one to refuse.
        #[source]
        cause: Option<tokio_postgres::Error>,
    },
    /// PostgreSQL refused, or the connection to it failed: what was being done (naming the server
    /// without its password), and the client's error.
    #[error("{context}: {}", postgres_message(.cause))]
    Postgres {
        /// What was being done (`cannot connect the postgres store (writer) to postgres://...`).
        context: String,
        /// The client library's error; the server's own words are in it when the server said something.
        #[source]
        cause: tokio_postgres::Error,
    },
    /// PostgreSQL did not finish a connection set-up in time: nothing refused, so there is no cause.
    #[error("{context}: no connection within {} ms (is the server reachable?)", .limit.as_millis())]
    NoConnection {
        /// What was being done, as for [`OpenError::Postgres`].
        context: String,
        /// How long the attempt was given.
        limit: Duration,
    },
    /// The TLS set-up `DATABASE_URL` asks for cannot be made (an unreadable `sslrootcert`, no system
    /// roots for `sslrootcert=system`).
    #[error("invalid DATABASE_URL: {0}")]
    Tls(#[source] crate::tls::TlsError),
    /// The database answered without an error, but not what was asked (SQLite kept another journal
    /// mode, or another `synchronous`): there is no cause to keep, only what was asked and what came
    /// back.
    #[error("{0}")]
    Refused(String),
}

/// A PostgreSQL client error on one line. tokio-postgres's own message leaves out the server's text and
/// the I/O error (they are its source), which are what an operator needs to read: say both. A refused
/// TLS certificate also gets a plain explanation (which CA setting to check, a host name that does not
/// match).
pub(crate) fn postgres_message(e: &tokio_postgres::Error) -> String {
    let message = match e.as_db_error() {
        Some(db) => format!("postgres: {db}"),
        None => match e.source() {
            Some(cause) => format!("postgres: {e}: {cause}"),
            None => format!("postgres: {e}"),
        },
    };
    match crate::tls::explain(e, "sslrootcert") {
        Some(hint) => format!("{message} ({hint})"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn errors_read_as_one_line_and_keep_their_cause() {
        let sqlite = rusqlite::Error::InvalidQuery;
        let open = OpenError::Sqlite {
            context: "cannot open sqlite database x.db".into(),
            cause: sqlite,
        };
        assert!(open
            .to_string()
            .starts_with("cannot open sqlite database x.db: "));
        assert!(open.source().unwrap().is::<rusqlite::Error>());

        let failed = StoreError::Unavailable(Arc::new(BackendError::Sqlite(
            rusqlite::Error::InvalidQuery,
        )));
        assert!(failed
            .to_string()
            .starts_with("store unavailable: sqlite: "));
        let backend = failed.source().unwrap();
        assert!(backend.is::<Arc<BackendError>>());
        assert!(backend.source().unwrap().is::<rusqlite::Error>());
        assert_eq!(
            StoreError::Overloaded("write queue full").to_string(),
            "store unavailable: write queue full"
        );
    }
}
