//! Configuration: every setting is a CLI flag and an environment variable of the same name, read once
//! at start-up, validated once, and handed to the rest of the program as a typed [`Config`].
//!
//! No other module reads the environment. Limits live here with their defaults so that an operator
//! finds every knob in `--help` and in docs/configuration.md, and a test can set any of them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::store::SqliteSynchronous;

/// Most shards a node may run with a Redis bus: the bus keeps the shards that want a topic in one
/// machine word (`bus::interest::ShardMask`).
pub const MAX_BUS_SHARDS: usize = 64;

/// Reads `SQLITE_SYNCHRONOUS`; a bad value stops start-up with clap's usage error (exit status 2),
/// naming the setting and the two accepted values.
fn parse_sqlite_synchronous(value: &str) -> Result<SqliteSynchronous, String> {
    value.parse()
}

/// Reads `STORE_READERS`: a whole number from 1 to [`MAX_STORE_READERS`].
fn parse_store_readers(value: &str) -> Result<usize, String> {
    parse_bounded(value, 1, MAX_STORE_READERS)
}

/// Reads `STORE_MAX_BATCH`: a whole number from 1 to [`MAX_STORE_MAX_BATCH`].
fn parse_store_max_batch(value: &str) -> Result<usize, String> {
    parse_bounded(value, 1, MAX_STORE_MAX_BATCH)
}

/// A whole number in `min..=max`; a bad value stops start-up with clap's usage error (exit status 2)
/// naming the setting and the range.
fn parse_bounded(value: &str, min: usize, max: usize) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from {min} to {max}")),
    }
}

/// `MAX_SEEN_IDS` when unset: a screenful of a list many times over, and a statement's worth.
pub const DEFAULT_MAX_SEEN_IDS: usize = 1000;
/// The largest `MAX_SEEN_IDS`: what one write request of the store thread may reasonably carry.
pub const MAX_MAX_SEEN_IDS: usize = 100_000;

/// Reads `MAX_SEEN_IDS`: a whole number from 1 to [`MAX_MAX_SEEN_IDS`].
fn parse_max_seen_ids(value: &str) -> Result<usize, String> {
    parse_bounded(value, 1, MAX_MAX_SEEN_IDS)
}

/// Reads `AUDIT_QUEUE`: a whole number from 1 to [`crate::audit::MAX_QUEUE`].
fn parse_audit_queue(value: &str) -> Result<usize, String> {
    parse_bounded(value, 1, crate::audit::MAX_QUEUE)
}

/// Most store reader threads: each holds a database connection and its page cache, and reads are short,
/// so more than this only costs memory (and PostgreSQL connections).
pub const MAX_STORE_READERS: usize = 64;
/// Largest store batch: one transaction of this many rows still commits in well under a second, and a
/// larger one would hold the write lock (and every waiting producer) for longer than that.
pub const MAX_STORE_MAX_BATCH: usize = 65_536;
/// The longest `UNREAD_COALESCE_MS`: a badge later than 10 s behind is a broken badge.
pub const MAX_UNREAD_COALESCE_MS: u64 = 10_000;

