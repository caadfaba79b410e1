//! Redis for multi-node tests: the machine's shared Redis (`TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`) under a key prefix of the test's own, or a private `redis-server` on a free
//! port that the test can stop and start again.
//!
//! Under `CI=true` an unreachable Redis (or a missing `redis-server`) fails the test; elsewhere the test
//! is skipped with a note. Nothing here ever flushes or stops the shared Redis.
#![allow(dead_code)]

use super::unavailable;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared Redis when `TEST_REDIS_URL` is unset.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// A Redis to run nodes against, with a prefix no other test uses.
pub struct TestRedis {
    /// The `REDIS_URL` for the servers.
    pub url: String,
    /// The `REDIS_PREFIX` for the servers.
    pub prefix: String,
}

impl TestRedis {
    /// The machine's shared Redis, or `None` (skip) when it is unreachable outside CI.
    pub fn shared() -> Option<TestRedis> {
        let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let reachable = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        if let Err(e) = reachable {
            return unavailable("Redis", &format!("Redis at {url} is unreachable ({e})"));
        }
        Some(TestRedis {
            url,
            prefix: format!("nstest:{}:", uuid::Uuid::now_v7().simple()),
        })
    }

    /// A fresh connection for the test's own commands.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to Redis")
    }

    /// Subscribers of one Redis channel (named without the prefix: `u:alice`, `c:news`, `b`).
    pub fn numsub(&self, name: &str) -> i64 {
        let full = format!("{}{name}", self.prefix);
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&full)
            .query(&mut self.connection())
            .expect("PUBSUB NUMSUB");
        counts.first().map(|(_, n)| *n).unwrap_or(0)
    }

    /// The active Redis channels under this prefix, without it, sorted.
    pub fn channels(&self) -> Vec<String> {
        let mut names: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(format!("{}*", self.prefix))
            .query(&mut self.connection())
            .expect("PUBSUB CHANNELS");
        for n in &mut names {
            *n = n[self.prefix.len()..].to_owned();
        }
        names.sort();
        names
    }

    /// Waits until `name` has `count` subscribers (a subscription is asynchronous: a test sends only
    /// once every node listens).
    pub fn wait_numsub(&self, name: &str, count: i64) {
        super::wait_until(
            &format!("{name} to have {count} subscribers"),
            Duration::from_secs(10),
            || self.numsub(name) == count,
        );
    }
}

/// A `redis-server` of the test's own on a free port, killed (by its PID) when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one, or `None` (skip) when `redis-server` is missing outside CI.
    pub fn start() -> Option<PrivateRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = PrivateRedis { port, child: None };
        if let Err(e) = redis.spawn() {
            return unavailable("Redis", &format!("cannot run redis-server ({e})"));
        }
        Some(redis)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::other("redis-server did not answer"))
    }

    /// Its `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: like a crash, every connection drops at once).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("redis-server restarts");
    }

    /// As a [`TestRedis`] with a fresh prefix.
    pub fn as_test_redis(&self) -> TestRedis {
        TestRedis {
            url: self.url(),
            prefix: format!("nstest:{}:", uuid::Uuid::now_v7().simple()),
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node of a cluster: its own process and port, sharing the test's PostgreSQL schema and its Redis
/// (under the test's prefix) with the other nodes started the same way.
pub fn cluster_node(schema: &super::pg::PgSchema, redis: &TestRedis) -> super::TestServer {
    super::TestServer::start_with(&[
        ("DATABASE_URL", &schema.url),
        ("REDIS_URL", &redis.url),
        ("REDIS_PREFIX", &redis.prefix),
    ])
}
