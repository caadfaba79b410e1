//! Values between PostgreSQL's rows and the model: times in PostgreSQL's binary `timestamptz` format,
//! and a notification decoded from the columns of `sql::columns!`.

use std::error::Error as StdError;

use bytes::BytesMut;
use tokio_postgres::types::{accepts, to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;

use super::session::Failure;
use crate::model::{Millis, Notification};

/// Milliseconds from the Unix epoch (the model's) to 2000-01-01 UTC (PostgreSQL's timestamp epoch).
pub(super) const POSTGRES_EPOCH_MILLIS: Millis = 946_684_800_000;
/// Microseconds per millisecond, for converting between the two epochs' units.
const MICROS_PER_MILLI: i64 = 1_000;

/// A time in the model's unit (milliseconds since the Unix epoch), in PostgreSQL's binary `timestamptz`
/// format (microseconds since 2000-01-01 UTC, a big-endian i64). Written by hand rather than through
/// `SystemTime` so that conversion is exact both ways and an out-of-range time is an error, never a
/// panic (the library's `SystemTime` encoding overflows on absurd values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timestamp(pub(super) Millis);

impl ToSql for Timestamp {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let micros = self
            .0
            .checked_sub(POSTGRES_EPOCH_MILLIS)
            .and_then(|ms| ms.checked_mul(MICROS_PER_MILLI))
            .ok_or_else(|| format!("time {} ms is out of PostgreSQL's range", self.0))?;
        out.extend_from_slice(&micros.to_be_bytes());
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Timestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Timestamp, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("timestamptz of {} bytes, expected 8", raw.len()))?;
        let micros = i64::from_be_bytes(bytes);
        // Floor division, so a time before 2000 (or an operator's sub-millisecond edit) rounds down
        // like every other; `infinity` saturates instead of overflowing.
        Ok(Timestamp(
            micros
                .div_euclid(MICROS_PER_MILLI)
                .saturating_add(POSTGRES_EPOCH_MILLIS),
        ))
    }

    accepts!(TIMESTAMPTZ);
}

/// A decoding failure of column `index`, as a [`Failure`] that keeps the connection.
pub(super) fn column_error(index: usize, e: tokio_postgres::Error) -> Failure {
    let cause = e.source().map(ToString::to_string).unwrap_or_default();
    Failure::Data(format!("cannot decode column {index}: {e} {cause}"))
}

/// Decodes one notification selected with [`columns!`], starting at column `first`.
pub(super) fn notification_from_row(row: &Row, first: usize) -> Result<Notification, Failure> {
    let get = |offset: usize| first + offset;
    macro_rules! column {
        ($offset:expr) => {
            row.try_get(get($offset))
                .map_err(|e| column_error(get($offset), e))?
        };
    }
    let time = |t: Option<Timestamp>| t.map(|t| t.0);
    let created_at: Timestamp = column!(8);
    Ok(Notification {
        id: column!(0),
        user_id: column!(1),
        kind: column!(2),
        title: column!(3),
        message: column!(4),
        channels: column!(5),
        broadcast: column!(6),
        data: column!(7),
        created_at: created_at.0,
        read_at: time(column!(9)),
        delivered_at: time(column!(10)),
        seen_at: time(column!(11)),
        scheduled_at: time(column!(12)),
        schedule_id: column!(13),
        urgent: column!(14),
    })
}
