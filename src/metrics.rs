//! Counters, gauges and histograms, kept per shard and summed only when read (Seastar's habit): each
//! shard writes its own cache line with uncontended relaxed atomics, so counting costs the delivery path
//! nothing shared. `GET /metrics` renders the sums in the Prometheus text exposition format, through an
//! [`Exposition`] that every owner of metrics (the shards here, the store, the Redis bus) writes into.
//!
//! A leaf: it imports nothing of the crate, so every layer may count (the store counts its commits
//! with a [`Histogram`] of this module, and `api` renders what the store and the bus hand it).
//!
//! What is counted where (docs/API.md lists every family):
//! - per shard ([`ShardCounters`]): connections, requests by route and status class, WebSocket closes
//!   by code, deliveries by kind, the outbound queue, commit → first write latency;
//! - per node ([`Refusals`]): requests and connections refused, by reason. Refusals are rare and
//!   happen off the delivery path, so one shared atomic per reason is enough;
//! - the store thread (`store`): commits, batch sizes, send → commit latency, scheduled notifications;
//! - the process ([`render_process`]): memory, CPU and file descriptors, read from `/proc` at scrape.

use std::cell::OnceCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bounds (nanoseconds) of the latency histograms' buckets: 100 µs to 10 s, about three per
/// decade, so p50 and p99 in the dashboard are within a bucket of the truth from LAN latencies to an
/// overloaded store.
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of the store batch size histogram (write requests per transaction): powers of two up
/// to the largest `STORE_MAX_BATCH` one would set.
pub const BATCH_SIZE_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// A histogram with fixed bucket bounds, in integer units (nanoseconds, or a count): one relaxed
/// `fetch_add` per bucket hit and one for the sum, no lock. Buckets are kept non-cumulative and
/// summed into Prometheus' cumulative `le` buckets when rendered.
#[derive(Debug)]
pub struct Histogram {
    /// Inclusive upper bounds, ascending; values above the last fall in the `+Inf` bucket.
    bounds: &'static [u64],
    /// One per bound, then `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of every observed value, in the histogram's unit.
    sum: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: u64) {
        // A binary search over at most 16 bounds: a few compares, no branch mispredicted twice.
        let slot = self.bounds.partition_point(|&b| b < value);
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Records a duration, in nanoseconds (the latency histograms' unit).
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds this histogram's buckets and sum into `into` (same bounds).
    fn add_to(&self, into: &mut HistogramSnapshot) {
        for (total, bucket) in into.buckets.iter_mut().zip(self.buckets.iter()) {
            *total += bucket.load(Relaxed);
        }
        into.sum += self.sum.load(Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut snapshot = HistogramSnapshot::empty(self.bounds);
        self.add_to(&mut snapshot);
        snapshot
    }
}

/// A histogram's values at one moment (possibly summed over shards), ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Inclusive upper bounds.
    pub bounds: &'static [u64],
    /// Non-cumulative counts, one per bound, then `+Inf`.
    pub buckets: Vec<u64>,
    /// Sum of the observed values.
    pub sum: u64,
}

impl HistogramSnapshot {
    fn empty(bounds: &'static [u64]) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds,
            buckets: vec![0; bounds.len() + 1],
            sum: 0,
        }
    }

    /// Values observed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until a restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The text exposition format (version 0.0.4) being written: `# HELP` and `# TYPE` once per family,
/// then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition {
            text: String::with_capacity(16 * 1024),
        }
    }

    /// Starts a family: its help and type lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(
            self.text,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
    }

    /// One sample of the current family. Label values here are fixed words of this crate, never
    /// client input, so they need no escaping.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram family; values are divided by `scale` (1e9 for nanoseconds to seconds, 1 for
    /// counts), as Prometheus wants base units.
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot, scale: f64) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (bound, count) in h.bounds.iter().zip(&h.buckets) {
            cumulative += count;
            let le = format_float(*bound as f64 / scale);
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        let count = h.count();
        self.sample(&bucket, &[("le", "+Inf")], count);
        self.sample(
            &format!("{name}_sum"),
            &[],
            format_float(h.sum as f64 / scale),
        );
        self.sample(&format!("{name}_count"), &[], count);
    }

    /// Appends text already in the exposition format (another part's families).
    pub fn push_raw(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// The text to serve.
    pub fn into_string(self) -> String {
        self.text
    }
}

