//! The migration runner of the PostgreSQL backend: applies `migrations/postgres/` at start-up, under an
//! advisory lock so that several nodes starting together apply each migration once.

use tokio_postgres::Client;

use super::session::{connect_within, new_runtime, PostgresTarget};
use super::sql::CREATE_MIGRATIONS_TABLE;
use crate::store::backend::{migrations, warn_if_schema_is_newer, Migration};
use crate::store::error::postgres_message;
use crate::store::OpenError;

/// Every migration, in order (see [`migrations!`]).
pub(crate) const MIGRATIONS: &[Migration] = migrations!("postgres");

/// The key of the session advisory lock held while migrating, so several nodes starting at once
/// migrate one after the other. Any constant works as long as nothing else in the database uses it:
/// this one is "notify" in ASCII, then migration lock number 1.
const MIGRATION_LOCK_KEY: i64 = 0x6e6f_7469_6679_0001;

/// Applies the migrations not yet recorded in `schema_migrations`, each in its own transaction together
/// with its record, while holding a session advisory lock, so several nodes starting at once apply each
/// migration once (the others wait, then find it recorded). Runs on a connection of its own, closed at
/// the end (which would release the lock even if unlocking failed). Returns how many were applied.
pub(crate) fn migrate(target: &PostgresTarget) -> Result<usize, OpenError> {
    let runtime = new_runtime()?;
    let context = || format!("cannot migrate the postgres database {target}");
    runtime.block_on(async {
        let (client, _connection) = connect_within(target, target.setup_timeout)
            .await
            .map_err(|e| e.opening(context()))?;
        migrate_on(client)
            .await
            .map_err(|cause| OpenError::Postgres {
                context: context(),
                cause,
            })
    })
}

/// See [`migrate`]; `client` is closed when this returns.
async fn migrate_on(mut client: Client) -> Result<usize, tokio_postgres::Error> {
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .try_get(0)?;
    if !locked {
        tracing::info!("another node is migrating the postgres database; waiting for it");
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
    }
    client.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
    let mut applied = 0;
    for migration in MIGRATIONS {
        let tx = client.transaction().await?;
        let done: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                &[&migration.version],
            )
            .await?
            .try_get(0)?;
        if done {
            continue; // dropping `tx` rolls back a transaction that changed nothing
        }
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&migration.version],
        )
        .await?;
        tx.commit().await?;
        applied += 1;
        tracing::info!(version = migration.version, "applied postgres migration");
    }
    let newest: Option<i64> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .try_get(0)?;
    warn_if_schema_is_newer(newest, MIGRATIONS);
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    Ok(applied)
}

/// Whether the database of `target` can be reached, without changing anything: connects (within the
/// set-up timeout) and reads the schema version. Returns what was found, as one line for
/// `check-config`.
pub(crate) fn probe(target: &PostgresTarget) -> Result<String, String> {
    let runtime = new_runtime().map_err(|e| e.to_string())?;
    let context =
        |e: &dyn std::fmt::Display| format!("cannot reach the postgres database {target}: {e}");
    runtime.block_on(async {
        let (client, _connection) = connect_within(target, target.setup_timeout)
            .await
            .map_err(|e| context(&e))?;
        let probe = async {
            let has_table: bool = client
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await?
                .try_get(0)?;
            if !has_table {
                return Ok(None);
            }
            let version: Option<i64> = client
                .query_one("SELECT max(version) FROM schema_migrations", &[])
                .await?
                .try_get(0)?;
            Ok::<_, tokio_postgres::Error>(version)
        };
        let version = tokio::time::timeout(target.setup_timeout, probe)
            .await
            .map_err(|_| context(&format!("no answer within {:?}", target.setup_timeout)))?
            .map_err(|e| context(&postgres_message(&e)))?;
        Ok(crate::store::backend::describe_version(
            &target.to_string(),
            version,
            MIGRATIONS,
        ))
    })
}
