//! Connections to PostgreSQL: where to connect ([`PostgresTarget`]), one session with its prepared
//! statements, and the [`Link`] that outlives its sessions, reconnecting with backoff after a failure and
//! bounding every request with a timeout (see the module doc of `postgres/mod.rs`).

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls, Socket};

use super::tls::PgTls;
use crate::store::backend::BackendError;
use crate::store::error::postgres_message;
use crate::store::OpenError;

/// Longest wait for a TCP connection to the server, unless the URL's `connect_timeout` says otherwise.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a whole connection set-up (TCP, authentication, session settings, preparing the
/// statements); `connect_timeout` only covers the TCP part.
const SESSION_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The server cancels a statement that runs longer than this. A 4096-row batch takes tens of
/// milliseconds, so this only fires on a database that is stuck (a lock held by an admin, a full disk).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server ends a session that sits inside a transaction doing nothing for this long, which only
/// happens when this client vanished mid-batch; it releases the locks that session held.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one batch or read, measured here. Longer than [`STATEMENT_TIMEOUT`], so a slow but
/// alive server answers with its own timeout error first; this one is for a server or network that no
/// longer answers at all.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// An idle connection starts TCP keepalive probes after this long, so a peer that vanished without a
/// goodbye (a network cut, a crashed host) is noticed even when nothing is being sent.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Unanswered keepalive probes before the kernel declares the connection dead.
const KEEPALIVE_RETRIES: u32 = 3;
/// The kernel fails the connection when data it sent stays unacknowledged this long: keepalives do not
/// cover a connection with a request in flight, and the default retransmission give-up is ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Wait after the first failed connection attempt; doubles after each further failure.
pub(super) const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Most wait between connection attempts while the database stays down: also the longest a recovered
/// database waits to be noticed.
pub(super) const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Yields to the runtime before using an idle session, so its connection task reads a close that
/// arrived meanwhile (see [`Link::ensure_session`]).
const IDLE_CHECK_YIELDS: usize = 2;
/// How long ending a session waits for its connection to say goodbye to the server.
const CLOSE_GRACE: Duration = Duration::from_millis(100);
/// Shown as `application_name` in `pg_stat_activity`, unless the URL names one.
const APPLICATION_NAME: &str = "notification-service";

/// Settings of every session. Set after connecting rather than through the startup `options`, so
/// connection poolers that refuse startup options still work, and a URL's own `options` stay as given.
fn session_settings(read_only: bool) -> String {
    format!(
        "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}; \
         SET default_transaction_read_only = {}",
        STATEMENT_TIMEOUT.as_millis(),
        IDLE_IN_TRANSACTION_TIMEOUT.as_millis(),
        if read_only { "on" } else { "off" },
    )
}

/// Where the data lives: a parsed `DATABASE_URL` with this backend's connection defaults applied.
#[derive(Clone)]
pub(crate) struct PostgresTarget {
    /// What tokio-postgres connects with; holds the password, so it is never printed.
    pub(super) config: Config,
    /// The URL's `sslmode` and `sslrootcert`, and the TLS connector they make (see `tls.rs`).
    pub(super) tls: PgTls,
    /// Bounds one batch or read (see [`OPERATION_TIMEOUT`]); a field so tests can shorten it.
    pub(super) operation_timeout: Duration,
    /// Bounds one connection set-up (see [`SESSION_SETUP_TIMEOUT`]); a field so tests can shorten it.
    pub(super) setup_timeout: Duration,
}

impl PostgresTarget {
    /// Parses a `postgres://` URL (or a libpq `key=value` string) and fills in the timeouts, keepalives
    /// and application name the URL does not set itself. `sslmode` and `sslrootcert` are read here
    /// (and the CA file with them), so a TLS setting that cannot work stops the start-up.
    pub(crate) fn parse(url: &str) -> Result<PostgresTarget, OpenError> {
        let (tls, url) = PgTls::split(url)?;
        // Only the error's own message is shown, never its cause's: that one may quote a piece of the
        // URL, which may be the password. The cause stays reachable through `source()`.
        let mut config = Config::from_str(&url).map_err(|cause| OpenError::Url {
            reason: format!("invalid DATABASE_URL: {cause}"),
            cause: Some(cause),
        })?;
        tls.apply(&mut config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        // The URL cannot be told apart from the library default here; two hours is the default and far
        // too long to notice a dead peer, so anything else is taken as the URL's choice.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        config.keepalives(true);
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        Ok(PostgresTarget {
            config,
            tls,
            operation_timeout: OPERATION_TIMEOUT,
            setup_timeout: SESSION_SETUP_TIMEOUT,
        })
    }

    /// The same target with shorter limits, so a test of an outage does not wait for the real ones.
    #[cfg(test)]
    pub(crate) fn with_timeouts(mut self, operation: Duration, setup: Duration) -> PostgresTarget {
        self.operation_timeout = operation;
        self.setup_timeout = setup;
        self
    }
}

/// Names the server, database, user and options; never the password.
impl fmt::Display for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("postgres://")?;
        if let Some(user) = self.config.get_user() {
            write!(f, "{user}@")?;
        }
        let ports = self.config.get_ports();
        for (i, host) in self.config.get_hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                Host::Tcp(name) => f.write_str(name)?,
                Host::Unix(path) => write!(f, "{}", path.display())?,
            }
            // One port for all hosts, or one per host.
            if let Some(port) = ports.get(i).or(ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        if let Some(dbname) = self.config.get_dbname() {
            write!(f, "/{dbname}")?;
        }
        if let Some(options) = self.config.get_options() {
            write!(f, " options={options:?}")?;
        }
        write!(f, "{}", self.tls)
    }
}

