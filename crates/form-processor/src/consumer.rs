//! One delivery, start to ack (§6, §8): dedupe first, poison guard, the
//! checks, then one store transaction, then — for a rejection — a confirmed
//! dead-letter publish, and only then the ack. Store outages are retried
//! with capped backoff for as long as they last.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backoff::Backoff;
use common::config::{FormProcessorConfig, Topic};
use common::envelope::Envelope;
use common::keys::Keys;
use common::RedisHandle;
use lapin::message::Delivery;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::acks::Acks;
use crate::analyze::{self, Analysis, MailInfo};
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::reject::{Reason, Rejection};
use crate::store::{self, Created, Known, NewFailure, Source, Store, Stored};

/// Test-only behaviour, reachable from the library API only.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Processing panics for a mail whose subject contains this text (to
    /// prove the poison guard).
    pub panic_on_subject: Option<String>,
}

/// Everything a delivery handler needs, shared.
pub struct Context {
    /// `[form-processor]`
    pub config: FormProcessorConfig,
    /// `config` for an inline parse ([`inline_config`]).
    pub inline_config: FormProcessorConfig,
    /// `[[topics]]`
    pub topics: Vec<Topic>,
    /// The record store.
    pub store: Store,
    /// Dead-letter publisher.
    pub dead: DeadLetters,
    /// Redis, for the poison guard's delivery counts.
    pub redis: RedisHandle,
    /// Redis key names.
    pub keys: Keys,
    /// Metrics.
    pub metrics: Metrics,
    /// Bounds parsing on the blocking pool (large mails) to the number of
    /// cores (and so its memory).
    pub parsing: Semaphore,
    /// Cancelled on shutdown: retry loops give up and leave the message unacked.
    pub shutdown: CancellationToken,
    /// Counts handled messages in the heartbeat.
    pub heartbeat: common::heartbeat::Heartbeat,
    /// Test hooks.
    pub hooks: Hooks,
    /// The run of settle failures under way (a dead-letter queue gone, a
    /// store outage): the requeue pause grows with its age.
    pub failures: FailureRun,
    /// Cancelled when this consuming session ends: a requeue pause ends
    /// at once (the message goes back now, or with the channel).
    pub session_over: CancellationToken,
    /// The consuming channel's acks, coalesced.
    pub acks: Acks,
}

/// How a delivery was settled.
enum Settled {
    /// Acked with this outcome and reason (for metrics).
    Acked(&'static str, &'static str),
    /// Left unacked (shutdown): the broker redelivers it.
    Left,
}

/// Handles one delivery; never panics outward. A panic inside processing
/// is logged and the delivery requeued, so the poison guard can count it.
pub async fn handle(ctx: Arc<Context>, mut delivery: Delivery) {
    use futures::FutureExt;
    // The body is held once, shared with the parser and the dead-letter
    // publish: one copy per prefetched message.
    let body = Arc::new(std::mem::take(&mut delivery.data));
    let started = Instant::now();
    ctx.metrics.in_flight.inc();
    let span = tracing::info_span!("form", dedupe_key = tracing::field::Empty);
    if let Some(tp) = traceparent(&delivery) {
        common::telemetry::set_remote_parent(&span, &tp);
    }
    let result = std::panic::AssertUnwindSafe(process(&ctx, &delivery, &body).instrument(span))
        .catch_unwind()
        .await;
    ctx.metrics.in_flight.dec();
    match result {
        Ok(Ok(Settled::Acked(outcome, reason))) => {
            ctx.failures.settled();
            if let Err(e) = ctx.acks.ack(delivery.delivery_tag).await {
                tracing::warn!(error = %e, "cannot ack; the message will be redelivered and found settled");
            }
            ctx.metrics
                .messages
                .with_label_values(&[outcome, reason])
                .inc();
            ctx.metrics
                .processing
                .observe(started.elapsed().as_secs_f64());
            ctx.heartbeat.update(|s| s.handled += 1);
        }
        Ok(Ok(Settled::Left)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot settle the message; it goes back to the queue");
            ctx.heartbeat.update(|s| s.last_error = Some(e.to_string()));
            requeue(&ctx, &delivery).await;
        }
        Err(_) => {
            tracing::error!("processing panicked; the message goes back to the queue and counts as a poison attempt");
            requeue(&ctx, &delivery).await;
        }
    }
}