/// A float as Prometheus reads it: shortest exact form (`0.0001`, `2.5`, `10`).
fn format_float(v: f64) -> String {
    format!("{v}")
}

/// The routes of the HTTP API, as the `route` label of `notif_http_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /api/v1/notifications/send` and `POST /notifications`.
    Send,
    /// `POST /api/v1/notifications/batch`.
    Batch,
    /// `POST /api/v1/notifications/schedule`.
    Schedule,
    /// `GET /api/v1/notifications/scheduled/:id`.
    ScheduledGet,
    /// `DELETE /api/v1/notifications/scheduled/:id`.
    ScheduledCancel,
    /// `GET /api/v1/notifications/user/:id` and `GET /notifications`.
    History,
    /// `PUT …/:user_id/:id/read`.
    Read,
    /// `PUT …/:user_id/read-all`.
    ReadAll,
    /// `PUT …/:user_id/seen`.
    Seen,
    /// `DELETE …/:user_id/:id`.
    Delete,
    /// `GET /api/v1/channels/:channel/presence`.
    Presence,
    /// `GET /health`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /ws`: the upgrade (101) or its refusal.
    WebSocket,
    /// `GET /api/v1/notifications/stream`: the SSE stream's opening (200) or its refusal.
    Stream,
    /// `GET /api/v1/notifications/poll`: a long-poll's answer or refusal.
    Poll,
    /// `GET /` and `/assets/*`: the monitor page and its files.
    Page,
    /// `GET /openapi.yaml`.
    OpenApi,
    /// The Pusher protocol's upgrade at `/app/{key}` and the Pusher HTTP API at `/apps/{id}/…`.
    Pusher,
    /// `GET` and `PUT /api/v1/users/:user_id/preferences`.
    Preferences,
    /// No route: 404, 405, or a request that could not be parsed.
    None,
}

impl Route {
    /// Every route, in declaration order (the order of their counters).
    pub const ALL: [Route; 21] = [
        Route::Send,
        Route::Batch,
        Route::Schedule,
        Route::ScheduledGet,
        Route::ScheduledCancel,
        Route::History,
        Route::Read,
        Route::ReadAll,
        Route::Seen,
        Route::Delete,
        Route::Presence,
        Route::Health,
        Route::Metrics,
        Route::WebSocket,
        Route::Stream,
        Route::Poll,
        Route::Page,
        Route::OpenApi,
        Route::Pusher,
        Route::Preferences,
        Route::None,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Route::Send => "send",
            Route::Batch => "batch",
            Route::Schedule => "schedule",
            Route::ScheduledGet => "scheduled_get",
            Route::ScheduledCancel => "scheduled_cancel",
            Route::History => "history",
            Route::Read => "read",
            Route::ReadAll => "read_all",
            Route::Seen => "seen",
            Route::Delete => "delete",
            Route::Presence => "presence",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::WebSocket => "ws",
            Route::Stream => "stream",
            Route::Poll => "poll",
            Route::Page => "page",
            Route::OpenApi => "openapi",
            Route::Pusher => "pusher",
            Route::Preferences => "preferences",
            Route::None => "none",
        }
    }
}

/// The `status_class` label values, indexed by `status / 100 - 1`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How a delivery reached a connection, the `kind` label of `notif_deliveries_by_kind_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// A stored notification, to the connection through its user.
    User,
    /// A stored notification, to the connection through a subscribed channel only.
    Channel,
    /// A stored broadcast.
    Broadcast,
    /// A client's ephemeral publish to a channel.
    Publish,
}

impl DeliveryKind {
    const ALL: [DeliveryKind; 4] = [
        DeliveryKind::User,
        DeliveryKind::Channel,
        DeliveryKind::Broadcast,
        DeliveryKind::Publish,
    ];

