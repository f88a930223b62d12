//! `pop-fetcher`: Fetches new mail over POP3 and publishes it to RabbitMQ (spec §4).

use std::process::ExitCode;

use clap::Parser;
use common::cli::{self, ConfigArgs};
use common::Component;

/// Fetches new mail over POP3 and publishes it to RabbitMQ (spec §4).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match cli::load(&args.config, Component::PopFetcher) {
        Ok(config) => config,
        Err(code) => return code,
    };
    cli::run_service(Component::PopFetcher, |shutdown| {
        common::fetch::run(
            pop_fetcher::Pop3,
            config,
            common::fetch::Options::from_env("MAILAGENT_POP3"),
            shutdown,
        )
    })
}