/// Shortest requeue pause.
const REQUEUE_PAUSE_MIN: Duration = Duration::from_millis(200);
/// Longest requeue pause.
const REQUEUE_PAUSE_MAX: Duration = Duration::from_secs(30);

/// The run of settle failures under way, shared by the session's
/// deliveries. The pause before a requeue is the run's age (between 200 ms
/// and 30 s), so each retry waits about as long as the outage has lasted:
/// doubling per round of retries, whatever the number of messages in
/// flight. (Counting failures instead made one short blip that failed a
/// full prefetch window pause every message for 30 s.)
#[derive(Debug, Default)]
pub struct FailureRun {
    since: std::sync::Mutex<Option<Instant>>,
}

impl FailureRun {
    /// A failure at `now`: the pause before its requeue.
    pub fn failed(&self, now: Instant) -> Duration {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        let age = now.saturating_duration_since(*since.get_or_insert(now));
        age.clamp(REQUEUE_PAUSE_MIN, REQUEUE_PAUSE_MAX)
    }

    /// A message settled: the run is over.
    pub fn settled(&self) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Puts the delivery back after a pause that grows with the failure run
/// (so a dead-letter queue that is gone is not hammered), at once when the
/// session or the process ends.
async fn requeue(ctx: &Context, delivery: &Delivery) {
    let pause = ctx.failures.failed(Instant::now());
    tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        _ = ctx.session_over.cancelled() => {}
        _ = tokio::time::sleep(pause) => {}
    }
    let _ = ctx.acks.requeue(delivery.delivery_tag).await;
}

/// The failure id a replayed message carries (`x-replay`).
fn replay_of(delivery: &Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(common::envelope::headers::REPLAY)? {
        lapin::types::AMQPValue::LongLongInt(id) => Some(*id),
        lapin::types::AMQPValue::LongInt(id) => Some(i64::from(*id)),
        _ => None,
    }
}

fn traceparent(delivery: &Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers
        .inner()
        .get(common::envelope::headers::TRACEPARENT)?
    {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        _ => None,
    }
}

/// Retries `op` while it fails transiently; `None` when shutdown came first.
async fn retry<T, F, Fut>(ctx: &Context, what: &str, mut op: F) -> Option<store::Result<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = store::Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match op().await {
            Err(e) if e.is_transient() => {
                ctx.metrics.store_retries.inc();
                let wait = backoff.next_delay();
                if backoff.attempts() == 1 || backoff.attempts() % 10 == 0 {
                    tracing::warn!(error = %e, attempts = backoff.attempts(), "cannot {what} yet; retrying");
                }
                ctx.heartbeat.update(|s| s.last_error = Some(e.to_string()));
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            other => return Some(other),
        }
    }
}

/// Why settling failed (the message is requeued).
#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error(transparent)]
    DeadLetter(#[from] crate::deadletter::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("cannot analyze the message: {0}")]
    Join(String),
}

macro_rules! or_leave {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(Settled::Left),
        }
    };
}

