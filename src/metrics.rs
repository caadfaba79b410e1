//! Counters, kept per shard and summed only when read (Seastar's habit): each shard writes its own
//! cache line with uncontended relaxed atomics, so counting costs the delivery path nothing shared.
//! `GET /metrics` renders the sums in the Prometheus text exposition format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// One shard's counters, padded to its own cache line so shards never false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardCounters {
    /// WebSocket connections open now.
    websockets_open: AtomicU64,
    /// WebSocket connections accepted since start.
    websockets_total: AtomicU64,
    /// HTTP requests answered (including errors).
    http_requests: AtomicU64,
    /// Client WebSocket messages received.
    websocket_messages: AtomicU64,
    /// Frames of stored notifications and client messages written or queued to connections.
    deliveries: AtomicU64,
    /// Notifications committed by requests this shard served.
    notifications_stored: AtomicU64,
}

impl ShardCounters {
    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A WebSocket upgrade completed.
    pub fn websocket_opened(&self) {
        Self::bump(&self.websockets_open, 1);
        Self::bump(&self.websockets_total, 1);
    }

    /// A WebSocket connection ended.
    pub fn websocket_closed(&self) {
        self.websockets_open.fetch_sub(1, Relaxed);
    }

    /// An HTTP request was answered.
    pub fn http_request(&self) {
        Self::bump(&self.http_requests, 1);
    }

    /// Client messages were received.
    pub fn websocket_messages(&self, n: usize) {
        Self::bump(&self.websocket_messages, n as u64);
    }

    /// Frames were handed to connections.
    pub fn deliveries(&self, n: usize) {
        Self::bump(&self.deliveries, n as u64);
    }

    /// Notifications were committed.
    pub fn notifications_stored(&self, n: usize) {
        Self::bump(&self.notifications_stored, n as u64);
    }
}

/// Every shard's counters, and the start time.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    shards: Box<[ShardCounters]>,
}

impl Metrics {
    /// Counters for `shards` shards, all zero.
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            started: Instant::now(),
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
        }
    }

    /// The counters shard `index` writes.
    pub fn shard(&self, index: usize) -> &ShardCounters {
        &self.shards[index]
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

    /// The Prometheus text exposition of every counter, with the store's and the audit log's.
    pub fn render(&self, store: &crate::store::StoreStats, audit: &crate::audit::Audit) -> String {
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "notif_websocket_connections",
            "gauge",
            "WebSocket connections open now.",
            self.websockets_open(),
        );
        metric(
            "notif_websocket_connections_total",
            "counter",
            "WebSocket connections accepted.",
            self.sum(|s| &s.websockets_total),
        );
        metric(
            "notif_http_requests_total",
            "counter",
            "HTTP requests answered.",
            self.sum(|s| &s.http_requests),
        );
        metric(
            "notif_websocket_messages_total",
            "counter",
            "Client WebSocket messages received.",
            self.sum(|s| &s.websocket_messages),
        );
        metric(
            "notif_deliveries_total",
            "counter",
            "Frames delivered to WebSocket connections.",
            self.sum(|s| &s.deliveries),
        );
        metric(
            "notif_notifications_stored_total",
            "counter",
            "Notifications stored by send and batch requests (fired schedules are in notif_store_inserted_total).",
            self.sum(|s| &s.notifications_stored),
        );
        metric(
            "notif_uptime_seconds",
            "gauge",
            "Seconds since start.",
            self.uptime_s(),
        );
        let store_counters: [(&str, &str, u64); 5] = [
            (
                "notif_store_commits_total",
                "Store transactions committed (group commits).",
                store.commits,
            ),
            (
                "notif_store_failed_batches_total",
                "Store batches rolled back.",
                store.failed_batches,
            ),
            (
                "notif_store_write_requests_total",
                "Write requests committed.",
                store.write_ops,
            ),
            (
                "notif_store_inserted_total",
                "Notifications inserted, fired schedules included.",
                store.inserted,
            ),
            (
                "notif_store_reads_total",
                "Read requests answered.",
                store.reads,
            ),
        ];
        for (name, help, value) in store_counters {
            metric(name, "counter", help, value);
        }
        metric(
            "notif_audit_lines_total",
            "counter",
            "Lines written to the audit log (AUDIT_LOG), drop reports included.",
            audit.lines_written(),
        );
        metric(
            "notif_audit_dropped_total",
            "counter",
            "Audit log lines dropped because the queue (AUDIT_QUEUE) was full or a write failed.",
            audit.lines_dropped(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_shards() {
        let m = Metrics::new(2);
        m.shard(0).websocket_opened();
        m.shard(1).websocket_opened();
        m.shard(1).websocket_closed();
        m.shard(0).deliveries(5);
        m.shard(1).deliveries(7);
        assert_eq!(m.websockets_open(), 1);
        let store = crate::store::StoreStats {
            commits: 3,
            ..Default::default()
        };
        let text = m.render(&store, &crate::audit::Audit::off());
        assert!(text.contains("notif_deliveries_total 12"), "{text}");
        assert!(text.contains("notif_store_commits_total 3"), "{text}");
        assert!(text.contains("notif_websocket_connections_total 2"));
        assert!(text.contains("notif_audit_dropped_total 0"), "{text}");
    }
}
