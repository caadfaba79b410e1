//! `Idempotency-Key`s in the store: the key a producer sends, the receipt recorded with it, and the
//! verdict on a key met again (API.md, "Idempotency").
//!
//! The store records what a keyed write committed (a [`Receipt`]: ids and times), never an HTTP answer:
//! the API renders the answer of a retry from the receipt exactly as it rendered the first one from the
//! stored notifications, so the bytes agree and the store stays free of HTTP.
//!
//! **How a record is stored.** The `idempotency_keys` table of migration 2 has a `status` and a `body`
//! column, made for an HTTP answer. A receipt is written into them as status [`RECEIPT_STATUS`] (0, not
//! an HTTP status) and a compact binary body ([`Receipt::encode`]). A record with any other status was
//! written by a version that stored the answer itself; it is still honoured for its 24 hours as
//! [`Receipt::Answer`], which the API returns as stored, so an upgrade in the middle of a producer's
//! retries changes nothing for it. Keeping the schema means no migration and lets either version read
//! the other's records during a rolling upgrade (an older node replays a receipt's record wrongly, so a
//! mixed deployment should not outlive the upgrade).

use std::sync::Arc;

use uuid::Uuid;

use crate::model::{Millis, Notification};

/// An `Idempotency-Key` and the request it came with (API.md, "Idempotency").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The producer's key.
    pub key: String,
    /// SHA-256 of the route and the body, so the same key with another body is told apart.
    pub fingerprint: [u8; 32],
}

/// The id and creation time of one stored notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The notification's id.
    pub id: Uuid,
    /// When it was committed (milliseconds since the epoch).
    pub created_at: Millis,
}

impl Stamp {
    /// The stamp of a stored notification.
    pub fn of(n: &Notification) -> Stamp {
        Stamp {
            id: n.id,
            created_at: n.created_at,
        }
    }
}

/// What a keyed write committed, recorded with its key and handed back to a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// The notifications an insert stored, in request order.
    Inserted(Vec<Stamp>),
    /// The pending notification a schedule stored.
    Scheduled {
        /// The schedule's id and the time it was scheduled.
        stamp: Stamp,
        /// When it is due.
        scheduled_at: Millis,
        /// Its user, if it has one.
        user_id: Option<String>,
    },
    /// A record written before receipts existed: the HTTP answer the first request got, to return as
    /// it is. Such records expire 24 hours after an upgrade.
    Answer {
        /// The first answer's HTTP status.
        status: u16,
        /// The first answer's body.
        body: Vec<u8>,
    },
}

/// The `status` column of a record that holds a [`Receipt`] in its `body`: no HTTP status is 0.
pub(crate) const RECEIPT_STATUS: u16 = 0;
/// First byte of an encoded [`Receipt::Inserted`].
const INSERTED_TAG: u8 = b'I';
/// First byte of an encoded [`Receipt::Scheduled`].
const SCHEDULED_TAG: u8 = b'S';
/// Bytes of an encoded [`Stamp`]: the id, then the time as a big-endian i64.
const STAMP_BYTES: usize = 24;

impl Receipt {
    /// The receipt of an insert that stored `stored`.
    pub(crate) fn inserted(stored: &[Arc<Notification>]) -> Receipt {
        Receipt::Inserted(stored.iter().map(|n| Stamp::of(n)).collect())
    }

    /// The receipt of a schedule that stored `pending`.
    pub(crate) fn scheduled(pending: &Notification) -> Receipt {
        Receipt::Scheduled {
            stamp: Stamp::of(pending),
            scheduled_at: pending.scheduled_at.unwrap_or(pending.created_at),
            user_id: pending.user_id.clone(),
        }
    }

    /// The `(status, body)` columns that store this receipt.
    pub(crate) fn encode(&self) -> (u16, Vec<u8>) {
        let mut body = Vec::new();
        match self {
            Receipt::Inserted(stamps) => {
                body.reserve(1 + stamps.len() * STAMP_BYTES);
                body.push(INSERTED_TAG);
                for stamp in stamps {
                    push_stamp(&mut body, stamp);
                }
            }
            Receipt::Scheduled {
                stamp,
                scheduled_at,
                user_id,
            } => {
                body.push(SCHEDULED_TAG);
                push_stamp(&mut body, stamp);
                body.extend_from_slice(&scheduled_at.to_be_bytes());
                // The user, if any, is the rest of the body: no length needed.
                if let Some(user) = user_id {
                    body.push(1);
                    body.extend_from_slice(user.as_bytes());
                }
            }
            Receipt::Answer { status, body } => return (*status, body.clone()),
        }
        (RECEIPT_STATUS, body)
    }

    /// Reads the `(status, body)` columns of a record back; `None` when they hold no receipt this
    /// version can read (a corrupt row).
    pub(crate) fn decode(status: u16, body: &[u8]) -> Option<Receipt> {
        if status != RECEIPT_STATUS {
            return Some(Receipt::Answer {
                status,
                body: body.to_vec(),
            });
        }
        let (&tag, rest) = body.split_first()?;
        match tag {
            INSERTED_TAG if rest.len() % STAMP_BYTES == 0 => Some(Receipt::Inserted(
                rest.chunks_exact(STAMP_BYTES)
                    .filter_map(read_stamp)
                    .collect(),
            )),
            SCHEDULED_TAG if rest.len() >= STAMP_BYTES + 8 => {
                let (stamp, rest) = rest.split_at(STAMP_BYTES);
                let (scheduled_at, user) = rest.split_at(8);
                let user_id = match user.split_first() {
                    None => None,
                    Some((1, name)) => Some(String::from_utf8(name.to_vec()).ok()?),
                    Some(_) => return None,
                };
                Some(Receipt::Scheduled {
                    stamp: read_stamp(stamp)?,
                    scheduled_at: Millis::from_be_bytes(scheduled_at.try_into().ok()?),
                    user_id,
                })
            }
            _ => None,
        }
    }
}

