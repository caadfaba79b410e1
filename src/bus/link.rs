//! The connections of one bus session with Redis: either one Redis (`REDIS_URL`, classic Pub/Sub) or a
//! Redis Cluster (`REDIS_CLUSTER`, sharded Pub/Sub).
//!
//! **One Redis.** A subscriber connection (SUBSCRIBE/UNSUBSCRIBE, one channel per command, see
//! `redis_bus.rs`) and a publisher connection (PUBLISH, pipelined).
//!
//! **A cluster.** Classic Pub/Sub copies every message to every node of a cluster; sharded Pub/Sub
//! (`SSUBSCRIBE`/`SPUBLISH`, Redis 7) keeps a channel's traffic on the shard that owns the channel's
//! slot (CRC16 of the name, with `{hashtag}` rules). The `redis` crate's cluster connection over RESP3
//! does the routing: it reads the slot map from the seeds, keeps one connection per node of it
//! (replicas included, idle: commands go to masters only), sends each SSUBSCRIBE and SPUBLISH to the
//! master of its channel's slot, and follows `MOVED` by refreshing the slot map. The subscriber cluster connection hands messages to us as RESP3 pushes; a second cluster
//! connection publishes, so a burst of publishes never queues behind subscriptions.
//!
//! The crate refuses a pipeline whose keys span slots, and a batch's channels (one per user) are
//! mostly in different slots; one SPUBLISH round trip each would cost a burst one request per
//! message. So the session reads the slot map itself (`CLUSTER SLOTS`, [`SlotOwners`]) and sends each
//! batch as one pipeline per master, routed through the slot of its first message (a master serves
//! every slot it owns): a channel is always in the same group, so its messages keep their order. A
//! map gone stale (a slot moved) makes a publish fail with `MOVED`, the batch stays queued, and the
//! new session reads the map again.
//!
//! **Slot moves and failovers.** When a slot leaves a master, Redis ends the subscriptions of its
//! channels with an `sunsubscribe` push; when a master goes away, the crate reports a disconnection.
//! Either way the bus treats the session as lost ([`Incoming::Lost`]): it reconnects, reads the new slot
//! map, subscribes everything on the new owners and catches up from the store what fell in the gap, the
//! same path as a Redis outage.
//!
//! **TLS.** `rediss://` URLs connect through rustls (`crate::tls`), trusting `REDIS_CA_FILE` when it is
//! set and the system's CAs otherwise; a cluster reaches every node of its slot map the seeds' way.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::{RedisNodes, RedisTarget};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long Redis may take to answer before the link counts as broken.
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the cluster connection retries a request (after `MOVED`, `TRYAGAIN` or a lost node)
/// before the bus treats the session as lost.
const CLUSTER_RETRIES: u32 = 3;

/// What the subscriber side produced.
pub enum Incoming {
    /// A message on a channel we subscribed to.
    Message(redis::Msg),
    /// Redis ended our subscription to this channel (its slot moved to another master).
    Unsubscribed(String),
    /// The connection (or one master's connection) is gone.
    Lost(RedisError),
    /// Something to ignore (a subscription confirmation).
    Nothing,
}

/// The connections of one session.
pub enum Link {
    /// One Redis.
    Single {
        /// Sends SUBSCRIBE and UNSUBSCRIBE on the subscriber connection.
        sink: PubSubSink,
        /// The messages of the subscriber connection; ends when the connection does.
        stream: PubSubStream,
        /// The publisher connection.
        publisher: MultiplexedConnection,
    },
    /// A Redis Cluster.
    Cluster {
        /// Subscribes: one connection per cluster node, SSUBSCRIBE on the slot's master.
        subscriber: ClusterConnection,
        /// The subscriber's pushes: messages, confirmations, server-side unsubscribes, disconnections.
        pushes: UnboundedReceiver<PushInfo>,
        /// Publishes: one connection per cluster node, SPUBLISH to the slot's master.
        publisher: ClusterConnection,
        /// Our own SUNSUBSCRIBEs whose confirmation has not come back yet.
        own: OwnUnsubscribes,
        /// The master of each slot as the session began, to group a batch's publishes per master;
        /// `None` if it could not be read (each message is then published on its own).
        owners: Option<SlotOwners>,
    },
}

