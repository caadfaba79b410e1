//! Scheduled notifications: they fire on time, land in history with their `scheduled_at` and
//! `schedule_id`, are delivered live, can be read and cancelled while pending, can be traced from the
//! schedule's id once fired (on SQLite and PostgreSQL), and survive a restart.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{json, Value};

fn rfc3339_in(ms: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(ms);
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn schedule(server: &TestServer, body: Value) -> Value {
    let r = server.post("/api/v1/notifications/schedule", &body);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[test]
fn a_scheduled_notification_fires_within_a_second_of_its_time_and_lands_in_history() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=ana");
    let at = rfc3339_in(1500);
    let created = schedule(
        &server,
        json!({"user_id": "ana", "title": "Recordatorio", "message": "vence hoy", "type": "recordatorio", "scheduled_at": at}),
    );
    assert_eq!(created["user_id"], "ana");
    assert_eq!(created["scheduled_at"], at.as_str());
    assert!(created["created_at"].is_string());
    let id = created["id"].as_str().unwrap();

    // Pending: readable by its id, not in history, not delivered.
    let pending = server.get(&format!("/api/v1/notifications/scheduled/{id}"));
    assert_eq!(pending.status, 200);
    assert_eq!(pending.json()["scheduled_at"], at.as_str());
    assert_eq!(pending.json()["message"], "vence hoy");
    assert_eq!(
        server.get("/api/v1/notifications/user/ana").json()["total"],
        0
    );
    client.expect_silence(Duration::from_millis(800));

    let n = client.expect_notification();
    let fired_at = Instant::now();
    assert_eq!(n["message"], "vence hoy");
    assert_eq!(n["type"], "recordatorio");
    assert_eq!(n["scheduled_at"], at.as_str());
    let due = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    let stamped = chrono::DateTime::parse_from_rfc3339(n["timestamp"].as_str().unwrap()).unwrap();
    let late = stamped.signed_duration_since(due).num_milliseconds();
    assert!((0..1000).contains(&late), "fired {late} ms after its time");
    let _ = fired_at;

    let history = server.get("/api/v1/notifications/user/ana").json();
    assert_eq!(history["total"], 1);
    assert_eq!(history["notifications"][0]["id"], n["id"]);
    assert_eq!(history["notifications"][0]["scheduled_at"], at.as_str());
    assert_eq!(n["schedule_id"], id);
    // Fired: no longer pending, and it says where it went.
    let fired = server.get(&format!("/api/v1/notifications/scheduled/{id}"));
    assert_eq!(fired.status, 200);
    assert_eq!(fired.json()["state"], "fired");
    assert_eq!(fired.json()["notification_id"], n["id"]);
    assert_eq!(
        server
            .request(
                "DELETE",
                &format!("/api/v1/notifications/scheduled/{id}"),
                None
            )
            .status,
        404
    );
}

#[test]
fn a_time_in_the_past_fires_at_once_and_offsets_are_understood() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=42");
    // PHP's toAtomString() writes +00:00; any offset is accepted.
    let created = schedule(
        &server,
        json!({"user_id": 42, "message": "late", "scheduled_at": "2020-01-29T12:00:00-05:00"}),
    );
    assert_eq!(created["scheduled_at"], "2020-01-29T17:00:00.000Z");
    let n = client.expect_notification();
    assert_eq!(n["message"], "late");
    assert_eq!(n["scheduled_at"], "2020-01-29T17:00:00.000Z");
}

#[test]
fn a_cancelled_schedule_never_fires() {
    let server = TestServer::start();
    let mut client = server.ws("user_id=bo");
    let created = schedule(
        &server,
        json!({"user_id": "bo", "message": "never", "scheduled_at": rfc3339_in(700)}),
    );
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        server
            .request(
                "DELETE",
                &format!("/api/v1/notifications/scheduled/{id}"),
                None
            )
            .status,
        204
    );
    assert_eq!(
        server
            .get(&format!("/api/v1/notifications/scheduled/{id}"))
            .status,
        404
    );
    client.expect_silence(Duration::from_millis(1500));
    assert_eq!(
        server.get("/api/v1/notifications/user/bo").json()["total"],
        0
    );
}

#[test]
fn bad_schedules_are_refused_with_the_field_named() {
    let server = TestServer::start();
    for (body, needle) in [
        (json!({"user_id": "u", "message": "m"}), "scheduled_at"),
        (
            json!({"user_id": "u", "message": "m", "scheduled_at": "next tuesday"}),
            "scheduled_at",
        ),
        (
            json!({"user_id": "u", "message": "m", "scheduled_at": rfc3339_in(400 * 24 * 3600 * 1000)}),
            "scheduled_at",
        ),
        (
            json!({"user_id": "u", "scheduled_at": rfc3339_in(1000)}),
            "message",
        ),
        (
            json!({"message": "m", "scheduled_at": rfc3339_in(1000)}),
            "target",
        ),
    ] {
        let r = server.post("/api/v1/notifications/schedule", &body);
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle)
                || r.error_code() == "no_target",
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(
        server
            .get("/api/v1/notifications/scheduled/not-a-uuid")
            .status,
        400
    );
    assert_eq!(
        server
            .get(&format!(
                "/api/v1/notifications/scheduled/{}",
                uuid::Uuid::now_v7()
            ))
            .status,
        404
    );
}