    fn label(self) -> &'static str {
        match self {
            DeliveryKind::User => "user",
            DeliveryKind::Channel => "channel",
            DeliveryKind::Broadcast => "broadcast",
            DeliveryKind::Publish => "publish",
        }
    }
}

/// What one delivery reached on one shard, for [`ShardCounters::delivered`].
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    /// A stored notification (`false`: a client publish).
    pub stored: bool,
    /// A broadcast.
    pub broadcast: bool,
    /// Connections given the plain frame (through their user, or a broadcast).
    pub plain: usize,
    /// Connections given a channel's frame.
    pub via_channel: usize,
    /// When the delivery was made on this node (after the commit, or on arrival from Redis).
    pub made_at: Instant,
}

/// WebSocket close codes with a counter of their own; any other code counts as `other`, and a
/// connection that ended without a close frame (the peer vanished, or missed its pongs) as `none`.
const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013];
const CLOSE_LABELS: [&str; 11] = [
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "1013", "other", "none",
];

fn close_slot(code: u16) -> usize {
    match code {
        0 => CLOSE_LABELS.len() - 1,
        code => CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len()),
    }
}

/// One shard's counters, padded to its own cache line so shards never false-share.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardCounters {
    /// WebSocket connections open now.
    websockets_open: AtomicU64,
    /// WebSocket connections accepted since start.
    websockets_total: AtomicU64,
    /// HTTP requests answered (including errors).
    http_requests: AtomicU64,
    /// HTTP responses by route and status class.
    http_responses: [[AtomicU64; 5]; Route::ALL.len()],
    /// Client WebSocket messages received.
    websocket_messages: AtomicU64,
    /// WebSocket closes by code (see [`CLOSE_LABELS`]).
    websocket_closes: [AtomicU64; CLOSE_LABELS.len()],
    /// Frames of stored notifications and client messages written or queued to connections.
    deliveries: AtomicU64,
    /// The same, by [`DeliveryKind`].
    deliveries_by_kind: [AtomicU64; 4],
    /// Notifications committed by requests this shard served.
    notifications_stored: AtomicU64,
    /// Times the shard's inbox pump woke to take work other threads queued (a burst is one).
    inbox_wakeups: AtomicU64,
    /// Bytes queued for sockets that did not take them at once. Signed: only the sum over a shard's
    /// own changes is meaningful, and it is never negative.
    outbound_bytes: AtomicI64,
    /// From a delivery's making (the commit) to the shard routing it into its write burst.
    first_write: Histogram,
}

impl Default for ShardCounters {
    fn default() -> ShardCounters {
        ShardCounters {
            websockets_open: AtomicU64::new(0),
            websockets_total: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            http_responses: Default::default(),
            websocket_messages: AtomicU64::new(0),
            websocket_closes: Default::default(),
            deliveries: AtomicU64::new(0),
            deliveries_by_kind: Default::default(),
            notifications_stored: AtomicU64::new(0),
            inbox_wakeups: AtomicU64::new(0),
            outbound_bytes: AtomicI64::new(0),
            first_write: Histogram::new(LATENCY_BOUNDS_NS),
        }
    }
}

impl ShardCounters {
    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A WebSocket upgrade completed (its 101 counts as a `ws` response).
    pub fn websocket_opened(&self) {
        Self::bump(&self.websockets_open, 1);
        Self::bump(&self.websockets_total, 1);
        self.http_response(Route::WebSocket, 101);
    }

    /// A WebSocket connection ended.
    pub fn websocket_closed(&self) {
        self.websockets_open.fetch_sub(1, Relaxed);
    }

    /// A WebSocket upgrade was answered with a 101 and closed at once with `code` (a user over their
    /// connection cap gets 1013 this way: browsers see close codes, never HTTP statuses).
    pub fn websocket_upgraded_then_closed(&self, code: u16) {
        self.http_response(Route::WebSocket, 101);
        self.websocket_close_code(code);
    }

    /// A WebSocket was closed with `code` (0: without a close frame).
    pub fn websocket_close_code(&self, code: u16) {
        Self::bump(&self.websocket_closes[close_slot(code)], 1);
    }

