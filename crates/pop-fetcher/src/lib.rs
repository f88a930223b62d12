//! `pop-fetcher`: fetches new mail over POP3 and publishes it to RabbitMQ
//! (spec §4).
//!
//! The replica is the fetch kit's supervisor ([`common::fetch`]: leases,
//! workers, retries, heartbeat, hand-over) running the POP3 protocol: for
//! each mail config it holds, a poll session ([`worker`]) reads the
//! maildrop with our own POP3 client ([`pop3`]), publishes every message
//! not yet handed over ([`uidls`]) with confirms, and deletes only what
//! RabbitMQ confirmed. Run it with
//! `common::fetch::run(Pop3, config, options, shutdown)`. See
//! docs/pop-fetcher.md.

pub mod error;
pub mod pop3;
pub mod uidls;
pub mod worker;

use common::config::Protocol as MailProtocol;
use common::fetch::{self, Mailbox};

pub use common::fetch::Options;

/// The POP3 protocol of the fetch kit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pop3;

impl fetch::Protocol for Pop3 {
    type Error = error::Error;
    const PROTOCOL: MailProtocol = MailProtocol::Pop3;
    async fn session(&self, mailbox: &Mailbox) -> error::Result<()> {
        worker::Worker { mb: mailbox }.session().await
    }
}
