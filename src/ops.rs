//! The one-off jobs of the binary besides serving: `migrate` and `check-config` (API.md, "Command
//! line"). Each reads the same [`Config`] a node would, does its job with the same code start-up uses
//! (the store's migration runner, [`Config::problems`]), and reports in plain lines an operator or a
//! deploy script reads; `main` turns the outcome into the exit status.

use std::time::Duration;

use crate::audit;
use crate::bus::link::describe;
use crate::config::{Config, RedisTarget};
use crate::store::{self, StoreUrl};

/// How long `check-config` waits for one Redis node to connect and answer PING: long enough for a
/// node across a data centre, short enough that a script running the check is not held up.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why `migrate` did not migrate, and with which exit status `main` should end.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A setting is invalid (exit status 2, like start-up).
    #[error("{0}")]
    Setting(String),
    /// The store could not be reached or migrated (exit status 1, like start-up).
    #[error("{0}")]
    Store(#[source] store::OpenError),
}

impl MigrateError {
    /// The exit status the binary ends with: 2 for a bad setting, 1 for the store, as at start-up.
    pub fn exit_status(&self) -> u8 {
        match self {
            MigrateError::Setting(_) => 2,
            MigrateError::Store(_) => 1,
        }
    }
}

/// `notification-service migrate`: validates the settings, applies the store's migrations as start-up
/// does (PostgreSQL under its advisory lock), and returns the one line to print.
pub fn migrate(config: &Config) -> Result<String, MigrateError> {
    config.validate().map_err(MigrateError::Setting)?;
    let url =
        StoreUrl::parse(&config.database_url).map_err(|e| MigrateError::Setting(e.to_string()))?;
    let done = store::migrate(&url, config.sqlite_synchronous).map_err(MigrateError::Store)?;
    Ok(match done.applied {
        0 => format!(
            "migrate: {} is up to date (schema version {}); nothing applied",
            done.store, done.version
        ),
        n => format!(
            "migrate: applied {n} migration{} to {} (now at schema version {})",
            if n == 1 { "" } else { "s" },
            done.store,
            done.version
        ),
    })
}

/// One line of `check-config`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Something that works, said as `ok: ...`.
    Ok(String),
    /// Something to fix, said as `problem: ...`.
    Problem(String),
}

impl Check {
    /// Whether this line is a problem.
    pub fn is_problem(&self) -> bool {
        matches!(self, Check::Problem(_))
    }
}

/// The line as printed.
impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Ok(what) => write!(f, "ok: {what}"),
            Check::Problem(what) => write!(f, "problem: {what}"),
        }
    }
}

/// `notification-service check-config`: every setting as start-up validates it (all problems, not the
/// first), then the store and Redis, reached without changing anything. Every check runs even after
/// one failed, so one run lists everything to fix.
pub fn check_config(config: &Config) -> Vec<Check> {
    let mut report = Vec::new();
    let problems = config.problems();
    if problems.is_empty() {
        report.push(Check::Ok("settings are valid".to_owned()));
    }
    report.extend(problems.into_iter().map(Check::Problem));

    match StoreUrl::parse(&config.database_url) {
        Err(problem) => report.push(Check::Problem(problem.to_string())),
        Ok(url) => report.push(match store::probe(&url) {
            Ok(found) => Check::Ok(format!("store: {found}")),
            Err(problem) => Check::Problem(format!("store: {problem}")),
        }),
    }

    report.push(match audit::probe(&config.audit_log) {
        Ok(found) => Check::Ok(format!("audit log: {found}")),
        Err(problem) => Check::Problem(format!("audit log: {problem}")),
    });

    // A bad Redis setting is already a problem above; only a usable one is worth reaching for.
    let target = config.redis_target().ok().flatten();
    if target.is_none() && config.redis_url.is_none() && config.redis_cluster.is_none() {
        report.push(Check::Ok(
            "redis: not configured (a single node; set REDIS_URL or REDIS_CLUSTER to join several)"
                .to_owned(),
        ));
    }
    if let Some(target) = target {
        let setting = target.setting();
        let over = if target.tls() { " over TLS" } else { "" };
        for url in target.urls() {
            report.push(match ping_redis(&target, url) {
                Ok(()) => Check::Ok(format!(
                    "redis: {setting} {} answers PING{over}",
                    shown(url)
                )),
                Err(e) => Check::Problem(format!(
                    "redis: {setting} {} did not answer PING: {e}",
                    shown(url)
                )),
            });
        }
    }
    report
}

/// Connects to one Redis node (over TLS for `rediss://`, trusting `REDIS_CA_FILE` if set) and sends
/// PING, within [`REDIS_PROBE_TIMEOUT`]. A plain blocking client: this runs once, outside any
/// runtime, so the bus's async machinery is not needed. A refused certificate is explained.
fn ping_redis(target: &RedisTarget, url: &str) -> Result<(), String> {
    let client = target.client(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_connection_with_timeout(REDIS_PROBE_TIMEOUT)
        .map_err(|e| describe(&e))?;
    conn.set_read_timeout(Some(REDIS_PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let answer: String = redis::cmd("PING")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    if answer == "PONG" {
        Ok(())
    } else {
        Err(format!("PING answered {answer:?}"))
    }
}

/// A Redis URL as it may be printed: a password (`redis://user:secret@host`) is masked.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_not_printed() {
        assert_eq!(shown("redis://u:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(shown("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn every_problem_is_listed_not_only_the_first() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/never.db", dir.path().display());
        let config = Config::parse_from([
            "x",
            "--max-frame",
            "1",
            "--heartbeat-s",
            "0",
            "--database-url",
            &db,
        ]);
        let report = check_config(&config);
        let problems: Vec<String> = report
            .iter()
            .filter(|c| c.is_problem())
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 2, "{report:?}");
        assert!(problems.iter().any(|p| p.contains("MAX_FRAME")));
        assert!(problems.iter().any(|p| p.contains("HEARTBEAT_S")));
        // The store check changed nothing.
        assert!(!dir.path().join("never.db").exists());
    }
}
