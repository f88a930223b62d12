//! `form-processor`: consumes fetched mail and performs the CREATE action
//! (spec §6): each offline Excel form becomes one record, exactly once.
//!
//! [`run`] is the whole service; `main.rs` only parses arguments and loads
//! the configuration, so tests drive it without a process. The modules, in
//! the order a message meets them:
//!
//! - [`consumer`]: one delivery from dedupe check to ack;
//! - [`analyze`]: the pure checks — [`mime`] parsing, [`route`] (topic,
//!   sender, and [`sender_auth`] for the authentication check),
//!   [`workbook`] (guard rails, typed cells) and
//!   [`objectmap`] (the `Tririga Object Map` interpreter);
//! - [`store`]: the SQLite/PostgreSQL record store;
//! - [`deadletter`]: confirmed publishes to the dead-letter exchange;
//! - [`acks`]: the channel's acks, one `multiple` ack per commit's worth;
//! - [`broker_dead`]: records the dead letters RabbitMQ made on its own.

pub mod acks;
pub mod analyze;
pub mod broker_dead;
pub mod consumer;
pub mod deadletter;
pub mod metrics;
pub mod mime;
pub mod objectmap;
pub mod reject;
pub mod route;
pub mod sender_auth;
pub mod store;
pub mod value;
pub mod workbook;
pub mod xlsx;

use std::sync::Arc;
use std::time::Duration;

use common::service::{self, StartError};
use common::shutdown::CancellationToken;
use common::{Component, Config};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

pub use consumer::Hooks;

/// How long in-flight messages may take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs until `shutdown` is cancelled: connects, opens the store, consumes
/// `<prefix>.create`, and on shutdown stops consuming, lets in-flight
/// messages finish and closes the channel so unacked ones are redelivered.
/// A lost RabbitMQ connection ends only the consuming session: the service
/// reconnects with backoff and goes on.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, Hooks::default()).await
}