async fn process(
    ctx: &Arc<Context>,
    delivery: &Delivery,
    body: &Arc<Vec<u8>>,
) -> Result<Settled, SettleError> {
    // The envelope's metadata; its body stays in `body`.
    let envelope = match Envelope::from_amqp(&delivery.properties, Vec::new()) {
        Ok(e) => e,
        Err(e) => {
            let key = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .filter(|m| m.len() == 64 && m.bytes().all(|b| b.is_ascii_hexdigit()))
                .unwrap_or_else(|| hex_sha256(body));
            let source = Source {
                dedupe_key: key,
                ..Default::default()
            };
            return reject(
                ctx,
                delivery,
                body,
                Rejection::new(Reason::BadEnvelope, e.to_string()),
                None,
                source,
            )
            .await;
        }
    };
    tracing::Span::current().record("dedupe_key", envelope.dedupe_key.as_str());
    let mut source = Source {
        dedupe_key: envelope.dedupe_key.clone(),
        mail_config: envelope.mail_config.clone(),
        mailbox: envelope.mailbox.clone(),
        received_at: envelope.timestamp as i64,
        ..Default::default()
    };

    // A first delivery — not redelivered by the broker, not a replay — is
    // parsed straight away: its dedupe key is checked by the insert that
    // would settle it (`ON CONFLICT`, in the writer's transaction), and a
    // known key found there is acked without a record. Only a redelivery
    // (the processor died, or requeued it) pays the dedupe read before any
    // other check and the poison guard's count: those are what stop a
    // known or poison message from being parsed again.
    let first_delivery = !delivery.redelivered && replay_of(delivery).is_none();
    if !first_delivery {
        if let Some(settled) = settled_before(ctx, delivery, body, &envelope.dedupe_key).await? {
            return Ok(settled);
        }
        // Poison guard: count redeliveries of this key across processes;
        // the first delivery, not counted, is the one more (a replay's
        // deliveries are all counted).
        let uncounted = u64::from(replay_of(delivery).is_none());
        let deliveries = count_delivery(ctx, &envelope.dedupe_key).await + uncounted;
        if deliveries > u64::from(ctx.config.delivery_limit) {
            let r = Rejection::new(
                Reason::Poison,
                format!(
                    "delivered {deliveries} times without completing (limit {})",
                    ctx.config.delivery_limit
                ),
            );
            return reject(ctx, delivery, body, r, None, source).await;
        }
    }

    let Analysis {
        info,
        topic,
        result,
    } = analyze_delivery(ctx, body).await?;
    fill_source(&mut source, &info);

    let settled = match result {
        Ok(accepted) => {
            let topic = accepted.topic.clone();
            let record = accepted.into_record(source.clone());
            let created = or_leave!(
                retry(ctx, "create the record", || ctx
                    .store
                    .create(record.clone()))
                .await
            );
            match created {
                Ok(Created::Record(id)) => {
                    tracing::debug!(record = id, topic = %topic, "created record");
                    Settled::Acked("created", "")
                }
                Ok(Created::AlreadyKnown) => {
                    // Settled before (a duplicate first delivery): as a
                    // rejection not yet dead-lettered, it is dead-lettered now.
                    or_leave!(already_settled(ctx, delivery, body, &envelope.dedupe_key).await?)
                }
                Ok(Created::Duplicate(failure, rejection)) => {
                    let (reason, detail) = (rejection.reason.code(), &rejection.detail);
                    dead_letter(ctx, delivery, body, Some(failure), reason, detail).await?;
                    Settled::Acked("rejected", rejection.reason.code())
                }
                Err(e) => {
                    tracing::error!(error = %e, "the store refused the record");
                    let r = Rejection::new(Reason::Unstorable, e.to_string());
                    reject(ctx, delivery, body, r, Some(topic), source.clone()).await?
                }
            }
        }
        Err(rejection) => reject(ctx, delivery, body, rejection, topic, source.clone()).await?,
    };
    if !first_delivery {
        forget_deliveries(ctx, &envelope.dedupe_key).await;
    }
    Ok(settled)
}

/// Mails up to this size are parsed on the task's own worker thread: at
/// tens of microseconds each, a hand-off to the blocking pool and back
/// (two thread wake-ups) cost about as much as the parse itself
/// (docs/benchmarks.md). Larger mails go to the blocking pool.
pub const INLINE_MAIL_MAX: usize = 64 * 1024;

/// What an inline parse may inflate (below `max-decompressed-bytes`): the
/// bound on how long it holds its worker, what reading 512 KB of XML takes
/// (the bench forms inflate to far less). A workbook that needs more is
/// refused by the inline parse and parsed again on the blocking pool under
/// the configured limit.
pub const INLINE_DECOMPRESSED_MAX: u64 = 512 * 1024;

/// `config` as an inline parse uses it: the decompression limit lowered to
/// [`INLINE_DECOMPRESSED_MAX`].
pub(crate) fn inline_config(config: &FormProcessorConfig) -> FormProcessorConfig {
    FormProcessorConfig {
        max_decompressed_bytes: config.max_decompressed_bytes.min(INLINE_DECOMPRESSED_MAX),
        ..config.clone()
    }
}

