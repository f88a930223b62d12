//! `token-broker`: keeps each OAuth profile's client-credentials token fresh
//! in Redis (§3).
//!
//! One [`worker::Worker`] per profile with `access-type = "application"`
//! refreshes the token ahead of expiry, under a Redis lock so that exactly one
//! broker replica requests each new token. Fetchers never call the token
//! endpoint: they read Redis (`common::token::TokenClient`) and, after an
//! authentication failure, publish a forced-refresh request naming the
//! refused token's fingerprint, which this broker honours only if that token
//! is still the current one.

pub mod lock;
pub mod metrics;
pub mod request;
pub mod schedule;
pub mod worker;

use std::collections::HashMap;
use std::time::Duration;

use common::config::AccessType;
use common::service::{self, StartError};
use common::shutdown::CancellationToken;
use common::token::{RefreshRequest, TokenClient};
use common::{Component, Config};
use futures::StreamExt;
use tokio::sync::mpsc;

/// Runs until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let service = match service::start(&config, Component::TokenBroker, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let metrics = metrics::Metrics::register(&service.admin.registry)?;
    let http = request::http_client(&config.token_broker, &config.tls)?;
    let tokens = TokenClient::new(
        service.redis.clone(),
        service.keys.clone(),
        &config.token_broker.encryption,
    );
    let profiles: Vec<_> = config
        .oauth_profiles
        .iter()
        .filter(|p| p.access_type == AccessType::Application)
        .cloned()
        .collect();
    service
        .heartbeat
        .update(|h| h.owns = profiles.iter().map(|p| p.name.clone()).collect());

    let mut senders = HashMap::new();
    let mut tasks = Vec::new();
    for profile in profiles {
        let (tx, rx) = mpsc::channel(64);
        senders.insert(profile.name.clone(), tx);
        let worker = worker::Worker {
            profile,
            cfg: config.token_broker.clone(),
            tokens: tokens.clone(),
            redis: service.redis.clone(),
            keys: service.keys.clone(),
            http: http.clone(),
            owner: service.instance.clone(),
            metrics: metrics.clone(),
            heartbeat: service.heartbeat.clone(),
            watch: Default::default(),
        };
        tasks.push(tokio::spawn(worker.run(rx, shutdown.clone())));
    }
    let client = service.redis.clone();
    let channel = service.keys.token_refresh_channel();
    tasks.push(tokio::spawn(listen_for_refresh_requests(
        client,
        channel,
        senders,
        shutdown.clone(),
    )));

    service.admin.set_ready(true);
    shutdown.cancelled().await;
    service.admin.set_ready(false);
    for task in tasks {
        let _ = task.await;
    }
    let _ = service.amqp.close(200, "shutdown").await;
    let _ = service.admin_server.task.await;
    Ok(())
}

/// Subscribes to forced-refresh requests and hands each to its profile's
/// worker; resubscribes after a Redis failure — on the primary the Sentinels
/// name then, or on another Cluster node (a `PUBLISH` reaches every node of a
/// Cluster).
async fn listen_for_refresh_requests(
    client: common::RedisHandle,
    channel: String,
    senders: HashMap<String, mpsc::Sender<String>>,
    shutdown: CancellationToken,
) {
    let mut backoff =
        common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let session = async {
            let mut pubsub = client.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            tracing::debug!(%channel, "listening for forced-refresh requests");
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(request) = serde_json::from_str::<RefreshRequest>(&payload) else {
                    tracing::warn!("ignoring a malformed forced-refresh request");
                    continue;
                };
                if let Some(tx) = senders.get(&request.profile) {
                    // A full queue already holds requests for this profile:
                    // dropping duplicates loses nothing.
                    let _ = tx.try_send(request.fingerprint);
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = session => {
                let wait = backoff.next_delay();
                if let Err(e) = result {
                    tracing::warn!(error = %e, "lost the forced-refresh subscription; resubscribing");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
