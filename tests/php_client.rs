//! The PHP client and its Laravel package (`clients/php/`) against the real server: their own PHPUnit
//! suite, run by the system's `phpunit` (Debian's 9.6, with `php-cli`, `php-curl` and
//! `php-laravel-framework`, which `.ci/run` installs) with the server's URL and API key in
//! `NOTIFICATION_SERVICE_URL` and `NOTIFICATION_SERVICE_API_KEY`. The suite covers every client method,
//! the API's errors as `ApiException`, idempotency keys, and a Laravel application sending a real
//! notification through the package's channel; its retry and timeout tests use a scripted stub of
//! their own (group `stub`), since the real server cannot be made to answer 503 on cue.
//!
//! It runs on both stores: idempotency, scheduling and the inbox routes are each store's own code.
//! Without php or phpunit the tests fail under `CI=true` and are skipped with a note elsewhere (the
//! suite itself fails under `CI=true` when Laravel is missing).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::pg::PgSchema;
use common::TestServer;

/// The package folder, relative to the crate root.
const PHP_DIR: &str = "clients/php";

/// The key the server is started with, and the suite given.
const API_KEY: &str = "php-suite-key";

/// Lines of PHPUnit's output shown when a run fails (its failure report fits in them).
const OUTPUT_TAIL_LINES: usize = 120;

/// The fewest tests a full run must report, so that a suite that lost its files cannot pass.
const MIN_TESTS: usize = 35;

/// The same for a run without the stub's tests (group `stub`).
const MIN_SERVER_TESTS: usize = 23;

/// `$PHPUNIT`, or `phpunit` on `PATH`, when it and `php` run.
fn find_phpunit() -> Option<PathBuf> {
    let runs = |program: &Path| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !runs(Path::new("php")) {
        return common::unavailable(
            "PHP",
            "php is not installed (apt-get install php-cli php-curl php-mbstring php-xml)",
        );
    }
    let phpunit =
        std::env::var_os("PHPUNIT").map_or_else(|| PathBuf::from("phpunit"), PathBuf::from);
    if !runs(&phpunit) {
        return common::unavailable("PHP", "phpunit is not installed (apt-get install phpunit)");
    }
    Some(phpunit)
}

/// Runs the PHPUnit suite against `server` (`extra` are phpunit's own arguments) and asserts that
/// every test passed, and at least `min_tests` of them ran.
fn run_suite(phpunit: &Path, server: &TestServer, extra: &[&str], min_tests: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(PHP_DIR);
    let out = Command::new(phpunit)
        .current_dir(&dir)
        .args(["-c", "phpunit.xml.dist", "--fail-on-incomplete"])
        // The suite skips a test only for something missing (Laravel), which CI must have.
        .args(common::in_ci().then_some("--fail-on-skipped"))
        .args(extra)
        .env(
            "NOTIFICATION_SERVICE_URL",
            format!("http://{}", server.addr),
        )
        .env("NOTIFICATION_SERVICE_API_KEY", API_KEY)
        .output()
        .expect("run phpunit");
    let report = common::output_tail(&out, OUTPUT_TAIL_LINES);
    assert!(
        out.status.success(),
        "phpunit failed ({}):\n{report}",
        out.status
    );
    // PHPUnit's closing line: `OK (37 tests, 212 assertions)`, or with skipped tests (outside CI)
    // `Tests: 37, Assertions: 150, Skipped: 10.`
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tests: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("OK (").or_else(|| l.strip_prefix("Tests: ")))
        .and_then(|l| l.split([' ', ',']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no PHPUnit summary line:\n{report}"));
    assert!(
        tests >= min_tests,
        "only {tests} PHP tests ran, expected at least {min_tests}:\n{report}"
    );
    println!("{report}");
}

#[test]
fn the_php_client_and_its_laravel_package_pass_their_suite_on_sqlite() {
    let Some(phpunit) = find_phpunit() else {
        return;
    };
    let server = TestServer::start_with(&[("API_KEY", API_KEY)]);
    run_suite(&phpunit, &server, &[], MIN_TESTS);
}

#[test]
fn the_php_client_and_its_laravel_package_pass_their_suite_on_postgres() {
    let Some(phpunit) = find_phpunit() else {
        return;
    };
    let Some(schema) = PgSchema::create() else {
        return;
    };
    let server = TestServer::start_with(&[("API_KEY", API_KEY), ("DATABASE_URL", &schema.url)]);
    // The stub's tests do not touch the server; the SQLite run has them.
    run_suite(
        &phpunit,
        &server,
        &["--exclude-group", "stub"],
        MIN_SERVER_TESTS,
    );
}
