//! The `notification-service` binary: configuration, logging, then `server::run`, or one of the
//! one-off jobs of [`notification_service::ops`] when a subcommand is named.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use notification_service::config::{Command, Config};
use notification_service::{ops, server};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs to stdout for the server. For a one-off job, logs go to stderr at `warn` unless `RUST_LOG`
/// says otherwise, so stdout holds only the job's own report, which scripts read.
fn init_logging(format: &str, job: bool) {
    let default = if job { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (format == "json", job) {
        (true, false) => builder.json().init(),
        (false, false) => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        (true, true) => builder.json().with_writer(std::io::stderr).init(),
        (false, true) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// `mi_option_purge_delay` in the mimalloc (v3) that `libmimalloc-sys` 0.1.49 builds; that crate
/// does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc to give freed pages back to the kernel at once rather than 10 ms later: the delayed
/// purge only runs when the same thread allocates again, and a shard goes quiet after a burst of
/// connections or at start-up, so their memory used to stay in RSS (about 10 MB at start,
/// docs/benchmarks.md "Idle memory"). Measured at no cost on fan-out (0.71 CPU-s per million
/// deliveries either way).
fn return_freed_pages_at_once() {
    // SAFETY: called first thing in main, before any other thread exists (mi_option_set is not
    // thread-safe); the option takes a number of milliseconds.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() -> ExitCode {
    return_freed_pages_at_once();
    // clap prints its own usage error (a malformed value, an unknown flag) and exits 2.
    let config = Config::parse();
    init_logging(&config.log_format, config.command.is_some());
    match config.command {
        None => serve(config),
        Some(Command::Migrate) => match ops::migrate(&config) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("notification-service migrate: {e}");
                ExitCode::from(e.exit_status())
            }
        },
        Some(Command::CheckConfig) => {
            let report = ops::check_config(&config);
            for check in &report {
                println!("{check}");
            }
            if report.iter().any(ops::Check::is_problem) {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// Runs the server: an invalid setting exits 2, a failed start-up or run 1 (API.md, "Start-up").
fn serve(config: Config) -> ExitCode {
    if let Err(e) = config.validate() {
        eprintln!("notification-service: {e}");
        return ExitCode::from(2);
    }
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
