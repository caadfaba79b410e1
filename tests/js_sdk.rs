//! The JavaScript SDK (`clients/js/`) against the real server: its own tests, `clients/js/test/*.test.mjs`,
//! run by node's test runner with the binary cargo built for this test (`NOTIFICATION_SERVICE_BIN`).
//! They connect by user id and by token (`?token=` and the `bearer` subprotocol), refresh tokens,
//! take 1008 and 1013 as docs/API.md says, follow `resumed.complete:false` pages, and kill and restart
//! the server mid-stream on the same port and database, checking that every acknowledged notification
//! arrives once and in order. Node.js 20.14+ and npm are needed (`npm ci` runs when `node_modules` is
//! missing or older than `package-lock.json`); without them the test fails under `CI=true` and is
//! skipped with a note elsewhere.

mod common;

use common::node::{js_dir, prepared_node, run_node_tests};

#[test]
fn the_javascript_sdk_passes_its_tests_against_the_server() {
    let Some(node) = prepared_node() else {
        return;
    };
    let mut files: Vec<String> = std::fs::read_dir(js_dir().join("test"))
        .expect("clients/js/test")
        .map(|e| e.expect("a directory entry").file_name())
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.ends_with(".test.mjs"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "the SDK's test files are missing: {files:?}"
    );
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    run_node_tests(&node, &files, &[]);
}