/// The server's settings (API.md, "Configuration"). Run with `--help` for the full list.
#[derive(Debug, Clone, Parser)]
#[command(name = "notification-service", version, about = "A thread-per-core real-time notification server", long_about = None)]
pub struct Config {
    /// Listen port. 0 picks a free port (the chosen one is printed at start-up).
    #[arg(long, global = true, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// Listen address.
    #[arg(long, global = true, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// `sqlite://path` (embedded, the default) or `postgres://...`.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "sqlite://data/notifications.db"
    )]
    pub database_url: String,

    /// Redis that joins several nodes (`host:port`, `redis://host:port/db`, or `rediss://...` for
    /// TLS). Unset: single node.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster that joins several nodes through sharded Pub/Sub (Redis 7): seed nodes as
    /// `host:port,host:port,...` (each may be a `redis://` or, all of them for TLS, a `rediss://`
    /// URL). Not with REDIS_URL.
    #[arg(long, global = true, env = "REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,

    /// PEM file of the CA certificate(s) that sign the Redis servers' certificates, for `rediss://`
    /// (REDIS_URL or REDIS_CLUSTER). Unset: the system's trusted CAs.
    #[arg(long, global = true, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Start of every Redis channel name, so several deployments can share one Redis.
    #[arg(long, global = true, env = "REDIS_PREFIX", default_value = "notif:")]
    pub redis_prefix: String,

    /// Milliseconds a node of a multi-node deployment may go without announcing itself on Redis
    /// before the others take it for gone and catch up from the store what it may not have published.
    #[arg(
        long,
        global = true,
        env = "REDIS_NODE_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub redis_node_timeout_ms: u64,

    /// Milliseconds a Pusher channel query (`GET /apps/{id}/channels…`) on a multi-node deployment
    /// waits for the other live nodes' counts; a node that has not answered by then is left out.
    #[arg(long, global = true, env = "SURVEY_TIMEOUT_MS", default_value_t = 1000)]
    pub survey_timeout_ms: u64,

    /// Executors, one per core. Default: the number of CPUs.
    #[arg(long, global = true, env = "SHARDS")]
    pub shards: Option<usize>,

    /// If set, every `/api/*` route and the `/notifications` alias want `Authorization: Bearer <key>`
    /// or `X-API-Key: <key>` (401 otherwise). Several keys, comma-separated, so a key can be rotated.
    #[arg(long, global = true, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// If set, `/metrics` wants `Authorization: Bearer <token>` (401 otherwise). Unset: open.
    #[arg(long, global = true, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// If set, `/ws` wants an HS256 JWT signed with this secret (`?token=`, `Authorization: Bearer`
    /// or `Sec-WebSocket-Protocol: bearer, <jwt>`); its `sub` is the user and `channels` the channel
    /// patterns it may join. A bare `user_id` is refused (401).
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Seconds of clock skew allowed when checking a JWT's `exp` and `nbf`.
    #[arg(long, global = true, env = "JWT_LEEWAY_S", default_value_t = 30)]
    pub jwt_leeway_s: u64,

    /// Seconds between server WebSocket pings; a connection that misses two pongs is closed.
    #[arg(long, global = true, env = "HEARTBEAT_S", default_value_t = 30)]
    pub heartbeat_s: u64,

    /// Milliseconds a shard gathers users' unread-count changes before writing the `unread` event:
    /// a burst of sends within one period is one event per connection with the last count. 0 writes
    /// each change as soon as it arrives. At most 10,000.
    #[arg(long, global = true, env = "UNREAD_COALESCE_MS", default_value_t = 50)]
    pub unread_coalesce_ms: u64,

    /// Largest accepted HTTP request body, in bytes (413 above it).
    #[arg(long, global = true, env = "MAX_BODY", default_value_t = 64 * 1024)]
    pub max_body: usize,

    /// Largest accepted body of `POST /api/v1/notifications/batch` (up to 1,000 notifications), in bytes.
    #[arg(long, global = true, env = "MAX_BATCH_BODY", default_value_t = 1024 * 1024)]
    pub max_batch_body: usize,

    /// Largest accepted HTTP request head, in bytes (431 above it).
    #[arg(long, global = true, env = "MAX_HEADER_BYTES", default_value_t = 8 * 1024)]
    pub max_header_bytes: usize,

    /// Largest accepted WebSocket message, in bytes (close 1009 above it).
    #[arg(long, global = true, env = "MAX_FRAME", default_value_t = 64 * 1024)]
    pub max_frame: usize,

    /// Deepest nesting of JSON arrays and objects accepted in a request body or WebSocket message
    /// (400 `invalid_json`, or an `error` event, above it). At most 128.
    #[arg(long, global = true, env = "MAX_JSON_DEPTH", default_value_t = crate::json_depth::DEFAULT_MAX_JSON_DEPTH)]
    pub max_json_depth: usize,

    /// Most bytes queued for one slow connection before it is closed with 1013.
    #[arg(long, global = true, env = "MAX_OUTBOUND_BYTES", default_value_t = 1024 * 1024)]
    pub max_outbound_bytes: usize,

    /// Most channels one WebSocket connection may subscribe to.
    #[arg(
        long,
        global = true,
        env = "MAX_CHANNELS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_channels_per_connection: usize,

    /// Most connections (HTTP and WebSocket) one shard holds; over it new ones get 503.
    #[arg(
        long,
        global = true,
        env = "MAX_CONNECTIONS_PER_SHARD",
        default_value_t = 500_000
    )]
    pub max_connections_per_shard: usize,

    /// Most connections (HTTP and WebSocket) the node holds over all shards; over it new ones get
    /// 503. 0: no limit beyond MAX_CONNECTIONS_PER_SHARD.
    #[arg(long, global = true, env = "MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most connections from one client IP address over all shards; over it new ones get 503.
    /// 0: no limit.
    #[arg(
        long,
        global = true,
        env = "MAX_CONNECTIONS_PER_IP",
        default_value_t = 0
    )]
    pub max_connections_per_ip: usize,

    /// Most WebSocket connections of one user over all shards; over it a new one is closed with 1013
    /// right after the upgrade. 0: no limit.
    #[arg(
        long,
        global = true,
        env = "MAX_CONNECTIONS_PER_USER",
        default_value_t = 0
    )]
    pub max_connections_per_user: usize,

    /// HTTP API requests per second allowed to one API key over the whole node (429 with
    /// `Retry-After` over it). 0: no limit. Applies only with API_KEY set.
    #[arg(long, global = true, env = "RATE_LIMIT_API", default_value_t = 0)]
    pub rate_limit_api: u32,

    /// How many API requests one key may make at once above RATE_LIMIT_API. 0: one second's worth.
    #[arg(long, global = true, env = "RATE_LIMIT_API_BURST", default_value_t = 0)]
    pub rate_limit_api_burst: u32,

    /// WebSocket messages per second allowed to one connection (an `error` event `rate_limited` over
    /// it; close 1008 when the client keeps going). 0: no limit.
    #[arg(long, global = true, env = "RATE_LIMIT_WS", default_value_t = 0)]
    pub rate_limit_ws: u32,

    /// How many WebSocket messages one connection may send at once above RATE_LIMIT_WS; also how many
    /// refused messages in a row close it with 1008. 0: one second's worth.
    #[arg(long, global = true, env = "RATE_LIMIT_WS_BURST", default_value_t = 0)]
    pub rate_limit_ws_burst: u32,

    /// Seconds a client has to send a complete request head (408 after).
    #[arg(long, global = true, env = "HEADER_TIMEOUT_S", default_value_t = 10)]
    pub header_timeout_s: u64,

    /// Seconds an idle keep-alive HTTP connection is kept open.
    #[arg(long, global = true, env = "KEEPALIVE_TIMEOUT_S", default_value_t = 75)]
    pub keepalive_timeout_s: u64,

    /// Most notification ids one `seen` request may list (WebSocket action or `PUT …/seen`), 1 to
    /// 100,000; more is refused with `invalid_field`.
    #[arg(long, global = true, env = "MAX_SEEN_IDS", default_value_t = DEFAULT_MAX_SEEN_IDS, value_parser = parse_max_seen_ids)]
    pub max_seen_ids: usize,

    /// Most stored notifications replayed by one `resume` (`complete: false` when cut).
    #[arg(long, global = true, env = "MAX_REPLAY", default_value_t = 1000)]
    pub max_replay: usize,

    /// Longest `timeout_s` a long-poll (`GET /api/v1/notifications/poll`) may ask to be parked for.
    #[arg(long, global = true, env = "MAX_POLL_TIMEOUT_S", default_value_t = 60)]
    pub max_poll_timeout_s: u64,

    /// Most notification types one user may mute (`PUT /api/v1/users/:user_id/preferences`).
    #[arg(
        long,
        global = true,
        env = "PREFERENCES_MAX_MUTED_TYPES",
        default_value_t = 100
    )]
    pub preferences_max_muted_types: usize,

    /// Most channels one user may mute (`PUT /api/v1/users/:user_id/preferences`).
    #[arg(
        long,
        global = true,
        env = "PREFERENCES_MAX_MUTED_CHANNELS",
        default_value_t = 100
    )]
    pub preferences_max_muted_channels: usize,

    /// Seconds a graceful shutdown waits for in-flight requests before closing anyway.
    #[arg(long, global = true, env = "SHUTDOWN_TIMEOUT_S", default_value_t = 10)]
    pub shutdown_timeout_s: u64,

    /// Days to keep notifications; older ones are deleted in small batches. Unset: keep forever.
    #[arg(long, global = true, env = "RETENTION_DAYS")]
    pub retention_days: Option<u32>,

    /// Store reader threads (history, replay, health), each with its own database connection.
    #[arg(long, global = true, env = "STORE_READERS", default_value_t = crate::store::DEFAULT_READER_THREADS, value_parser = parse_store_readers)]
    pub store_readers: usize,

    /// Most rows the store writer commits in one transaction (group commit); a single larger request
    /// still commits whole, alone.
    #[arg(long, global = true, env = "STORE_MAX_BATCH", default_value_t = crate::store::DEFAULT_MAX_BATCH, value_parser = parse_store_max_batch)]
    pub store_max_batch: usize,

    /// What a commit of the embedded SQLite store waits for: `normal` (no fsync per commit; survives
    /// a crash of the process, a power loss may take back about the last 500 ms) or `full` (an fsync
    /// per committed batch; survives a power loss too). Ignored with PostgreSQL.
    #[arg(long, global = true, env = "SQLITE_SYNCHRONOUS", default_value = "normal", value_parser = parse_sqlite_synchronous)]
    pub sqlite_synchronous: SqliteSynchronous,

    /// The audit log (docs/audit.md): `off`, `stdout`, or a file path (appended to, reopened on
    /// SIGHUP). One JSON line per step of a notification's life and per refused credential or rate
    /// limit.
    #[arg(long, global = true, env = "AUDIT_LOG", default_value = "off")]
    pub audit_log: crate::audit::Target,

    /// Audit events waiting for the audit writer; past it, events are dropped and counted
    /// (`notif_audit_dropped_total`), never waited for.
    #[arg(long, global = true, env = "AUDIT_QUEUE", default_value_t = crate::audit::DEFAULT_QUEUE, value_parser = parse_audit_queue)]
    pub audit_queue: usize,

    /// Log format: `text` or `json`. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Pusher apps this node serves (Pusher Channels protocol at `/app/{key}`, HTTP API at
    /// `/apps/{id}/…`): `id:key:secret[,id:key:secret…]`. Unset (and no PUSHER_APPS_FILE): the Pusher
    /// routes answer 404.
    #[arg(long, global = true, env = "PUSHER_APPS", hide_env_values = true)]
    pub pusher_apps: Option<String>,

    /// A file of Pusher apps, one `id:key:secret` per line (`#` starts a comment line), read at
    /// start-up; added to PUSHER_APPS.
    #[arg(long, global = true, env = "PUSHER_APPS_FILE")]
    pub pusher_apps_file: Option<PathBuf>,

    /// The Pusher channel a user's notifications reach Pusher clients on, with `{id}` for the user id
    /// (Laravel's `Echo.private('App.Models.User.' + id).notification(…)`).
    #[arg(
        long,
        global = true,
        env = "PUSHER_USER_CHANNEL",
        default_value = "private-App.Models.User.{id}"
    )]
    pub pusher_user_channel: String,

    /// Largest `data` of one Pusher event, in bytes (HTTP API and client events); Pusher's limit.
    #[arg(long, global = true, env = "PUSHER_MAX_EVENT_BYTES", default_value_t = 10 * 1024)]
    pub pusher_max_event_bytes: usize,

    /// Most channels one Pusher HTTP API event may name; Pusher's limit.
    #[arg(
        long,
        global = true,
        env = "PUSHER_MAX_EVENT_CHANNELS",
        default_value_t = 100
    )]
    pub pusher_max_event_channels: usize,

    /// Longest Pusher channel name, in bytes; Pusher's limit.
    #[arg(
        long,
        global = true,
        env = "PUSHER_MAX_CHANNEL_NAME",
        default_value_t = 200
    )]
    pub pusher_max_channel_name: usize,

    /// Most events in one Pusher `batch_events` request; Pusher's limit.
    #[arg(long, global = true, env = "PUSHER_MAX_BATCH", default_value_t = 10)]
    pub pusher_max_batch: usize,

    /// Most members (users) of one presence channel a Pusher client may join; Pusher's limit. A
    /// subscription over it gets `pusher:subscription_error` with status 4100. Native presence
    /// subscriptions are not capped.
    #[arg(
        long,
        global = true,
        env = "PUSHER_MAX_PRESENCE_MEMBERS",
        default_value_t = 100
    )]
    pub pusher_max_presence_members: usize,

    /// Largest `user_info` of a Pusher presence member's `channel_data`, in bytes (Pusher's 1 KB):
    /// every subscriber gets it in the member list and in `member_added`.
    #[arg(
        long,
        global = true,
        env = "PUSHER_MAX_PRESENCE_INFO_BYTES",
        default_value_t = 1024,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536)
    )]
    pub pusher_max_presence_info_bytes: usize,

    /// The Pusher apps read from PUSHER_APPS and PUSHER_APPS_FILE at start-up (`Config::load_pusher`);
    /// empty until then.
    #[arg(skip)]
    pub pusher: crate::pusher::Apps,

    /// What to do instead of serving (`migrate`, `check-config`); none runs the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The one-off jobs of the binary besides serving (API.md, "Command line"). Every setting above is
