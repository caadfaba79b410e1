//! Node.js for the tests of the JavaScript SDK and the monitor page: finding `node`, `npm` and
//! Chromium, installing `clients/js`'s packages (`npm ci`) when they are missing, and running
//! `node --test` with the server binary cargo built. Without a tool the tests fail under `CI=true`
//! and are skipped with a note elsewhere, like every other test that needs something of the machine's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The SDK's package folder, relative to the crate root.
pub const JS_DIR: &str = "clients/js";

/// The oldest Node.js the SDK and its tests support (`--test-force-exit` came with 20.14).
const MIN_NODE: (u32, u32) = (20, 14);

/// How long one `node --test` run may take before it is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Fails under CI, else prints a note; the caller then skips.
fn missing(what: &str) {
    if ci() {
        panic!("{what}, and CI=true requires it (.ci/run installs it)");
    }
    eprintln!("note: skipping: {what}");
}

/// The package folder as an absolute path.
pub fn js_dir() -> PathBuf {
    package_dir(JS_DIR)
}

/// A package folder of the repository (`clients/js`, `tests/pusher`) as an absolute path.
pub fn package_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// `node` when it is installed and at least [`MIN_NODE`].
fn node() -> Option<PathBuf> {
    let node = std::env::var_os("NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let version = Command::new(&node)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let Some(version) = version else {
        missing("node is not installed (Node.js 20.14 or newer)");
        return None;
    };
    let mut parts = version.trim_start_matches('v').split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < MIN_NODE {
        missing(&format!(
            "node is {version}, older than {}.{}",
            MIN_NODE.0, MIN_NODE.1
        ));
        return None;
    }
    Some(node)
}

/// Runs `npm ci` in the package folder `relative` unless its `node_modules` matches
/// `package-lock.json` already (npm writes `node_modules/.package-lock.json` on install). One test at
/// a time.
fn install_packages(relative: &str) -> bool {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = package_dir(relative);
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(dir.join("node_modules/.package-lock.json"));
    let locked = modified(dir.join("package-lock.json"));
    if installed.is_some() && installed >= locked {
        return true;
    }
    let npm = std::env::var_os("NPM").map_or_else(|| PathBuf::from("npm"), PathBuf::from);
    let out = match Command::new(&npm)
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            missing("npm is not installed");
            return false;
        }
    };
    assert!(
        out.status.success(),
        "npm ci in {relative} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Node.js with the SDK package's dependencies installed, or `None` (skip) when there is none.
pub fn prepared_node() -> Option<PathBuf> {
    prepared_node_in(JS_DIR)
}

/// Node.js with the dependencies of the package folder `relative` installed, or `None` (skip).
pub fn prepared_node_in(relative: &str) -> Option<PathBuf> {
    let node = node()?;
    install_packages(relative).then_some(node)
}

/// The Chromium (or Chrome) binary for the headless browser test: `$CHROMIUM`, or the first of the
/// usual names that runs.
pub fn chromium() -> Option<PathBuf> {
    let candidates = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            ["chromium", "chromium-browser", "google-chrome"]
                .into_iter()
                .map(PathBuf::from),
        );
    for candidate in candidates {
        let runs = Command::new(&candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if runs {
            // puppeteer wants a path, not a name to look up.
            return Some(on_path(&candidate).unwrap_or(candidate));
        }
    }
    missing("Chromium is not installed (apt-get install chromium)");
    None
}

/// Where a bare program name is found on `PATH`.
fn on_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() != 1 {
        return None;
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs `node --test <files>` in the package folder with `env`, the server binary in
/// `NOTIFICATION_SERVICE_BIN`; fails the test with node's output unless every test passed.
pub fn run_node_tests(node: &Path, files: &[&str], env: &[(&str, &str)]) {
    run_node_tests_in(node, JS_DIR, files, env)
}

/// [`run_node_tests`] in the package folder `relative`.
pub fn run_node_tests_in(node: &Path, relative: &str, files: &[&str], env: &[(&str, &str)]) {
    let mut child = Command::new(node)
        .args(["--test", "--test-force-exit", "--test-reporter=spec"])
        .args(files)
        .current_dir(package_dir(relative))
        .env(
            "NOTIFICATION_SERVICE_BIN",
            env!("CARGO_BIN_EXE_notification-service"),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    // Read both pipes on threads, so a chatty run cannot fill one and block node.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait for node");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        status.success(),
        "node --test {files:?} failed ({status}; killed after {RUN_TIMEOUT:?} if it ran that long):\n{report}"
    );
    println!("{report}");
}
