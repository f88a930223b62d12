//! `mailagent`: the operator CLI (§7).

mod dates;
mod dead_letters;
mod records;
mod setup;
mod status;
mod test_connection;

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
    /// Every live agent, each OAuth profile's token state, each mail
    /// config's owner and progress, and the queue depths.
    Status(status::StatusArgs),
    /// Check one mail config end to end: own token request, DNS, TCP, TLS,
    /// login, folder; names the failing step and its likely cause.
    TestConnection {
        /// The incoming-mail config name.
        name: String,
    },
    /// Declare the AMQP topology once, print the RabbitMQ permissions of
    /// each component, and print or apply their Redis ACL users (least
    /// privilege: the services then run with `[amqp] declare = "passive"`).
    Setup(setup::SetupArgs),
    /// List the records created from forms (`--json`: one object a line).
    Records(records::RecordsArgs),
    /// List rejected messages, or replay one from the dead-letter queue.
    DeadLetters {
        /// What to do (default: list).
        #[command(subcommand)]
        command: Option<dead_letters::DeadLettersCommand>,
    },
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
        Command::Status(ref s) => with_config(&args.config, Component::Cli, |config| async move {
            status::status(&config, s).await
        }),
        Command::TestConnection { ref name } => {
            with_config(&args.config, Component::Cli, |config| async move {
                if test_connection::test_connection(&config, name).await? {
                    Ok(())
                } else {
                    anyhow::bail!("connection test failed")
                }
            })
        }
        Command::Setup(ref s) => with_config(&args.config, Component::Setup, |config| async move {
            setup::setup(&config, s).await
        }),
        Command::Records(ref r) => with_config(&args.config, Component::Cli, |config| async move {
            records::records(&config, r).await
        }),
        Command::DeadLetters { ref command } => {
            with_config(&args.config, Component::Cli, |config| async move {
                let command = command
                    .as_ref()
                    .unwrap_or(&dead_letters::DeadLettersCommand::List);
                dead_letters::dead_letters(&config, command).await
            })
        }
    }
}

/// Loads the configuration as `component` reads it and runs `f` on a
/// runtime; errors exit 1.
fn with_config<F, Fut>(args: &ConfigArgs, component: Component, f: F) -> ExitCode
where
    F: FnOnce(common::Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match cli::load(args, component) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(f(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailagent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
