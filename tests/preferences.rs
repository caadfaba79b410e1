//! Per-user preferences (API.md, "Preferences") through the public interface, on SQLite and
//! PostgreSQL: the GET/PUT round trip and its validation, muted types and channels (stored, counted,
//! not pushed), quiet hours (not pushed, then pushed when they end, after a restart too), `urgent`,
//! and two nodes on Redis honouring what was set through either.

mod common;

use std::time::Duration;

use common::pg::PgSchema;
use common::redis::{cluster_node, TestRedis};
use common::{HttpResponse, TestServer, WsClient};
use serde_json::{json, Value};

fn put(server: &TestServer, user: &str, body: &Value) -> HttpResponse {
    server.request(
        "PUT",
        &format!("/api/v1/users/{user}/preferences"),
        Some(&body.to_string()),
    )
}

fn put_ok(server: &TestServer, user: &str, body: Value) -> Value {
    let r = put(server, user, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Sends a marker to `user` and expects it as the client's next frame: whatever was sent before it
/// and not pushed was indeed not pushed (deliveries to one connection keep commit order).
fn expect_marker_next(server: &TestServer, user: &str, client: &mut WsClient) {
    let id = server.send(json!({"user_id": user, "message": "marker"}));
    let n = client.expect_notification();
    assert_eq!(n["id"], id.as_str(), "expected the marker, got {n}");
}

/// Local wall-clock time `offset_s` seconds from now in Asia/Kolkata (UTC+05:30, no DST), as
/// `HH:MM:SS`.
fn kolkata_in(offset_s: i64) -> String {
    let t = chrono::Utc::now()
        + chrono::Duration::seconds(offset_s)
        + chrono::Duration::minutes(5 * 60 + 30);
    t.format("%H:%M:%S").to_string()
}

fn round_trip_and_validation(env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("PREFERENCES_MAX_MUTED_TYPES", "2"));
    let server = TestServer::start_with(&env);

    let none = server.get("/api/v1/users/ana/preferences");
    assert_eq!(none.status, 200);
    assert_eq!(
        none.json(),
        json!({"user_id": "ana", "muted_types": [], "muted_channels": [], "quiet_hours": null, "updated_at": null})
    );

    let set = put_ok(
        &server,
        "ana",
        json!({"muted_types": ["promo", "promo", "digest"], "muted_channels": ["news"],
               "quiet_hours": {"start": "22:00", "end": "07:30", "time_zone": "Europe/Madrid"}}),
    );
    assert_eq!(set["muted_types"], json!(["promo", "digest"]), "kept once");
    assert!(set["updated_at"].is_string());
    let got = server.get("/api/v1/users/ana/preferences").json();
    assert_eq!(got, set);
    assert_eq!(
        got["quiet_hours"],
        json!({"start": "22:00", "end": "07:30", "time_zone": "Europe/Madrid"})
    );

    let refused = |body: Value, needle: &str| {
        let r = put(&server, "ana", &body);
        r.assert_error(
            needle,
            400,
            if needle == "unknown field" {
                "invalid_json"
            } else {
                "invalid_field"
            },
        );
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(needle),
            "{message:?} should name {needle:?}"
        );
    };
    refused(
        json!({"muted_types": ["a", "b", "c"]}),
        "PREFERENCES_MAX_MUTED_TYPES",
    );
    refused(
        json!({"muted_channels": ["no spaces"]}),
        "muted_channels[0]",
    );
    refused(
        json!({"quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Mars/Olympus"}}),
        "quiet_hours.time_zone",
    );
    refused(
        json!({"quiet_hours": {"start": "24:00", "end": "07:00", "time_zone": "UTC"}}),
        "quiet_hours.start",
    );
    refused(
        json!({"quiet_hours": {"start": "07:00", "end": "07:00", "time_zone": "UTC"}}),
        "quiet_hours.end",
    );
    refused(
        json!({"quiet_hours": {"start": "22:00", "end": "07:00"}}),
        "quiet_hours.time_zone",
    );
    refused(json!({"mute_types": ["promo"]}), "unknown field");
    let not_json = server.request("PUT", "/api/v1/users/ana/preferences", Some("[1]"));
    not_json.assert_error("array body", 400, "invalid_json");
    // Refusals changed nothing.
    assert_eq!(server.get("/api/v1/users/ana/preferences").json(), set);

    // All defaults: back to none.
    let cleared = put_ok(&server, "ana", json!({}));
    assert_eq!(cleared["updated_at"], Value::Null);
    assert_eq!(
        server.get("/api/v1/users/ana/preferences").json(),
        none.json()
    );
}

