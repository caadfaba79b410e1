//! The server on PostgreSQL, through its public interface: the API works the same, an unreachable
//! database is a 503 that heals by itself, and two nodes sharing one database fire each scheduled
//! notification exactly once.

mod common;

use std::time::Duration;

use common::pg::PgSchema;
use common::proxy::CuttableProxy;
use common::TestServer;
use serde_json::{json, Value};

#[test]
fn the_api_works_the_same_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let server = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    assert!(!server.log_contains("password"), "no secret in the logs");
    let mut client = server.ws("user_id=pat&channels=ops");
    client.expect_event("subscribed");
    let a = server.send(json!({"user_id": "pat", "message": "a", "data": {"k": [1, 2]}}));
    let n = client.expect_notification();
    assert_eq!(n["id"], a.as_str());
    assert_eq!(n["data"]["k"][1], 2);
    let b = server.send(json!({"channels": ["ops"], "message": "b"}));
    assert_eq!(client.expect_notification()["channel"], "ops");
    let r = server.request("PUT", &format!("/api/v1/notifications/pat/{a}/read"), None);
    assert_eq!(r.json()["read"], true);
    let page = server.get("/api/v1/notifications/user/pat").json();
    assert_eq!(
        (page["total"].as_u64(), page["unread"].as_u64()),
        (Some(1), Some(0))
    );
    drop(client);
    let c = server.send(json!({"user_id": "pat", "message": "c"}));
    let mut back = server.ws(&format!("user_id=pat&channels=ops&since={a}"));
    back.expect_event("subscribed");
    assert_eq!(back.expect_notification()["id"], b.as_str());
    assert_eq!(back.expect_notification()["id"], c.as_str());
    assert_eq!(back.expect_event("resumed")["count"], 2);
    // U+0000 cannot be stored in PostgreSQL text or jsonb: a 400 naming the field, and a batch
    // holding it is refused whole instead of failing the commit it would have shared with others.
    let nul = server.post(
        "/api/v1/notifications/send",
        &json!({"user_id": "pat", "message": "x", "data": {"k": "a\u{0}b"}}),
    );
    assert_eq!(
        (nul.status, nul.error_code()),
        (400, "invalid_field".into())
    );
    let batch = server.post(
        "/api/v1/notifications/batch",
        &json!({"notifications": [
            {"user_id": "pat", "message": "fine"},
            {"user_id": "pat", "message": "bad\u{0}"}
        ]}),
    );
    assert_eq!(batch.status, 400);
    assert_eq!(server.get("/health").json()["store"], "ok");
}

#[test]
fn an_unreachable_postgres_is_a_503_and_the_server_heals_by_itself() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let proxy = CuttableProxy::start(schema.upstream);
    let server = TestServer::start_with(&[("DATABASE_URL", &schema.url_via(proxy.addr))]);
    let mut client = server.ws("user_id=olga");
    server.send(json!({"user_id": "olga", "message": "before"}));
    client.expect_notification();

    proxy.cut();
    let r = server.post(
        "/api/v1/notifications/send",
        &json!({"user_id": "olga", "message": "during"}),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "store_unavailable");
    let health = server.get("/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["status"], "degraded");
    assert_eq!(health.json()["store"], "down");
    // Live connections stay open.
    client.send_json(json!({"action": "ping"}));
    client.expect_event("pong");

    proxy.restore();
    let id = common::wait_for(
        "the server to recover without a restart",
        Duration::from_secs(15),
        || {
            let r = server.post(
                "/api/v1/notifications/send",
                &json!({"user_id": "olga", "message": "after"}),
            );
            if r.status != 201 {
                assert_eq!(r.status, 503);
            }
            (r.status == 201).then(|| r.json()["id"].as_str().unwrap().to_owned())
        },
    );
    assert_eq!(client.expect_notification()["id"], id.as_str());
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn two_nodes_on_one_database_fire_each_scheduled_notification_exactly_once() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let node_a = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    let mut node_b = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    for i in 0..200 {
        let at = (due + chrono::Duration::milliseconds(i * 10)).to_rfc3339();
        let node = if i % 2 == 0 { &node_a } else { &node_b };
        let r = node.post(
            "/api/v1/notifications/schedule",
            &json!({"user_id": "crowd", "message": i.to_string(), "scheduled_at": at}),
        );
        assert_eq!(r.status, 201);
    }
    // Node B dies hard while the notifications fall due; node A must fire the rest.
    std::thread::sleep(Duration::from_millis(2000));
    unsafe { libc::kill(node_b.pid() as i32, libc::SIGKILL) };
    let _ = node_b.wait_exit();

    common::wait_until("all 200 to fire", Duration::from_secs(15), || {
        let page = node_a
            .get("/api/v1/notifications/user/crowd?limit=500")
            .json();
        let messages: Vec<&str> = page["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["message"].as_str().unwrap())
            .collect();
        let mut unique = messages.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            messages.len(),
            "a scheduled notification fired twice"
        );
        messages.len() == 200
    });
}

#[test]
fn idempotent_retries_on_two_nodes_store_once() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let node_a = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    let node_b = TestServer::start_with(&[("DATABASE_URL", &schema.url)]);
    let body = json!({"user_id": "twice", "message": "once"}).to_string();
    let answers: Vec<(u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let addr = if i % 2 == 0 { node_a.addr } else { node_b.addr };
                let body = body.clone();
                scope.spawn(move || {
                    let r = common::TestServerRef(addr).post_raw(
                        "/api/v1/notifications/send",
                        &body,
                        &[("Idempotency-Key", "two-nodes")],
                    );
                    (r.status, r.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|(s, _)| *s == 201), "{answers:?}");
    assert!(
        answers.windows(2).all(|w| w[0].1 == w[1].1),
        "one answer for every retry"
    );
    let page: Value = node_a.get("/api/v1/notifications/user/twice").json();
    assert_eq!(page["total"], 1);
}