impl fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a request failed inside a session.
#[derive(Debug)]
pub(super) enum Failure {
    /// The server refused, or the connection failed.
    Postgres(tokio_postgres::Error),
    /// Data that could not be encoded or decoded: a bug or a corrupt row, not a connection problem.
    Data(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Postgres(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Postgres(e) => f.write_str(&postgres_message(e)),
            Failure::Data(why) => write!(f, "postgres: {why}"),
        }
    }
}

/// A failure as the store sees it: the same one-line message, and the client's error as its cause.
impl From<Failure> for BackendError {
    fn from(failure: Failure) -> BackendError {
        let message = failure.to_string();
        match failure {
            Failure::Postgres(cause) => BackendError::Postgres {
                message,
                cause: Some(cause),
            },
            Failure::Data(_) => BackendError::Data(message),
        }
    }
}

impl BackendError {
    /// A PostgreSQL failure with no client error behind it (a timeout, a backoff).
    fn postgres(message: String) -> BackendError {
        BackendError::Postgres {
            message,
            cause: None,
        }
    }
}

/// Why a connection attempt failed: the client's error, or no answer in time.
#[derive(Debug)]
pub(super) enum ConnectFailure {
    /// The server refused (authentication, a missing table to prepare against) or could not be reached.
    Refused(tokio_postgres::Error),
    /// The set-up did not finish within this limit.
    TimedOut(Duration),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Refused(e) => f.write_str(&postgres_message(e)),
            ConnectFailure::TimedOut(limit) => write!(
                f,
                "no connection within {} ms (is the server reachable?)",
                limit.as_millis()
            ),
        }
    }
}

impl ConnectFailure {
    /// The start-up error for this failure while doing `context`, keeping the client's error as its
    /// cause.
    pub(super) fn opening(self, context: String) -> OpenError {
        match self {
            ConnectFailure::Refused(cause) => OpenError::Postgres { context, cause },
            ConnectFailure::TimedOut(limit) => OpenError::NoConnection { context, limit },
        }
    }
}

/// Connects within `limit`, and starts the connection's task on the current runtime. Must run inside
/// `block_on`.
pub(super) async fn connect_within(
    target: &PostgresTarget,
    limit: Duration,
) -> Result<(Client, JoinHandle<()>), ConnectFailure> {
    match tokio::time::timeout(limit, connect_client(target)).await {
        Ok(connected) => connected.map_err(ConnectFailure::Refused),
        Err(_) => Err(ConnectFailure::TimedOut(limit)),
    }
}

impl Failure {
    /// Whether the session this happened on can no longer be used. Only the server's own refusals
    /// (a constraint, a timeout it enforced, a trigger's exception) leave the connection in a known good
    /// state; anything else (the socket, the protocol, a `FATAL`, the connection-exception class) drops
    /// it, and reconnecting costs one connection set-up.
    fn loses_connection(&self, client: &Client) -> bool {
        match self {
            Failure::Data(_) => false,
            Failure::Postgres(e) => {
                if client.is_closed() || e.is_closed() {
                    return true;
                }
                match e.as_db_error() {
                    None => true,
                    Some(db) => {
                        matches!(db.severity(), "FATAL" | "PANIC")
                            // Class 08: connection exception.
                            || db.code().code().starts_with("08")
                    }
                }
            }
        }
    }
}

/// The backoff between connection attempts while the database is unreachable.
#[derive(Debug)]
pub(super) struct Backoff {
    /// The wait armed by the next failure.
    next_delay: Duration,
    /// No attempt before this instant; `None` when the last attempt succeeded (or none was made).
    retry_at: Option<Instant>,
}

