//! The command-line edge shared by every binary: `--config` (global, before
//! or after a subcommand), `--check-config`, exit codes, the runtime.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, Component, Config, LoadOptions};

/// Exit status for invalid configuration.
pub const EXIT_CONFIG: u8 = 2;

/// Arguments every service binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML). Defaults to $MAILAGENT_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the whole configuration, print a redacted summary (exit 0)
    /// or every error (exit 2), and stop.
    #[arg(long, global = true)]
    pub check_config: bool,
}

/// Loads the configuration for `component`. On errors prints them all to
/// stderr and returns exit status 2; with `--check-config` prints the
/// summary and returns exit status 0.
pub fn load(args: &ConfigArgs, component: Component) -> Result<Config, ExitCode> {
    let options = LoadOptions::from_process(args.config.clone());
    match config::load(&options, component) {
        Ok(config) if args.check_config => {
            print!("{}", config.summary());
            Err(ExitCode::SUCCESS)
        }
        Ok(config) => Ok(config),
        Err(errors) => {
            eprint!("{}: {errors}", component.name());
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The multi-threaded runtime every binary runs on; when it cannot start,
/// says so on stderr and gives the exit status (1).
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Runs a service: a multi-threaded runtime, telemetry for `component`, a
/// shutdown token cancelled on SIGTERM/SIGINT, and `run`'s result mapped to
/// an exit status (0 on a clean stop, 1 on a fatal error).
pub fn run_service<F, Fut, E>(component: Component, run: F) -> ExitCode
where
    F: FnOnce(crate::shutdown::CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let _telemetry = crate::telemetry::init(component.name());
        let shutdown = crate::shutdown::token_from(crate::shutdown::shutdown_signal());
        match run(shutdown).await {
            Ok(()) => {
                tracing::info!(component = component.name(), "stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(component = component.name(), error = %e, "stopped on a fatal error");
                ExitCode::FAILURE
            }
        }
    })
}