#[test]
fn preferences_round_trip_and_are_validated_on_sqlite() {
    round_trip_and_validation(&[]);
}

#[test]
fn preferences_round_trip_and_are_validated_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    round_trip_and_validation(&[("DATABASE_URL", &schema.url)]);
}

fn muted_types_and_channels(env: &[(&str, &str)]) {
    let server = TestServer::start_with(env);
    let mut ana = server.ws("user_id=ana&channels=news,sport");
    ana.expect_event("subscribed");
    put_ok(
        &server,
        "ana",
        json!({"muted_types": ["promo"], "muted_channels": ["news"]}),
    );

    // A muted type: stored and counted, not pushed, whichever way it reaches her.
    let promo = server.send(json!({"user_id": "ana", "type": "promo", "message": "50% off"}));
    server.send(json!({"channels": ["sport"], "type": "promo", "message": "tickets"}));
    server.send(json!({"broadcast": true, "type": "promo", "message": "everyone"}));
    // A muted channel: its notifications are not pushed to her, unless addressed to her.
    server.send(json!({"channels": ["news"], "message": "headline"}));
    expect_marker_next(&server, "ana", &mut ana);
    let addressed =
        server.send(json!({"user_id": "ana", "channels": ["news"], "message": "for you"}));
    assert_eq!(ana.expect_notification()["id"], addressed.as_str());
    server.send(json!({"channels": ["sport"], "message": "goal"}));
    assert_eq!(ana.expect_notification()["message"], "goal");

    let history = server.get("/api/v1/notifications/user/ana").json();
    let ids: Vec<&str> = history["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&promo.as_str()), "the muted one is in history");
    assert_eq!(history["unread"], 3, "and counted: promo, marker, for you");

    // Another user of the same channels is not affected.
    let mut bea = server.ws("user_id=bea&channels=news");
    bea.expect_event("subscribed");
    server.send(json!({"channels": ["news"], "type": "promo", "message": "for bea"}));
    assert_eq!(bea.expect_notification()["message"], "for bea");

    // Unmuted: pushed again, to connections that were already open.
    put_ok(&server, "ana", json!({}));
    server.send(json!({"user_id": "ana", "type": "promo", "message": "now welcome"}));
    assert_eq!(ana.expect_notification()["message"], "now welcome");
}

#[test]
fn a_muted_type_or_channel_is_stored_but_not_pushed_on_sqlite() {
    muted_types_and_channels(&[]);
}

#[test]
fn a_muted_type_or_channel_is_stored_but_not_pushed_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    muted_types_and_channels(&[("DATABASE_URL", &schema.url)]);
}

fn quiet_hours(env: &[(&str, &str)]) {
    let server = TestServer::start_with(env);
    let mut ana = server.ws("user_id=ana");
    // Quiet hours that began a minute ago and end in 3 seconds, in her zone.
    put_ok(
        &server,
        "ana",
        json!({"quiet_hours": {"start": kolkata_in(-60), "end": kolkata_in(3), "time_zone": "Asia/Kolkata"}}),
    );
    let held = server.send(json!({"user_id": "ana", "message": "while asleep"}));
    let urgent = server.send(json!({"user_id": "ana", "message": "fire alarm", "urgent": true}));
    let n = ana.expect_notification();
    assert_eq!(
        n["id"],
        urgent.as_str(),
        "urgent is pushed at once, the held one is not: {n}"
    );
    assert_eq!(n["urgent"], true);
    // In history and unread at once.
    let history = server.get("/api/v1/notifications/user/ana").json();
    assert_eq!(history["total"], 2);
    assert_eq!(history["unread"], 2);
    // Pushed when the quiet hours end (within the scheduler's tick after it).
    let n = ana.expect_notification();
    assert_eq!(n["id"], held.as_str());
    assert_eq!(n["message"], "while asleep");
    // Once: the next frame is the marker.
    expect_marker_next(&server, "ana", &mut ana);
    let bad = server.post(
        "/api/v1/notifications/send",
        &json!({"user_id": "ana", "message": "x", "urgent": "yes"}),
    );
    bad.assert_error("urgent as a string", 400, "invalid_json");
}