/// Redis Cluster's number of hash slots.
const SLOTS: usize = 16384;

/// The slot of a Redis key (channel name): CRC16 (XMODEM) of the key, or of its `{hashtag}` when it
/// has a non-empty one, modulo 16384, as Redis Cluster computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

/// Which master owns each slot, read from `CLUSTER SLOTS` when a session begins.
#[derive(Debug, Clone)]
pub struct SlotOwners {
    /// Per slot, the index of its master in the reply's order of masters (`u16::MAX`: none).
    owner: Vec<u16>,
}

impl SlotOwners {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, …], replicas…], …]`. `None` for
    /// a reply of another shape.
    pub fn from_reply(reply: &redis::Value) -> Option<SlotOwners> {
        use redis::Value;
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut masters: Vec<(Vec<u8>, i64)> = Vec::new();
        let mut owner = vec![u16::MAX; SLOTS];
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
                (master.first(), master.get(1))
            else {
                return None;
            };
            let key = (host.clone(), *port);
            let index = match masters.iter().position(|m| *m == key) {
                Some(i) => i,
                None => {
                    masters.push(key);
                    masters.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            owner[start..=end].fill(u16::try_from(index).ok()?);
        }
        Some(SlotOwners { owner })
    }

    /// Groups `messages` per master of their channel's slot, each group in the batch's order, with
    /// the slot of its first message (the route of its pipeline). A message whose slot has no known
    /// master is a group of its own.
    pub fn group<'m>(
        &self,
        messages: &'m [(String, Bytes)],
    ) -> Vec<(u16, Vec<&'m (String, Bytes)>)> {
        let mut groups: Vec<(u16, Vec<&(String, Bytes)>)> = Vec::new();
        let mut by_master: HashMap<u16, usize> = HashMap::new();
        for message in messages {
            let slot = key_slot(message.0.as_bytes());
            let master = self.owner[usize::from(slot)];
            match by_master.get(&master) {
                Some(&i) if master != u16::MAX => groups[i].1.push(message),
                _ => {
                    by_master.insert(master, groups.len());
                    groups.push((slot, vec![message]));
                }
            }
        }
        groups
    }
}

/// Tells our own SUNSUBSCRIBE's confirmation from Redis ending a subscription after a slot move: both
/// arrive as the same `sunsubscribe` push. Without this, a channel unsubscribed and subscribed again
/// before the confirmation is read would look moved and cost a needless reconnect.
#[derive(Default)]
pub struct OwnUnsubscribes(HashMap<String, u32>);

impl OwnUnsubscribes {
    /// We are sending a SUNSUBSCRIBE of `name`.
    pub fn sent(&mut self, name: &str) {
        *self.0.entry(name.to_owned()).or_default() += 1;
    }

    /// A `sunsubscribe` push for `name` came: `true` if it confirms one of ours (then it is counted off).
    pub fn confirmed(&mut self, name: &str) -> bool {
        match self.0.get_mut(name) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.0.remove(name);
                true
            }
            None => false,
        }
    }
}

/// A Redis error on one line, with the explanation of a refused TLS certificate when that is what
/// happened (which CA setting to check, a host name that does not match).
pub fn describe(e: &RedisError) -> String {
    match crate::tls::explain(e, "REDIS_CA_FILE") {
        Some(hint) => format!("{e} ({hint})"),
        None => e.to_string(),
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

impl Link {
    /// Opens the connections of a session (over TLS for `rediss://`, trusting `REDIS_CA_FILE` if set).
    pub async fn connect(target: &RedisTarget) -> Result<Link, RedisError> {
        match &target.nodes {
            RedisNodes::Single(url) => {
                let client = target.client(url)?;
                let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                    .await
                    .map_err(|_| timed_out())??;
                let (sink, stream) = pubsub.split();
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT));
                let publisher = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Link::Single {
                    sink,
                    stream,
                    publisher,
                })
            }
            RedisNodes::Cluster(seeds) => {
                crate::tls::install_default_provider();
                let certs = target.tls_certificates().map_err(|why| {
                    RedisError::from((redis::ErrorKind::InvalidClientConfig, "REDIS_CA_FILE", why))
                })?;
                let builder = || {
                    let builder = ClusterClientBuilder::new(seeds.clone())
                        .connection_timeout(CONNECT_TIMEOUT)
                        .response_timeout(RESPONSE_TIMEOUT)
                        .retries(CLUSTER_RETRIES);
                    // Every node the slot map names is reached the seeds' way (TLS or not), and
                    // trusted through the same CA.
                    match &certs {
                        Some(certs) => builder.certs(certs.clone()),
                        None => builder,
                    }
                };
                let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
                let sub_client = builder()
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()?;
                let pub_client = builder().build()?;
                // The crate connects to every seed, then to every master of the slot map.
                let whole = CONNECT_TIMEOUT * 3;
                let subscriber = tokio::time::timeout(whole, sub_client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())??;
                let publisher = tokio::time::timeout(whole, pub_client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())??;
                let mut publisher = publisher;
                let owners = read_slot_owners(&mut publisher).await;
                Ok(Link::Cluster {
                    subscriber,
                    pushes,
                    publisher,
                    own: OwnUnsubscribes::default(),
                    owners,
                })
            }
        }
    }

    /// Subscribes to one Redis channel (SUBSCRIBE, or SSUBSCRIBE on its slot's master).
    pub fn subscribe(&self, name: String) -> futures_util::future::BoxFuture<'static, RedisResult> {
        match self {
            Link::Single { sink, .. } => {
                let mut sink = sink.clone();
                async move { sink.subscribe(name).await }.boxed()
            }
            Link::Cluster { subscriber, .. } => {
                let mut conn = subscriber.clone();
                async move { conn.ssubscribe(name).await }.boxed()
            }
        }
    }

    /// Ends the subscription to one Redis channel.
    pub fn unsubscribe(
        &mut self,
        name: String,
    ) -> futures_util::future::BoxFuture<'static, RedisResult> {
        match self {
            Link::Single { sink, .. } => {
                let mut sink = sink.clone();
                async move { sink.unsubscribe(name).await }.boxed()
            }
            Link::Cluster {
                subscriber, own, ..
            } => {
                own.sent(&name);
                let mut conn = subscriber.clone();
                async move { conn.sunsubscribe(name).await }.boxed()
            }
        }
    }

    /// Publishes each `(channel, envelope)`: one PUBLISH pipeline, or in a cluster one SPUBLISH
    /// pipeline per master (see the module docs), the pipelines sent together.
    pub async fn publish(&mut self, messages: &[(String, Bytes)]) -> RedisResult {
        if messages.is_empty() {
            return Ok(());
        }
        match self {
            Link::Single { publisher, .. } => {
                let mut pipe = redis::pipe();
                for (channel, envelope) in messages {
                    pipe.cmd("PUBLISH")
                        .arg(channel)
                        .arg(envelope.as_ref())
                        .ignore();
                }
                pipe.query_async::<()>(publisher).await
            }
            Link::Cluster {
                publisher, owners, ..
            } => {
                let Some(owners) = owners else {
                    let sends = messages.iter().map(|(channel, envelope)| {
                        let mut conn = publisher.clone();
                        let mut cmd = redis::cmd("SPUBLISH");
                        cmd.arg(channel).arg(envelope.as_ref());
                        async move { cmd.exec_async(&mut conn).await }
                    });
                    futures_util::future::try_join_all(sends).await?;
                    return Ok(());
                };
                let sends = owners.group(messages).into_iter().map(|(slot, group)| {
                    let mut conn = publisher.clone();
                    let mut pipe = redis::pipe();
                    for (channel, envelope) in &group {
                        pipe.cmd("SPUBLISH").arg(channel).arg(envelope.as_ref());
                    }
                    let route =
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    let count = group.len();
                    async move {
                        let replies = conn.route_pipeline(pipe, 0, count, route).await?;
                        // A stale slot map shows as a `MOVED` reply inside the pipeline.
                        match replies.into_iter().find_map(|r| match r {
                            redis::Value::ServerError(e) => Some(e),
                            _ => None,
                        }) {
                            Some(e) => Err(RedisError::from(e)),
                            None => Ok(()),
                        }
                    }
                });
                futures_util::future::try_join_all(sends).await?;
                Ok(())
            }
        }
    }

    /// Runs a pipeline on the publisher connection (in a cluster, every key of it must share a slot).
    pub async fn query<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RedisError> {
        match self {
            Link::Single { publisher, .. } => pipe.query_async(publisher).await,
            Link::Cluster { publisher, .. } => pipe.query_async(publisher).await,
        }
    }

    /// Runs one command on the publisher connection.
    pub async fn query_cmd<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        match self {
            Link::Single { publisher, .. } => cmd.query_async(publisher).await,
            Link::Cluster { publisher, .. } => cmd.query_async(publisher).await,
        }
    }

    /// Waits for the next thing the subscriber side produces.
    pub async fn next(&mut self) -> Incoming {
        match self {
            Link::Single { stream, .. } => match stream.next().await {
                Some(msg) => Incoming::Message(msg),
                None => Incoming::Lost(connection_reset()),
            },
            Link::Cluster { pushes, own, .. } => match pushes.recv().await {
                Some(push) => from_push(own, push),
                None => Incoming::Lost(connection_reset()),
            },
        }
    }

    /// The next thing the subscriber side produced, if it is there already.
    pub fn next_ready(&mut self) -> Option<Incoming> {
        match self {
            Link::Single { stream, .. } => match stream.next().now_or_never() {
                Some(Some(msg)) => Some(Incoming::Message(msg)),
                _ => None,
            },
            Link::Cluster { pushes, own, .. } => {
                pushes.try_recv().ok().map(|push| from_push(own, push))
            }
        }
    }
}

