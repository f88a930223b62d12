//! `form-processor`: consumes fetched mail and performs the CREATE action
//! (spec §6): each offline Excel form becomes one record, exactly once.
//!
//! [`run`] is the whole service; `main.rs` only parses arguments and loads
//! the configuration, so tests drive it without a process. The modules, in
//! the order a message meets them:
//!
//! - [`consumer`]: one delivery from dedupe check to ack;
//! - [`analyze`]: the pure checks — [`mime`] parsing, [`route`] (topic,
//!   sender, authentication), [`workbook`] (guard rails, typed cells) and
//!   [`objectmap`] (the `Tririga Object Map` interpreter);
//! - [`store`]: the SQLite/PostgreSQL record store;
//! - [`deadletter`]: confirmed publishes to the dead-letter exchange.

pub mod analyze;
pub mod consumer;
pub mod deadletter;
pub mod metrics;
pub mod mime;
pub mod objectmap;
pub mod reject;
pub mod route;
pub mod store;
pub mod value;
pub mod workbook;

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
            match store::Store::open(store_url.expose(), Some(observe.clone())).await {
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

    let channel = service.amqp.create_channel().await?;
    channel
        .basic_qos(config.form_processor.prefetch, BasicQosOptions::default())
        .await?;
    let dead =
        deadletter::DeadLetters::open(&service.amqp, &service.topology.dead_exchange).await?;
    let tag = format!("form-processor:{}", service.instance);
    let mut consumer = channel
        .basic_consume(
            &service.topology.create_queue,
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
        topics: config.topics.clone(),
        store: store.clone(),
        dead,
        redis: service.redis.clone(),
        keys: service.keys.clone(),
        metrics,
        parsing: tokio::sync::Semaphore::new(cores),
        shutdown: shutdown.clone(),
        heartbeat: service.heartbeat.clone(),
        hooks,
    });
    service.admin.set_ready(true);
    tracing::info!(queue = %service.topology.create_queue, prefetch = config.form_processor.prefetch, "consuming");

    let mut tasks = tokio::task::JoinSet::new();
    let mut failure: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
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
    service.admin.set_ready(false);
    let _ = channel
        .basic_cancel(&tag, BasicCancelOptions::default())
        .await;
    if failure.is_some() {
        shutdown.cancel();
    }
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
    let _ = channel.close(200, "shutdown").await;
    ctx.dead.close().await;
    let _ = service.amqp.close(200, "shutdown").await;
    store.close().await;
    shutdown.cancel();
    let _ = service.admin_server.task.await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