/// read for them too, from the environment or as a flag before or after the subcommand's name, so the
/// job sees exactly what a node started with the same environment would.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Apply the store's migrations (as start-up does), print what was applied, and exit: 0 when the
    /// schema is current, 1 when the store cannot be reached or migrated.
    Migrate,
    /// Validate every setting as start-up does, then try to reach the store and Redis without changing
    /// anything; print one line per check, and exit 0 when all is well, 2 when anything is wrong.
    CheckConfig,
}

impl Config {
    /// Parses flags and environment, then validates the combination.
    pub fn from_args() -> Result<Config, String> {
        let config = Config::parse();
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings that would make the server misbehave rather than fail to start: the first
    /// of [`Config::problems`].
    pub fn validate(&self) -> Result<(), String> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Every setting that would make the server misbehave, one sentence each, in the order of
    /// `--help`. All of them rather than the first, so `check-config` can list everything to fix at
    /// once; start-up ([`Config::validate`]) stops at the first.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = Vec::new();
        let mut check = |bad: bool, problem: &dyn Fn() -> String| {
            if bad {
                problems.push(problem());
            }
        };
        check(self.shards == Some(0), &|| {
            "SHARDS must be at least 1".into()
        });
        if let Err(problem) = self.pusher_apps() {
            problems.push(problem);
        }
        let mut check = |bad: bool, problem: &dyn Fn() -> String| {
            if bad {
                problems.push(problem());
            }
        };
        check(
            crate::pusher::UserChannelPattern::parse(&self.pusher_user_channel).is_err(),
            &|| "PUSHER_USER_CHANNEL must contain {id} exactly once".into(),
        );
        check(
            self.pusher_max_event_bytes == 0
                || self.pusher_max_event_channels == 0
                || self.pusher_max_channel_name == 0
                || self.pusher_max_batch == 0
                || self.pusher_max_presence_members == 0,
            &|| {
                "PUSHER_MAX_EVENT_BYTES, PUSHER_MAX_EVENT_CHANNELS, PUSHER_MAX_CHANNEL_NAME, \
                 PUSHER_MAX_BATCH and PUSHER_MAX_PRESENCE_MEMBERS must be at least 1"
                    .into()
            },
        );
        check(self.heartbeat_s == 0, &|| {
            "HEARTBEAT_S must be at least 1".into()
        });
        check(self.unread_coalesce_ms > MAX_UNREAD_COALESCE_MS, &|| {
            format!("UNREAD_COALESCE_MS must be at most {MAX_UNREAD_COALESCE_MS}")
        });
        check(self.max_header_bytes < 256, &|| {
            "MAX_HEADER_BYTES must be at least 256".into()
        });
        check(self.max_frame < 128, &|| {
            "MAX_FRAME must be at least 128".into()
        });
        check(
            self.max_json_depth < 2 || self.max_json_depth > crate::json_depth::MAX_MAX_JSON_DEPTH,
            &|| {
                format!(
                    "MAX_JSON_DEPTH must be between 2 and {} (a send's envelope and its data are two levels)",
                    crate::json_depth::MAX_MAX_JSON_DEPTH
                )
            },
        );
        check(self.retention_days == Some(0), &|| {
            "RETENTION_DAYS must be at least 1 (unset keeps notifications forever)".into()
        });
        check(
            self.api_key
                .as_deref()
                .is_some_and(|keys| keys.split(',').all(|k| k.trim().is_empty())),
            &|| "API_KEY must hold at least one non-empty key (comma-separated)".into(),
        );
        check(
            self.metrics_token.as_deref().is_some_and(str::is_empty),
            &|| "METRICS_TOKEN must not be empty (unset it to leave /metrics open)".into(),
        );
        check(
            self.jwt_secret.as_deref().is_some_and(str::is_empty),
            &|| "JWT_SECRET must not be empty".into(),
        );
        check(self.redis_node_timeout_ms < 300, &|| {
            "REDIS_NODE_TIMEOUT_MS must be at least 300".into()
        });
        check(!(1..=60_000).contains(&self.survey_timeout_ms), &|| {
            "SURVEY_TIMEOUT_MS must be 1 to 60000".into()
        });
        if self.redis_url.is_some() && self.redis_cluster.is_some() {
            check(true, &|| "set REDIS_URL or REDIS_CLUSTER, not both".into());
        } else {
            match self.redis_target() {
                Err(problem) => check(true, &|| problem.clone()),
                Ok(target) => check(
                    target.is_some() && self.shard_count() > MAX_BUS_SHARDS,
                    &|| {
                        format!(
                            "with REDIS_URL or REDIS_CLUSTER, SHARDS must be at most {MAX_BUS_SHARDS}"
                        )
                    },
                ),
            }
        }
        check(
            self.header_timeout_s == 0 || self.keepalive_timeout_s == 0,
            &|| "HEADER_TIMEOUT_S and KEEPALIVE_TIMEOUT_S must be at least 1".into(),
        );
        problems
    }

