//! `pop-fetcher`: Fetches new mail over POP3 and publishes it to RabbitMQ (spec §4).
//!
//! [`run`] is the whole service; `main.rs` only parses arguments and loads
//! the configuration, so tests drive it without a process.

pub mod error;
pub mod pop3;

use common::service::{self, StartError};
use common::shutdown::CancellationToken;
use common::{Component, Config};

/// Runs until `shutdown` is cancelled: connects, declares the topology,
/// serves the admin endpoints and beats the heartbeat.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let service = match service::start(&config, Component::PopFetcher, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    service.admin.set_ready(true);
    shutdown.cancelled().await;
    service.admin.set_ready(false);
    let _ = service.amqp.close(200, "shutdown").await;
    let _ = service.admin_server.task.await;
    Ok(())
}
