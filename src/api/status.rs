//! `GET /health` and `GET /metrics`: what a load balancer and Prometheus ask.
//!
//! Health asks the store for a trivial read with a short deadline: a store that cannot answer makes the
//! node `degraded` (503), so a load balancer stops sending producers to a node that could not commit.

use std::time::Duration;

use futures_util::future::{select, Either};

use crate::api::ApiContext;
use crate::http::response::Response;
use crate::metrics::{render_process, Exposition, Kind};

/// How long health waits for the store before calling it down.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health`.
pub async fn health(ctx: &ApiContext<'_>) -> Response {
    let ping = std::pin::pin!(ctx.store.ping());
    let deadline = std::pin::pin!(glommio::timer::sleep(STORE_PING_TIMEOUT));
    let store_ok = matches!(select(ping, deadline).await, Either::Left((Ok(()), _)));
    // Redis joins the nodes, but only the store decides whether this node can take sends: a node
    // without Redis still commits and delivers locally, so a Redis outage does not fail health.
    let redis = match ctx.fanout.redis_up() {
        None => "disabled",
        Some(true) => "ok",
        Some(false) => "down",
    };
    let (status, code) = if store_ok {
        ("ok", 200)
    } else {
        ("degraded", 503)
    };
    let body = format!(
        "{{\"status\":\"{status}\",\"store\":\"{}\",\"redis\":\"{redis}\",\"connections\":{},\"uptime_s\":{}}}",
        if store_ok { "ok" } else { "down" },
        ctx.metrics.websockets_open(),
        ctx.metrics.uptime_s(),
    );
    Response::json(code, body.into_bytes())
}

/// How long a scrape waits for the store's count of pending scheduled notifications; without an
/// answer the gauge is left out of that scrape (Prometheus then shows a gap, not a wrong zero).
const PENDING_COUNT_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /metrics`: the shards' families, the store's, the Redis bus's, and the process's.
pub async fn metrics(ctx: &ApiContext<'_>) -> Response {
    let pending = std::pin::pin!(ctx.store.scheduled_pending());
    let deadline = std::pin::pin!(glommio::timer::sleep(PENDING_COUNT_TIMEOUT));
    let pending = match select(pending, deadline).await {
        Either::Left((Ok(n), _)) => Some(n),
        _ => None,
    };
    let mut out = Exposition::new();
    ctx.metrics.render(&mut out);
    ctx.store.render_metrics(&mut out);
    if let Some(n) = pending {
        out.single(
            "notif_scheduled_pending",
            Kind::Gauge,
            "Scheduled notifications waiting to fire, in the whole database (every node's).",
            n,
        );
    }
    let audit = ctx.audit;
    out.single(
        "notif_audit_lines_total",
        Kind::Counter,
        "Lines written to the audit log (AUDIT_LOG), drop reports included.",
        audit.lines_written(),
    );
    out.single(
        "notif_audit_dropped_total",
        Kind::Counter,
        "Audit log lines dropped because the queue (AUDIT_QUEUE) was full or a write failed.",
        audit.lines_dropped(),
    );
    out.single(
        "notif_sqlite_memory_bytes",
        Kind::Gauge,
        "Memory SQLite's allocator holds (page caches, statements); 0 on PostgreSQL.",
        crate::store::sqlite_allocator_bytes(),
    );
    let mut bus = String::new();
    ctx.fanout.render_bus_metrics(&mut bus);
    out.push_raw(&bus);
    render_process(&mut out);
    Response::text(
        200,
        "text/plain; version=0.0.4",
        out.into_string().into_bytes(),
    )
}