/// Appends the encoding of `stamp`.
fn push_stamp(body: &mut Vec<u8>, stamp: &Stamp) {
    body.extend_from_slice(stamp.id.as_bytes());
    body.extend_from_slice(&stamp.created_at.to_be_bytes());
}

/// Reads one encoded stamp ([`STAMP_BYTES`] long).
fn read_stamp(bytes: &[u8]) -> Option<Stamp> {
    let (id, time) = bytes.split_at_checked(16)?;
    Some(Stamp {
        id: Uuid::from_bytes(id.try_into().ok()?),
        created_at: Millis::from_be_bytes(time.try_into().ok()?),
    })
}

/// A key claimed by a write, with the receipt to record if the write goes ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyRecord {
    /// The producer's key.
    pub key: String,
    /// SHA-256 of the route and the body: tells a retry from a different request with the same key.
    pub fingerprint: [u8; 32],
    /// The `status` column: [`RECEIPT_STATUS`] for a receipt.
    pub status: u16,
    /// The `body` column: the encoded receipt.
    pub body: Vec<u8>,
}

impl IdempotencyRecord {
    /// The record of `key` for a write that committed `receipt`.
    pub(crate) fn new(key: IdempotencyKey, receipt: &Receipt) -> IdempotencyRecord {
        let (status, body) = receipt.encode();
        IdempotencyRecord {
            key: key.key,
            fingerprint: key.fingerprint,
            status,
            body,
        }
    }
}

/// An unexpired record found under a claimed key, as a backend read it.
#[derive(Debug)]
pub(crate) struct FoundRecord {
    /// The fingerprint of the request that stored it.
    pub fingerprint: Vec<u8>,
    /// Its `status` column (an integer column: checked here, not by each backend).
    pub status: i64,
    /// Its `body` column.
    pub body: Vec<u8>,
}

/// Why a key was not written: what the store answers instead of writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyVerdict {
    /// The same request came before: nothing is written; this is what it committed.
    Replayed(Receipt),
    /// A different request used the key: nothing is written.
    KeyReused,
}

/// The verdict on a claim whose key already has the unexpired record `found`, the same for every
/// backend: the same fingerprint replays the record's receipt, another is a reuse. A record that
/// cannot be read is an error (the write fails) rather than a wrong answer.
pub(crate) fn verdict(claim: &IdempotencyRecord, found: FoundRecord) -> Result<KeyVerdict, String> {
    if found.fingerprint != claim.fingerprint {
        return Ok(KeyVerdict::KeyReused);
    }
    u16::try_from(found.status)
        .ok()
        .and_then(|status| Receipt::decode(status, &found.body))
        .map(KeyVerdict::Replayed)
        .ok_or_else(|| {
            format!(
                "the idempotency record of key {:?} cannot be read (status {})",
                claim.key, found.status
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: u128, at: Millis) -> Stamp {
        Stamp {
            id: Uuid::from_u128(n),
            created_at: at,
        }
    }

    #[test]
    fn receipts_round_trip_through_the_record_columns() {
        let receipts = [
            Receipt::Inserted(vec![stamp(1, 1_700_000_000_123)]),
            Receipt::Inserted((0..1000).map(|i| stamp(i, -5 + i as Millis)).collect()),
            Receipt::Scheduled {
                stamp: stamp(7, 10),
                scheduled_at: 99,
                user_id: Some("ida \u{e9}".into()),
            },
            Receipt::Scheduled {
                stamp: stamp(7, 10),
                scheduled_at: 99,
                user_id: None,
            },
        ];
        for receipt in receipts {
            let (status, body) = receipt.encode();
            assert_eq!(status, RECEIPT_STATUS);
            assert_eq!(Receipt::decode(status, &body), Some(receipt));
        }
    }

    #[test]
    fn a_record_of_the_previous_version_is_its_http_answer() {
        let body = br#"{"id":"0190","timestamp":"2024-01-29T17:00:00.000Z"}"#;
        assert_eq!(
            Receipt::decode(201, body),
            Some(Receipt::Answer {
                status: 201,
                body: body.to_vec()
            })
        );
    }

    #[test]
    fn corrupt_receipts_are_refused() {
        for body in [&b""[..], b"I\x01", b"S\x00", b"X", b"S"] {
            assert_eq!(Receipt::decode(RECEIPT_STATUS, body), None, "{body:?}");
        }
        let (_, mut body) = Receipt::Scheduled {
            stamp: stamp(1, 1),
            scheduled_at: 1,
            user_id: None,
        }
        .encode();
        body.push(2);
        assert_eq!(Receipt::decode(RECEIPT_STATUS, &body), None);
    }

    #[test]
    fn the_verdict_replays_the_same_request_and_refuses_another() {
        let receipt = Receipt::Inserted(vec![stamp(3, 4)]);
        let key = IdempotencyKey {
            key: "k".into(),
            fingerprint: [1; 32],
        };
        let claim = IdempotencyRecord::new(key, &receipt);
        let found = |fingerprint: [u8; 32], status: i64| FoundRecord {
            fingerprint: fingerprint.to_vec(),
            status,
            body: claim.body.clone(),
        };
        assert_eq!(
            verdict(&claim, found([1; 32], 0)),
            Ok(KeyVerdict::Replayed(receipt))
        );
        assert_eq!(
            verdict(&claim, found([2; 32], 0)),
            Ok(KeyVerdict::KeyReused)
        );
        assert!(verdict(&claim, found([1; 32], 70_000)).is_err());
    }
}
