//! Which other nodes are alive, and what each of them has published: so that a node that dies between
//! committing a notification and publishing it loses no live delivery elsewhere.
//!
//! A node's commit and its Redis publish are two steps. Between them (microseconds normally; as long as
//! the node is cut off from Redis otherwise) the notification is durable but only the node itself knows
//! it still has to go out. If the process dies there, nothing else would ever publish it: the live
//! clients on other nodes would get it only by resuming. So every node announces, on a timer, that it is
//! alive and how far its publishing has got, and the others catch up from the store when it stops.
//!
//! **In Redis.** Each node keeps a key `<prefix>{nodes}:<node id>` holding its *publish watermark* (the
//! wall-clock millisecond before which everything it committed has been published), written every third
//! of `REDIS_NODE_TIMEOUT_MS` with that timeout as its expiry, and its id in the set `<prefix>{nodes}`
//! so that the others can find the key. The `{nodes}` hash tag keeps both in one slot of a Redis
//! Cluster, so one `MGET` reads them all. A node that stops gracefully publishes everything, then writes
//! [`STOPPED`] in its key: nothing to catch up.
//!
//! **Here.** [`PeerWatch`] is the bookkeeping of one node, without any I/O: fed what Redis says on each
//! tick, it names the peers that are gone (their key expired, or they left the set) with the watermark
//! they last announced. The bus thread then catches its live connections up from the store from that
//! watermark (less `CATCH_UP_MARGIN`, for commits still in flight when the watermark was taken), drops
//! the copies it had delivered already, and remembers the point it read from, so that a node taken for
//! dead that comes back (it was only cut off from Redis) and publishes what it kept is not delivered
//! twice.
//!
//! **After a Redis restart** the keys and the set are gone until each node writes them again, so a peer
//! that is missing is taken for gone only after [`PeerWatch::grace`] has passed since this node's own
//! session began: long enough for every live node to reconnect through its backoff.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::model::Millis;

/// The value a node writes in its key when it stops gracefully, after publishing everything.
pub const STOPPED: &str = "stopped";

/// How long the [`STOPPED`] marker stays: far longer than a node's announcement (`timeout`), because a
/// peer that reads the set only after the marker expired would take the stopped node for dead (and read
/// the store for nothing). A peer that sees the marker takes the node out of the set; the key then just
/// expires.
pub fn stopped_marker_ttl(timeout: Duration) -> Duration {
    (timeout * 10).max(Duration::from_secs(30))
}

/// The Redis set of node ids under `prefix`.
pub fn nodes_set_key(prefix: &str) -> String {
    format!("{prefix}{{nodes}}")
}

/// The Redis key of node `id`'s watermark under `prefix` (same hash slot as [`nodes_set_key`]).
pub fn node_key(prefix: &str, id: Uuid) -> String {
    format!("{prefix}{{nodes}}:{}", id.simple())
}

/// What a node's key said on one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Alive; everything it committed before this wall-clock millisecond is published.
    Alive(Millis),
    /// It stopped gracefully: it published everything first.
    Stopped,
    /// The key is gone (expired) or unreadable.
    Missing,
}

impl PeerState {
    /// Reads a key's value as written by the bus thread.
    pub fn parse(value: Option<&str>) -> PeerState {
        match value {
            Some(STOPPED) => PeerState::Stopped,
            Some(v) => v.parse().map_or(PeerState::Missing, PeerState::Alive),
            None => PeerState::Missing,
        }
    }
}

/// A peer that is gone without having stopped gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GonePeer {
    /// Its node id (the origin of its envelopes).
    pub id: Uuid,
    /// The last watermark it announced: what it committed from then on may never have been published.
    pub watermark: Millis,
}

/// A peer seen alive.
#[derive(Debug, Clone, Copy)]
struct Peer {
    /// The last watermark it announced.
    watermark: Millis,
    /// Whether it announced itself since this node's session began: then a missing key is an expiry,
    /// not a Redis restart that the peer has not caught up with yet.
    seen_this_session: bool,
}

