//! Connections to RabbitMQ and Redis from the configuration, with errors that
//! name the (redacted) endpoint.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use redis::aio::ConnectionManager;

use crate::config::Config;
use crate::error::{Error, Result};

/// Opens an AMQP connection (`amqps://` verified against the platform roots
/// plus `[tls] extra-ca-file`), driven by the current tokio runtime.
pub async fn amqp(config: &Config, connection_name: &str) -> Result<Connection> {
    let endpoint = config.amqp.url.redacted();
    let mut props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(connection_name.to_string().into());
    props.client_properties.insert(
        "product".into(),
        lapin::types::AMQPValue::LongString("mailagent".into()),
    );
    let tls = OwnedTLSConfig {
        identity: None::<OwnedIdentity>,
        cert_chain: match &config.tls.extra_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| Error::Io {
                action: format!("read CA file {}", path.display()),
                source,
            })?),
            None => None,
        },
    };
    Connection::connect_with_config(config.amqp.url.expose(), props, tls)
        .await
        .map_err(|source| Error::Amqp {
            action: "connect",
            endpoint,
            source,
        })
}

/// Opens a Redis connection manager (reconnects by itself after errors).
pub async fn redis(config: &Config) -> Result<ConnectionManager> {
    let endpoint = config.redis.url.redacted();
    let client = redis::Client::open(config.redis.url.expose()).map_err(|source| Error::Redis {
        action: "open client",
        endpoint: endpoint.clone(),
        source,
    })?;
    let mgr_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(10))
        .set_response_timeout(std::time::Duration::from_secs(10))
        .set_number_of_retries(3);
    ConnectionManager::new_with_config(client, mgr_config)
        .await
        .map_err(|source| Error::Redis {
            action: "connect",
            endpoint,
            source,
        })
}

/// A dedicated Redis client (for pub/sub, which needs its own connection).
pub fn redis_client(config: &Config) -> Result<redis::Client> {
    redis::Client::open(config.redis.url.expose()).map_err(|source| Error::Redis {
        action: "open client",
        endpoint: config.redis.url.redacted(),
        source,
    })
}
