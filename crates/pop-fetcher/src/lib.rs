//! `pop-fetcher`: fetches new mail over POP3 and publishes it to RabbitMQ
//! (spec §4).
//!
//! [`run`] is the whole service; `main.rs` only parses arguments and loads
//! the configuration, so tests drive it without a process. The replica
//! takes its fair share of Redis leases over the `pop3`/`pop3s` mail
//! configs ([`common::lease`]); for each lease it holds, a worker
//! ([`mailbox`]) polls the maildrop with our own POP3 client ([`pop3`]),
//! publishes every message not yet handed over ([`uidls`]) with confirms
//! ([`common::publish`]), and deletes only what RabbitMQ confirmed. See
//! docs/pop-fetcher.md.

pub mod amqp;
pub mod error;
pub mod mailbox;
pub mod metrics;
pub mod pop3;
pub mod uidls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::config::Protocol;
use common::lease::{LeaseChange, LeaseHolder, Leases};
use common::service::{self, StartError};
use common::shutdown::CancellationToken;
use common::token::TokenClient;
use common::{Component, Config};
use tokio::task::JoinHandle;

use crate::amqp::AmqpLink;
use crate::mailbox::Shared;
use crate::metrics::Metrics;

/// How long a stopping worker may take to finish its batch (confirms, DELE,
/// QUIT) before it is cut off; well inside the lease time-to-live.
pub const STOP_GRACE: Duration = Duration::from_secs(7);

/// Tunables that are not part of the configuration file (defaults suit
/// production; tests and benchmarks shorten them through `MAILAGENT_POP3_*`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Lease time-to-live (`MAILAGENT_POP3_LEASE_TTL`, seconds).
    pub lease_ttl: Duration,
    /// Outstanding publisher confirms (`MAILAGENT_POP3_WINDOW`).
    pub window: usize,
    /// First reconnect wait (`MAILAGENT_POP3_BACKOFF_MS`).
    pub backoff_initial: Duration,
    /// Largest reconnect wait (`MAILAGENT_POP3_BACKOFF_MAX_MS`).
    pub backoff_max: Duration,
    /// How long to wait for the broker to replace a refused token
    /// (`MAILAGENT_POP3_TOKEN_WAIT_MS`).
    pub token_wait: Duration,
    /// Time allowed for one server answer (`MAILAGENT_POP3_READ_TIMEOUT`, seconds).
    pub read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: common::lease::DEFAULT_TTL,
            window: common::publish::DEFAULT_WINDOW,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            token_wait: Duration::from_secs(15),
            read_timeout: pop3::DEFAULT_TIMEOUT,
        }
    }
}

impl Options {
    /// Defaults overridden by `MAILAGENT_POP3_*` environment variables.
    pub fn from_env() -> Self {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let d = Self::default();
        Self {
            lease_ttl: num("MAILAGENT_POP3_LEASE_TTL")
                .map(Duration::from_secs)
                .unwrap_or(d.lease_ttl),
            window: num("MAILAGENT_POP3_WINDOW")
                .map(|w| w as usize)
                .unwrap_or(d.window),
            backoff_initial: num("MAILAGENT_POP3_BACKOFF_MS")
                .map(Duration::from_millis)
                .unwrap_or(d.backoff_initial),
            backoff_max: num("MAILAGENT_POP3_BACKOFF_MAX_MS")
                .map(Duration::from_millis)
                .unwrap_or(d.backoff_max),
            token_wait: num("MAILAGENT_POP3_TOKEN_WAIT_MS")
                .map(Duration::from_millis)
                .unwrap_or(d.token_wait),
            read_timeout: num("MAILAGENT_POP3_READ_TIMEOUT")
                .map(Duration::from_secs)
                .unwrap_or(d.read_timeout),
        }
    }
}

/// Runs until `shutdown` is cancelled, with [`Options::from_env`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, Options::from_env(), shutdown).await
}

