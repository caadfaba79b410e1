//! The monitor and demo page at `/`: served without an API key while the API wants one, and driven
//! in headless Chromium (`clients/js/test-browser/monitor.test.mjs`, with puppeteer-core): it asks
//! for the metrics token and the API key the server wants, shows live counts, connects an inbox over
//! the SDK, shows a notification sent over REST with the unread badge, marks it read, pages the
//! history, sends from its form, and saves a screenshot (`MONITOR_SCREENSHOT`, else in cargo's
//! temporary folder; the README's `docs/images/monitor.png` is made with
//! `MONITOR_SCREENSHOT=$PWD/docs/images/monitor.png cargo test --test monitor_page`).
//!
//! The browser test needs Node.js and Chromium; without them it fails under `CI=true` and is skipped
//! with a note elsewhere. The HTTP checks run everywhere.

mod common;

use common::node::{chromium, prepared_node, run_node_tests};
use common::TestServer;

const API_KEY: &str = "monitor-test-key";

#[test]
fn the_page_and_its_assets_are_served_without_a_key_while_the_api_wants_one() {
    let server = TestServer::start_with(&[("API_KEY", API_KEY), ("METRICS_TOKEN", "m")]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<title>notification-service monitor</title>"));
    assert!(page
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-security-policy")
            && v.contains("default-src 'self'")));
    for (path, kind) in [
        ("/assets/monitor.js", "text/javascript; charset=utf-8"),
        ("/assets/monitor.css", "text/css; charset=utf-8"),
        ("/assets/notifications.js", "text/javascript; charset=utf-8"),
    ] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(kind), "{path}");
        assert!(!r.body.is_empty(), "{path}");
    }
    // The SDK served is the SDK of clients/js, byte for byte.
    let sdk = std::fs::read(common::node::js_dir().join("index.js")).unwrap();
    assert_eq!(server.get("/assets/notifications.js").body, sdk);
    let head = server.request("HEAD", "/", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    server
        .get("/assets/nope.js")
        .assert_error("unknown asset", 404, "not_found");
    server
        .request("POST", "/", Some("{}"))
        .assert_error("POST /", 405, "method_not_allowed");
    // Only the page is open: the API, other paths and /metrics still want their credentials.
    server
        .get("/api/v1/notifications/user/u1")
        .assert_error("history", 401, "unauthorized");
    server
        .get("/index.html")
        .assert_error("other path", 401, "unauthorized");
    server
        .get("/assets/a/b")
        .assert_error("nested asset path", 401, "unauthorized");
    server
        .get("/metrics")
        .assert_error("metrics", 401, "unauthorized");
}

#[test]
fn the_page_works_in_headless_chromium() {
    let Some(node) = prepared_node() else {
        return;
    };
    let Some(chromium) = chromium() else {
        return;
    };
    let screenshot = std::env::var("MONITOR_SCREENSHOT")
        .unwrap_or_else(|_| format!("{}/monitor.png", env!("CARGO_TARGET_TMPDIR")));
    run_node_tests(
        &node,
        &["test-browser/monitor.test.mjs"],
        &[
            ("CHROMIUM", chromium.to_str().expect("a UTF-8 path")),
            ("MONITOR_SCREENSHOT", &screenshot),
        ],
    );
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {screenshot}"
    );
}
