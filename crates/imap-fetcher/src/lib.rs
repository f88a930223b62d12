//! `imap-fetcher`: fetches new mail over IMAP and publishes it to RabbitMQ
//! (spec §4).
//!
//! The replica is the fetch kit's supervisor ([`common::fetch`]: leases,
//! workers, retries, heartbeat, hand-over) running the IMAP protocol: for
//! each mail config it holds, a session ([`worker`]) logs in, passes over
//! the folder ([`handover`]) — new UIDs above the checkpoint
//! ([`checkpoint`]), fetched with `BODY.PEEK[]`, published with confirms,
//! flagged only after the confirm ([`after_fetch`]), then checkpointed —
//! and waits with IDLE or polling. Run it with
//! `common::fetch::run(Imap, config, options, shutdown)`. See
//! docs/imap-fetcher.md.

pub mod after_fetch;
pub mod checkpoint;
pub mod error;
pub mod handover;
pub mod session;
pub mod utf7;
pub mod worker;

use common::config::Protocol as MailProtocol;
use common::fetch::{self, Mailbox};

pub use common::fetch::Options;

/// The IMAP protocol of the fetch kit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Imap;

impl fetch::Protocol for Imap {
    type Error = error::Error;
    const PROTOCOL: MailProtocol = MailProtocol::Imap;
    async fn session(&self, mailbox: &Mailbox) -> error::Result<()> {
        worker::Worker { mb: mailbox }.session().await
    }
}