/// [`run`] with test hooks.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let service = match service::start(&config, Component::FormProcessor, &shutdown).await {
        Ok(s) => s,
        Err(StartError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let metrics = metrics::Metrics::new(&service.admin.registry);
    let observe: store::BatchObserver = {
        let m = metrics.clone();
        Arc::new(move |n, took| {
            m.batch_size.observe(n as f64);
            m.store.observe(took.as_secs_f64());
        })
    };
    let store_url = config.form_processor.store.clone();
    let store = {
        let mut backoff =
            common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let synchronous = config.form_processor.sqlite_synchronous;
            match store::Store::open_with(store_url.expose(), Some(observe.clone()), synchronous)
                .await
            {
                Ok(s) => break s,
                Err(e) if e.is_transient() => {
                    let wait = backoff.next_delay();
                    tracing::warn!(store = %store_url, error = %e, "cannot open the record store yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => return Err(anyhow::anyhow!("record store {store_url}: {e}")),
            }
        }
    };
    tracing::info!(store = %store_url, "record store open");

    let mut conn = service.amqp;
    let session = Session {
        config: &config,
        topology: &service.topology,
        store: &store,
        redis: &service.redis,
        keys: &service.keys,
        metrics: &metrics,
        heartbeat: &service.heartbeat,
        admin: &service.admin,
        instance: &service.instance,
        hooks: &hooks,
        shutdown: &shutdown,
    };
    // One consuming session per AMQP connection. A lost connection (a
    // RabbitMQ restart, a network cut) ends the session: its in-flight
    // messages go back to the queue, and a new connection is made with
    // backoff, as at start; only shutdown ends the loop.
    let mut outcome;
    // Between sessions, so that a session that fails at once (a consumer
    // refused, say) does not spin; reset after a session that lasted.
    let mut backoff =
        common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let started = tokio::time::Instant::now();
        outcome = session.consume(&conn).await;
        let _ = conn.close(200, "session over").await;
        let lost = match &outcome {
            Ok(()) => break,
            Err(e) => e,
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        let lost = format!("{lost:#}");
        tracing::warn!(error = %lost, retry_in_ms = wait.as_millis() as u64, "lost the RabbitMQ session; reconnecting");
        // `mailagent status` shows it until the next session starts.
        service
            .heartbeat
            .update(|s| s.last_error = Some(format!("RabbitMQ session lost: {lost}")));
        tokio::select! {
            _ = shutdown.cancelled() => {
                outcome = Ok(());
                break;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        let name = format!("{}:{}", Component::FormProcessor.name(), service.instance);
        conn = match service::retry_transient("reconnect to RabbitMQ", &shutdown, || async {
            let conn = common::connect::amqp(&config, &name).await?;
            service::declare_topology(&conn, &config).await?;
            Ok(conn)
        })
        .await
        {
            Ok(conn) => conn,
            Err(StartError::Cancelled) => {
                outcome = Ok(());
                break;
            }
            Err(StartError::Fatal(e)) => {
                outcome = Err(e.into());
                break;
            }
        };
        tracing::info!("reconnected to RabbitMQ");
        service.heartbeat.update(|s| s.last_error = None);
    }

    store.close().await;
    shutdown.cancel();
    let _ = service.admin_server.task.await;
    outcome
}

/// What one consuming session shares with the service.
struct Session<'a> {
    config: &'a Config,
    topology: &'a common::topology::Topology,
    store: &'a store::Store,
    redis: &'a common::RedisHandle,
    keys: &'a common::keys::Keys,
    metrics: &'a metrics::Metrics,
    heartbeat: &'a common::heartbeat::Heartbeat,
    admin: &'a common::admin::AdminState,
    instance: &'a str,
    hooks: &'a Hooks,
    shutdown: &'a CancellationToken,
}

impl Session<'_> {
    /// Consumes on `conn` until shutdown (`Ok`) or until the connection or
    /// the consumer fails (`Err`). Either way it stops taking work, lets
    /// in-flight messages finish (those whose channel is gone are
    /// redelivered) and closes the channel.
    async fn consume(&self, conn: &lapin::Connection) -> anyhow::Result<()> {
        let config = self.config;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(config.form_processor.prefetch, BasicQosOptions::default())
            .await?;
        let dead = deadletter::DeadLetters::open(conn, &self.topology.dead_exchange).await?;
        let tag = format!("form-processor:{}", self.instance);
        let mut consumer = channel
            .basic_consume(
                &self.topology.create_queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let ctx = Arc::new(consumer::Context {
            config: config.form_processor.clone(),
            inline_config: consumer::inline_config(&config.form_processor),
            topics: config.topics.clone(),
            store: self.store.clone(),
            dead,
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            metrics: self.metrics.clone(),
            parsing: tokio::sync::Semaphore::new(cores),
            shutdown: self.shutdown.clone(),
            heartbeat: self.heartbeat.clone(),
            hooks: self.hooks.clone(),
            failures: Default::default(),
            session_over: CancellationToken::new(),
            acks: acks::Acks::new(channel.clone()),
        });
        self.admin.set_ready(true);
        tracing::info!(queue = %self.topology.create_queue, prefetch = config.form_processor.prefetch, "consuming");

        let mut tasks = tokio::task::JoinSet::new();
        let mut failure: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = ctx.dead.broken() => {
                    failure = Some(anyhow::anyhow!("the dead-letter channel failed"));
                    break;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        ctx.acks.delivered(delivery.delivery_tag).await;
                        tasks.spawn(consumer::handle(ctx.clone(), delivery));
                    }
                    Some(Err(e)) => {
                        failure = Some(anyhow::anyhow!("the AMQP consumer failed: {e}"));
                        break;
                    }
                    None => {
                        failure = Some(anyhow::anyhow!("the AMQP consumer was cancelled by the broker"));
                        break;
                    }
                }
            }
        }

        // Stop taking work, finish what is in flight, then close: unacked
        // messages go back to the queue.
        self.admin.set_ready(false);
        ctx.session_over.cancel();
        let _ = channel
            .basic_cancel(&tag, BasicCancelOptions::default())
            .await;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "in-flight messages did not finish in time; they will be redelivered"
            );
            tasks.abort_all();
        }
        let _ = ctx.acks.flush().await;
        let _ = channel.close(200, "shutdown").await;
        ctx.dead.close().await;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
