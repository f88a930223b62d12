//! `mailagent`: the operator CLI (§7).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::cli::{self, ConfigArgs};
use common::Component;

/// Operate an Incoming Mail Agent deployment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the whole configuration file and print a redacted summary
    /// (exit 0) or every error (exit 2).
    CheckConfig,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    match args.command {
        Command::CheckConfig => {
            args.config.check_config = true;
            match cli::load(&args.config, Component::Cli) {
                Ok(_) => ExitCode::SUCCESS,
                Err(code) => code,
            }
        }
    }
}
