//! `form-processor`: Consumes fetched mail and performs the CREATE action (spec §6).

use std::process::ExitCode;

use clap::Parser;
use common::cli::{self, ConfigArgs};
use common::Component;

/// jemalloc, not glibc's malloc: a delivery's buffers cross threads (see
/// the dependency's note in Cargo.toml).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Consumes fetched mail and performs the CREATE action (spec §6).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match cli::load(&args.config, Component::FormProcessor) {
        Ok(config) => config,
        Err(code) => return code,
    };
    cli::run_service(Component::FormProcessor, |shutdown| {
        form_processor::run(config, shutdown)
    })
}