#[test]
fn quiet_hours_hold_a_notification_until_they_end_and_urgent_is_pushed_on_sqlite() {
    quiet_hours(&[]);
}

#[test]
fn quiet_hours_hold_a_notification_until_they_end_and_urgent_is_pushed_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    quiet_hours(&[("DATABASE_URL", &schema.url)]);
}

/// `urgent` is stored: history, WebSocket `since`, SSE `Last-Event-ID` and the long-poll show it as
/// the live object did (absent when false), and a scheduled urgent notification is shown by `GET`
/// and pushed at once when it fires in quiet hours.
fn urgent_stored_and_scheduled(env: &[(&str, &str)]) {
    let server = TestServer::start_with(env);
    let mut ana = server.ws("user_id=ana");
    // Quiet hours from a minute ago to an hour ahead: nothing plain is pushed during the test.
    put_ok(
        &server,
        "ana",
        json!({"quiet_hours": {"start": kolkata_in(-60), "end": kolkata_in(3600), "time_zone": "Asia/Kolkata"}}),
    );
    let held = server.send(json!({"user_id": "ana", "message": "while asleep"}));
    let urgent = server.send(json!({"user_id": "ana", "message": "fire alarm", "urgent": true}));
    let live = ana.expect_notification();
    assert_eq!(live["id"], urgent.as_str());
    assert_eq!(live["urgent"], true);

    // Scheduled: accepted, shown pending, pushed at once when it fires in quiet hours.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(800))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let r = server.post(
        "/api/v1/notifications/schedule",
        &json!({"user_id": "ana", "message": "flood", "urgent": true, "scheduled_at": at}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let schedule_id = r.json()["id"].as_str().unwrap().to_owned();
    let pending = server.get(&format!("/api/v1/notifications/scheduled/{schedule_id}"));
    assert_eq!(pending.status, 200);
    assert_eq!(pending.json()["urgent"], true, "{}", pending.json());
    let fired = ana.expect_notification();
    assert_eq!(fired["schedule_id"], schedule_id.as_str(), "{fired}");
    assert_eq!(fired["urgent"], true);
    let fired_id = fired["id"].as_str().unwrap().to_owned();

    // History: the key only on the urgent ones.
    let history = server.get("/api/v1/notifications/user/ana").json();
    let by_id = |list: &Value, id: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {list}"))
            .clone()
    };
    let notifications = &history["notifications"];
    assert_eq!(by_id(notifications, &urgent)["urgent"], true);
    assert_eq!(by_id(notifications, &fired_id)["urgent"], true);
    assert!(by_id(notifications, &held).get("urgent").is_none());

    // Replay: WebSocket `since`, SSE `Last-Event-ID`, long-poll.
    let nil = uuid::Uuid::nil().to_string();
    let mut replay = server.ws(&format!("user_id=ana&since={nil}"));
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        let v = replay.next_json();
        if v.get("event").is_none() {
            replayed.push(v);
        }
    }
    let replayed = Value::Array(replayed);
    assert_eq!(by_id(&replayed, &urgent)["urgent"], true, "{replayed}");
    assert_eq!(by_id(&replayed, &fired_id)["urgent"], true);
    assert!(by_id(&replayed, &held).get("urgent").is_none());

    let mut stream = common::sse::open(server.addr, "user_id=ana", &[("Last-Event-ID", &nil)])
        .unwrap_or_else(|r| panic!("refused: {}", r.status));
    let mut streamed = Vec::new();
    while streamed.len() < 3 {
        let e = stream.next_event();
        if e.name == "notification" {
            streamed.push(e.json());
        }
    }
    let streamed = Value::Array(streamed);
    assert_eq!(by_id(&streamed, &urgent)["urgent"], true, "{streamed}");
    assert!(by_id(&streamed, &held).get("urgent").is_none());

    let polled = common::sse::poll(server.addr, &format!("user_id=ana&since={nil}"), &[]).json();
    let polled = &polled["notifications"];
    assert_eq!(by_id(polled, &fired_id)["urgent"], true, "{polled}");
    assert!(by_id(polled, &held).get("urgent").is_none());
}

