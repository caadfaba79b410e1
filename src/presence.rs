//! Presence: who is on each presence channel (a channel whose name starts with `presence-`), one
//! registry for every connection kind (native WebSockets and SSE streams, and Pusher connections, so
//! that a native and a Pusher client on one channel see each other).
//!
//! A member is a user id plus an optional `user_info` JSON value (what Pusher's `channel_data`
//! carries; native members have none). Membership is counted at three levels:
//! - **per connection**: each subscribed connection of the node, named by its shard and hub slot
//!   ([`ConnRef`]);
//! - **per user on this node**: the user is here while at least one of its connections is, on any
//!   shard; the first and the last one are the node-level changes the other nodes are told of (a bus
//!   envelope, and the node's Redis hash for the channel);
//! - **across nodes**: for every channel this node has subscribers on, the other nodes that hold the
//!   user (from their envelopes, from Redis when the node starts caring about the channel, and dropped
//!   when a node is gone). A user joins when it goes from no connection anywhere to one, and leaves when
//!   its last connection anywhere goes; only those two edges become `join`/`leave` events
//!   ([`PresenceChange`]).
//!
//! **Why one mutex for the node, not a message per shard.** Shards share nothing on the delivery path,
//! and this stays off it: the registry is touched only when a connection subscribes to or leaves a
//! presence channel, when it closes while on one, when another node's presence change arrives, and when
//! someone asks for the member list. Those are rare next to deliveries, and each holds the lock for a
//! few map operations. One node-wide structure makes "the user's first connection on any shard" a plain
//! check rather than a protocol between shards; a delivery to any channel (presence or not) never looks
//! at it. Each node emits the events to its own subscribers, deciding from its own view, so no lock or
//! consensus spans nodes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::delivery::inbox::ConnId;
use crate::delivery::PresenceChange;

/// The name prefix that makes a channel a presence channel.
pub const CHANNEL_PREFIX: &str = "presence-";

/// Whether `channel` is a presence channel.
pub fn is_presence_channel(channel: &str) -> bool {
    channel.starts_with(CHANNEL_PREFIX)
}

/// One connection of this node: its shard and its slot in that shard's hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The shard that holds the connection.
    pub shard: usize,
    /// The connection's slot in that shard's hub.
    pub conn: ConnId,
}

/// A member of a presence channel, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The user.
    pub user_id: String,
    /// The member's `user_info` JSON text (Pusher's `channel_data`); `None` for native members.
    pub user_info: Option<String>,
}

/// What a local join or leave changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The user's presence on this node changed (its first connection here came, or its last one
    /// went): the other nodes must be told, and the node's Redis state written.
    pub node_changed: bool,
    /// The user's presence across nodes changed: the event for the channel's subscribers.
    pub event: Option<PresenceChange>,
}

/// One user on one channel.
#[derive(Debug, Default)]
struct UserPresence {
    /// Its `user_info`, from the first connection or node that gave one.
    info: Option<Arc<str>>,
    /// Its connections on this node.
    local: Vec<ConnRef>,
    /// Other nodes that hold it.
    remote: Vec<Uuid>,
}

impl UserPresence {
    fn present(&self) -> bool {
        !self.local.is_empty() || !self.remote.is_empty()
    }
}

/// One presence channel: its users, sorted so that a listing is stable.
#[derive(Debug, Default)]
struct Channel {
    users: BTreeMap<Box<str>, UserPresence>,
}

/// The registry's state, behind the mutex of [`Presence`].
#[derive(Debug, Default)]
struct Registry {
    channels: HashMap<Box<str>, Channel>,
}

/// The node's presence registry: a cheap handle, shared by every shard, the bus thread and the API
/// (see the module docs for why it is behind one mutex).
#[derive(Debug, Clone, Default)]
pub struct Presence {
    inner: Arc<Mutex<Registry>>,
}