impl Backoff {
    /// No wait armed.
    pub(super) fn new() -> Backoff {
        Backoff {
            next_delay: RECONNECT_BACKOFF_MIN,
            retry_at: None,
        }
    }

    /// How long until an attempt is allowed, or `None` if it is allowed now.
    pub(super) fn wait_left(&self, now: Instant) -> Option<Duration> {
        self.retry_at
            .and_then(|at| at.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// An attempt failed: wait before the next one, twice as long as last time, up to the cap.
    pub(super) fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.next_delay);
        self.next_delay = (self.next_delay * 2).min(RECONNECT_BACKOFF_MAX);
    }

    /// An attempt succeeded: the next failure starts from the shortest wait again.
    pub(super) fn succeeded(&mut self) {
        *self = Backoff::new();
    }
}

/// The prepared statements of one kind of session, prepared once per connection.
pub(super) trait Statements: Sized {
    /// Whether the session is read-only (reader threads).
    const READ_ONLY: bool;
    /// Prepares every statement on a fresh connection.
    fn prepare(client: &Client) -> impl Future<Output = Result<Self, tokio_postgres::Error>>;
}

/// A live connection and its prepared statements.
struct Session<S> {
    /// The connection; its socket is driven by [`Session::connection`].
    client: Client,
    /// Prepared on this connection (prepared statements belong to one server session).
    statements: S,
    /// The task on the link's runtime that drives the socket; it ends when the socket fails or, once
    /// the client is dropped, after saying goodbye to the server.
    connection: JoinHandle<()>,
}

/// A connection to PostgreSQL that outlives its sessions: it reconnects, with backoff, after a failure.
pub(super) struct Link<S> {
    /// Runs this link's connection task and its requests; current-thread, used only by the thread that
    /// owns the link, and only inside `block_on`, so nothing runs while the thread waits for work.
    runtime: Runtime,
    /// Where to connect.
    target: PostgresTarget,
    /// Who this link serves ("writer", "reader 0"), for logs.
    role: String,
    /// The current session; `None` after a failure, until a request reconnects.
    session: Option<Session<S>>,
    /// Paces connection attempts while they fail.
    backoff: Backoff,
    /// Why the last connection attempt failed, repeated to callers while the backoff runs.
    last_connect_error: String,
}

/// A current-thread runtime with the I/O and timer drivers tokio-postgres needs.
pub(super) fn new_runtime() -> Result<Runtime, OpenError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|cause| OpenError::Io {
            context: "cannot start a runtime for the postgres store".to_owned(),
            cause,
        })
}

/// Connects (over TLS when the target says so) and starts the connection's task on the current
/// runtime. Must run inside `block_on`.
pub(super) async fn connect_client(
    target: &PostgresTarget,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    match target.tls.connector() {
        None => connect_with(&target.config, NoTls).await,
        Some(tls) => connect_with(&target.config, tls.clone()).await,
    }
}

/// [`connect_client`] with one kind of TLS connector (the connection's type depends on it).
async fn connect_with<T>(
    config: &Config,
    tls: T,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, connection) = config.connect(tls).await?;
    let task = tokio::spawn(async move {
        // Ends when the client is dropped or the socket fails; the failure reaches the caller of the
        // request in flight, so it is only worth a debug line here.
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok((client, task))
}

/// Connects, applies the session settings and prepares the statements: a ready session.
async fn open_session<S: Statements>(
    target: &PostgresTarget,
) -> Result<Session<S>, tokio_postgres::Error> {
    let (client, connection) = connect_client(target).await?;
    client
        .batch_execute(&session_settings(S::READ_ONLY))
        .await?;
    let statements = S::prepare(&client).await?;
    Ok(Session {
        client,
        statements,
        connection,
    })
}

impl<S> Link<S> {
    /// Ends the current session, if any: drops the client and gives the connection task a moment to
    /// tell the server (which then rolls back whatever that session had open and releases its locks
    /// at once, instead of when it notices the socket is gone).
    fn close_session(&mut self) {
        if let Some(Session {
            client, connection, ..
        }) = self.session.take()
        {
            drop(client);
            // The task only runs inside block_on; a peer that no longer answers cannot hold this up
            // beyond the grace period.
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(CLOSE_GRACE, connection).await });
        }
    }
}

/// A thread's link is dropped when the thread ends (the store closed): say goodbye to the server.
impl<S> Drop for Link<S> {
    fn drop(&mut self) {
        self.close_session();
    }
}

