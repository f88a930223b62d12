//! `imap-fetcher`: fetches new mail over IMAP and publishes it to RabbitMQ
//! (spec §4).
//!
//! [`run`] is the whole service; `main.rs` only parses arguments and loads
//! the configuration, so tests drive it without a process. The replica
//! takes its fair share of Redis leases over the `imap`/`imaps` mail
//! configs ([`common::lease`]); for each lease it holds, a worker
//! ([`mailbox`]) logs in, hands every new message over — fetched with
//! `BODY.PEEK[]`, published with confirms ([`common::publish`]), flagged
//! only after the confirm, then checkpointed ([`checkpoint`]) — and waits
//! with IDLE or polling. See docs/imap-fetcher.md.

pub mod checkpoint;
pub mod error;
pub mod mailbox;
pub mod metrics;
pub mod session;
pub mod utf7;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::config::Protocol;
use common::lease::{LeaseChange, LeaseHolder, Leases};
use common::publish::AmqpLink;
use common::service::{self, StartError};
use common::shutdown::CancellationToken;
use common::token::TokenClient;
use common::{Component, Config};
use tokio::task::JoinHandle;

use crate::mailbox::Shared;
use crate::metrics::Metrics;

/// How long a stopping worker may take to finish its batch (confirms, then
/// flags) before it is cut off. Keeps shutdown within 10 s.
pub const STOP_GRACE: Duration = Duration::from_secs(7);

/// Tunables that are not part of the configuration file. [`Options::from_env`]
/// reads `MAILAGENT_IMAP_LEASE_TTL` (seconds), `MAILAGENT_IMAP_WINDOW` and
/// `MAILAGENT_IMAP_BACKOFF_MS` / `MAILAGENT_IMAP_BACKOFF_MAX_MS`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lease time-to-live (≤ 30 s).
    pub lease_ttl: Duration,
    /// Outstanding confirmations per publisher.
    pub window: usize,
    /// First reconnect wait.
    pub backoff_initial: Duration,
    /// Longest reconnect wait.
    pub backoff_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: common::lease::DEFAULT_TTL,
            window: common::publish::DEFAULT_WINDOW,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl Options {
    /// Defaults, overridden by the `MAILAGENT_IMAP_*` environment variables.
    pub fn from_env() -> Self {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let d = Self::default();
        Self {
            lease_ttl: num("MAILAGENT_IMAP_LEASE_TTL")
                .map(Duration::from_secs)
                .unwrap_or(d.lease_ttl),
            window: num("MAILAGENT_IMAP_WINDOW")
                .map(|w| w as usize)
                .unwrap_or(d.window),
            backoff_initial: num("MAILAGENT_IMAP_BACKOFF_MS")
                .map(Duration::from_millis)
                .unwrap_or(d.backoff_initial),
            backoff_max: num("MAILAGENT_IMAP_BACKOFF_MAX_MS")
                .map(Duration::from_millis)
                .unwrap_or(d.backoff_max),
        }
    }
}

/// Runs until `shutdown` is cancelled, with [`Options::from_env`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, Options::from_env(), shutdown).await
}

/// Runs until `shutdown` is cancelled: connects, takes leases, fetches;
/// then finishes in-flight batches, releases the leases and returns.
pub async fn run_with(
    config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = match service::start(&config, Component::ImapFetcher, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let names: Vec<String> = config
        .incoming_mail
        .iter()
        .filter(|m| m.protocol() == Protocol::Imap)
        .map(|m| m.name.clone())
        .collect();
    raise_open_files_limit(names.len());
    let tls = common::tls::client_config(config.tls.extra_ca_file.as_deref())?;
    let tokens = TokenClient::new(
        service.redis.clone(),
        service.keys.clone(),
        &config.token_broker.encryption,
    );
    let metrics = Metrics::new(&service.admin.registry, Protocol::Imap);
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        config: Arc::clone(&config),
        instance: service.instance.clone(),
        keys: service.keys.clone(),
        redis: service.redis.clone(),
        amqp: AmqpLink::new(
            Arc::clone(&config),
            format!("imap-fetcher:{}", service.instance),
            service.amqp,
        ),
        exchange: service.topology.exchange.clone(),
        window: options.window,
        tls,
        tokens,
        metrics: metrics.clone(),
        heartbeat: service.heartbeat.clone(),
        backoff: (options.backoff_initial, options.backoff_max),
    });
    let lease_metrics = metrics.clone();
    let leases = Leases::new(
        service.redis.clone(),
        service.keys.clone(),
        Protocol::Imap.as_str(),
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
    tracing::info!(configs = names.len(), instance = %service.instance, lease_ttl_s = options.lease_ttl.as_secs(), "imap fetcher running");
    service.admin.set_ready(true);
    let mut workers = Workers {
        shared: Arc::clone(&shared),
        running: HashMap::new(),
    };
    leases.run(&mut workers, shutdown.clone()).await;
    service.admin.set_ready(false);
    shared.amqp.close().await;
    let _ = service.admin_server.task.await;
    tracing::info!("imap fetcher stopped");
    Ok(())
}

struct Running {
    graceful: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts and stops mailbox workers as leases come and go.
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
        if let Some(mut r) = self.running.remove(config) {
            r.graceful.cancel();
            if tokio::time::timeout(STOP_GRACE, &mut r.task).await.is_err() {
                tracing::warn!(
                    config,
                    "worker did not finish its batch in time; cut off (unconfirmed mail stays unflagged)"
                );
                r.task.abort();
            }
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
        let stopping: Vec<(String, Running)> = configs
            .iter()
            .filter_map(|c| self.running.remove(c).map(|r| (c.clone(), r)))
            .collect();
        for (_, r) in &stopping {
            r.graceful.cancel();
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for (config, mut r) in stopping {
            if tokio::time::timeout_at(deadline, &mut r.task)
                .await
                .is_err()
            {
                tracing::warn!(
                    config,
                    "worker did not finish its batch in time; cut off (unconfirmed mail stays unflagged)"
                );
                r.task.abort();
            }
        }
        self.publish_owned();
    }
}

/// Raises the open-files soft limit as far as the hard limit allows (each
/// mail config holds a TLS connection), and warns when that is too low.
pub fn raise_open_files_limit(configs: usize) {
    let wanted = (configs as u64) * 2 + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            configs,
            "open-files limit is too low for this many mail configs; raise the hard limit (ulimit -Hn)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}