#[test]
fn pending_schedules_survive_a_restart_and_due_ones_fire_right_after_start() {
    let mut server = TestServer::start();
    let soon = schedule(
        &server,
        json!({"user_id": "rex", "message": "due while down", "scheduled_at": rfc3339_in(1000)}),
    );
    let later = schedule(
        &server,
        json!({"user_id": "rex", "message": "due after restart", "scheduled_at": rfc3339_in(3500)}),
    );
    assert!(server.terminate().success());
    std::thread::sleep(Duration::from_millis(1500)); // `soon` falls due while the server is down

    let server = TestServer::start_in(server.dir.clone(), &[]);
    common::wait_until(
        "the due notification to fire after start-up",
        Duration::from_secs(3),
        || server.get("/api/v1/notifications/user/rex").json()["total"] == 1,
    );
    let pending = server.get(&format!(
        "/api/v1/notifications/scheduled/{}",
        later["id"].as_str().unwrap()
    ));
    assert_eq!(pending.status, 200, "still pending after the restart");
    let fired = server.get(&format!(
        "/api/v1/notifications/scheduled/{}",
        soon["id"].as_str().unwrap()
    ));
    assert_eq!(fired.status, 200);
    assert_eq!(fired.json()["state"], "fired");
    let mut client = server.ws("user_id=rex");
    assert_eq!(client.expect_notification()["message"], "due after restart");
}

#[test]
fn a_fired_schedule_is_traced_to_its_schedule_on_sqlite() {
    fired_schedule_is_traced(&[]);
}

#[test]
fn a_fired_schedule_is_traced_to_its_schedule_on_postgres() {
    let Some(schema) = common::pg::PgSchema::create() else {
        return;
    };
    fired_schedule_is_traced(&[("DATABASE_URL", &schema.url)]);
}

/// A fired schedule carries `schedule_id` live and in history, `GET /scheduled/:id` answers where it
/// went, and the pending, cancelled, unknown and plain-send cases keep their answers.
fn fired_schedule_is_traced(env: &[(&str, &str)]) {
    let server = TestServer::start_with(env);
    let mut client = server.ws("user_id=tracy&channels=news");
    client.expect_event("subscribed");

    // A plain send: no schedule_id key at all, live or in history.
    let plain = server.send(json!({"user_id": "tracy", "message": "plain"}));
    let live = client.expect_notification();
    assert_eq!(live["id"], plain.as_str());
    assert!(live.get("schedule_id").is_none(), "{live}");

    let created = schedule(
        &server,
        json!({"user_id": "tracy", "channels": ["news"], "message": "from a schedule", "scheduled_at": "2020-01-29T17:00:00Z"}),
    );
    let schedule_id = created["id"].as_str().unwrap();
    let fired = client.expect_notification();
    assert_eq!(fired["message"], "from a schedule");
    assert_ne!(fired["id"], schedule_id, "firing gives a new id");
    assert_eq!(fired["schedule_id"], schedule_id);

    let history = server.get("/api/v1/notifications/user/tracy").json();
    let stored = &history["notifications"][0];
    assert_eq!(stored["id"], fired["id"]);
    assert_eq!(stored["schedule_id"], schedule_id);
    assert_eq!(stored["scheduled_at"], "2020-01-29T17:00:00.000Z");
    let plain_stored = &history["notifications"][1];
    assert_eq!(plain_stored["id"], plain.as_str());
    assert!(plain_stored.get("schedule_id").is_none(), "{plain_stored}");

    // A resume replays it from the store with the same field.
    let mut late = server.ws(&format!("user_id=tracy&since={plain}"));

    assert_eq!(late.expect_notification()["schedule_id"], schedule_id);
    late.expect_event("resumed");

    let path = format!("/api/v1/notifications/scheduled/{schedule_id}");
    let traced = server.get(&path);
    assert_eq!(
        traced.status,
        200,
        "{}",
        String::from_utf8_lossy(&traced.body)
    );
    assert_eq!(
        traced.json(),
        json!({
            "id": schedule_id,
            "state": "fired",
            "notification_id": fired["id"],
            "user_id": "tracy",
            "scheduled_at": "2020-01-29T17:00:00.000Z",
            "fired_at": fired["timestamp"],
        })
    );
    // Cancelling a fired one is still 404: there is nothing left to cancel.
    server
        .request("DELETE", &path, None)
        .assert_error("cancel fired", 404, "not_found");

    // Pending: the notification object as before, with its state.
    let pending = schedule(
        &server,
        json!({"user_id": "tracy", "message": "later", "scheduled_at": rfc3339_in(3_600_000)}),
    );
    let pending_path = format!(
        "/api/v1/notifications/scheduled/{}",
        pending["id"].as_str().unwrap()
    );
    let r = server.get(&pending_path);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["id"], pending["id"]);
    assert_eq!(body["state"], "pending");
    assert_eq!(body["message"], "later");
    assert!(body.get("schedule_id").is_none(), "{body}");
    // Cancelled: 404, like an unknown id.
    assert_eq!(server.request("DELETE", &pending_path, None).status, 204);
    server
        .get(&pending_path)
        .assert_error("cancelled", 404, "not_found");
    server
        .get(&format!(
            "/api/v1/notifications/scheduled/{}",
            uuid::Uuid::now_v7()
        ))
        .assert_error("unknown", 404, "not_found");
    // A plain notification's id is not a schedule's.
    server
        .get(&format!("/api/v1/notifications/scheduled/{plain}"))
        .assert_error("plain id", 404, "not_found");
}
