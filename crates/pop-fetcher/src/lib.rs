//! `pop-fetcher`: fetches new mail over POP3 and publishes it to RabbitMQ
//! (spec §4).
//!
//! The replica is the fetch kit's supervisor ([`common::fetch`]: leases,
//! workers, retries, heartbeat, hand-over) running the POP3 protocol: for
//! each mail config it holds, a poll session ([`worker`]) reads the
//! maildrop with our own POP3 client ([`pop3`]), publishes every message
//! not yet handed over ([`uidls`]) with confirms, and deletes only what
//! RabbitMQ confirmed. See docs/pop-fetcher.md.

pub mod error;
pub mod pop3;
pub mod uidls;
pub mod worker;

use common::config::Protocol as MailProtocol;
use common::fetch::{self, Mailbox};
use common::shutdown::CancellationToken;
use common::{Component, Config};

pub use common::fetch::Options;

/// The POP3 protocol of the fetch kit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pop3;

impl fetch::Protocol for Pop3 {
    type Error = error::Error;
    const PROTOCOL: MailProtocol = MailProtocol::Pop3;
    const COMPONENT: Component = Component::PopFetcher;

    async fn session(&self, mailbox: &Mailbox) -> error::Result<()> {
        worker::Worker { mb: mailbox }.session().await
    }
}

/// Runs until `shutdown` is cancelled: connects, takes leases, runs one
/// worker per leased POP3 mail config; at shutdown finishes the batches in
/// flight, releases the leases and exits. `options` come from the binary's
/// environment (`MAILAGENT_POP3_*`, [`Options::from_env`]).
pub async fn run(
    config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Ok(fetch::run(Pop3, config, options, shutdown).await?)
}