    /// Where the Redis bus connects (`REDIS_URL` or `REDIS_CLUSTER`, with `REDIS_CA_FILE`), or `None`
    /// for a single node. The CA file is read here, so one that cannot be used stops the start-up.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, String> {
        let nodes = match (&self.redis_url, &self.redis_cluster) {
            (Some(url), _) => RedisNodes::Single(normalize_url(url)?),
            (None, Some(seeds)) => RedisNodes::Cluster(parse_cluster_seeds(seeds)?),
            (None, None) => {
                return match &self.redis_ca_file {
                    Some(_) => {
                        Err("REDIS_CA_FILE is set, but neither REDIS_URL nor REDIS_CLUSTER".into())
                    }
                    None => Ok(None),
                };
            }
        };
        let target = RedisTarget {
            nodes,
            ca_file: self.redis_ca_file.clone(),
        };
        target.check_tls()?;
        Ok(Some(target))
    }

    /// The number of shards to run: `SHARDS`, or one per CPU.
    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// [`Config::retention_days`] as a duration.
    pub fn retention(&self) -> Option<Duration> {
        self.retention_days
            .map(|days| Duration::from_secs(u64::from(days) * 24 * 60 * 60))
    }

    /// [`Config::unread_coalesce_ms`] as a duration.
    pub fn unread_coalesce(&self) -> Duration {
        Duration::from_millis(self.unread_coalesce_ms)
    }

    /// The Pusher apps of PUSHER_APPS and PUSHER_APPS_FILE, read and checked.
    pub fn pusher_apps(&self) -> Result<crate::pusher::Apps, String> {
        let mut text = self.pusher_apps.clone().unwrap_or_default();
        if let Some(file) = &self.pusher_apps_file {
            let content = std::fs::read_to_string(file)
                .map_err(|e| format!("PUSHER_APPS_FILE {} cannot be read: {e}", file.display()))?;
            text.push('\n');
            text.push_str(&content);
        }
        crate::pusher::Apps::parse(&text).map_err(|e| format!("PUSHER_APPS: {e}"))
    }

    /// Reads the Pusher apps into [`Config::pusher`] (start-up does it once, after validation).
    pub fn load_pusher(&mut self) -> Result<(), String> {
        self.pusher = self.pusher_apps()?;
        Ok(())
    }

    /// [`Config::heartbeat_s`] as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_s)
    }
}

