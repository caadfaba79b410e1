//! The `notification-service` binary: configuration, logging, then `server::run`.

use std::io::IsTerminal;
use std::process::ExitCode;

use notification_service::config::Config;
use notification_service::server;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let config = match Config::from_args() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("notification-service: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log_format);
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