impl<S: Statements> Link<S> {
    /// Opens the first session now, so a wrong URL or a missing schema stops the start-up with a clear
    /// error instead of a stream of 503s.
    pub(super) fn open(target: &PostgresTarget, role: String) -> Result<Link<S>, OpenError> {
        let mut link = Link {
            runtime: new_runtime()?,
            target: target.clone(),
            role,
            session: None,
            backoff: Backoff::new(),
            last_connect_error: String::new(),
        };
        link.connect().map_err(|e| {
            e.opening(format!(
                "cannot connect the postgres store ({}) to {target}",
                link.role
            ))
        })?;
        Ok(link)
    }

    /// One connection attempt, bounded by the target's set-up timeout.
    fn connect(&mut self) -> Result<(), ConnectFailure> {
        let target = &self.target;
        let limit = self.target.setup_timeout;
        let attempt = self
            .runtime
            .block_on(async { tokio::time::timeout(limit, open_session::<S>(target)).await });
        match attempt {
            Ok(Ok(session)) => {
                self.session = Some(session);
                Ok(())
            }
            Ok(Err(e)) => Err(ConnectFailure::Refused(e)),
            Err(_) => Err(ConnectFailure::TimedOut(limit)),
        }
    }

    /// Makes sure there is a usable session: keeps the current one unless the server closed it, else
    /// connects, unless the backoff says to wait, in which case the request fails at once.
    fn ensure_session(&mut self) -> Result<(), BackendError> {
        if let Some(session) = &self.session {
            // Let the connection task read what arrived while the thread was idle: a server that
            // restarted has said goodbye on this socket, and noticing it now means reconnecting
            // instead of failing this request. One yield lets the runtime poll the socket and wake
            // the connection task; the next lets that task run. Should it not (a different runtime
            // version), the request fails on the closed connection as it would without this check.
            self.runtime.block_on(async {
                for _ in 0..IDLE_CHECK_YIELDS {
                    tokio::task::yield_now().await;
                }
            });
            if !session.client.is_closed() {
                return Ok(());
            }
            tracing::warn!(role = %self.role, "postgres connection closed by the server; reconnecting");
            self.close_session();
        }
        let now = Instant::now();
        if let Some(wait) = self.backoff.wait_left(now) {
            return Err(BackendError::postgres(format!(
                "postgres unreachable ({}); next connection attempt in {} ms",
                self.last_connect_error,
                wait.as_millis()
            )));
        }
        match self.connect() {
            Ok(()) => {
                // The first session is opened by `open`; any connection made here is a reconnect.
                tracing::info!(role = %self.role, target = %self.target, "postgres reconnected");
                self.backoff.succeeded();
                Ok(())
            }
            Err(e) => {
                // From the end of the attempt: one that timed out must not leave the wait expired.
                self.backoff.failed(Instant::now());
                tracing::warn!(
                    role = %self.role,
                    target = %self.target,
                    error = %e,
                    retry_in_ms = self.backoff.wait_left(Instant::now()).map_or(0, |w| w.as_millis()),
                    "postgres connection attempt failed"
                );
                self.last_connect_error = e.to_string();
                let message = format!("postgres unreachable: {e}");
                Err(match e {
                    ConnectFailure::Refused(cause) => BackendError::Postgres {
                        message,
                        cause: Some(cause),
                    },
                    ConnectFailure::TimedOut(_) => BackendError::postgres(message),
                })
            }
        }
    }

    /// Runs `work` on the session (connecting first if needed), bounded by the operation timeout. A
    /// failure that lost the connection ends the session, so the next call reconnects.
    pub(super) fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut Client, &S) -> Result<T, Failure>,
    ) -> Result<T, BackendError> {
        self.ensure_session()?;
        let Some(live) = self.session.as_mut() else {
            return Err(BackendError::postgres("postgres: no session".to_owned()));
        };
        let limit = self.target.operation_timeout;
        let outcome = self.runtime.block_on(async {
            tokio::time::timeout(limit, work(&mut live.client, &live.statements)).await
        });
        let (result, lost) = match outcome {
            Ok(Ok(value)) => (Ok(value), false),
            Ok(Err(failure)) => {
                let lost = failure.loses_connection(&live.client);
                if lost {
                    tracing::warn!(role = %self.role, error = %failure, "postgres connection lost");
                }
                (Err(failure.into()), lost)
            }
            Err(_) => {
                // The state of the connection is unknown (a statement may still be running, its
                // answer may still arrive): never reuse it.
                tracing::warn!(role = %self.role, timeout = ?limit, "postgres did not answer; dropping the connection");
                let why = format!("postgres: no answer within {} ms", limit.as_millis());
                (Err(BackendError::postgres(why)), true)
            }
        };
        if lost {
            self.close_session();
        }
        result
    }
}