/// Where the Redis bus finds Redis (`REDIS_URL` or `REDIS_CLUSTER`, and `REDIS_CA_FILE` for TLS),
/// checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// One Redis or a cluster's seeds.
    pub nodes: RedisNodes,
    /// `REDIS_CA_FILE`: the CA(s) a `rediss://` server's certificate must chain to, instead of the
    /// system's trusted CAs.
    pub ca_file: Option<PathBuf>,
}

/// One Redis or a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisNodes {
    /// `REDIS_URL`: one Redis, classic Pub/Sub.
    Single(String),
    /// `REDIS_CLUSTER`: the seed nodes of a Redis Cluster (each a `redis://` or `rediss://` URL),
    /// sharded Pub/Sub.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Every URL given: the one Redis, or each seed.
    pub fn urls(&self) -> &[String] {
        match &self.nodes {
            RedisNodes::Single(url) => std::slice::from_ref(url),
            RedisNodes::Cluster(seeds) => seeds,
        }
    }

    /// Whether the connections use TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.urls().iter().any(|u| is_tls(u))
    }

    /// The setting that names the nodes, for messages.
    pub fn setting(&self) -> &'static str {
        match self.nodes {
            RedisNodes::Single(_) => "REDIS_URL",
            RedisNodes::Cluster(_) => "REDIS_CLUSTER",
        }
    }

    /// Refuses TLS settings that cannot mean what they say: seeds that mix `redis://` and
    /// `rediss://`, a `REDIS_CA_FILE` no `rediss://` URL uses (or that `#insecure` would ignore), a
    /// CA file that cannot be read or holds no certificate.
    fn check_tls(&self) -> Result<(), String> {
        let setting = self.setting();
        let tls = self.urls().iter().filter(|u| is_tls(u)).count();
        if tls != 0 && tls != self.urls().len() {
            return Err(format!(
                "{setting} mixes redis:// and rediss:// nodes: use rediss:// for all or none"
            ));
        }
        let Some(file) = &self.ca_file else {
            return Ok(());
        };
        if tls == 0 {
            return Err(format!(
                "REDIS_CA_FILE is set, but {setting} is not rediss:// (TLS)"
            ));
        }
        if self.urls().iter().any(|u| u.ends_with("#insecure")) {
            return Err(format!(
                "REDIS_CA_FILE is set, but {setting} ends with #insecure, which checks no certificate"
            ));
        }
        read_ca(file).map(drop)
    }

    /// The `redis` crate's TLS material: the CA file's certificates, read now (so a CA file replaced
    /// on disk is used from the next connection on); `None` for the system's roots or plain TCP.
    pub fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, String> {
        match &self.ca_file {
            Some(file) if self.tls() => Ok(Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca(file)?),
            })),
            _ => Ok(None),
        }
    }

    /// A client of one node (`url` is one of [`RedisTarget::urls`]), trusting the CA file if given.
    pub fn client(&self, url: &str) -> Result<redis::Client, redis::RedisError> {
        crate::tls::install_default_provider();
        match self.tls_certificates() {
            Ok(Some(certs)) => redis::Client::build_with_tls(url, certs),
            Ok(None) => redis::Client::open(url),
            Err(why) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "REDIS_CA_FILE",
                why,
            ))),
        }
    }
}