    /// An HTTP request was answered.
    pub fn http_request(&self) {
        Self::bump(&self.http_requests, 1);
    }

    /// An HTTP response with `status` was given on `route`.
    pub fn http_response(&self, route: Route, status: u16) {
        // `Route::ALL` lists the routes in declaration order, so the discriminant is the index.
        let route = route as usize;
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        Self::bump(&self.http_responses[route][class], 1);
    }

    /// Client messages were received.
    pub fn websocket_messages(&self, n: usize) {
        Self::bump(&self.websocket_messages, n as u64);
    }

    /// Frames were handed to connections (not counted by kind: see [`ShardCounters::delivered`]).
    pub fn deliveries(&self, n: usize) {
        Self::bump(&self.deliveries, n as u64);
    }

    /// One delivery reached connections of this shard: the totals, the kinds, and (for a stored
    /// notification) the commit → first write latency.
    pub fn delivered(&self, d: Delivered) {
        let n = d.plain + d.via_channel;
        if n == 0 {
            return;
        }
        self.deliveries(n);
        let kind = |k: DeliveryKind| &self.deliveries_by_kind[k as usize];
        if !d.stored {
            Self::bump(kind(DeliveryKind::Publish), n as u64);
            return;
        }
        if d.broadcast {
            Self::bump(kind(DeliveryKind::Broadcast), n as u64);
        } else {
            Self::bump(kind(DeliveryKind::User), d.plain as u64);
            Self::bump(kind(DeliveryKind::Channel), d.via_channel as u64);
        }
        self.first_write.observe_duration(d.made_at.elapsed());
    }

    /// The inbox pump woke up to a burst of queued messages.
    pub fn inbox_wakeup(&self) {
        Self::bump(&self.inbox_wakeups, 1);
    }

    /// Notifications were committed.
    pub fn notifications_stored(&self, n: usize) {
        Self::bump(&self.notifications_stored, n as u64);
    }

    /// The bytes waiting in this shard's outbound queues changed by `delta`.
    pub fn outbound_queued(&self, delta: i64) {
        self.outbound_bytes.fetch_add(delta, Relaxed);
    }
}

/// Why a request, a connection or a client message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A missing or wrong API key, metrics token or WebSocket token (401).
    Unauthorized,
    /// An API key over `RATE_LIMIT_API` (429).
    RateLimited,
    /// A WebSocket message over `RATE_LIMIT_WS`.
    MessageRateLimited,
    /// A connection over `MAX_CONNECTIONS`.
    MaxConnections,
    /// A connection over `MAX_CONNECTIONS_PER_IP`.
    MaxConnectionsPerIp,
    /// A connection over `MAX_CONNECTIONS_PER_SHARD`.
    MaxConnectionsPerShard,
    /// A WebSocket over `MAX_CONNECTIONS_PER_USER` (closed with 1013).
    MaxConnectionsPerUser,
}

impl Refusal {
    const ALL: [Refusal; 7] = [
        Refusal::Unauthorized,
        Refusal::RateLimited,
        Refusal::MessageRateLimited,
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::MaxConnectionsPerShard,
        Refusal::MaxConnectionsPerUser,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::RateLimited => "rate_limited",
            Refusal::MessageRateLimited => "message_rate_limited",
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::MaxConnectionsPerShard => "max_connections_per_shard",
            Refusal::MaxConnectionsPerUser => "max_connections_per_user",
        }
    }
}

/// Refusals of the node, by reason: shared by every shard (a refusal is rare and never on the
/// delivery path, so one relaxed atomic per reason costs nothing that matters).
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; Refusal::ALL.len()],
}

impl Refusals {
    /// Counts one refusal.
    pub fn count(&self, why: Refusal) {
        self.counts[why as usize].fetch_add(1, Relaxed);
    }

    /// Refusals for `why` so far.
    pub fn get(&self, why: Refusal) -> u64 {
        self.counts[why as usize].load(Relaxed)
    }
}

/// Every shard's counters, the node's refusals, and the start time.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    shards: Box<[ShardCounters]>,
    refusals: Arc<Refusals>,
}

