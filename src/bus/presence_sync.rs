//! Presence across nodes: each node's members of each presence channel in Redis, with an expiry the
//! node keeps refreshing, and the reads that fill a node's view of the others (`crate::presence`).
//!
//! **In Redis.** A node that holds users on presence channel `C` keeps the hash
//! `<prefix>{p:C}:<node id>`, user id → `user_info` JSON text (empty for a native member). The node
//! writes it when a user's first connection on the node comes (`HSET`) and its last one goes (`HDEL`),
//! rewrites it whole after every reconnect (Redis may have restarted, and changes made while it was away
//! were not written), and renews its expiry (`REDIS_NODE_TIMEOUT_MS`) with every announcement of
//! `peers.rs`, every third of that timeout. So a node that dies leaves hashes that expire with its
//! announcement key, and a node that starts later never reads a dead node's members. The `{p:C}` hash
//! tag keeps every node's hash of one channel in one slot of a Redis Cluster, so a channel's reads
//! and writes are single-slot pipelines, and different channels spread over the masters.
//!
//! **Between nodes.** The change itself travels as a `J` envelope (`wire.rs`) on the channel's Redis
//! channel (`<prefix>c:C`), which exactly the nodes with subscribers on `C` listen to; each decides from
//! its own view whether the user joined or left, and tells its own subscribers. A node reads the other
//! nodes' hashes of `C` (the nodes of the `peers.rs` set) when it starts listening to `C` (after the subscription is confirmed, so no
//! envelope falls between the read and the live stream), again after every reconnect and when a node it
//! had not seen starts announcing itself, and for `GET /api/v1/channels/:channel/presence`. A node
//! writes its hash before it publishes the change: a node whose subscription comes too late for the
//! envelope reads the hash after subscribing, so it has the change one way or the other.
//!
//! **A node that dies.** Its users leave when the other nodes take it for gone (`peers.rs`: its
//! announcement key expired): each of them drops the gone node's members from its view and sends
//! `leave` to its own subscribers for those that are on no other node. That happens within
//! `REDIS_NODE_TIMEOUT_MS` after the node's last announcement, plus a third of it for the observer's next
//! tick: at most 4/3 of the timeout after the death (4 s with the default 3,000 ms), plus a round trip.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::RedisError;
use uuid::Uuid;

use crate::bus::link::Link;
use crate::bus::wire::NodePresence;
use crate::presence::Member;

/// The Redis hash of node `node`'s members of presence channel `channel` under `prefix`.
pub fn members_key(prefix: &str, channel: &str, node: Uuid) -> String {
    format!("{prefix}{{p:{channel}}}:{}", node.simple())
}

/// The value stored for a member: its `user_info` JSON text, or empty for none.
fn stored_info(info: Option<&str>) -> &str {
    info.unwrap_or("")
}

/// Writes one change of this node's members (`node`) to its hash, renewing the hash's expiry.
pub async fn write_change(
    link: &mut Link,
    prefix: &str,
    node: Uuid,
    ttl: Duration,
    change: &NodePresence,
) -> Result<(), RedisError> {
    let key = members_key(prefix, &change.channel, node);
    let mut pipe = redis::pipe();
    if change.present {
        pipe.cmd("HSET")
            .arg(&key)
            .arg(&change.user_id)
            .arg(stored_info(change.user_info.as_deref()))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis() as u64)
            .ignore();
    } else {
        pipe.cmd("HDEL").arg(&key).arg(&change.user_id).ignore();
    }
    link.query::<()>(&pipe).await
}

/// Replaces every hash of this node (`node`) with its members now, `local` (channel, member): after a
/// reconnect, when Redis may have lost them or kept members who left meanwhile.
pub async fn rewrite_all(
    link: &mut Link,
    prefix: &str,
    node: Uuid,
    ttl: Duration,
    local: &[(String, Member)],
) -> Result<(), RedisError> {
    let mut by_channel: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
    for (channel, member) in local {
        by_channel.entry(channel).or_default().push(member);
    }
    for (channel, members) in by_channel {
        let key = members_key(prefix, channel, node);
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&key).ignore();
        let hset = pipe.cmd("HSET").arg(&key);
        for m in members {
            hset.arg(&m.user_id)
                .arg(stored_info(m.user_info.as_deref()));
        }
        pipe.ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis() as u64)
            .ignore();
        link.query::<()>(&pipe).await?;
    }
    Ok(())
}

/// Renews the expiry of this node's hashes of `channels` (on every announcement).
pub async fn refresh(
    link: &mut Link,
    prefix: &str,
    node: Uuid,
    ttl: Duration,
    channels: &[String],
) -> Result<(), RedisError> {
    for channel in channels {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(members_key(prefix, channel, node))
            .arg(ttl.as_millis() as u64);
        link.query_cmd::<()>(&cmd).await?;
    }
    Ok(())
}

/// Reads the members of `channel` on each of `nodes` (a node whose hash expired has none).
pub async fn read(
    link: &mut Link,
    prefix: &str,
    channel: &str,
    nodes: &[Uuid],
) -> Result<Vec<(Uuid, Vec<Member>)>, RedisError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for node in nodes {
        pipe.cmd("HGETALL").arg(members_key(prefix, channel, *node));
    }
    let hashes: Vec<BTreeMap<String, String>> = link.query(&pipe).await?;
    Ok(nodes
        .iter()
        .zip(hashes)
        .map(|(node, hash)| {
            let members = hash
                .into_iter()
                .map(|(user_id, info)| Member {
                    user_id,
                    user_info: (!info.is_empty()).then_some(info),
                })
                .collect();
            (*node, members)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nodes_hash_of_a_channel_shares_the_channels_hash_tag() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ka = members_key("notif:", "presence-room", a);
        let kb = members_key("notif:", "presence-room", b);
        assert!(ka.starts_with("notif:{p:presence-room}:"));
        assert_ne!(ka, kb);
        assert_eq!(ka.split('}').next(), kb.split('}').next());
    }
}