/// The checks of one mail (§6): inline when the mail is small and its
/// workbook inflates to little, else on the blocking pool (bounded by
/// `Context::parsing`). A panic in them reaches [`handle`]'s guard either
/// way.
async fn analyze_delivery(
    ctx: &Arc<Context>,
    body: &Arc<Vec<u8>>,
) -> Result<Analysis, SettleError> {
    fn run(body: &[u8], config: &FormProcessorConfig, ctx: &Context) -> Analysis {
        let analysis = analyze::analyze(body, config, &ctx.topics);
        if let Some(p) = &ctx.hooks.panic_on_subject {
            if analysis.info.subject.contains(p.as_str()) {
                panic!(
                    "test hook: processing panics for subject {:?}",
                    analysis.info.subject
                );
            }
        }
        analysis
    }
    if body.len() <= INLINE_MAIL_MAX {
        let analysis = run(body, &ctx.inline_config, ctx);
        let over_inline_limit = matches!(&analysis.result,
            Err(r) if r.reason == Reason::DecompressedTooLarge)
            && ctx.inline_config.max_decompressed_bytes < ctx.config.max_decompressed_bytes;
        if !over_inline_limit {
            return Ok(analysis);
        }
    }
    let permit = ctx
        .parsing
        .acquire()
        .await
        .map_err(|e| SettleError::Join(e.to_string()))?;
    let parsed = Arc::clone(body);
    let shared = Arc::clone(ctx);
    let joined = tokio::task::spawn_blocking(move || run(&parsed, &shared.config, &shared)).await;
    drop(permit);
    match joined {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(SettleError::Join(e.to_string())),
    }
}

/// The dedupe read, retried while the store is out: what the key settled,
/// if anything; `None` when shutdown came first.
async fn lookup(ctx: &Context, dedupe_key: &str) -> Result<Option<Option<Known>>, SettleError> {
    match retry(ctx, "look up the dedupe key", || {
        ctx.store.lookup(dedupe_key)
    })
    .await
    {
        Some(known) => Ok(Some(known?)),
        None => Ok(None),
    }
}

/// The dedupe read before any other check (a redelivery or a replay):
/// `Some` when the key is settled and the delivery was settled with it; a
/// replayed failure is forgotten so that the mail is processed afresh.
async fn settled_before(
    ctx: &Context,
    delivery: &Delivery,
    body: &[u8],
    dedupe_key: &str,
) -> Result<Option<Settled>, SettleError> {
    let Some(known) = lookup(ctx, dedupe_key).await? else {
        return Ok(Some(Settled::Left));
    };
    match known {
        Some(Known::Record(id)) => {
            tracing::debug!(
                record = id,
                "already created; acking the duplicate delivery"
            );
            Ok(Some(Settled::Acked("already-known", "")))
        }
        Some(Known::Failure { id, .. }) if replay_of(delivery) == Some(id) => {
            // `mailagent dead-letters replay`: forget the failure, then
            // process the mail afresh.
            match retry(ctx, "forget a replayed failure", || {
                ctx.store.forget(dedupe_key)
            })
            .await
            {
                Some(forgot) => forgot?,
                None => return Ok(Some(Settled::Left)),
            };
            // Its earlier deliveries do not count against the poison guard.
            let mut redis = ctx.redis.clone();
            let _: redis::RedisResult<()> =
                redis::AsyncCommands::del(&mut redis, ctx.keys.deliveries(dedupe_key)).await;
            tracing::info!(
                failure = id,
                "replayed failure forgotten; processing afresh"
            );
            Ok(None)
        }
        Some(Known::Failure {
            id,
            reason,
            detail,
            dead_lettered,
        }) => {
            if !dead_lettered {
                dead_letter(ctx, delivery, body, Some(id), &reason, &detail).await?;
            }
            Ok(Some(Settled::Acked("already-known", "")))
        }
        None => Ok(None),
    }
}

/// A key the store found settled when asked to settle it: acked, after a
/// rejection that is not dead-lettered yet is dead-lettered. `None` when
/// shutdown came first.
async fn already_settled(
    ctx: &Context,
    delivery: &Delivery,
    body: &[u8],
    dedupe_key: &str,
) -> Result<Option<Settled>, SettleError> {
    let Some(known) = lookup(ctx, dedupe_key).await? else {
        return Ok(None);
    };
    if let Some(Known::Failure {
        id,
        reason,
        detail,
        dead_lettered: false,
    }) = known
    {
        dead_letter(ctx, delivery, body, Some(id), &reason, &detail).await?;
    }
    Ok(Some(Settled::Acked("already-known", "")))
}