impl Metrics {
    /// Counters for `shards` shards, all zero.
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            started: Instant::now(),
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
            refusals: Arc::default(),
        }
    }

    /// The counters shard `index` writes.
    pub fn shard(&self, index: usize) -> &ShardCounters {
        &self.shards[index]
    }

    /// The node's refusal counters (shared with `auth`, which counts them).
    pub fn refusals(&self) -> &Arc<Refusals> {
        &self.refusals
    }

    fn sum(&self, field: impl Fn(&ShardCounters) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| field(s).load(Relaxed)).sum()
    }

    /// WebSocket connections open now, over all shards.
    pub fn websockets_open(&self) -> u64 {
        self.sum(|s| &s.websockets_open)
    }

    /// Seconds since start.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Renders every shard-side family (summed over shards) and the refusals.
    pub fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        out.single(
            "notif_websocket_connections",
            Gauge,
            "WebSocket connections open now.",
            self.websockets_open(),
        );
        out.single(
            "notif_websocket_connections_total",
            Counter,
            "WebSocket connections accepted.",
            self.sum(|s| &s.websockets_total),
        );
        out.single(
            "notif_http_requests_total",
            Counter,
            "HTTP requests answered.",
            self.sum(|s| &s.http_requests),
        );
        out.family(
            "notif_http_responses_total",
            Counter,
            "HTTP responses by route and status class (101 for a WebSocket upgrade).",
        );
        for (r, route) in Route::ALL.iter().enumerate() {
            for (c, class) in STATUS_CLASSES.iter().enumerate() {
                let n = self.sum(|s| &s.http_responses[r][c]);
                if n > 0 {
                    out.sample(
                        "notif_http_responses_total",
                        &[("route", route.label()), ("status_class", class)],
                        n,
                    );
                }
            }
        }
        out.single(
            "notif_websocket_messages_total",
            Counter,
            "Client WebSocket messages received.",
            self.sum(|s| &s.websocket_messages),
        );
        out.family(
            "notif_websocket_closes_total",
            Counter,
            "WebSocket connections closed, by close code (none: without a close frame).",
        );
        for (i, code) in CLOSE_LABELS.iter().enumerate() {
            let n = self.sum(|s| &s.websocket_closes[i]);
            out.sample("notif_websocket_closes_total", &[("code", code)], n);
        }
        out.single(
            "notif_deliveries_total",
            Counter,
            "Frames delivered to WebSocket connections.",
            self.sum(|s| &s.deliveries),
        );
        out.family(
            "notif_deliveries_by_kind_total",
            Counter,
            "Frames delivered to WebSocket connections, by how they reached the connection.",
        );
        for kind in DeliveryKind::ALL {
            let n = self.sum(|s| &s.deliveries_by_kind[kind as usize]);
            out.sample(
                "notif_deliveries_by_kind_total",
                &[("kind", kind.label())],
                n,
            );
        }
        out.single(
            "notif_notifications_stored_total",
            Counter,
            "Notifications stored by send and batch requests (fired schedules are in notif_store_inserted_total).",
            self.sum(|s| &s.notifications_stored),
        );
        out.single(
            "notif_shard_wakeups_total",
            Counter,
            "Times a shard woke to take deliveries and messages other threads queued for it (a burst is one).",
            self.sum(|s| &s.inbox_wakeups),
        );
        let outbound: i64 = self
            .shards
            .iter()
            .map(|s| s.outbound_bytes.load(Relaxed))
            .sum();
        out.single(
            "notif_outbound_queue_bytes",
            Gauge,
            "Bytes queued for WebSocket connections whose socket did not take them at once.",
            outbound.max(0),
        );
        let mut first_write = HistogramSnapshot::empty(LATENCY_BOUNDS_NS);
        for s in self.shards.iter() {
            s.first_write.add_to(&mut first_write);
        }
        out.histogram(
            "notif_commit_to_write_seconds",
            "From a stored notification's commit (or its arrival from Redis) to its first socket write on a shard.",
            &first_write,
            1e9,
        );
        out.family(
            "notif_refused_total",
            Counter,
            "Requests, connections and WebSocket messages refused, by reason.",
        );
        for why in Refusal::ALL {
            out.sample(
                "notif_refused_total",
                &[("reason", why.label())],
                self.refusals.get(why),
            );
        }
        out.single(
            "notif_uptime_seconds",
            Gauge,
            "Seconds since start.",
            self.uptime_s(),
        );
    }
}

