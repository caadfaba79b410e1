//! The live unread count: `{"event":"unread","count":N}` right after `connected` and after every change
//! of the user's unread count (send, read, read-all, delete), coalesced so a burst is a few frames
//! whose last one is exact, across nodes through Redis; and history's `total`/`unread`, which come from
//! the same counters. On SQLite and on PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::{TestServer, TestServerRef, WsClient};
use serde_json::{json, Value};

/// The server on SQLite, then (when PostgreSQL is reachable, always under CI) on a PostgreSQL schema
/// of its own, each with `env` added.
fn on_both_stores(env: &[(&str, &str)], body: impl Fn(&TestServer)) {
    body(&TestServer::start_with(env));
    if let Some(schema) = PgSchema::create() {
        let mut with_pg = env.to_vec();
        with_pg.push(("DATABASE_URL", &schema.url));
        body(&TestServer::start_with(&with_pg));
    }
}

/// The next frame, which must be an `unread` event: its count.
fn next_unread(client: &mut WsClient) -> u64 {
    let v = client.next_any_json();
    assert_eq!(v["event"], "unread", "expected an unread event, got {v}");
    v["count"].as_u64().expect("a count")
}

/// Reads frames (notifications included) until an `unread` event with `count` arrives; returns every
/// count seen on the way, in order, the last one being `count` (coalescing may skip values).
fn unread_until(client: &mut WsClient, count: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no unread {count}; saw {seen:?}");
        let v = client.next_any_json();
        if v["event"] == "unread" {
            let n = v["count"].as_u64().expect("a count");
            seen.push(n);
            if n == count {
                return seen;
            }
        }
    }
}