/// Whether a Redis URL asks for TLS.
fn is_tls(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// Reads `REDIS_CA_FILE`.
fn read_ca(file: &Path) -> Result<Vec<u8>, String> {
    crate::tls::read_ca_file(file).map_err(|e| format!("REDIS_CA_FILE: {e}"))
}

/// Turns `REDIS_URL` (`host:port`, `redis://host:port/db`, `rediss://...`) into a URL the client
/// accepts, refusing what cannot work (checked at start-up, so a typo fails fast).
fn normalize_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("redis://{url}")
    };
    redis::Client::open(url.as_str()).map_err(|e| format!("REDIS_URL is not usable: {e}"))?;
    Ok(url)
}

/// Turns `REDIS_CLUSTER` (`host:port,host:port,...`, each also as a `redis://` URL) into seed URLs,
/// refusing an empty list or a seed that cannot work.
fn parse_cluster_seeds(list: &str) -> Result<Vec<String>, String> {
    let seeds: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| normalize_url(s).map_err(|e| e.replace("REDIS_URL", "REDIS_CLUSTER")))
        .collect::<Result<_, _>>()?;
    if seeds.is_empty() {
        return Err("REDIS_CLUSTER names no node".into());
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unread_coalescing_is_bounded() {
        let c = Config::parse_from(["notification-service", "--unread-coalesce-ms", "0"]);
        assert!(c.validate().is_ok(), "0 writes every change at once");
        let c = Config::parse_from(["notification-service", "--unread-coalesce-ms", "10001"]);
        assert_eq!(
            c.validate().unwrap_err(),
            "UNREAD_COALESCE_MS must be at most 10000"
        );
    }

    #[test]
    fn the_survey_timeout_is_bounded() {
        let c = Config::parse_from(["x"]);
        assert_eq!(c.survey_timeout_ms, 1000);
        for ok in ["1", "60000"] {
            let c = Config::parse_from(["x", "--survey-timeout-ms", ok]);
            assert!(c.validate().is_ok(), "{ok}");
        }
        for bad in ["0", "60001"] {
            let c = Config::parse_from(["x", "--survey-timeout-ms", bad]);
            assert_eq!(
                c.validate().unwrap_err(),
                "SURVEY_TIMEOUT_MS must be 1 to 60000"
            );
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::parse_from(["notification-service"]);
        assert_eq!(c.port, 8080);
        assert_eq!(c.database_url, "sqlite://data/notifications.db");
        assert_eq!(c.max_body, 65536);
        assert_eq!(c.heartbeat_s, 30);
        assert_eq!(c.unread_coalesce(), Duration::from_millis(50));
        assert_eq!(c.sqlite_synchronous, SqliteSynchronous::Normal);
        assert_eq!((c.store_readers, c.store_max_batch), (2, 4096));
        assert!(c.validate().is_ok());
        assert_eq!(c.audit_log, crate::audit::Target::Off);
        assert_eq!(c.audit_queue, crate::audit::DEFAULT_QUEUE);
    }

    #[test]
    fn the_audit_log_is_off_stdout_or_a_file_with_a_bounded_queue() {
        let c = Config::parse_from(["x", "--audit-log", "/tmp/a.log", "--audit-queue", "1"]);
        assert_eq!(c.audit_log, crate::audit::Target::File("/tmp/a.log".into()));
        assert_eq!(c.audit_queue, 1);
        let c = Config::parse_from(["x", "--audit-log", "stdout"]);
        assert_eq!(c.audit_log, crate::audit::Target::Stdout);
        for value in ["0", "1048577", "lots"] {
            let e = Config::try_parse_from(["x", "--audit-queue", value]).unwrap_err();
            assert!(
                e.to_string()
                    .contains("must be a whole number from 1 to 1048576"),
                "{e}"
            );
        }
        assert!(Config::try_parse_from(["x", "--audit-log", ""]).is_err());
    }

    #[test]
    fn store_readers_and_batch_size_are_bounded() {
        let c = Config::parse_from(["x", "--store-readers", "64", "--store-max-batch", "1"]);
        assert_eq!((c.store_readers, c.store_max_batch), (64, 1));
        for (flag, value) in [
            ("--store-readers", "0"),
            ("--store-readers", "65"),
            ("--store-readers", "two"),
            ("--store-max-batch", "0"),
            ("--store-max-batch", "65537"),
        ] {
            let e = Config::try_parse_from(["x", flag, value]).unwrap_err();
            assert!(
                e.to_string().contains("must be a whole number from 1 to"),
                "{e}"
            );
        }
    }

    #[test]
    fn flags_override_and_zero_shards_is_refused() {
        let c = Config::parse_from(["x", "--port", "0", "--shards", "0"]);
        assert_eq!(c.port, 0);
        assert!(c.validate().unwrap_err().contains("SHARDS"));
    }

    #[test]
    fn pusher_apps_come_from_the_list_and_the_file_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apps");
        std::fs::write(&file, "# apps\n2:k2:s2\n").unwrap();
        let mut c = Config::parse_from([
            "x",
            "--pusher-apps",
            "1:k1:s1",
            "--pusher-apps-file",
            file.to_str().unwrap(),
        ]);
        assert!(c.validate().is_ok());
        c.load_pusher().unwrap();
        assert_eq!(c.pusher.by_key("k2").unwrap().id, "2");
        assert_eq!(c.pusher.by_id("1").unwrap().secret, "s1");
        assert!(Config::parse_from(["x"]).pusher_apps().unwrap().is_empty());
        let bad = Config::parse_from(["x", "--pusher-apps", "1:k1"]);
        assert!(bad.validate().unwrap_err().contains("PUSHER_APPS"));
        let missing = Config::parse_from(["x", "--pusher-apps-file", "/nonexistent/apps"]);
        assert!(missing.validate().unwrap_err().contains("PUSHER_APPS_FILE"));
        let pattern = Config::parse_from(["x", "--pusher-user-channel", "private-user"]);
        assert!(pattern
            .validate()
            .unwrap_err()
            .contains("PUSHER_USER_CHANNEL"));
        let zero = Config::parse_from(["x", "--pusher-max-batch", "0"]);
        assert!(zero.validate().unwrap_err().contains("PUSHER_MAX_BATCH"));
        let zero = Config::parse_from(["x", "--pusher-max-presence-members", "0"]);
        assert!(zero
            .validate()
            .unwrap_err()
            .contains("PUSHER_MAX_PRESENCE_MEMBERS"));
        let c = Config::parse_from(["x"]);
        assert_eq!(
            (
                c.pusher_max_presence_members,
                c.pusher_max_presence_info_bytes
            ),
            (100, 1024)
        );
        for bad in ["0", "65537"] {
            assert!(
                Config::try_parse_from(["x", "--pusher-max-presence-info-bytes", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn sqlite_synchronous_is_normal_or_full() {
        let c = Config::parse_from(["x", "--sqlite-synchronous", "FULL"]);
        assert_eq!(c.sqlite_synchronous, SqliteSynchronous::Full);
        let e = Config::try_parse_from(["x", "--sqlite-synchronous", "off"]).unwrap_err();
        assert!(e.to_string().contains("use normal or full"), "{e}");
    }

    #[test]
    fn redis_cluster_is_a_seed_list_and_excludes_redis_url() {
        let c = Config::parse_from(["x", "--redis-cluster", "10.0.0.1:7000, 10.0.0.2:7000"]);
        assert!(c.validate().is_ok());
        assert_eq!(
            c.redis_target().unwrap(),
            Some(RedisTarget {
                nodes: RedisNodes::Cluster(vec![
                    "redis://10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ]),
                ca_file: None
            })
        );
        let both = Config::parse_from(["x", "--redis-cluster", "h:1", "--redis-url", "h:2"]);
        assert!(both.validate().unwrap_err().contains("not both"));
        let empty = Config::parse_from(["x", "--redis-cluster", ","]);
        assert!(empty.validate().unwrap_err().contains("REDIS_CLUSTER"));
    }

    #[test]
    fn urls_are_normalized_and_nonsense_is_refused() {
        assert_eq!(
            normalize_url("127.0.0.1:6379").unwrap(),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(normalize_url("redis://h:1/2").unwrap(), "redis://h:1/2");
        assert!(normalize_url("http://x").is_err());
    }

    #[test]
    fn cluster_seeds_are_split_and_normalized() {
        assert_eq!(
            parse_cluster_seeds(" 127.0.0.1:7000, redis://h:7001 ,").unwrap(),
            vec!["redis://127.0.0.1:7000", "redis://h:7001"]
        );
        assert!(parse_cluster_seeds(" , ").is_err());
        let err = parse_cluster_seeds("h:1,http://x").unwrap_err();
        assert!(err.contains("REDIS_CLUSTER"), "{err}");
    }

    #[test]
    fn redis_tls_settings_that_cannot_work_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "no certificate here").unwrap();
        let junk = junk.to_str().unwrap();
        let problem = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            Config::parse_from(all).validate().unwrap_err()
        };
        assert!(problem(&["--redis-cluster", "rediss://h:1,redis://h:2"]).contains("mixes"));
        assert!(
            problem(&["--redis-url", "redis://h:1", "--redis-ca-file", "/x.pem"])
                .contains("is not rediss://")
        );
        assert!(problem(&["--redis-ca-file", "/x.pem"]).contains("neither REDIS_URL"));
        assert!(problem(&[
            "--redis-url",
            "rediss://h:1/#insecure",
            "--redis-ca-file",
            "/x.pem"
        ])
        .contains("#insecure"));
        let missing = problem(&[
            "--redis-url",
            "rediss://h:1",
            "--redis-ca-file",
            "/nonexistent.pem",
        ]);
        assert!(
            missing.contains("REDIS_CA_FILE: cannot read the CA file /nonexistent.pem"),
            "{missing}"
        );
        assert!(
            problem(&["--redis-url", "rediss://h:1", "--redis-ca-file", junk])
                .contains("holds no usable PEM certificate")
        );
        let tls = Config::parse_from(["x", "--redis-cluster", "rediss://h:1,rediss://h:2"]);
        assert!(tls.validate().is_ok());
        assert!(tls.redis_target().unwrap().unwrap().tls());
    }
}
