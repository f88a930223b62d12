//! The supervisor of a fetcher replica: starts the service (Redis,
//! RabbitMQ, admin endpoints, heartbeat), takes its fair share of the
//! leases on its protocol's mail configs, runs one worker per lease, and
//! at shutdown lets the workers finish their batches, releases the leases
//! and closes the connection.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::error::Failure;
use super::lease::{LeaseChange, LeaseClock, LeaseHolder, Leases};
use super::metrics::FetchMetrics;
use super::options::Options;
use super::publish::AmqpLink;
use super::worker::{self, Kit, Mailbox};
use crate::config::{Component, Config, Protocol as MailProtocol};
use crate::service::{self, StartError};
use crate::token::TokenClient;

/// How long a stopping worker may take to finish its batch (confirms, then
/// flags or deletions) before it is cut off; well inside the lease
/// time-to-live, and keeps shutdown within 10 s.
pub const STOP_GRACE: Duration = Duration::from_secs(7);

/// A mail protocol: the only thing the IMAP and POP3 fetchers do
/// differently.
pub trait Protocol: Send + Sync + 'static {
    /// The protocol's errors, wrapping the shared [`super::FetchError`].
    type Error: Failure;

    /// The mail configs this fetcher serves (`imap`/`imaps` or
    /// `pop3`/`pop3s`); it also names the fetcher's component.
    const PROTOCOL: MailProtocol;

    /// One session on `mailbox`: log in, hand over what is new, and return
    /// `Ok` when done — the next session starts after `poll-interval` —
    /// or when `mailbox.graceful` asks it to stop (after finishing the batch
    /// in flight). A protocol that stays connected between passes (IMAP
    /// IDLE) returns only then. Each successful pass calls
    /// [`Mailbox::passed`].
    fn session<'a>(
        &'a self,
        mailbox: &'a Mailbox,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'a;
}

/// The component (heartbeat and log name) of a fetcher of `protocol`.
pub fn component(protocol: MailProtocol) -> Component {
    match protocol {
        MailProtocol::Imap => Component::ImapFetcher,
        MailProtocol::Pop3 => Component::PopFetcher,
    }
}

/// Runs a fetcher of `protocol` until `shutdown` is cancelled: connects,
/// takes leases, fetches; then finishes in-flight batches, releases the
/// leases and returns. The binary reads `options` from its environment
/// ([`Options::from_env`]); tests build them.
pub async fn run<P: Protocol>(
    protocol: P,
    config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = component(P::PROTOCOL);
    let service = match service::start(&config, component, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(StartError::Fatal(e)) => return Err(e.into()),
    };
    let names: Vec<String> = config
        .incoming_mail
        .iter()
        .filter(|m| m.protocol() == P::PROTOCOL)
        .map(|m| m.name.clone())
        .collect();
    raise_open_files_limit(names.len());
    for warning in config.warnings() {
        tracing::warn!(component = component.name(), "{warning}");
    }
    let tls = crate::tls::client_config(config.tls.extra_ca_file.as_deref())?;
    let tokens = TokenClient::new(
        service.redis.clone(),
        service.keys.clone(),
        &config.token_broker.encryption,
    );
    let metrics = FetchMetrics::new(&service.admin.registry, P::PROTOCOL);
    let config = Arc::new(config);
    let kit = Arc::new(Kit {
        config: Arc::clone(&config),
        instance: service.instance.clone(),
        keys: service.keys.clone(),
        redis: service.redis.clone(),
        amqp: AmqpLink::new(
            Arc::clone(&config),
            format!("{}:{}", component.name(), service.instance),
            service.amqp,
        ),
        exchange: service.topology.exchange.clone(),
        tls,
        tokens,
        metrics: metrics.clone(),
        heartbeat: service.heartbeat.clone(),
        options: options.clone(),
    });
    let leases = Leases::new(
        service.redis.clone(),
        service.keys.clone(),
        P::PROTOCOL.as_str(),
        &service.instance,
        names.clone(),
        options.lease_ttl,
    )
    .on_change(move |_, change| {
        metrics
            .lease_changes
            .with_label_values(&[change.as_str()])
            .inc();
        match change {
            LeaseChange::Acquired => metrics.leases_held.inc(),
            _ => metrics.leases_held.dec(),
        }
    });
    tracing::info!(component = component.name(), configs = names.len(), instance = %service.instance, lease_ttl_s = options.lease_ttl.as_secs(), "fetcher running");
    service.admin.set_ready(true);
    let mut workers = Workers {
        protocol: Arc::new(protocol),
        kit: Arc::clone(&kit),
        running: HashMap::new(),
    };
    leases.run(&mut workers, shutdown.clone()).await;
    service.admin.set_ready(false);
    kit.amqp.close().await;
    let _ = service.admin_server.task.await;
    tracing::info!(component = component.name(), "fetcher stopped");
    Ok(())
}

struct Running {
    graceful: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts and stops mailbox workers as leases come and go.
struct Workers<P> {
    protocol: Arc<P>,
    kit: Arc<Kit>,
    running: HashMap<String, Running>,
}

impl<P> Workers<P> {
    /// The heartbeat lists the configs this replica works on.
    fn publish_owned(&self) {
        let mut owns: Vec<String> = self.running.keys().cloned().collect();
        owns.sort();
        self.kit.heartbeat.update(|s| s.owns = owns);
    }

    /// Asks the workers of `configs` to finish, and waits for them until
    /// `deadline`; a worker still busy then is cut off.
    async fn finish(&mut self, configs: &[String], deadline: tokio::time::Instant) {
        let stopping: Vec<(String, Running)> = configs
            .iter()
            .filter_map(|c| self.running.remove(c).map(|r| (c.clone(), r)))
            .collect();
        for (_, r) in &stopping {
            r.graceful.cancel();
        }
        for (config, mut r) in stopping {
            if tokio::time::timeout_at(deadline, &mut r.task)
                .await
                .is_err()
            {
                tracing::warn!(
                    config,
                    "worker did not finish its batch in time; cut off (unconfirmed mail stays on the server, unflagged)"
                );
                r.task.abort();
                let _ = r.task.await;
            }
        }
        self.publish_owned();
    }
}

impl<P: Protocol> LeaseHolder for Workers<P> {
    async fn start(&mut self, config: &str, clock: LeaseClock) {
        let Some(cfg) = self.kit.config.mail_config(config).cloned() else {
            return;
        };
        if let Some(old) = self.running.remove(config) {
            old.task.abort();
        }
        let graceful = CancellationToken::new();
        let mailbox = Mailbox::new(Arc::clone(&self.kit), cfg, graceful.clone(), clock);
        let task = tokio::spawn(worker::run(Arc::clone(&self.protocol), mailbox));
        self.running
            .insert(config.to_string(), Running { graceful, task });
        self.publish_owned();
    }

    async fn stop(&mut self, config: &str) {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        self.finish(&[config.to_string()], deadline).await;
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
        self.finish(configs, deadline).await;
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
