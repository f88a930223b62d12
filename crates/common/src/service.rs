//! What every long-running binary does at start (§7): connect to Redis and
//! RabbitMQ (retrying while they are unreachable), declare the topology,
//! serve the admin endpoints and beat its heartbeat.

use std::time::Duration;

use crate::redis_handle::RedisHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminServer, AdminState};
use crate::backoff::Backoff;
use crate::config::{Component, Config, Declare};
use crate::heartbeat::Heartbeat;
use crate::keys::Keys;
use crate::topology::Topology;

/// The connections and shared parts a service runs with.
pub struct Service {
    /// This instance's id.
    pub instance: String,
    /// Redis key names.
    pub keys: Keys,
    /// A Redis connection (reconnects by itself).
    pub redis: RedisHandle,
    /// The AMQP connection.
    pub amqp: lapin::Connection,
    /// Exchange and queue names, declared.
    pub topology: Topology,
    /// Metrics registry and readiness.
    pub admin: AdminState,
    /// The admin server.
    pub admin_server: AdminServer,
    /// This instance's heartbeat.
    pub heartbeat: Heartbeat,
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Shutdown was requested while still connecting.
    #[error("shutdown requested during start")]
    Cancelled,
    /// A permanent failure (bad TLS setup, admin port taken…).
    #[error(transparent)]
    Fatal(#[from] crate::Error),
}

/// Retries `attempt` with backoff while it fails transiently, until it
/// succeeds, fails permanently, or `shutdown` is cancelled.
pub async fn retry_transient<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Result<T, StartError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot {what} yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(StartError::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects everything a `component` needs and starts its admin server and
/// heartbeat. Readiness is left to the caller.
pub async fn start(
    config: &Config,
    component: Component,
    shutdown: &CancellationToken,
) -> Result<Service, StartError> {
    let instance = crate::heartbeat::instance_id();
    let keys = Keys::new(config.redis.prefix.clone());
    let admin = AdminState::new(&config.admin.metrics_prefix);
    let admin_server =
        crate::admin::serve(config.admin.listen, admin.clone(), shutdown.clone()).await?;
    let redis = retry_transient("connect to Redis", shutdown, || {
        crate::connect::redis(config)
    })
    .await?;
    let name = format!("{}:{instance}", component.name());
    let (amqp, topology) = retry_transient("connect to RabbitMQ", shutdown, || async {
        let conn = crate::connect::amqp(config, &name).await?;
        let topology = declare_topology(&conn, config).await?;
        Ok((conn, topology))
    })
    .await?;
    let heartbeat = Heartbeat::new(component.name(), &instance);
    heartbeat.update(|s| s.admin = Some(admin_server.addr.to_string()));
    heartbeat.spawn(
        redis.clone(),
        keys.clone(),
        config.admin.heartbeat_interval,
        shutdown.clone(),
    );
    tracing::info!(component = component.name(), %instance, redis = %config.redis.endpoint(), amqp = %config.amqp.endpoints(), "started");
    Ok(Service {
        instance,
        keys,
        redis,
        amqp,
        topology,
        admin,
        admin_server,
        heartbeat,
    })
}

/// Declares the topology on a fresh channel of `conn` — or, with
/// `[amqp] declare = "passive"`, checks that `mailagent setup` declared it
/// (a user without configure permission).
pub async fn declare_topology(
    conn: &lapin::Connection,
    config: &Config,
) -> crate::Result<Topology> {
    let passive = config.amqp_declare == Declare::Passive;
    let err = |source| crate::Error::Amqp {
        action: if passive {
            "find the topology (declare = \"passive\": run `mailagent setup` first)"
        } else {
            "declare the topology (a user without configure permission needs declare = \"passive\")"
        },
        endpoint: config.amqp.endpoints(),
        source,
    };
    let channel = conn.create_channel().await.map_err(err)?;
    let topology = crate::topology::declare(&channel, &config.amqp, passive)
        .await
        .map_err(err)?;
    let _ = channel.close(200, "topology declared").await;
    Ok(topology)
}