/// Runs until `shutdown` is cancelled: connects, takes leases, runs one
/// worker per leased POP3 mail config; at shutdown finishes the batches in
/// flight, releases the leases and exits.
pub async fn run_with(
    config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = match service::start(&config, Component::PopFetcher, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let names: Vec<String> = config
        .incoming_mail
        .iter()
        .filter(|m| m.protocol() == Protocol::Pop3)
        .map(|m| m.name.clone())
        .collect();
    let tls = common::tls::client_config(config.tls.extra_ca_file.as_deref())?;
    let tokens = TokenClient::new(
        service.redis.clone(),
        service.keys.clone(),
        &config.token_broker.encryption,
    );
    let metrics = Metrics::new(&service.admin.registry, Protocol::Pop3);
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        config: Arc::clone(&config),
        instance: service.instance.clone(),
        keys: service.keys.clone(),
        redis: service.redis.clone(),
        amqp: AmqpLink::new(
            Arc::clone(&config),
            format!("pop-fetcher:{}", service.instance),
            service.amqp,
        ),
        exchange: service.topology.exchange.clone(),
        tls,
        tokens,
        metrics: metrics.clone(),
        heartbeat: service.heartbeat.clone(),
        options: options.clone(),
    });
    let lease_metrics = metrics.clone();
    let leases = Leases::new(
        service.redis.clone(),
        service.keys.clone(),
        Protocol::Pop3.as_str(),
        &service.instance,
        names.clone(),
        options.lease_ttl,
    )
    .on_change(move |_, change| {
        lease_metrics
            .lease_changes
            .with_label_values(&[change.as_str()])
            .inc();
        match change {
            LeaseChange::Acquired => lease_metrics.leases_held.inc(),
            _ => lease_metrics.leases_held.dec(),
        }
    });
    tracing::info!(configs = names.len(), instance = %service.instance, lease_ttl_s = options.lease_ttl.as_secs(), "pop fetcher running");
    service.admin.set_ready(true);
    let mut workers = Workers {
        shared: Arc::clone(&shared),
        running: HashMap::new(),
    };
    leases.run(&mut workers, shutdown.clone()).await;
    service.admin.set_ready(false);
    shared.amqp.close().await;
    let _ = service.admin_server.task.await;
    tracing::info!("pop fetcher stopped");
    Ok(())
}

struct Running {
    graceful: CancellationToken,
    task: JoinHandle<()>,
}

/// The workers of the configs this replica holds leases on.
struct Workers {
    shared: Arc<Shared>,
    running: HashMap<String, Running>,
}

impl Workers {
    fn publish_owned(&self) {
        let mut owns: Vec<String> = self.running.keys().cloned().collect();
        owns.sort();
        self.shared.heartbeat.update(|s| s.owns = owns);
    }

    async fn finish(config: &str, mut r: Running, deadline: tokio::time::Instant) {
        r.graceful.cancel();
        if tokio::time::timeout_at(deadline, &mut r.task)
            .await
            .is_err()
        {
            tracing::warn!(config, "worker did not finish its batch in time; cut off (nothing unconfirmed was deleted, and without QUIT nothing is)");
            r.task.abort();
            let _ = r.task.await;
        }
    }
}

impl LeaseHolder for Workers {
    async fn start(&mut self, config: &str) {
        let Some(cfg) = self.shared.config.mail_config(config).cloned() else {
            return;
        };
        if let Some(old) = self.running.remove(config) {
            old.task.abort();
        }
        let graceful = CancellationToken::new();
        let task = tokio::spawn(mailbox::run(
            Arc::clone(&self.shared),
            cfg,
            graceful.clone(),
        ));
        self.running
            .insert(config.to_string(), Running { graceful, task });
        self.publish_owned();
    }

    async fn stop(&mut self, config: &str) {
        if let Some(r) = self.running.remove(config) {
            Self::finish(config, r, tokio::time::Instant::now() + STOP_GRACE).await;
        }
        self.publish_owned();
    }

    async fn lost(&mut self, config: &str) {
        if let Some(r) = self.running.remove(config) {
            r.graceful.cancel();
            r.task.abort();
            let _ = r.task.await;
        }
        self.publish_owned();
    }

    async fn stop_all(&mut self, configs: &[String]) {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        let stopping: Vec<(String, Running)> = configs
            .iter()
            .filter_map(|c| self.running.remove(c).map(|r| (c.clone(), r)))
            .collect();
        for (_, r) in &stopping {
            r.graceful.cancel();
        }
        for (config, r) in stopping {
            Self::finish(&config, r, deadline).await;
        }
        self.publish_owned();
    }
}