fn fill_source(source: &mut Source, info: &MailInfo) {
    source.message_id = info.message_id.clone();
    source.sender = info.sender.clone();
    source.subject = info.subject.clone();
    if source.received_at == 0 {
        source.received_at = info.date.unwrap_or(0);
    }
}

/// Stores the rejection, then dead-letters the message.
async fn reject(
    ctx: &Context,
    delivery: &Delivery,
    body: &[u8],
    rejection: Rejection,
    topic: Option<String>,
    source: Source,
) -> Result<Settled, SettleError> {
    tracing::info!(reason = rejection.reason.code(), detail = %rejection.detail, "rejected message");
    let failure = NewFailure {
        rejection: rejection.clone(),
        topic,
        source,
    };
    let stored = or_leave!(
        retry(ctx, "store the rejection", || ctx
            .store
            .reject(failure.clone()))
        .await
    );
    let failure = match stored {
        Ok(Stored::Failure(id)) => Some(id),
        // Stored before (a commit whose answer was lost, or another copy of
        // the mail): dead-letter it unless that is done already.
        Ok(Stored::AlreadyKnown) => {
            return Ok(or_leave!(
                already_settled(ctx, delivery, body, &failure.source.dedupe_key).await?
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store the rejection; dead-lettering it anyway");
            None
        }
    };
    let (reason, detail) = (rejection.reason.code(), &rejection.detail);
    dead_letter(ctx, delivery, body, failure, reason, detail).await?;
    let outcome = if rejection.reason == Reason::Poison {
        "poison"
    } else {
        "rejected"
    };
    Ok(Settled::Acked(outcome, rejection.reason.code()))
}

/// Publishes the message to the dead-letter exchange with its reason
/// (confirmed), then notes that on its stored failure, if any.
async fn dead_letter(
    ctx: &Context,
    delivery: &Delivery,
    body: &[u8],
    failure: Option<i64>,
    reason: &str,
    detail: &str,
) -> Result<(), SettleError> {
    ctx.dead
        .publish(&delivery.properties, body, reason, detail)
        .await?;
    let Some(failure) = failure else {
        return Ok(());
    };
    if let Err(e) = ctx.store.mark_dead_lettered(failure).await {
        tracing::warn!(error = %e, failure, "cannot mark the failure dead-lettered; a redelivery would publish it again");
    }
    Ok(())
}

/// Increments this key's delivery count (kept a day). Redis trouble is
/// logged and counts as a first delivery: processing goes on unguarded.
async fn count_delivery(ctx: &Context, dedupe_key: &str) -> u64 {
    let key = ctx.keys.deliveries(dedupe_key);
    let mut redis = ctx.redis.clone();
    let result: redis::RedisResult<(u64, bool)> = redis::pipe()
        .atomic()
        .incr(&key, 1u64)
        .expire(&key, 86_400)
        .query_async(&mut redis)
        .await;
    match result {
        Ok((n, _)) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the delivery in Redis; the poison guard is off for it");
            1
        }
    }
}

async fn forget_deliveries(ctx: &Context, dedupe_key: &str) {
    let mut redis = ctx.redis.clone();
    let _: redis::RedisResult<u64> = redis::cmd("DEL")
        .arg(ctx.keys.deliveries(dedupe_key))
        .query_async(&mut redis)
        .await;
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blip that fails a whole prefetch window at once pauses each of
    /// its messages the shortest time, not longer per message; the pause
    /// then grows with the run's age up to the cap, and a settled message
    /// ends the run.
    #[test]
    fn the_requeue_pause_follows_the_failure_runs_age_not_its_count() {
        let run = FailureRun::default();
        let t0 = Instant::now();
        for _ in 0..64 {
            assert_eq!(run.failed(t0), REQUEUE_PAUSE_MIN);
        }
        assert_eq!(
            run.failed(t0 + Duration::from_millis(100)),
            REQUEUE_PAUSE_MIN
        );
        assert_eq!(
            run.failed(t0 + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(run.failed(t0 + Duration::from_secs(600)), REQUEUE_PAUSE_MAX);
        run.settled();
        let later = t0 + Duration::from_secs(900);
        assert_eq!(run.failed(later), REQUEUE_PAUSE_MIN);
        assert_eq!(
            run.failed(later + Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