/// The cluster's slot map, read through the publisher connection from any master; `None` (each
/// message then published on its own) if it cannot be read or understood.
async fn read_slot_owners(publisher: &mut ClusterConnection) -> Option<SlotOwners> {
    let reply = publisher
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await;
    match reply {
        Ok(reply) => {
            let owners = SlotOwners::from_reply(&reply);
            if owners.is_none() {
                tracing::warn!(
                    "CLUSTER SLOTS answered in an unknown shape: publishing one message at a time"
                );
            }
            owners
        }
        Err(e) => {
            tracing::warn!(error = %describe(&e), "CLUSTER SLOTS failed: publishing one message at a time");
            None
        }
    }
}

/// The result of a subscription change or a publish.
type RedisResult = Result<(), RedisError>;

fn connection_reset() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

/// Reads one RESP3 push of the cluster subscriber.
fn from_push(own: &mut OwnUnsubscribes, push: PushInfo) -> Incoming {
    match push.kind {
        PushKind::SMessage => match redis::Msg::from_push_info(push) {
            Some(msg) => Incoming::Message(msg),
            None => Incoming::Nothing,
        },
        PushKind::SUnsubscribe => match push.data.first() {
            Some(redis::Value::BulkString(name)) => {
                let name = String::from_utf8_lossy(name);
                if own.confirmed(&name) {
                    Incoming::Nothing
                } else {
                    Incoming::Unsubscribed(name.into_owned())
                }
            }
            _ => Incoming::Nothing,
        },
        PushKind::Disconnection => Incoming::Lost(connection_reset()),
        _ => Incoming::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters_and_a_batch_is_grouped_per_master_in_order() {
        for key in [
            "notif:u:ann",
            "notif:c:{room}.x",
            "{}x",
            "a{b",
            "",
            "notif:b",
        ] {
            assert_eq!(
                Route::new(key_slot(key.as_bytes()), SlotAddr::Master),
                Route::with_key(key, SlotAddr::Master),
                "{key}"
            );
        }
        assert_eq!(key_slot(b"foo"), 12182, "Redis's own example");
        let node = |host: &str, port| {
            redis::Value::Array(vec![
                redis::Value::BulkString(host.as_bytes().to_vec()),
                redis::Value::Int(port),
            ])
        };
        let range = |start, end, master| {
            redis::Value::Array(vec![
                redis::Value::Int(start),
                redis::Value::Int(end),
                master,
            ])
        };
        let reply = redis::Value::Array(vec![
            range(0, 8191, node("10.0.0.1", 7000)),
            range(8192, 12000, node("10.0.0.2", 7000)),
            range(12001, 16383, node("10.0.0.1", 7000)),
        ]);
        let owners = SlotOwners::from_reply(&reply).expect("a slot map");
        let message = |channel: &str, n: u8| (channel.to_owned(), Bytes::from(vec![n]));
        // Slots: {a} 15495 (first master), {b} 3300 (first), {c} 7365 (first), {d} 11298 (second).
        let batch = [
            message("{d}1", 1),
            message("{a}1", 2),
            message("{d}1", 3),
            message("{b}1", 4),
            message("{a}1", 5),
        ];
        let groups: Vec<(u16, Vec<u8>)> = owners
            .group(&batch)
            .into_iter()
            .map(|(slot, g)| (slot, g.iter().map(|m| m.1[0]).collect()))
            .collect();
        assert_eq!(
            groups,
            vec![
                (key_slot(b"d"), vec![1, 3]),
                (key_slot(b"a"), vec![2, 4, 5])
            ]
        );
        assert!(SlotOwners::from_reply(&redis::Value::Int(1)).is_none());
        let gap =
            SlotOwners::from_reply(&redis::Value::Array(vec![range(0, 10, node("h", 1))])).unwrap();
        assert_eq!(gap.group(&batch).len(), 5, "no known master: one each");
    }

    #[test]
    fn sharded_pushes_become_messages_and_server_unsubscribes() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let mut own = OwnUnsubscribes::default();
        let message = from_push(
            &mut own,
            PushInfo {
                kind: PushKind::SMessage,
                data: vec![bulk("notif:u:ann"), bulk("payload")],
            },
        );
        let Incoming::Message(msg) = message else {
            panic!("not a message")
        };
        assert_eq!(msg.get_channel_name(), "notif:u:ann");
        assert_eq!(msg.get_payload_bytes(), b"payload");
        let gone = from_push(
            &mut own,
            PushInfo {
                kind: PushKind::SUnsubscribe,
                data: vec![bulk("notif:c:x"), redis::Value::Int(0)],
            },
        );
        assert!(matches!(gone, Incoming::Unsubscribed(n) if n == "notif:c:x"));
        assert!(matches!(
            from_push(
                &mut own,
                PushInfo {
                    kind: PushKind::Disconnection,
                    data: vec![],
                }
            ),
            Incoming::Lost(_)
        ));
        assert!(matches!(
            from_push(
                &mut own,
                PushInfo {
                    kind: PushKind::SSubscribe,
                    data: vec![bulk("notif:c:x"), redis::Value::Int(1)],
                }
            ),
            Incoming::Nothing
        ));
        // Our own SUNSUBSCRIBE's confirmation is not a slot move; a second push for it is.
        let unsubscribed = |own: &mut OwnUnsubscribes| {
            from_push(
                own,
                PushInfo {
                    kind: PushKind::SUnsubscribe,
                    data: vec![bulk("notif:c:y"), redis::Value::Int(0)],
                },
            )
        };
        own.sent("notif:c:y");
        own.sent("notif:c:y");
        assert!(matches!(unsubscribed(&mut own), Incoming::Nothing));
        assert!(matches!(unsubscribed(&mut own), Incoming::Nothing));
        assert!(matches!(unsubscribed(&mut own), Incoming::Unsubscribed(_)));
    }
}
