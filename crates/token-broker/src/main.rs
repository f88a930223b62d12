//! `token-broker`: Keeps each OAuth profile's client-credentials token fresh in Redis (spec §3).

use std::process::ExitCode;

use clap::Parser;
use common::cli::{self, ConfigArgs};
use common::Component;

/// Keeps each OAuth profile's client-credentials token fresh in Redis (spec §3).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match cli::load(&args.config, Component::TokenBroker) {
        Ok(config) => config,
        Err(code) => return code,
    };
    cli::run_service(Component::TokenBroker, |shutdown| {
        token_broker::run(config, shutdown)
    })
}
