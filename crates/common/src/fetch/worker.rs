//! One mail config's worker while its replica holds the lease: runs the
//! protocol's sessions one after the other, retrying failed ones with
//! backoff, and reports them in the heartbeat and the metrics.
//!
//! The rules every fetcher follows, written once:
//!
//! - **Heartbeat:** a failed session sets the instance's `last-error` to
//!   `<config>: <error>`; a successful pass clears it only when it is that
//!   same config's error, so one mailbox's success never hides another's
//!   failure.
//! - **Backoff:** transient failures wait a full-jitter backoff from
//!   `backoff-initial` up to `backoff-max`; failures that need a person
//!   ([`Failure::needs_human`]) wait on a slower schedule, never less than
//!   8 × the initial wait, and are logged as errors; a successful pass
//!   resets both.
//! - **Lease:** a session is cut off once its lease's local deadline is
//!   within the margin with no renewal (a stalled Redis, a paused process),
//!   and the next starts only when a renewal came through; every change to
//!   the mailbox is preceded by [`Mailbox::fence`].
//! - **Tokens:** a refused token is counted, reported to the token broker
//!   (a forced refresh of exactly that token) and replaced within
//!   `token-wait` — or not, when a graceful stop comes first
//!   ([`Mailbox::replacement`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::redis_handle::RedisHandle;
use tokio_util::sync::CancellationToken;

use super::error::{Failure, FetchError};
use super::lease::{self, LeaseClock};
use super::metrics::FetchMetrics;
use super::options::Options;
use super::publish::AmqpLink;
use super::supervisor::Protocol;
use crate::config::{Config, IncomingMail, MailAuth};
use crate::heartbeat::{now_secs, Heartbeat};
use crate::keys::Keys;
use crate::token::{AccessToken, TokenClient, TokenError};

/// What every worker of a replica shares.
pub struct Kit {
    /// The whole configuration.
    pub config: Arc<Config>,
    /// This replica's instance id (lease owner, `x-fetcher` header).
    pub instance: String,
    /// Redis key names.
    pub keys: Keys,
    /// Redis.
    pub redis: RedisHandle,
    /// RabbitMQ, reconnected on demand.
    pub amqp: AmqpLink,
    /// The exchange to publish to.
    pub exchange: String,
    /// TLS trust for the mail servers.
    pub tls: Arc<rustls::ClientConfig>,
    /// Tokens from the broker.
    pub tokens: TokenClient,
    /// The fetcher's metrics.
    pub metrics: FetchMetrics,
    /// This instance's heartbeat.
    pub heartbeat: Heartbeat,
    /// Tunables.
    pub options: Options,
}

/// One mail config as its worker sees it: the config, the replica's shared
/// parts, the graceful-stop signal and the retry state.
pub struct Mailbox {
    /// The replica's shared parts.
    pub kit: Arc<Kit>,
    /// The mail config.
    pub cfg: IncomingMail,
    /// The application (client) id behind the config, or the login name
    /// for password configs: named in permission errors.
    pub app: String,
    /// Cancelled when the worker should finish its batch and stop.
    pub graceful: CancellationToken,
    /// The local deadline of the lease this work runs under.
    pub lease: LeaseClock,
    retry: Mutex<Retry>,
}

/// The two backoff schedules of a worker.
struct Retry {
    transient: crate::backoff::Backoff,
    human: crate::backoff::Backoff,
}

impl Mailbox {
    /// The worker state of `cfg`, working under the lease `clock`.
    pub fn new(
        kit: Arc<Kit>,
        cfg: IncomingMail,
        graceful: CancellationToken,
        lease: LeaseClock,
    ) -> Self {
        let o = &kit.options;
        let slow = slow_start(o.backoff_initial);
        let retry = Retry {
            transient: crate::backoff::Backoff::new(o.backoff_initial, o.backoff_max),
            human: crate::backoff::Backoff::new(slow, o.backoff_max.max(slow)),
        };
        Self {
            app: app_of(&kit.config, &cfg),
            kit,
            cfg,
            graceful,
            lease,
            retry: Mutex::new(retry),
        }
    }

