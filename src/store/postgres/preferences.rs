//! The PostgreSQL side of per-user preferences (API.md, "Preferences"): storing them, reading them,
//! and the notifications quiet hours hold back until they end. Rare writes, so each is one unprepared
//! statement rather than one more prepared on every writer connection.

use std::sync::Arc;

use tokio_postgres::{Client, Row, Transaction};
use uuid::Uuid;

use super::rows::{column_error, notification_from_row, Timestamp};
use super::session::Failure;
use super::sql::{
    ALL_PREFERENCES, FORGET_PREFERENCES, HOLD_QUIET, PREFERENCES, RELEASE_QUIET, SET_PREFERENCES,
};
use crate::store::backend::{sql_int, StoredPreferences, WriteOutcome, WriteRequest};

/// Applies [`WriteRequest::SetPreferences`], [`WriteRequest::HoldQuiet`] or
/// [`WriteRequest::ReleaseQuiet`] in the batch's transaction.
pub(super) async fn apply(
    tx: &Transaction<'_>,
    request: &WriteRequest,
    now: Timestamp,
) -> Result<WriteOutcome, Failure> {
    match request {
        WriteRequest::SetPreferences { user_id, stored } => set(tx, user_id, stored, now).await,
        WriteRequest::HoldQuiet { held } => {
            let ids: Vec<Uuid> = held.iter().map(|h| h.id).collect();
            let users: Vec<&str> = held.iter().map(|h| h.user_id.as_str()).collect();
            let until: Vec<Timestamp> = held.iter().map(|h| Timestamp(h.release_at)).collect();
            tx.execute(HOLD_QUIET, &[&ids, &users, &until])
                .await
                .map(|_| WriteOutcome::Held)
                .map_err(Failure::from)
        }
        WriteRequest::ReleaseQuiet { limit } => release(tx, now, *limit).await,
        _ => Err(Failure::Data(
            "a request planned as a preferences request (a planning bug)".to_owned(),
        )),
    }
}

async fn set(
    tx: &Transaction<'_>,
    user_id: &str,
    stored: &Option<String>,
    now: Timestamp,
) -> Result<WriteOutcome, Failure> {
    match stored {
        Some(json) => tx.execute(SET_PREFERENCES, &[&user_id, json, &now]).await?,
        None => tx.execute(FORGET_PREFERENCES, &[&user_id]).await?,
    };
    Ok(WriteOutcome::PreferencesSet)
}

async fn release(
    tx: &Transaction<'_>,
    now: Timestamp,
    limit: usize,
) -> Result<WriteOutcome, Failure> {
    let rows = tx.query(RELEASE_QUIET, &[&now, &sql_int(limit)]).await?;
    let released = rows
        .iter()
        .map(|row| notification_from_row(row, 0).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WriteOutcome::Released(released))
}

/// One user's stored preferences.
pub(super) async fn one(
    client: &Client,
    user_id: &str,
) -> Result<Option<StoredPreferences>, Failure> {
    let row = client.query_opt(PREFERENCES, &[&user_id]).await?;
    row.map(|row| stored(&row, 0)).transpose()
}

/// Every user's stored preferences.
pub(super) async fn all(client: &Client) -> Result<Vec<(String, StoredPreferences)>, Failure> {
    let rows = client.query(ALL_PREFERENCES, &[]).await?;
    rows.iter()
        .map(|row| {
            let user: String = row.try_get(0).map_err(|e| column_error(0, e))?;
            Ok((user, stored(row, 1)?))
        })
        .collect()
}

/// The preferences and their time, from column `first` on.
fn stored(row: &Row, first: usize) -> Result<StoredPreferences, Failure> {
    let json: String = row.try_get(first).map_err(|e| column_error(first, e))?;
    let at: Timestamp = row
        .try_get(first + 1)
        .map_err(|e| column_error(first + 1, e))?;
    Ok(StoredPreferences {
        json,
        updated_at: at.0,
    })
}
