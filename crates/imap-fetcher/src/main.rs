//! `imap-fetcher`: Fetches new mail over IMAP and publishes it to RabbitMQ (spec §4).

use std::process::ExitCode;

use clap::Parser;
use common::cli::{self, ConfigArgs};
use common::Component;

/// Fetches new mail over IMAP and publishes it to RabbitMQ (spec §4).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match cli::load(&args.config, Component::ImapFetcher) {
        Ok(config) => config,
        Err(code) => return code,
    };
    cli::run_service(Component::ImapFetcher, |shutdown| {
        common::fetch::run(
            imap_fetcher::Imap,
            config,
            common::fetch::Options::from_env("MAILAGENT_IMAP"),
            shutdown,
        )
    })
}