#[test]
fn urgent_is_stored_replayed_and_schedulable_on_sqlite() {
    urgent_stored_and_scheduled(&[]);
}

#[test]
fn urgent_is_stored_replayed_and_schedulable_on_postgres() {
    let Some(schema) = PgSchema::create() else {
        return;
    };
    urgent_stored_and_scheduled(&[("DATABASE_URL", &schema.url)]);
}

#[test]
fn a_held_notification_is_pushed_after_a_restart() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut server = TestServer::start_in(dir.clone(), &[]);
    // Long enough for a restart and a connection before the quiet hours end.
    put_ok(
        &server,
        "ana",
        json!({"quiet_hours": {"start": kolkata_in(-60), "end": kolkata_in(6), "time_zone": "Asia/Kolkata"}}),
    );
    let held = server.send(json!({"user_id": "ana", "message": "kept for later"}));
    server.terminate();
    let server = TestServer::start_in(dir, &[]);
    let mut ana = server.ws("user_id=ana");
    let n = ana.expect_notification();
    assert_eq!(n["id"], held.as_str());
    // The preferences were read back at start-up too.
    assert_eq!(
        server.get("/api/v1/users/ana/preferences").json()["quiet_hours"]["time_zone"],
        "Asia/Kolkata"
    );
}

#[test]
fn two_nodes_honour_preferences_set_through_either_and_release_once() {
    let (Some(schema), Some(redis)) = (PgSchema::create(), TestRedis::shared()) else {
        return;
    };
    let node = || cluster_node(&schema, &redis);
    let a = node();
    let b = node();
    redis.wait_numsub("b", 2);
    let mut phone = a.ws("user_id=ana");
    let mut laptop = b.ws("user_id=ana");
    redis.wait_numsub("u:ana", 2);

    // Set through A, honoured by B's connection, for sends through either node.
    put_ok(&a, "ana", json!({"muted_types": ["promo"]}));
    assert_eq!(
        b.get("/api/v1/users/ana/preferences").json()["muted_types"],
        json!(["promo"])
    );
    let mut honoured = false;
    for _ in 0..50 {
        // The change reaches B through Redis: probe until B's shards hold it. A's did at once.
        b.send(json!({"user_id": "ana", "type": "promo", "message": "probe"}));
        let id = b.send(json!({"user_id": "ana", "message": "marker"}));
        assert_eq!(phone.expect_notification()["id"], id.as_str());
        if laptop.expect_notification()["id"] == id.as_str() {
            honoured = true;
            break;
        }
        assert_eq!(laptop.expect_notification()["id"], id.as_str());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        honoured,
        "node B never honoured the preferences set through A"
    );
    a.send(json!({"user_id": "ana", "type": "promo", "message": "via A"}));
    let id = a.send(json!({"user_id": "ana", "message": "marker"}));
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.expect_notification()["id"], id.as_str());
    }

    // Quiet hours set through B; a send through A is held on both nodes, then pushed once to each.
    put_ok(
        &b,
        "ana",
        json!({"quiet_hours": {"start": kolkata_in(-60), "end": kolkata_in(4), "time_zone": "Asia/Kolkata"}}),
    );
    // A's store thread decides the hold when it commits: give the change a moment to reach A.
    std::thread::sleep(Duration::from_millis(1000));
    let held = a.send(json!({"user_id": "ana", "message": "while asleep"}));
    for device in [&mut phone, &mut laptop] {
        let n = device.expect_notification();
        assert_eq!(n["id"], held.as_str(), "{n}");
    }
    for device in [&mut phone, &mut laptop] {
        device.expect_silence(Duration::from_millis(500));
    }
}