/// One node's view of the others (see the module docs).
#[derive(Debug)]
pub struct PeerWatch {
    /// This node, which is never its own peer.
    me: Uuid,
    /// Peers seen alive, with their last watermark and whether they were seen in this session.
    alive: HashMap<Uuid, Peer>,
    /// How long after a session began a missing peer is not yet taken for gone.
    grace: Duration,
    /// When this node's current Redis session began.
    session_began: Option<Instant>,
}

impl PeerWatch {
    /// A watch for node `me`; `grace` as in the module docs.
    pub fn new(me: Uuid, grace: Duration) -> PeerWatch {
        PeerWatch {
            me,
            alive: HashMap::new(),
            grace,
            session_began: None,
        }
    }

    /// The peers seen alive: their keys are read on each tick even when their id has left the set,
    /// because the node that saw a peer's [`STOPPED`] first takes it out of the set, and the others must
    /// still tell that graceful stop from a death by the key.
    pub fn known(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.alive.keys().copied()
    }

    /// The grace after a session begins.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// This node's Redis session began at `now` (keys written before an outage may be gone).
    pub fn session_began(&mut self, now: Instant) {
        self.session_began = Some(now);
        for peer in self.alive.values_mut() {
            peer.seen_this_session = false;
        }
    }

    /// Takes one tick's reading: every id in the set with the state of its key. Returns the peers that
    /// are gone, each once, and the ids to take out of the set (gone, stopped, or stale entries of
    /// nodes this one never saw alive).
    pub fn observe(
        &mut self,
        now: Instant,
        reading: impl IntoIterator<Item = (Uuid, PeerState)>,
    ) -> (Vec<GonePeer>, Vec<Uuid>) {
        let settled = self
            .session_began
            .is_some_and(|began| now.saturating_duration_since(began) >= self.grace);
        let mut refreshed = Vec::new();
        let mut forget = Vec::new();
        for (id, state) in reading {
            if id == self.me {
                continue;
            }
            match state {
                PeerState::Alive(watermark) => {
                    self.alive.insert(
                        id,
                        Peer {
                            watermark,
                            seen_this_session: true,
                        },
                    );
                    refreshed.push(id);
                }
                PeerState::Stopped => {
                    self.alive.remove(&id);
                    forget.push(id);
                }
                // Never seen alive by this node: a stale entry (or a node that died before its
                // first write); nothing of it was expected here.
                PeerState::Missing if settled && !self.alive.contains_key(&id) => forget.push(id),
                PeerState::Missing => {}
            }
        }
        // A peer seen alive and not refreshed this tick: its key expired, or another node already
        // took it out of the set. Right after a Redis restart only the ones seen since are judged.
        let mut gone = Vec::new();
        self.alive.retain(|id, peer| {
            let kept = refreshed.contains(id) || !(settled || peer.seen_this_session);
            if !kept {
                gone.push(GonePeer {
                    id: *id,
                    watermark: peer.watermark,
                });
            }
            kept
        });
        // Anything gone leaves the set too, so that a node started later does not take it for a peer.
        forget.extend(gone.iter().map(|g| g.id));
        forget.sort();
        forget.dedup();
        gone.sort_by_key(|g| g.id);
        (gone, forget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: Uuid, watermark: Millis) -> GonePeer {
        GonePeer { id, watermark }
    }

    fn ids() -> (Uuid, Uuid, Uuid) {
        (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3))
    }

    #[test]
    fn values_parse_as_written() {
        assert_eq!(PeerState::parse(Some("1700")), PeerState::Alive(1700));
        assert_eq!(PeerState::parse(Some(STOPPED)), PeerState::Stopped);
        assert_eq!(PeerState::parse(Some("junk")), PeerState::Missing);
        assert_eq!(PeerState::parse(None), PeerState::Missing);
    }

