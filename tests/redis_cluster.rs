//! Nodes joined by a Redis Cluster (`REDIS_CLUSTER`): sharded Pub/Sub puts each user's and channel's
//! traffic on the master that owns its slot, and the bus follows a slot that moves to another master.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::pg::PgSchema;
use common::redis_cluster::TestCluster;
use common::{TestServer, WsClient};
use serde_json::json;

/// A node of the deployment: its own process, the shared database, the cluster.
fn node(schema: &PgSchema, cluster: &TestCluster, prefix: &str) -> TestServer {
    node_with(schema, cluster, prefix, &[])
}

/// [`node`] with extra settings.
fn node_with(
    schema: &PgSchema,
    cluster: &TestCluster,
    prefix: &str,
    extra: &[(&str, &str)],
) -> TestServer {
    let seeds = cluster.seeds();
    let mut env = vec![
        ("DATABASE_URL", schema.url.as_str()),
        ("REDIS_CLUSTER", seeds.as_str()),
        ("REDIS_PREFIX", prefix),
    ];
    env.extend_from_slice(extra);
    TestServer::start_with(&env)
}

/// Sends to `user` through `via` and expects exactly that notification next on `client`.
fn expect_delivery(via: &TestServer, user: &str, client: &mut WsClient, message: &str) {
    let id = via.send(json!({"user_id": user, "message": message}));
    let n = client.expect_notification();
    assert_eq!(
        (n["id"].as_str(), n["message"].as_str()),
        (Some(id.as_str()), Some(message)),
        "expected {message}, got {n}"
    );
}

#[test]
fn sharded_pubsub_spreads_users_over_masters_and_follows_a_slot_move() {
    let (Some(schema), Some(cluster)) = (PgSchema::create(), TestCluster::start()) else {
        return;
    };
    let prefix = format!("nstest:{}:", uuid::Uuid::now_v7().simple());
    // One user per master: their Redis channels hash to slots on three different masters.
    let mut users: BTreeMap<u16, (String, u16)> = BTreeMap::new();
    for i in 0.. {
        let user = format!("user{i}");
        let slot = cluster.slot(&format!("{prefix}u:{user}"));
        users.entry(cluster.owner(slot)).or_insert((user, slot));
        if users.len() == cluster.ports.len() {
            break;
        }
    }

    let a = node(&schema, &cluster, &prefix);
    let b = node(&schema, &cluster, &prefix);
    // Both nodes listen to broadcasts on the master that owns the broadcast channel.
    let broadcast = format!("{prefix}b");
    let owner = cluster.owner(cluster.slot(&broadcast));
    cluster.wait_until("both nodes listen to broadcasts", |c| {
        c.shardnumsub(owner, &broadcast) == 2
    });

    // A client of each user on node A; producers post to node B.
    let mut clients = Vec::new();
    for (&master, (user, _)) in &users {
        let client = a.ws(&format!("user_id={user}"));
        let channel = format!("{prefix}u:{user}");
        cluster.wait_until("node A subscribes on the owning master", |c| {
            c.shardnumsub(master, &channel) == 1
        });
        // Sharded: the other masters know nothing of the channel.
        for &other in cluster.ports.iter().filter(|&&p| p != master) {
            assert_eq!(cluster.shardnumsub(other, &channel), 0, "{user} on {other}");
        }
        clients.push((user.clone(), master, client));
    }
    for (user, _, client) in &mut clients {
        expect_delivery(&b, user, client, "across the cluster");
    }
    // A broadcast (its channel on one master) reaches every client.
    let cast = b.send(json!({"broadcast": true, "message": "to all"}));
    for (_, _, client) in &mut clients {
        assert_eq!(client.expect_notification()["id"], cast.as_str());
    }
    // A user who leaves and comes back at once: node A unsubscribes and subscribes again; the
    // confirmation of its own SUNSUBSCRIBE is not taken for a slot move (no reconnect, counted below).
    for _ in 0..3 {
        let (user, master, client) = &mut clients[1];
        let channel = format!("{prefix}u:{user}");
        let _ = client.ws.get_ref().shutdown(std::net::Shutdown::Both);
        cluster.wait_until("node A unsubscribes", |c| {
            c.shardnumsub(*master, &channel) == 0
        });
        *client = a.ws(&format!("user_id={user}"));
        cluster.wait_until("node A subscribes again", |c| {
            c.shardnumsub(*master, &channel) == 1
        });
        expect_delivery(&b, user, client, "back again");
    }

    // Move the first user's slot to another master: Redis ends node A's subscription there; node A
    // subscribes on the new owner and delivery goes on.
    let (user, from, client) = &mut clients[0];
    let slot = users[from].1;
    let to = *cluster.ports.iter().find(|&&p| p != *from).unwrap();
    cluster.move_slot(slot, to);
    let channel = format!("{prefix}u:{user}");
    cluster.wait_until("node A subscribes on the new owner", |c| {
        c.shardnumsub(to, &channel) == 1
    });
    assert_eq!(cluster.shardnumsub(*from, &channel), 0);
    assert!(
        a.log_contains("slot moved"),
        "node A saw the server-side unsubscribe"
    );
    expect_delivery(&b, user, client, "after the slot move");
    // The other users were resubscribed too and still get theirs, once.
    for (user, _, client) in clients.iter_mut().skip(1) {
        expect_delivery(&b, user, client, "after the move, elsewhere");
    }
    // Node A lost one session (the slot move), node B none: its publishes followed MOVED.
    for (server, outages) in [(&a, 1), (&b, 0)] {
        let health = server.get("/health").json();
        assert_eq!(health["redis"], "ok", "{health}");
        assert_eq!(server.metric("notif_redis_outages_total"), outages);
    }
}