/// Renders the standard process families from `/proc/self` (Linux): resident memory, CPU seconds,
/// open and maximum file descriptors, start time. A value that cannot be read is left out.
pub fn render_process(out: &mut Exposition) {
    use Kind::{Counter, Gauge};
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    // SAFETY: as above.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let statm = std::fs::read_to_string("/proc/self/statm").ok();
    if let Some(rss_pages) = statm
        .as_deref()
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
    {
        out.single(
            "process_resident_memory_bytes",
            Gauge,
            "Resident memory size in bytes.",
            rss_pages * page_size,
        );
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat(5), the 12th and 13th after the name.
    let cpu_ticks: Option<u64> = match (fields.get(11), fields.get(12)) {
        (Some(u), Some(s)) => u
            .parse::<u64>()
            .ok()
            .zip(s.parse::<u64>().ok())
            .map(|(u, s)| u + s),
        _ => None,
    };
    if let Some(cpu_ticks) = cpu_ticks {
        out.single(
            "process_cpu_seconds_total",
            Counter,
            "Total user and system CPU time spent in seconds.",
            format_float(cpu_ticks as f64 / ticks),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.single(
            "process_open_fds",
            Gauge,
            "Number of open file descriptors.",
            // The directory handle itself is one of them.
            fds.count().saturating_sub(1),
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        out.single(
            "process_max_fds",
            Gauge,
            "Maximum number of open file descriptors.",
            limit.rlim_cur,
        );
    }
    // starttime is field 22 of stat(5), in ticks since boot; boot time is `btime` in /proc/stat.
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, fields.get(19).and_then(|v| v.parse::<u64>().ok())) {
        out.single(
            "process_start_time_seconds",
            Gauge,
            "Start time of the process since the Unix epoch in seconds.",
            format_float(boot as f64 + start as f64 / ticks),
        );
    }
}

thread_local! {
    /// The counters of the shard this thread runs, once [`bind_shard_thread`] was called: for the
    /// places that change a shard's totals without a handle on the shard (a connection's outbound
    /// queue).
    static THIS_SHARD: OnceCell<(Arc<Metrics>, usize)> = const { OnceCell::new() };
}

/// Makes this thread count as shard `index` for [`outbound_queue_changed`]. Called once by each
/// shard's thread at start.
pub fn bind_shard_thread(metrics: Arc<Metrics>, index: usize) {
    THIS_SHARD.with(|s| {
        let _ = s.set((metrics, index));
    });
}

/// The bytes queued for sockets on this thread's shard changed by `delta` (nothing on a thread that
/// is not a shard's, e.g. in unit tests).
pub fn outbound_queue_changed(delta: i64) {
    if delta != 0 {
        THIS_SHARD.with(|s| {
            if let Some((metrics, index)) = s.get() {
                metrics.shard(*index).outbound_queued(delta);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(m: &Metrics) -> String {
        let mut out = Exposition::new();
        m.render(&mut out);
        out.into_string()
    }

    #[test]
    fn counters_are_summed_over_shards() {
        let m = Metrics::new(2);
        m.shard(0).websocket_opened();
        m.shard(1).websocket_opened();
        m.shard(1).websocket_closed();
        m.shard(0).deliveries(5);
        m.shard(1).deliveries(7);
        m.shard(0).http_response(Route::Send, 201);
        m.shard(1).http_response(Route::Send, 202);
        m.shard(1).http_response(Route::Send, 503);
        m.shard(0).websocket_close_code(1000);
        m.shard(1).websocket_close_code(4000);
        m.shard(1).websocket_close_code(0);
        m.refusals().count(Refusal::RateLimited);
        assert_eq!(m.websockets_open(), 1);
        let text = rendered(&m);
        assert!(text.contains("notif_deliveries_total 12"), "{text}");
        assert!(text.contains("notif_websocket_connections_total 2"));
        assert!(text.contains("notif_http_responses_total{route=\"send\",status_class=\"2xx\"} 2"));
        assert!(text.contains("notif_http_responses_total{route=\"send\",status_class=\"5xx\"} 1"));
        assert!(text.contains("notif_http_responses_total{route=\"ws\",status_class=\"1xx\"} 2"));
        assert!(text.contains("notif_websocket_closes_total{code=\"1000\"} 1"));
        assert!(text.contains("notif_websocket_closes_total{code=\"other\"} 1"));
        assert!(text.contains("notif_websocket_closes_total{code=\"none\"} 1"));
        assert!(text.contains("notif_refused_total{reason=\"rate_limited\"} 1"));
    }

    #[test]
    fn every_route_and_reason_has_its_own_counter() {
        for (i, route) in Route::ALL.iter().enumerate() {
            assert_eq!(*route as usize, i, "{route:?}");
        }
        for (i, why) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i, "{why:?}");
        }
        for (i, kind) in DeliveryKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
        assert_eq!(close_slot(1013), 8);
        assert_eq!(CLOSE_LABELS[close_slot(4000)], "other");
        assert_eq!(CLOSE_LABELS[close_slot(0)], "none");
    }

    #[test]
    fn deliveries_are_split_by_kind_and_time_their_first_write() {
        let m = Metrics::new(1);
        let made_at = Instant::now() - Duration::from_millis(3);
        let d = |stored, broadcast, plain, via_channel| Delivered {
            stored,
            broadcast,
            plain,
            via_channel,
            made_at,
        };
        m.shard(0).delivered(d(true, false, 2, 3));
        m.shard(0).delivered(d(true, true, 4, 0));
        m.shard(0).delivered(d(false, false, 0, 6));
        m.shard(0).delivered(d(true, false, 0, 0));
        let text = rendered(&m);
        assert!(text.contains("notif_deliveries_total 15"), "{text}");
        for (kind, n) in [
            ("user", 2),
            ("channel", 3),
            ("broadcast", 4),
            ("publish", 6),
        ] {
            assert!(
                text.contains(&format!(
                    "notif_deliveries_by_kind_total{{kind=\"{kind}\"}} {n}"
                )),
                "{kind}: {text}"
            );
        }
        // Two stored deliveries reached someone; the publish and the one that reached nobody are
        // not timed. Both took 3 ms or more, so the 2.5 ms bucket is empty and the 5 ms one has
        // them (unless this test ran very slowly).
        assert!(
            text.contains("notif_commit_to_write_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("notif_commit_to_write_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("notif_commit_to_write_seconds_bucket{le=\"+Inf\"} 2"));
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_in_base_units() {
        let h = Histogram::new(&[10, 100]);
        for v in [1, 10, 11, 100, 1000] {
            h.observe(v);
        }
        let mut out = Exposition::new();
        out.histogram("x_seconds", "x.", &h.snapshot(), 1000.0);
        let text = out.into_string();
        assert!(text.contains("# TYPE x_seconds histogram"));
        assert!(text.contains("x_seconds_bucket{le=\"0.01\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.1\"} 4\n"));
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"));
        assert!(text.contains("x_seconds_sum 1.122\n"));
        assert!(text.contains("x_seconds_count 5\n"));
    }

    #[test]
    fn the_outbound_gauge_counts_only_on_a_bound_thread() {
        let m = Arc::new(Metrics::new(2));
        outbound_queue_changed(100);
        let m2 = m.clone();
        std::thread::spawn(move || {
            bind_shard_thread(m2, 1);
            outbound_queue_changed(300);
            outbound_queue_changed(-100);
        })
        .join()
        .unwrap();
        assert!(rendered(&m).contains("notif_outbound_queue_bytes 200\n"));
    }

    #[test]
    fn the_process_families_are_read_from_proc() {
        let mut out = Exposition::new();
        render_process(&mut out);
        let text = out.into_string();
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "{name}: {text}");
        }
    }
}