fn change(channel: &str, user: &str, info: Option<&Arc<str>>, joined: bool) -> PresenceChange {
    PresenceChange {
        channel: channel.to_owned(),
        user_id: user.to_owned(),
        user_info: info.map(|i| i.to_string()),
        joined,
        except_socket: None,
    }
}

impl Presence {
    /// An empty registry.
    pub fn new() -> Presence {
        Presence::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain maps behind, still consistent enough to serve.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `conn` of `user_id` is on `channel` now, with `user_info` (JSON text) if its kind
    /// carries one. Joining twice is harmless.
    pub fn join(
        &self,
        channel: &str,
        user_id: &str,
        user_info: Option<&str>,
        conn: ConnRef,
    ) -> Outcome {
        let mut reg = self.lock();
        let users = &mut reg.channels.entry(channel.into()).or_default().users;
        let entry = users.entry(user_id.into()).or_default();
        if entry.local.contains(&conn) {
            return Outcome::default();
        }
        let was_present = entry.present();
        let node_changed = entry.local.is_empty();
        entry.local.push(conn);
        if entry.info.is_none() {
            entry.info = user_info.map(Arc::from);
        }
        Outcome {
            node_changed,
            event: (!was_present).then(|| change(channel, user_id, entry.info.as_ref(), true)),
        }
    }

    /// Connection `conn` of `user_id` left `channel` (it unsubscribed or closed). Leaving a channel
    /// the connection is not on is harmless.
    pub fn leave(&self, channel: &str, user_id: &str, conn: ConnRef) -> Outcome {
        let mut reg = self.lock();
        let Some(ch) = reg.channels.get_mut(channel) else {
            return Outcome::default();
        };
        let Some(entry) = ch.users.get_mut(user_id) else {
            return Outcome::default();
        };
        let Some(pos) = entry.local.iter().position(|c| *c == conn) else {
            return Outcome::default();
        };
        entry.local.swap_remove(pos);
        let node_changed = entry.local.is_empty();
        let gone = !entry.present();
        let event = gone.then(|| change(channel, user_id, entry.info.as_ref(), false));
        if gone {
            ch.users.remove(user_id);
            if ch.users.is_empty() {
                reg.channels.remove(channel);
            }
        }
        Outcome {
            node_changed,
            event,
        }
    }

    /// The members of `channel` this node knows of (its own and, where it has subscribers, the other
    /// nodes'), sorted by user id.
    pub fn members(&self, channel: &str) -> Vec<Member> {
        let reg = self.lock();
        reg.channels
            .get(channel)
            .map(|ch| {
                ch.users
                    .iter()
                    .filter(|(_, p)| p.present())
                    .map(|(user, p)| Member {
                        user_id: user.to_string(),
                        user_info: p.info.as_ref().map(|i| i.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many users are on `channel` (as [`Presence::members`] counts them).
    pub fn user_count(&self, channel: &str) -> usize {
        let reg = self.lock();
        reg.channels
            .get(channel)
            .map_or(0, |ch| ch.users.values().filter(|p| p.present()).count())
    }

    /// The users this node holds, per channel, with their `user_info`: what it writes to Redis (after
    /// a reconnect, every one of them again).
    pub fn local_members(&self) -> Vec<(String, Member)> {
        let reg = self.lock();
        let mut out = Vec::new();
        for (channel, ch) in &reg.channels {
            for (user, p) in &ch.users {
                if !p.local.is_empty() {
                    out.push((
                        channel.to_string(),
                        Member {
                            user_id: user.to_string(),
                            user_info: p.info.as_ref().map(|i| i.to_string()),
                        },
                    ));
                }
            }
        }
        out
    }

    /// The channels this node holds users on (whose Redis hashes it keeps alive).
    pub fn local_channels(&self) -> Vec<String> {
        let reg = self.lock();
        reg.channels
            .iter()
            .filter(|(_, ch)| ch.users.values().any(|p| !p.local.is_empty()))
            .map(|(channel, _)| channel.to_string())
            .collect()
    }

    /// Node `node` says `user` is (`present`) or is no longer on `channel`. Returns the event for this
    /// node's subscribers, if the user's presence across nodes changed.
    pub fn apply_remote(
        &self,
        node: Uuid,
        channel: &str,
        user: &str,
        user_info: Option<&str>,
        present: bool,
    ) -> Option<PresenceChange> {
        let mut reg = self.lock();
        Self::apply_remote_locked(&mut reg, node, channel, user, user_info, present)
    }

    fn apply_remote_locked(
        reg: &mut Registry,
        node: Uuid,
        channel: &str,
        user: &str,
        user_info: Option<&str>,
        present: bool,
    ) -> Option<PresenceChange> {
        if present {
            let users = &mut reg.channels.entry(channel.into()).or_default().users;
            let entry = users.entry(user.into()).or_default();
            if entry.remote.contains(&node) {
                return None;
            }
            let was_present = entry.present();
            entry.remote.push(node);
            if entry.info.is_none() {
                entry.info = user_info.map(Arc::from);
            }
            (!was_present).then(|| change(channel, user, entry.info.as_ref(), true))
        } else {
            let ch = reg.channels.get_mut(channel)?;
            let entry = ch.users.get_mut(user)?;
            let pos = entry.remote.iter().position(|n| *n == node)?;
            entry.remote.swap_remove(pos);
            if entry.present() {
                return None;
            }
            let event = change(channel, user, entry.info.as_ref(), false);
            ch.users.remove(user);
            if ch.users.is_empty() {
                reg.channels.remove(channel);
            }
            Some(event)
        }
    }

    /// Replaces what this node knows of the other nodes' members of `channel` with `remote` (read from
    /// Redis: each node with its members). Returns the events for the differences when `announce` (a
    /// reload after a reconnect, when changes may have been missed); none on a first read, whose members
    /// were there before this node's subscribers came.
    pub fn replace_remote(
        &self,
        channel: &str,
        remote: &[(Uuid, Vec<Member>)],
        announce: bool,
    ) -> Vec<PresenceChange> {
        let mut reg = self.lock();
        let mut events = Vec::new();
        // Drop what is no longer listed, then add what is.
        let stale: Vec<(Uuid, String)> = reg
            .channels
            .get(channel)
            .map(|ch| {
                ch.users
                    .iter()
                    .flat_map(|(user, p)| p.remote.iter().map(move |n| (*n, user.to_string())))
                    .filter(|(n, user)| {
                        !remote
                            .iter()
                            .any(|(rn, ms)| rn == n && ms.iter().any(|m| m.user_id == *user))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (node, user) in stale {
            events.extend(Self::apply_remote_locked(
                &mut reg, node, channel, &user, None, false,
            ));
        }
        for (node, members) in remote {
            for m in members {
                events.extend(Self::apply_remote_locked(
                    &mut reg,
                    *node,
                    channel,
                    &m.user_id,
                    m.user_info.as_deref(),
                    true,
                ));
            }
        }
        if announce {
            events
        } else {
            Vec::new()
        }
    }

    /// This node no longer has subscribers on `channel`: what it knew of the other nodes' members
    /// there goes (nobody here would hear of their changes any more).
    pub fn forget_remote(&self, channel: &str) {
        let mut reg = self.lock();
        if let Some(ch) = reg.channels.get_mut(channel) {
            ch.users.retain(|_, p| {
                p.remote.clear();
                p.present()
            });
            if ch.users.is_empty() {
                reg.channels.remove(channel);
            }
        }
    }

    /// Node `node` is gone (its announcement expired) or stopped: its users leave wherever it held
    /// them. Returns the `leave` events for this node's subscribers.
    pub fn node_gone(&self, node: Uuid) -> Vec<PresenceChange> {
        let mut reg = self.lock();
        let held: Vec<(String, String)> = reg
            .channels
            .iter()
            .flat_map(|(channel, ch)| {
                ch.users
                    .iter()
                    .filter(|(_, p)| p.remote.contains(&node))
                    .map(|(user, _)| (channel.to_string(), user.to_string()))
            })
            .collect();
        held.into_iter()
            .filter_map(|(channel, user)| {
                Self::apply_remote_locked(&mut reg, node, &channel, &user, None, false)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(shard: usize, conn: ConnId) -> ConnRef {
        ConnRef { shard, conn }
    }

    fn users(p: &Presence, channel: &str) -> Vec<String> {
        p.members(channel).into_iter().map(|m| m.user_id).collect()
    }

    #[test]
    fn a_users_first_connection_joins_and_its_last_leaves_across_shards() {
        let p = Presence::new();
        let first = p.join("presence-a", "u1", None, conn(0, 1));
        assert!(first.node_changed);
        assert!(first.event.as_ref().is_some_and(|e| e.joined));
        let second = p.join("presence-a", "u1", None, conn(1, 1));
        assert_eq!(
            second,
            Outcome::default(),
            "a second connection changes nothing"
        );
        assert_eq!(
            p.join("presence-a", "u1", None, conn(1, 1)),
            Outcome::default()
        );
        assert_eq!(users(&p, "presence-a"), ["u1"]);
        assert_eq!(p.leave("presence-a", "u1", conn(0, 1)), Outcome::default());
        let last = p.leave("presence-a", "u1", conn(1, 1));
        assert!(last.node_changed);
        assert!(last.event.is_some_and(|e| !e.joined && e.user_id == "u1"));
        assert_eq!(p.user_count("presence-a"), 0);
        assert_eq!(p.leave("presence-a", "u1", conn(1, 1)), Outcome::default());
    }

    #[test]
    fn a_user_on_another_node_is_there_until_both_are_gone() {
        let p = Presence::new();
        let other = Uuid::from_u128(7);
        let joined = p.apply_remote(other, "presence-a", "u1", Some(r#"{"n":1}"#), true);
        assert!(joined.is_some_and(|e| e.joined && e.user_info.as_deref() == Some(r#"{"n":1}"#)));
        let local = p.join("presence-a", "u1", None, conn(0, 3));
        assert!(local.node_changed && local.event.is_none());
        assert_eq!(p.apply_remote(other, "presence-a", "u1", None, false), None);
        let left = p.leave("presence-a", "u1", conn(0, 3));
        assert!(left.event.is_some_and(|e| !e.joined));
    }

    #[test]
    fn a_gone_node_takes_its_users_and_a_reload_announces_only_differences() {
        let p = Presence::new();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        p.apply_remote(a, "presence-x", "u1", None, true);
        p.apply_remote(a, "presence-y", "u2", None, true);
        p.apply_remote(b, "presence-y", "u2", None, true);
        let left = p.node_gone(a);
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].channel.as_str(), left[0].joined),
            ("presence-x", false)
        );
        assert_eq!(users(&p, "presence-y"), ["u2"]);
        let member = |u: &str| Member {
            user_id: u.into(),
            user_info: None,
        };
        let events = p.replace_remote("presence-y", &[(b, vec![member("u3")])], true);
        let mut seen: Vec<(String, bool)> =
            events.into_iter().map(|e| (e.user_id, e.joined)).collect();
        seen.sort();
        assert_eq!(seen, [("u2".to_string(), false), ("u3".to_string(), true)]);
        assert!(p
            .replace_remote("presence-z", &[(b, vec![member("u4")])], false)
            .is_empty());
        assert_eq!(users(&p, "presence-z"), ["u4"]);
        p.forget_remote("presence-z");
        assert_eq!(p.user_count("presence-z"), 0);
    }

    #[test]
    fn only_presence_prefixed_channels_are_presence_channels() {
        assert!(is_presence_channel("presence-room"));
        assert!(!is_presence_channel("room"));
        assert!(!is_presence_channel("private-presence-room"));
    }
}