    /// True once a graceful stop was asked for.
    pub fn stopping(&self) -> bool {
        self.graceful.is_cancelled()
    }

    /// Call before every change to the mailbox (flags, moves, deletes, a
    /// POP3 QUIT that commits DELEs): `Err(LeaseLost)` unless this replica
    /// still holds the lease with more than the margin left, locally and in
    /// Redis ([`lease::fence`]).
    pub async fn fence(&self) -> Result<(), FetchError> {
        let kit = &self.kit;
        let mut redis = kit.redis.clone();
        let name = &self.cfg.name;
        match lease::fence(&mut redis, &kit.keys, name, &kit.instance, &self.lease).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                kit.metrics.fenced.with_label_values(&[name]).inc();
                Err(FetchError::LeaseLost(name.clone()))
            }
            Err(source) => Err(FetchError::Redis {
                action: "check the lease",
                source,
            }),
        }
    }

    /// The profile's current token from Redis. A stored token this fetcher
    /// cannot open (a key it does not have, failed authentication, clear
    /// while keys are configured) is treated as a refused one: the broker is
    /// asked to replace exactly it, and the replacement is awaited up to
    /// `token-wait`; without one the key problem is the error.
    pub async fn token(&self, profile: &str) -> Result<AccessToken, FetchError> {
        let tokens = &self.kit.tokens;
        let problem = match tokens.current(profile).await {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {
                return Err(FetchError::NoToken {
                    profile: profile.to_string(),
                })
            }
            Err(e) if e.is_transient() => return Err(token_error(profile)(e)),
            Err(e) => e,
        };
        let Some(stored) = tokens.stored(profile).await.ok().flatten() else {
            return Err(token_error(profile)(problem));
        };
        tracing::warn!(config = %self.cfg.name, profile, fingerprint = %stored.fingerprint, error = %problem, "cannot open the stored token; asking the broker for a forced refresh");
        let unopenable = AccessToken {
            token: crate::Secret::new(""),
            expires_at: stored.expires_at,
            fingerprint: stored.fingerprint,
        };
        tokens
            .report_failure(profile, &unopenable)
            .await
            .map_err(token_error(profile))?;
        let wait = tokens.wait_for_replacement(profile, &unopenable, self.kit.options.token_wait);
        let replaced = tokio::select! {
            _ = self.graceful.cancelled() => None,
            r = wait => r.map_err(token_error(profile))?,
        };
        replaced.ok_or_else(|| token_error(profile)(problem))
    }

    /// The server refused `refused`: counts it, asks the broker for a forced
    /// refresh of exactly that token, and waits up to `token-wait` for the
    /// replacement. `None` when none came in time or a graceful stop came
    /// first.
    pub async fn replacement(
        &self,
        profile: &str,
        refused: &AccessToken,
    ) -> Result<Option<AccessToken>, FetchError> {
        let name = &self.cfg.name;
        tracing::warn!(config = %name, profile, fingerprint = %refused.fingerprint, "token refused; asking the broker for a forced refresh");
        self.kit
            .metrics
            .errors
            .with_label_values(&[name, "auth"])
            .inc();
        let tokens = &self.kit.tokens;
        tokens
            .report_failure(profile, refused)
            .await
            .map_err(token_error(profile))?;
        let wait = tokens.wait_for_replacement(profile, refused, self.kit.options.token_wait);
        tokio::select! {
            _ = self.graceful.cancelled() => Ok(None),
            r = wait => r.map_err(token_error(profile)),
        }
    }

    /// A permission failure on this mailbox, with what the server said.
    pub fn permission(&self, detail: impl Into<String>) -> FetchError {
        FetchError::Permission {
            mailbox: self.cfg.username.clone(),
            app: self.app.clone(),
            detail: detail.into(),
        }
    }

    /// A pass over the mailbox succeeded: its time is observed, the
    /// heartbeat shows the poll and loses this config's error (no other),
    /// and the retry schedules start again.
    pub fn passed(&self, started: Instant) {
        let name = &self.cfg.name;
        self.kit
            .metrics
            .poll_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let own = format!("{name}: ");
        self.kit.heartbeat.update(|s| {
            s.last_poll = Some(now_secs());
            if s.last_error.as_deref().is_some_and(|e| e.starts_with(&own)) {
                s.last_error = None;
            }
        });
        if let Ok(mut r) = self.retry.lock() {
            r.transient.reset();
            r.human.reset();
        }
    }

    /// A session failed: counted, shown in the heartbeat, logged by its
    /// class. Returns how long to wait before the next one.
    fn failed(&self, e: &impl Failure) -> Duration {
        let name = &self.cfg.name;
        let kind = e.kind();
        self.kit
            .metrics
            .errors
            .with_label_values(&[name, kind])
            .inc();
        let message = format!("{name}: {e}");
        self.kit.heartbeat.update(|s| s.last_error = Some(message));
        let human = e.needs_human();
        let initial = self.kit.options.backoff_initial;
        let wait = match self.retry.lock() {
            Ok(mut r) if human => r.human.next_delay().max(slow_start(initial)),
            Ok(mut r) => r.transient.next_delay(),
            Err(_) => initial,
        };
        let retry_in_ms = wait.as_millis() as u64;
        if human {
            tracing::error!(config = %name, kind, error = %e, retry_in_ms, "mailbox needs attention");
        } else {
            tracing::warn!(config = %name, kind, error = %e, retry_in_ms, "mailbox session failed");
        }
        wait
    }
}

