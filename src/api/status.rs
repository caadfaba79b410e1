//! `GET /health` and `GET /metrics`: what a load balancer and Prometheus ask.
//!
//! Health asks the store for a trivial read with a short deadline: a store that cannot answer makes the
//! node `degraded` (503), so a load balancer stops sending producers to a node that could not commit.

use std::time::Duration;

use futures_util::future::{select, Either};

use crate::api::ApiContext;
use crate::http::response::Response;

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

/// `GET /metrics`.
pub fn metrics(ctx: &ApiContext<'_>) -> Response {
    let mut text = ctx.metrics.render(&ctx.store.stats(), ctx.audit);
    ctx.fanout.render_bus_metrics(&mut text);
    Response::text(200, "text/plain; version=0.0.4", text.into_bytes())
}
