//! A Redis Cluster of the test's own: three masters (no replicas) started from the machine's
//! `redis-server` on free ports, joined with `redis-cli --cluster create`, every process killed by its
//! PID when the cluster is dropped (also when the test panics).
//!
//! Under `CI=true` a missing `redis-server` or `redis-cli` fails the test; elsewhere the test is
//! skipped with a note.
#![allow(dead_code)]

use super::unavailable;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Masters of the cluster.
const MASTERS: usize = 3;
/// `cluster-node-timeout` in milliseconds: short, so a replica takes over a dead master within seconds.
const NODE_TIMEOUT_MS: &str = "1000";

/// Three masters sharing the 16384 slots (and the replicas a test adds).
pub struct TestCluster {
    /// The masters' ports, then the replicas'.
    pub ports: Vec<u16>,
    /// The `redis-server` processes, by port; `None` once killed.
    children: Vec<(u16, Option<Child>)>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts and joins the cluster, or `None` (skip) without `redis-server`/`redis-cli` outside CI.
    pub fn start() -> Option<TestCluster> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = TestCluster {
            ports: Vec::new(),
            children: Vec::new(),
            _dir: dir,
        };
        for _ in 0..MASTERS {
            if let Err(e) = cluster.spawn_node() {
                return unavailable("Redis Cluster", &format!("cannot run redis-server ({e})"));
            }
        }
        for &port in &cluster.ports {
            cluster.wait_ping(port);
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match created {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("redis-cli --cluster create failed: {s}"),
            Err(e) => return unavailable("Redis Cluster", &format!("cannot run redis-cli ({e})")),
        }
        cluster.wait_until(
            "every node sees the cluster ok and the same slot map",
            |c| {
                c.ports.iter().all(|&p| {
                    c.query::<String>(p, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                }) && c
                    .ports
                    .iter()
                    .all(|&p| c.owner_seen_by(p, 0) == Some(c.owner(0)))
            },
        );
        Some(cluster)
    }

    /// Starts one more cluster-enabled `redis-server` on a free port; returns the port.
    fn spawn_node(&mut self) -> std::io::Result<u16> {
        let port = super::free_port();
        let conf = self._dir.path().join(format!("nodes-{port}.conf"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(&conf)
            .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.children.push((port, Some(child)));
        self.ports.push(port);
        Ok(port)
    }

    /// Adds a replica of the master on `master` and waits until it has synced; returns its port.
    pub fn add_replica(&mut self, master: u16) -> u16 {
        let port = self.spawn_node().expect("redis-server starts");
        self.wait_ping(port);
        let master_id = self.node_id(master);
        let added = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{master}"))
            .args(["--cluster-slave", "--cluster-master-id", &master_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli");
        assert!(
            added.success(),
            "redis-cli --cluster add-node failed: {added}"
        );
        self.wait_until("the replica has synced", |c| {
            c.query::<String>(port, &["INFO", "replication"])
                .contains("master_link_status:up")
        });
        port
    }

    /// Kills the node on `port` with SIGKILL (a crash), by its PID.
    pub fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.children {
            if *p == port {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    fn wait_ping(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {port} did not answer");
    }

    /// `REDIS_CLUSTER` for the servers: every master as a seed.
    pub fn seeds(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        seeds.join(",")
    }

    /// Runs one command on the node at `port`.
    pub fn query<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to a cluster node");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn)
            .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
    }

    /// The slot of a key or shard channel.
    pub fn slot(&self, name: &str) -> u16 {
        self.query(self.ports[0], &["CLUSTER", "KEYSLOT", name])
    }

    /// The node id of the master on `port`.
    pub fn node_id(&self, port: u16) -> String {
        self.query(port, &["CLUSTER", "MYID"])
    }

    /// The port of the master that owns `slot`, as the first live node sees it.
    pub fn owner(&self, slot: u16) -> u16 {
        let live = self
            .children
            .iter()
            .find(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
            .expect("a live node");
        self.owner_seen_by(live, slot)
            .unwrap_or_else(|| panic!("no live master owns slot {slot}"))
    }

    /// The port of the live master that owns `slot`, as the node on `port` sees it.
    pub fn owner_seen_by(&self, port: u16, slot: u16) -> Option<u16> {
        let nodes: String = self.query(port, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields[2].contains("fail") {
                continue; // a dead master keeps its slots in the table until a replica takes them
            }
            let owns = fields.iter().skip(8).any(|range| {
                if range.starts_with('[') {
                    return false; // a migration in progress, not ownership
                }
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                let (lo, hi): (u16, u16) = (lo.parse().unwrap(), hi.parse().unwrap());
                (lo..=hi).contains(&slot)
            });
            if owns {
                let addr = fields[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().ok();
            }
        }
        None
    }

    /// Shard-channel subscribers of `channel` on the node at `port` (`PUBSUB SHARDNUMSUB`).
    pub fn shardnumsub(&self, port: u16, channel: &str) -> i64 {
        let counts: Vec<(String, i64)> = self.query(port, &["PUBSUB", "SHARDNUMSUB", channel]);
        counts.first().map(|(_, n)| *n).unwrap_or(0)
    }

    /// Waits until `check` holds (10 s at most).
    pub fn wait_until(&self, what: &str, mut check: impl FnMut(&TestCluster) -> bool) {
        super::wait_until(what, Duration::from_secs(10), || check(self));
    }

    /// Moves an (empty) slot to the master on `to`, the way `redis-cli --cluster reshard` does:
    /// IMPORTING on the target, MIGRATING on the source, then NODE everywhere (there are no keys to
    /// MIGRATE: Pub/Sub stores none). The source ends its subscriptions of the slot's channels.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let slot_s = slot.to_string();
        let setslot = |port: u16, args: &[&str]| {
            let mut all = vec!["CLUSTER", "SETSLOT", &slot_s];
            all.extend_from_slice(args);
            let _: String = self.query(port, &all);
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for &p in &self.ports {
            if p != from && p != to {
                setslot(p, &["NODE", &to_id]);
            }
        }
        self.wait_until("every node sees the slot moved", |c| {
            c.ports
                .iter()
                .all(|&p| c.owner_seen_by(p, slot) == Some(to))
        });
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
