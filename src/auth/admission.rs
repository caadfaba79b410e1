//! Connection caps that hold across shards: per node, per client IP, per user.
//!
//! Shards share nothing on the hot path, but a cap on "connections of this user" means nothing if each
//! shard counts alone (the kernel spreads one client's sockets over every shard). So these counts are
//! the one shared structure of the connection path, and they are touched only when a connection opens
//! or closes, never per message: the node-wide count is an atomic; the per-IP and per-user counts are
//! maps split into [`STRIPES`] mutex-guarded stripes by hash, so shards opening connections at the same
//! moment rarely wait on the same lock. An entry is removed when its count drops to zero, so the maps
//! hold only addresses and users that are connected now.
//!
//! A connection's slot is a permit ([`ConnectionPermit`]) that gives it back when dropped, whatever way
//! the connection ends; a user's slot is given back by the session when it ends.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::{Refusal, Refusals};

/// Stripes of each map: enough that a few shards opening connections at once rarely collide.
const STRIPES: usize = 16;

/// A count per key, striped.
#[derive(Debug)]
struct StripedCounts<K> {
    hasher: RandomState,
    stripes: Vec<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq> StripedCounts<K> {
    fn new() -> StripedCounts<K> {
        StripedCounts {
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<HashMap<K, usize>> {
        &self.stripes[self.hasher.hash_one(key) as usize % STRIPES]
    }

    /// Counts one more for `key` unless it already has `limit`.
    fn try_acquire(&self, key: K, limit: usize) -> bool {
        let mut map = self.stripe(&key).lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    fn release<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.stripe(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                map.remove(key);
            }
        }
    }

    fn get<Q>(&self, key: &Q) -> usize
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.stripe(key).lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).copied().unwrap_or(0)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `MAX_CONNECTIONS`.
    Node,
    /// The client's address holds `MAX_CONNECTIONS_PER_IP`.
    Ip,
}

/// The node's connection counts and their caps (0: no cap).
#[derive(Debug)]
pub struct ConnectionCounts {
    max_total: usize,
    max_per_ip: usize,
    max_per_user: usize,
    total: AtomicUsize,
    per_ip: StripedCounts<IpAddr>,
    per_user: StripedCounts<Box<str>>,
    /// Where each refusal is counted, for `/metrics`.
    refusals: Arc<Refusals>,
}

impl ConnectionCounts {
    /// Counts with these caps; 0 turns a cap (and its counting) off.
    pub fn new(max_total: usize, max_per_ip: usize, max_per_user: usize) -> ConnectionCounts {
        ConnectionCounts {
            max_total,
            max_per_ip,
            max_per_user,
            total: AtomicUsize::new(0),
            per_ip: StripedCounts::new(),
            per_user: StripedCounts::new(),
            refusals: Arc::default(),
        }
    }

    /// The same counts, counting their refusals in `refusals` (the node's, rendered at `/metrics`).
    pub fn counting_refusals_in(self, refusals: Arc<Refusals>) -> ConnectionCounts {
        ConnectionCounts { refusals, ..self }
    }

    /// Admits a new connection from `peer`, or says which cap it hit.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<ConnectionPermit, Refused> {
        let counted_total = self.max_total > 0;
        if counted_total {
            let admitted = self
                .total
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_total).then_some(n + 1)
                })
                .is_ok();
            if !admitted {
                self.refusals.count(Refusal::MaxConnections);
                return Err(Refused::Node);
            }
        }
        let mut ip = None;
        if self.max_per_ip > 0 {
            if let Some(addr) = peer.map(|a| a.to_canonical()) {
                if !self.per_ip.try_acquire(addr, self.max_per_ip) {
                    if counted_total {
                        self.total.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.refusals.count(Refusal::MaxConnectionsPerIp);
                    return Err(Refused::Ip);
                }
                ip = Some(addr);
            }
        }
        Ok(ConnectionPermit {
            counts: (counted_total || ip.is_some()).then(|| self.clone()),
            counted_total,
            ip,
        })
    }

    /// Takes one of `user`'s WebSocket slots; false when the user already has
    /// `MAX_CONNECTIONS_PER_USER`. A slot taken must be given back with [`Self::release_user`] (the
    /// session does it when it ends: a permit object would cost every idle connection its size).
    pub fn admit_user(&self, user: &str) -> bool {
        let admitted = self.max_per_user == 0
            || self
                .per_user
                .try_acquire(Box::from(user), self.max_per_user);
        if !admitted {
            self.refusals.count(Refusal::MaxConnectionsPerUser);
        }
        admitted
    }

    /// Gives back a slot taken by [`Self::admit_user`].
    pub fn release_user(&self, user: &str) {
        if self.max_per_user > 0 {
            self.per_user.release(user);
        }
    }

    /// The user's WebSocket connections now (0 when the per-user cap is off).
    pub fn user_connections(&self, user: &str) -> usize {
        self.per_user.get(user)
    }

    /// The configured per-user cap (0: none).
    pub fn max_per_user(&self) -> usize {
        self.max_per_user
    }
}

/// A connection's slot in the node and per-IP counts, given back on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    /// `None` when no cap is on: nothing to give back.
    counts: Option<Arc<ConnectionCounts>>,
    counted_total: bool,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let Some(counts) = &self.counts else {
            return;
        };
        if self.counted_total {
            counts.total.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(ip) = &self.ip {
            counts.per_ip.release(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_slots_come_back() {
        let counts = Arc::new(ConnectionCounts::new(3, 2, 1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = counts.admit(Some(a)).unwrap();
        let _p2 = counts.admit(Some(a)).unwrap();
        assert_eq!(counts.admit(Some(a)).unwrap_err(), Refused::Ip);
        let _p3 = counts.admit(Some(b)).unwrap();
        assert_eq!(counts.admit(Some(b)).unwrap_err(), Refused::Node);
        drop(p1);
        let _p4 = counts.admit(Some(a)).unwrap();

        assert!(counts.admit_user("u1"));
        assert!(!counts.admit_user("u1"));
        assert!(counts.admit_user("u2"));
        counts.release_user("u1");
        assert_eq!(counts.user_connections("u1"), 0);
        assert!(counts.admit_user("u1"));
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let counts = Arc::new(ConnectionCounts::new(0, 1, 0));
        let _p = counts.admit(Some("127.0.0.1".parse().unwrap())).unwrap();
        assert!(counts
            .admit(Some("::ffff:127.0.0.1".parse().unwrap()))
            .is_err());
    }
}
