//! API keys: the credential of producers calling the HTTP API (and of Prometheus calling `/metrics`).
//!
//! Several keys may be valid at once (`API_KEY=new,old`), so a key is rotated by adding the new one,
//! moving the callers, then removing the old one. A key is never compared as text: both sides are
//! hashed with SHA-256 and the digests compared in constant time (`subtle`), against every configured
//! key without stopping at the first match. So neither the position of the first differing byte nor
//! the key's length nor which key matched shows in the time an answer takes.
//!
//! A request presents its key as `Authorization: Bearer <key>` or as `X-API-Key: <key>`.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::KeyId;
use crate::http::request::RequestHead;

/// The scheme of an `Authorization` header that carries a key or a token (RFC 6750).
const BEARER: &str = "bearer";

/// A set of valid keys, held as digests.
#[derive(Clone)]
pub struct KeySet {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests of secrets are secrets too: only say how many there are.
        write!(f, "KeySet({} keys)", self.digests.len())
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl KeySet {
    /// The keys of a comma-separated list (surrounding spaces ignored, empty items skipped).
    pub fn from_list(list: &str) -> KeySet {
        KeySet {
            digests: list
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| digest(k.as_bytes()))
                .collect(),
        }
    }

    /// Exactly one key, taken whole (commas included).
    pub fn single(key: &str) -> KeySet {
        KeySet {
            digests: vec![digest(key.as_bytes())],
        }
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The index of the key `presented` is, in constant time over every key of the set.
    pub fn find(&self, presented: &[u8]) -> Option<usize> {
        self.lookup(presented).0
    }

    /// Like [`KeySet::find`], with the audit log's id of the presented key (valid or not), taken
    /// from the digest the comparison computes anyway.
    pub fn lookup(&self, presented: &[u8]) -> (Option<usize>, KeyId) {
        let presented = digest(presented);
        let mut found = None;
        for (i, d) in self.digests.iter().enumerate() {
            if bool::from(d.ct_eq(&presented)) {
                found = Some(i);
            }
        }
        (found, KeyId::of_digest(&presented))
    }
}

/// The token of `Authorization: Bearer <token>`, if the header has that form.
pub fn bearer_token(head: &RequestHead) -> Option<&str> {
    let value = head.header_str("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case(BEARER)
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The API key a request presents: `Authorization: Bearer <key>`, else `X-API-Key: <key>`.
pub fn presented_key(head: &RequestHead) -> Option<&str> {
    bearer_token(head).or_else(|| {
        head.header_str("x-api-key")
            .map(str::trim)
            .filter(|k| !k.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex8(key: &[u8]) -> String {
        digest(key)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn every_listed_key_matches_and_nothing_else() {
        let keys = KeySet::from_list(" new-key , ,old-key");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.find(b"new-key"), Some(0));
        assert_eq!(keys.find(b"old-key"), Some(1));
        assert_eq!(keys.find(b"new-ke"), None);
        assert_eq!(keys.find(b"new-key "), None);
        assert_eq!(keys.find(b""), None);
        assert_eq!(KeySet::single("a,b").find(b"a,b"), Some(0));
        assert!(!format!("{keys:?}").contains("new-key"));
        // The audit log's id: 8 hex digits of the SHA-256 (`printf %s new-key | sha256sum`).
        let (index, id) = keys.lookup(b"new-key");
        assert_eq!(index, Some(0));
        assert_eq!(id.to_string(), hex8(b"new-key"));
        assert_eq!(keys.lookup(b"nope").1.to_string(), hex8(b"nope"));
    }
}