    #[test]
    fn a_peer_whose_key_expires_is_gone_once_with_its_last_watermark() {
        let (me, a, b) = ids();
        let start = Instant::now();
        let mut watch = PeerWatch::new(me, Duration::from_secs(1));
        watch.session_began(start);
        let later = start + Duration::from_secs(2);
        let (gone, _) = watch.observe(
            later,
            [
                (me, PeerState::Alive(5)),
                (a, PeerState::Alive(10)),
                (b, PeerState::Alive(20)),
            ],
        );
        assert!(gone.is_empty());
        let (gone, forget) = watch.observe(
            later,
            [
                (me, PeerState::Alive(6)),
                (a, PeerState::Missing),
                (b, PeerState::Alive(21)),
            ],
        );
        assert_eq!(gone, vec![peer(a, 10)]);
        assert_eq!(forget, vec![a]);
        // Another node took it out of the set: it is not gone a second time.
        let (gone, _) = watch.observe(later, [(b, PeerState::Alive(22))]);
        assert!(gone.is_empty());
    }

    #[test]
    fn a_peer_taken_out_of_the_set_by_another_node_is_gone_too() {
        let (me, a, _) = ids();
        let start = Instant::now();
        let mut watch = PeerWatch::new(me, Duration::ZERO);
        watch.session_began(start);
        watch.observe(start, [(a, PeerState::Alive(7))]);
        let (gone, _) = watch.observe(start, []);
        assert_eq!(gone, vec![peer(a, 7)]);
    }

    #[test]
    fn a_graceful_stop_is_not_a_death() {
        let (me, a, _) = ids();
        let start = Instant::now();
        let mut watch = PeerWatch::new(me, Duration::ZERO);
        watch.session_began(start);
        watch.observe(start, [(a, PeerState::Alive(7))]);
        let (gone, forget) = watch.observe(start, [(a, PeerState::Stopped)]);
        assert!(gone.is_empty());
        assert_eq!(forget, vec![a]);
        let (gone, _) = watch.observe(start, [(a, PeerState::Missing)]);
        assert!(gone.is_empty(), "forgotten, so not gone later either");
    }

    #[test]
    fn a_peer_seen_in_this_session_is_gone_as_soon_as_its_key_expires_even_within_the_grace() {
        let (me, a, _) = ids();
        let start = Instant::now();
        let mut watch = PeerWatch::new(me, Duration::from_secs(60));
        watch.session_began(start);
        watch.observe(start, [(a, PeerState::Alive(7))]);
        let (gone, _) = watch.observe(start + Duration::from_secs(1), [(a, PeerState::Missing)]);
        assert_eq!(gone, vec![peer(a, 7)]);
    }

    #[test]
    fn within_the_grace_after_a_session_begins_missing_peers_are_waited_for() {
        let (me, a, stale) = ids();
        let start = Instant::now();
        let mut watch = PeerWatch::new(me, Duration::from_secs(5));
        watch.session_began(start);
        watch.observe(start, [(a, PeerState::Alive(7))]);
        // Redis restarted: the set is empty, and so is a's key, until a reconnects.
        watch.session_began(start + Duration::from_secs(10));
        let (gone, forget) = watch.observe(
            start + Duration::from_secs(11),
            [(stale, PeerState::Missing)],
        );
        assert!(
            gone.is_empty() && forget.is_empty(),
            "a may still be reconnecting"
        );
        let (gone, _) = watch.observe(start + Duration::from_secs(12), [(a, PeerState::Alive(9))]);
        assert!(gone.is_empty(), "a came back");
        let (gone, forget) = watch.observe(
            start + Duration::from_secs(16),
            [(stale, PeerState::Missing)],
        );
        assert_eq!(gone, vec![peer(a, 9)]);
        assert_eq!(
            forget.len(),
            2,
            "a and the stale entry leave the set: {forget:?}"
        );
    }
}
