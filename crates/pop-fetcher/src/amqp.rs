//! The AMQP connection, reopened when it has died (RabbitMQ restarted), and
//! confirm-mode publishers on it ([`common::publish::Publisher`]).

use std::sync::Arc;

use common::publish::Publisher;
use common::Config;
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// The AMQP connection of this replica, shared by its mailbox workers.
pub struct AmqpLink {
    config: Arc<Config>,
    name: String,
    conn: Mutex<Option<lapin::Connection>>,
}

impl AmqpLink {
    /// Starts from an open connection.
    pub fn new(config: Arc<Config>, name: String, conn: lapin::Connection) -> Self {
        Self {
            config,
            name,
            conn: Mutex::new(Some(conn)),
        }
    }

    /// A confirm-mode publisher on the live connection (reconnecting first
    /// when it died).
    pub async fn publisher<T>(&self, exchange: &str, window: usize) -> Result<Publisher<T>> {
        let mut guard = self.conn.lock().await;
        if !guard.as_ref().is_some_and(|c| c.status().connected()) {
            *guard = None;
            let conn = common::connect::amqp(&self.config, &self.name)
                .await
                .map_err(|e| {
                    Error::Publish(common::publish::PublishError::Channel(amqp_source(e)))
                })?;
            *guard = Some(conn);
        }
        let conn = guard.as_ref().expect("connection set above");
        Ok(Publisher::open(conn, exchange, window).await?)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close(200, "shutdown").await;
        }
    }
}

fn amqp_source(e: common::Error) -> lapin::Error {
    match e {
        common::Error::Amqp { source, .. } => source,
        other => lapin::Error::IOError(Arc::new(std::io::Error::other(other.to_string()))),
    }
}
