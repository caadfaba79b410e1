//! The user's inbox over REST: history and its pages, unread, read, read-all, delete, batch, aliases.

mod common;

use common::TestServer;
use serde_json::{json, Value};

fn history(server: &TestServer, user: &str, query: &str) -> Value {
    let r = server.get(&format!("/api/v1/notifications/user/{user}?{query}"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[test]
fn history_pages_newest_first_with_counts_and_a_cursor() {
    let server = TestServer::start();
    let batch: Vec<Value> = (0..120)
        .map(|i| json!({"user_id": "u1", "message": format!("n{i}")}))
        .collect();
    let r = server.post(
        "/api/v1/notifications/batch",
        &json!({ "notifications": batch }),
    );
    assert_eq!(r.status, 201);
    let ids = r.json()["ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 120);
    server.send(json!({"user_id": "someone-else", "message": "not mine"}));

    let mut seen = Vec::new();
    let mut query = "limit=50".to_owned();
    loop {
        let page = history(&server, "u1", &query);
        assert_eq!(page["user_id"], "u1");
        assert_eq!(page["total"], 120);
        assert_eq!(page["unread"], 120);
        let list = page["notifications"].as_array().unwrap();
        seen.extend(
            list.iter()
                .map(|n| n["message"].as_str().unwrap().to_owned()),
        );
        match page["next_before"].as_str() {
            Some(cursor) => query = format!("limit=50&before={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..120).rev().map(|i| format!("n{i}")).collect();
    assert_eq!(seen, expected, "every notification once, newest first");
}

#[test]
fn read_unread_read_all_and_delete() {
    let server = TestServer::start();
    let a = server.send(json!({"user_id": "u2", "message": "a"}));
    let b = server.send(json!({"user_id": "u2", "message": "b"}));
    let c = server.send(json!({"user_id": "u2", "message": "c"}));

    let r = server.request("PUT", &format!("/api/v1/notifications/u2/{a}/read"), None);
    assert_eq!(r.status, 200);
    let n = r.json();
    assert_eq!(n["read"], true);
    let read_at = n["read_at"].as_str().unwrap().to_owned();
    // Twice is harmless and keeps the first read time.
    let again = server
        .request("PUT", &format!("/api/v1/notifications/u2/{a}/read"), None)
        .json();
    assert_eq!(again["read_at"], read_at.as_str());
    // Another user's id is unknown for this user.
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/api/v1/notifications/intruder/{a}/read"),
                None
            )
            .status,
        404
    );

    let unread = history(&server, "u2", "unread=true");
    let ids: Vec<&str> = unread["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![c.as_str(), b.as_str()]);
    assert_eq!(unread["unread"], 2);
    assert_eq!(unread["total"], 3);

    let r = server.request("PUT", "/api/v1/notifications/u2/read-all", None);
    assert_eq!(r.json(), json!({"updated": 2}));
    assert_eq!(history(&server, "u2", "")["unread"], 0);

    let r = server.request("DELETE", &format!("/api/v1/notifications/u2/{b}"), None);
    assert_eq!(r.status, 204);
    assert_eq!(
        server
            .request("DELETE", &format!("/api/v1/notifications/u2/{b}"), None)
            .status,
        404
    );
    let page = history(&server, "u2", "");
    assert_eq!(page["total"], 2);
    assert!(page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["id"] != b.as_str()));
}

#[test]
fn the_seed_aliases_work_for_existing_callers() {
    let server = TestServer::start();
    let r = server.post(
        "/notifications",
        &json!({"user_id": "123", "message": "Notificação de teste"}),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let list = server
        .get("/notifications?user_id=123&unread=true&limit=10")
        .json();
    assert_eq!(list["notifications"][0]["id"], id.as_str());
    assert_eq!(list["notifications"][0]["message"], "Notificação de teste");
    assert_eq!(list["notifications"][0]["type"], "info");
}

#[test]
fn send_answers_with_the_id_and_a_millisecond_utc_timestamp() {
    let server = TestServer::start();
    let r = server.post(
        "/api/v1/notifications/send",
        &json!({"user_id": "u", "message": "m"}),
    );
    assert_eq!(r.status, 201);
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    let ts = v["timestamp"].as_str().unwrap();
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
}

#[test]
fn a_batch_is_all_or_nothing() {
    let server = TestServer::start();
    let r = server.post(
        "/api/v1/notifications/batch",
        &json!({"notifications": [{"user_id": "u3", "message": "ok"}, {"user_id": "u3"}]}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("notifications[1].message"));
    assert_eq!(history(&server, "u3", "")["total"], 0);
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"user_id": "u3", "message": "x"}))
        .collect();
    let r = server.post(
        "/api/v1/notifications/batch",
        &json!({ "notifications": too_many }),
    );
    assert_eq!(r.status, 400);
    assert_eq!(history(&server, "u3", "")["total"], 0);
}

#[test]
fn health_and_metrics_answer() {
    let server = TestServer::start();
    let h = server.get("/health");
    assert_eq!(h.status, 200);
    let v = h.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["store"], "ok");
    assert_eq!(v["redis"], "disabled");
    server.send(json!({"user_id": "u", "message": "m"}));
    let m = server.get("/metrics");
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.contains("notif_notifications_stored_total 1"),
        "{text}"
    );
}