/// Runs `mailbox`'s sessions until its graceful stop (finishing the batch
/// in flight) or a lost lease. Dropping the future stops it at once.
pub(crate) async fn run<P: Protocol>(protocol: Arc<P>, mailbox: Mailbox) {
    let name = mailbox.cfg.name.clone();
    while !mailbox.stopping() {
        if !mailbox.lease.valid() {
            tokio::select! {
                _ = mailbox.graceful.cancelled() => break,
                _ = mailbox.lease.renewed() => {}
            }
        }
        let session = tokio::select! {
            r = protocol.session(&mailbox) => Some(r),
            _ = mailbox.lease.running_out() => None,
        };
        let wait = match session {
            Some(Ok(())) => mailbox.cfg.poll_interval,
            Some(Err(e)) if e.lease_lost() => {
                // Fenced: the lease is running out or another replica holds
                // it. The lease loop stops this worker when the renewal
                // fails; if the renewal comes through, work goes on.
                tracing::warn!(config = %name, error = %e, "lease not held for this change; session ended");
                mailbox.kit.options.lease_ttl / 3
            }
            Some(Err(e)) => mailbox.failed(&e),
            None if mailbox.lease.given_up() => break,
            None => {
                // Cut off before the lease could expire: nothing after this
                // point changes the mailbox. Unconfirmed mail stays as it is.
                tracing::warn!(config = %name, "lease deadline near without a renewal; session cut off");
                mailbox.kit.metrics.fenced.with_label_values(&[&name]).inc();
                Duration::ZERO
            }
        };
        tokio::select! {
            _ = mailbox.graceful.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(config = %name, "worker stopped");
}

/// The shortest wait after a failure that needs a person: 8 × the first
/// transient wait (full jitter would otherwise allow a retry at once).
fn slow_start(initial: Duration) -> Duration {
    initial.saturating_mul(8)
}

/// The application (client) id behind a config, for permission errors.
fn app_of(config: &Config, cfg: &IncomingMail) -> String {
    match &cfg.auth {
        MailAuth::OAuth { profile } => config
            .profile(profile)
            .map(|p| p.application_key.clone())
            .unwrap_or_else(|| profile.clone()),
        MailAuth::Password { .. } => cfg.username.clone(),
    }
}

fn token_error(profile: &str) -> impl FnOnce(TokenError) -> FetchError + '_ {
    move |e| FetchError::Token {
        profile: profile.to_string(),
        detail: e.to_string(),
    }
}