#[test]
fn a_failover_to_a_replica_loses_nothing_for_live_connections() {
    let (Some(schema), Some(mut cluster)) = (PgSchema::create(), TestCluster::start()) else {
        return;
    };
    let prefix = format!("nstest:{}:", uuid::Uuid::now_v7().simple());
    // Alice's Redis channel lives on a master that is not the broadcast channel's, so the publisher
    // side (node B, which subscribes only to broadcasts) keeps its subscription through the failover.
    let broadcast_owner = cluster.owner(cluster.slot(&format!("{prefix}b")));
    let (user, slot, master) = (0..)
        .map(|i| {
            let user = format!("user{i}");
            let slot = cluster.slot(&format!("{prefix}u:{user}"));
            (user, slot, cluster.owner(slot))
        })
        .find(|(_, _, master)| *master != broadcast_owner)
        .unwrap();
    let replica = cluster.add_replica(master);
    let channel = format!("{prefix}u:{user}");

    // A small replay page: the catch-up after the failover needs several pages, and must read them
    // all (it once stopped after the first and lost the newest of the gap).
    let a = node_with(&schema, &cluster, &prefix, &[("MAX_REPLAY", "3")]);
    let b = node_with(&schema, &cluster, &prefix, &[("MAX_REPLAY", "3")]);
    let mut alice = a.ws(&format!("user_id={user}"));
    cluster.wait_until("node A subscribes on the master", |c| {
        c.shardnumsub(master, &channel) == 1
    });
    expect_delivery(&b, &user, &mut alice, "before");

    // The master dies; its replica takes over. Sends go on through node B meanwhile.
    cluster.kill(master);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(b.send(json!({"user_id": user, "message": format!("during {i}")})));
    }
    cluster.wait_until("the replica owns the slot", |c| {
        c.owner_seen_by(replica, slot) == Some(replica)
    });
    cluster.wait_until("node A subscribes on the new master", |c| {
        c.shardnumsub(replica, &channel) == 1
    });
    for i in 5..8 {
        sent.push(b.send(json!({"user_id": user, "message": format!("during {i}")})));
    }
    // Everything sent while the master was gone arrives, once, in id order; then live delivery.
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(
            alice.expect_notification()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(got, sent);
    expect_delivery(&b, &user, &mut alice, "after");
    // Node B may still be between two reconnect attempts (its backoff grew while the slot had no
    // master); both are back within the longest backoff.
    for server in [&a, &b] {
        common::wait_until(
            "redis to be ok on both nodes",
            Duration::from_secs(10),
            || server.get("/health").json()["redis"] == "ok",
        );
    }
    assert!(a.metric("notif_redis_outages_total") >= 1);
}

/// On a cluster too, each node announces itself (a key and a set in one hash slot, read with one
/// `MGET`), and a node killed with -9 is taken for gone by the others, which catch up from the store
/// what it may not have published; the announcements cost no session.
#[test]
fn a_killed_node_is_taken_for_gone_and_caught_up_on_a_cluster() {
    let (Some(schema), Some(cluster)) = (PgSchema::create(), TestCluster::start()) else {
        return;
    };
    let prefix = format!("nstest:{}:", uuid::Uuid::now_v7().simple());
    let start = || {
        node_with(
            &schema,
            &cluster,
            &prefix,
            &[("REDIS_NODE_TIMEOUT_MS", "1000")],
        )
    };
    let a = start();
    let b = start();
    let mut alice = b.ws("user_id=alice");
    let set = format!("{prefix}{{nodes}}");
    let owner = cluster.owner(cluster.slot(&set));
    cluster.wait_until("both nodes announce themselves", |c| {
        c.query::<Vec<String>>(owner, &["SMEMBERS", &set]).len() == 2
    });
    let channel = format!("{prefix}u:alice");
    let slot_owner = cluster.owner(cluster.slot(&channel));
    cluster.wait_until("node B subscribes to alice", |c| {
        c.shardnumsub(slot_owner, &channel) == 1
    });
    expect_delivery(&a, "alice", &mut alice, "from A");

    drop(a);
    common::wait_until(
        "node A to be taken for gone",
        Duration::from_secs(10),
        || b.metric("notif_redis_peers_gone_total") == 1,
    );
    cluster.wait_until("node A leaves the set", |c| {
        c.query::<Vec<String>>(owner, &["SMEMBERS", &set]).len() == 1
    });
    expect_delivery(&b, "alice", &mut alice, "after");
    assert_eq!(b.metric("notif_redis_outages_total"), 0);
}