fn put(server: &TestServer, path: &str) -> Value {
    let r = server.request("PUT", path, None);
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

fn history(server: &TestServer, user: &str) -> Value {
    let r = server.get(&format!("/api/v1/notifications/user/{user}?limit=500"));
    assert_eq!(r.status, 200);
    r.json()
}

#[test]
fn the_unread_event_follows_connect_send_read_read_all_and_delete() {
    on_both_stores(&[], |server| {
        let first = server.send(json!({"user_id": "ann", "message": "before"}));
        server.send(json!({"user_id": "ann", "message": "before, too"}));
        server.send(json!({"user_id": "bob", "message": "someone else's"}));
        server.send(json!({"channels": ["news"], "message": "no inbox"}));

        let mut ann = server.ws("user_id=ann");
        assert_eq!(next_unread(&mut ann), 2, "right after connected");
        let mut stranger = server.ws("user_id=zed");
        assert_eq!(next_unread(&mut stranger), 0, "a user never written to");

        let third = server.send(json!({"user_id": "ann", "message": "live"}));
        assert_eq!(ann.expect_notification()["id"], third.as_str());
        assert_eq!(next_unread(&mut ann), 3, "a new notification");

        put(server, &format!("/api/v1/notifications/ann/{first}/read"));
        assert_eq!(next_unread(&mut ann), 2, "a read");
        // A second read changes nothing, so it says nothing.
        put(server, &format!("/api/v1/notifications/ann/{first}/read"));
        ann.send_json(json!({"action": "read", "id": third}));
        assert_eq!(next_unread(&mut ann), 1, "a read from the WebSocket");

        assert_eq!(
            put(server, "/api/v1/notifications/ann/read-all")["updated"],
            1
        );
        assert_eq!(next_unread(&mut ann), 0, "read-all");

        let fourth = server.send(json!({"user_id": "ann", "message": "to delete"}));
        ann.expect_notification();
        assert_eq!(next_unread(&mut ann), 1);
        let r = server.request(
            "DELETE",
            &format!("/api/v1/notifications/ann/{fourth}"),
            None,
        );
        assert_eq!(r.status, 204);
        assert_eq!(next_unread(&mut ann), 0, "a delete");

        // Deleting a read one changes the total, not the unread count: no event.
        let r = server.request(
            "DELETE",
            &format!("/api/v1/notifications/ann/{first}"),
            None,
        );
        assert_eq!(r.status, 204);
        ann.expect_silence(Duration::from_millis(300));
        stranger.expect_silence(Duration::from_millis(10));
        assert!(
            stranger.unread_seen.is_empty(),
            "{:?}",
            stranger.unread_seen
        );

        let page = history(server, "ann");
        assert_eq!(
            (page["total"].as_u64(), page["unread"].as_u64()),
            (Some(2), Some(0))
        );
        let page = history(server, "bob");
        assert_eq!(
            (page["total"].as_u64(), page["unread"].as_u64()),
            (Some(1), Some(1))
        );
        // A reconnect starts from the stored count.
        let mut again = server.ws("user_id=ann");
        assert_eq!(next_unread(&mut again), 0);
    });
}

#[test]
fn history_counts_stay_exact_through_mixed_operations() {
    on_both_stores(&[], |server| {
        let mut ids = Vec::new();
        for i in 0..30 {
            ids.push(server.send(json!({"user_id": "kim", "message": format!("m{i}")})));
        }
        let r = server.post(
            "/api/v1/notifications/batch",
            &json!({"notifications": (0..20)
                .map(|i| json!({"user_id": "kim", "message": format!("b{i}"), "channels": ["c"]}))
                .collect::<Vec<_>>()}),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        // Read 10, delete 5 of those read and 5 unread ones.
        for id in &ids[..10] {
            put(server, &format!("/api/v1/notifications/kim/{id}/read"));
        }
        for id in ids[5..15].iter() {
            let r = server.request("DELETE", &format!("/api/v1/notifications/kim/{id}"), None);
            assert_eq!(r.status, 204);
        }
        // Scheduled ones count once they fire, not before.
        let r = server.post(
            "/api/v1/notifications/schedule",
            &json!({"user_id": "kim", "message": "later", "scheduled_at": "2020-01-01T00:00:00Z"}),
        );
        assert_eq!(r.status, 201);
        let expected = |page: &Value| {
            let all = page["notifications"].as_array().unwrap();
            let unread = all.iter().filter(|n| n["read_at"].is_null()).count() as u64;
            (all.len() as u64, unread)
        };
        common::wait_until("the schedule fired", Duration::from_secs(10), || {
            history(server, "kim")["total"] == 41
        });
        let page = history(server, "kim");
        assert_eq!(expected(&page), (41, 36));
        assert_eq!(
            (
                page["total"].as_u64().unwrap(),
                page["unread"].as_u64().unwrap()
            ),
            expected(&page)
        );
        assert_eq!(
            put(server, "/api/v1/notifications/kim/read-all")["updated"],
            36
        );
        let page = history(server, "kim");
        assert_eq!(
            (page["total"].as_u64(), page["unread"].as_u64()),
            (Some(41), Some(0))
        );
        // An unread-only page does not change the counts.
        let r = server.get("/api/v1/notifications/user/kim?unread=true");
        assert_eq!(r.json()["notifications"].as_array().unwrap().len(), 0);
        assert_eq!(
            (r.json()["total"].as_u64(), r.json()["unread"].as_u64()),
            (Some(41), Some(0))
        );
    });
}

#[test]
fn a_burst_of_1000_sends_is_a_few_unread_frames_whose_last_is_exact() {
    on_both_stores(&[("UNREAD_COALESCE_MS", "200")], |server| {
        let mut client = server.ws("user_id=burst");
        assert_eq!(next_unread(&mut client), 0);
        let server_ref = Arc::new(TestServerRef(server.addr));
        let producers: Vec<_> = (0..8)
            .map(|p| {
                let server_ref = server_ref.clone();
                std::thread::spawn(move || {
                    for i in 0..125 {
                        server_ref.send(json!({"user_id": "burst", "message": format!("{p}-{i}")}));
                    }
                })
            })
            .collect();
        let mut notifications = 0;
        let mut counts = Vec::new();
        while counts.last() != Some(&1000) {
            let v = client.next_any_json();
            if v["event"] == "unread" {
                counts.push(v["count"].as_u64().unwrap());
            } else {
                assert!(v["id"].is_string(), "{v}");
                notifications += 1;
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        client.expect_silence(Duration::from_millis(500));
        assert_eq!(notifications, 1000, "every notification, once");
        assert!(
            counts.len() <= 100,
            "{} unread frames for 1,000 sends: {counts:?}",
            counts.len()
        );
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "counts only grow: {counts:?}"
        );
        assert!(
            client.unread_seen.is_empty(),
            "nothing after the exact last count"
        );
    });
}

#[test]
fn a_read_on_one_node_updates_the_count_on_another() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let node = || cluster_node(&schema, &redis);
    let a = node();
    let b = node();
    let mut on_a = a.ws("user_id=dee");
    let mut on_b = b.ws("user_id=dee");
    assert_eq!(next_unread(&mut on_a), 0);
    assert_eq!(next_unread(&mut on_b), 0);
    redis.wait_numsub("u:dee", 2);

    let first = a.send(json!({"user_id": "dee", "message": "one"}));
    let second = b.send(json!({"user_id": "dee", "message": "two"}));
    for client in [&mut on_a, &mut on_b] {
        let seen = unread_until(client, 2);
        assert!(seen.iter().all(|&n| n <= 2), "{seen:?}");
    }
    // A read on node A reaches the phone on node B, and the other way round.
    put(&a, &format!("/api/v1/notifications/dee/{first}/read"));
    assert_eq!(unread_until(&mut on_b, 1), vec![1]);
    assert_eq!(unread_until(&mut on_a, 1), vec![1]);
    on_b.send_json(json!({"action": "read", "id": second}));
    assert_eq!(unread_until(&mut on_a, 0), vec![0]);
    assert_eq!(unread_until(&mut on_b, 0), vec![0]);
    // A newcomer on either node starts from the shared count.
    a.send(json!({"user_id": "dee", "message": "three"}));
    assert_eq!(unread_until(&mut on_b, 1), vec![1]);
    assert_eq!(unread_until(&mut on_a, 1), vec![1]);
    let mut late = b.ws("user_id=dee");
    assert_eq!(next_unread(&mut late), 1);
    for client in [&mut on_a, &mut on_b] {
        client.expect_silence(Duration::from_millis(300));
        assert!(
            client.unread_seen.is_empty(),
            "one count per change, none repeated"
        );
    }
}
