//! One profile's refresh loop: keeps its token fresh, answers forced-refresh
//! requests for the current token, and records the profile's state.

use std::time::{Duration, Instant};

use common::backoff::full_jitter;
use common::config::{OAuthProfile, TokenBrokerConfig};
use common::heartbeat::{now_secs, Heartbeat};
use common::keys::Keys;
use common::shutdown::CancellationToken;
use common::token::{ProfileState, StoredToken, TokenClient};
use common::RedisHandle;
use redis::AsyncCommands;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::request::{credential_error, request_token_with, RequestError};

/// Longest sleep between two looks at Redis (another replica may have refreshed).
const MAX_NAP: Duration = Duration::from_secs(1);

/// How often the credential's expiry is read again from its files.
const CREDENTIAL_CHECK: Duration = Duration::from_secs(10);

/// Inside this many seconds of the credential's expiry, a warning is logged
/// once a day.
const EXPIRY_WARNING_SECS: i64 = 30 * 86_400;

/// The expiry warning is logged at most this often.
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(86_400);

/// Whether the expiry warning is due now: the credential runs out within
/// [`EXPIRY_WARNING_SECS`] (`left` seconds; zero or negative once it has)
/// and none was logged in the last [`EXPIRY_WARNING_EVERY`] (`since_last`:
/// how long ago the last one was, `None` before the first).
fn expiry_warning_due(left: i64, since_last: Option<Duration>) -> bool {
    left < EXPIRY_WARNING_SECS && since_last.is_none_or(|d| d >= EXPIRY_WARNING_EVERY)
}

/// What the loop remembers about the profile's credential between looks.
#[derive(Default)]
pub struct CredentialWatch {
    /// When the files were last read.
    checked: Option<Instant>,
    /// The credential's expiry (epoch seconds), when known.
    expires_at: Option<i64>,
    /// When the last expiry warning was logged.
    warned: Option<Instant>,
    /// The fingerprint of a stored token that could not be opened, already logged.
    unopenable: Option<String>,
    /// The last error reading the credential, already logged.
    unreadable: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a refresh is attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Trigger {
    /// The token is missing or due.
    Scheduled,
    /// A fetcher reported this token (fingerprint) as refused.
    Forced(String),
}

/// Everything one profile's loop needs.
pub struct Worker {
    /// The profile.
    pub profile: OAuthProfile,
    /// Broker settings.
    pub cfg: TokenBrokerConfig,
    /// Token storage.
    pub tokens: TokenClient,
    /// Redis, for state and lock.
    pub redis: RedisHandle,
    /// Key names.
    pub keys: Keys,
    /// HTTP client for the token endpoint.
    pub http: reqwest::Client,
    /// This instance (lock owner).
    pub owner: String,
    /// Metrics.
    pub metrics: Metrics,
    /// Heartbeat (counts refreshes, records errors).
    pub heartbeat: Heartbeat,
    /// The credential's expiry and warnings.
    pub watch: CredentialWatch,
}

impl Worker {
    /// Runs until `shutdown`; `forced` delivers fingerprints of refused tokens.
    pub async fn run(mut self, mut forced: mpsc::Receiver<String>, shutdown: CancellationToken) {
        let name = self.profile.name.clone();
        tracing::info!(profile = %name, token_url = %self.profile.token_url, "keeping the profile's token fresh");
        loop {
            let wait = match self.tick().await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(profile = %name, error = %e, "cannot read the profile's token state; retrying");
                    MAX_NAP
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(fp) = forced.recv() => {
                    if let Err(e) = self.forced(fp).await {
                        tracing::warn!(profile = %name, error = %e, "cannot handle a forced refresh request");
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn state(&mut self) -> redis::RedisResult<ProfileState> {
        Ok(
            common::token::read_state(&mut self.redis, &self.keys, &self.profile.name)
                .await?
                .unwrap_or_default(),
        )
    }

    async fn write_state(&mut self, state: &ProfileState) -> redis::RedisResult<()> {
        let json = serde_json::to_string(state).expect("state serializes");
        self.redis
            .set(self.keys.token_state(&self.profile.name), json)
            .await
    }

    /// The stored token, when it is valid *and opens* with this broker's
    /// keys: a token sealed under a key no longer configured, one that fails
    /// authentication, or one in clear while keys are configured is treated
    /// as absent, so it is replaced at once instead of at its expiry.
    async fn stored(&mut self) -> anyhow::Result<Option<StoredToken>> {
        let name = &self.profile.name;
        let Some(stored) = self
            .tokens
            .stored(name)
            .await
            .or_else(|e| match e {
                e if e.is_transient() => Err(e),
                e => {
                    tracing::warn!(profile = %name, error = %e, "the stored token is unreadable; replacing it");
                    Ok(None)
                }
            })?
            .filter(|s| s.expires_at > now_secs())
        else {
            return Ok(None);
        };
        match self.tokens.cipher().open(name, &stored) {
            Ok(_) => Ok(Some(stored)),
            Err(e) => {
                if self.watch.unopenable.as_ref() != Some(&stored.fingerprint) {
                    tracing::warn!(profile = %name, fingerprint = %stored.fingerprint, error = %e, "cannot open the stored token; replacing it now");
                    self.watch.unopenable = Some(stored.fingerprint.clone());
                }
                Ok(None)
            }
        }
    }

    /// Reads the credential's expiry again when due, sets the gauge, and
    /// warns once a day inside 30 days of it.
    fn watch_credential(&mut self) {
        let name = self.profile.name.clone();
        if self
            .watch
            .checked
            .is_none_or(|t| t.elapsed() >= CREDENTIAL_CHECK)
        {
            self.watch.checked = Some(Instant::now());
            match common::credential::expiry(&self.profile) {
                Ok(e) => {
                    self.watch.expires_at = e;
                    self.watch.unreadable = None;
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.watch.unreadable.as_ref() != Some(&message) {
                        tracing::warn!(profile = %name, error = %message, "cannot read the profile's credential");
                        self.watch.unreadable = Some(message);
                    }
                }
            }
        }
        let gauge = &self.metrics.credential_seconds_to_expiry;
        let Some(expires_at) = self.watch.expires_at else {
            let _ = gauge.remove_label_values(&[&name]);
            return;
        };
        let left = expires_at - now_secs() as i64;
        gauge.with_label_values(&[&name]).set(left as f64);
        if expiry_warning_due(left, self.watch.warned.map(|t| t.elapsed())) {
            self.watch.warned = Some(Instant::now());
            let kind = common::credential::kind(&self.profile.credential);
            let expires = common::credential::date(expires_at);
            if left <= 0 {
                tracing::error!(profile = %name, credential = kind, %expires, "the profile's credential has expired: replace it in the app registration and in the configuration");
            } else {
                tracing::warn!(profile = %name, credential = kind, %expires, days_left = left / 86_400, "the profile's credential expires soon: add a new one to the app registration and configure it");
            }
        }
    }

    /// One look: refresh if due and allowed; returns how long to sleep.
    async fn tick(&mut self) -> anyhow::Result<Duration> {
        self.watch_credential();
        let stored = self.stored().await?;
        let state = self.state().await?;
        let gauge = stored
            .as_ref()
            .map(|s| s.expires_at as f64 - now_secs() as f64)
            .unwrap_or(-1.0);
        self.metrics
            .seconds_to_expiry
            .with_label_values(&[&self.profile.name])
            .set(gauge);
        let due = stored
            .as_ref()
            .map(|s| crate::schedule::refresh_due_ms(s.issued_at, s.expires_at, &self.cfg))
            .unwrap_or(0);
        let wake = due.max(state.next_attempt_ms.unwrap_or(0));
        let now = now_ms();
        if now >= wake {
            self.attempt(Trigger::Scheduled).await?;
            return Ok(Duration::from_millis(50));
        }
        Ok(Duration::from_millis(wake - now).min(MAX_NAP))
    }

    async fn forced(&mut self, fingerprint: String) -> anyhow::Result<()> {
        let current = self.stored().await?;
        let label = if current.as_ref().map(|s| &s.fingerprint) != Some(&fingerprint) {
            "stale"
        } else {
            let state = self.state().await?;
            let min = self.cfg.forced_refresh_min_interval.as_millis() as u64;
            if now_ms().saturating_sub(state.last_refresh_ms.unwrap_or(0)) < min {
                "too-soon"
            } else {
                self.attempt(Trigger::Forced(fingerprint.clone())).await?;
                "refreshed"
            }
        };
        tracing::debug!(profile = %self.profile.name, %fingerprint, result = label, "forced refresh request");
        self.metrics
            .forced
            .with_label_values(&[&self.profile.name, label])
            .inc();
        Ok(())
    }

    /// Takes the lock, re-checks under it, requests a token, stores it or
    /// records the failure, releases the lock.
    async fn attempt(&mut self, trigger: Trigger) -> anyhow::Result<()> {
        let lock_key = self.keys.token_lock(&self.profile.name);
        let ttl = self
            .cfg
            .lock_ttl
            .max(self.cfg.request_timeout + Duration::from_secs(5));
        if !crate::lock::acquire(&mut self.redis, &lock_key, &self.owner, ttl).await? {
            return Ok(()); // another replica is refreshing this profile
        }
        let result = self.attempt_locked(trigger).await;
        crate::lock::release(&mut self.redis, &lock_key, &self.owner).await?;
        result
    }

    async fn attempt_locked(&mut self, trigger: Trigger) -> anyhow::Result<()> {
        let name = self.profile.name.clone();
        // Re-check under the lock: another replica may have just refreshed.
        let stored = self.stored().await?;
        let mut state = self.state().await?;
        let now = now_ms();
        if state.next_attempt_ms.is_some_and(|t| t > now) {
            return Ok(());
        }
        match &trigger {
            Trigger::Scheduled => {
                if let Some(s) = &stored {
                    if crate::schedule::refresh_due_ms(s.issued_at, s.expires_at, &self.cfg) > now {
                        return Ok(());
                    }
                }
            }
            Trigger::Forced(fp) => {
                if stored.as_ref().map(|s| &s.fingerprint) != Some(fp) {
                    return Ok(());
                }
                let min = self.cfg.forced_refresh_min_interval.as_millis() as u64;
                if now.saturating_sub(state.last_refresh_ms.unwrap_or(0)) < min {
                    return Ok(());
                }
            }
        }
        let valid_token = stored.is_some();
        state.state = "refreshing".into();
        state.updated_at = now_secs();
        self.write_state(&state).await?;

        let started = Instant::now();
        let kind = common::credential::kind(&self.profile.credential);
        let presented = common::credential::present(&self.profile);
        let (used, unusable) = match &presented {
            Ok(p) => {
                self.watch.expires_at = p.expires_at;
                tracing::info!(profile = %name, credential = %p.description, trigger = ?trigger, "requesting a token");
                (Some(p.description.clone()), None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        let result = match presented {
            Ok(p) => request_token_with(&self.http, &self.profile, &p).await,
            Err(e) => Err(credential_error(e)),
        };
        self.metrics
            .endpoint_latency
            .with_label_values(&[&name])
            .observe(started.elapsed().as_secs_f64());
        let now = now_ms();
        let outcome;
        match result {
            Ok(issued) => {
                let expires_at = now_secs() + issued.expires_in;
                let token = self
                    .tokens
                    .store(&name, issued.access_token.expose(), expires_at)
                    .await?;
                outcome = "success";
                state = ProfileState {
                    state: "ok".into(),
                    expires_at: Some(expires_at),
                    last_refresh_ms: Some(now),
                    updated_at: now_secs(),
                    ..Default::default()
                };
                self.heartbeat.update(|h| {
                    h.handled += 1;
                    h.last_error = None;
                    h.last_poll = Some(now_secs());
                });
                tracing::info!(
                    profile = %name,
                    credential = used.as_deref().unwrap_or(kind),
                    expires_in = issued.expires_in,
                    fingerprint = %token.fingerprint,
                    trigger = ?trigger,
                    "stored a new token"
                );
            }
            Err(error) => {
                let (label, next, ceiling) = match &error {
                    RequestError::Throttled { retry_after } => {
                        // Retry-After when given, else the transient schedule.
                        let (_, jittered) = full_jitter(
                            self.cfg.backoff_initial,
                            self.cfg.backoff_max,
                            state.failures,
                        );
                        ("throttled", retry_after.unwrap_or(jittered), None)
                    }
                    RequestError::Transient(_) => {
                        let (ceiling, wait) = full_jitter(
                            self.cfg.backoff_initial,
                            self.cfg.backoff_max,
                            state.failures,
                        );
                        ("transient", wait, Some(ceiling))
                    }
                    RequestError::Rejected { .. } => {
                        ("rejected", self.cfg.failing_retry_interval, None)
                    }
                };
                outcome = label;
                state.failures = state.failures.saturating_add(1);
                state.next_attempt_ms = Some(now + next.as_millis() as u64);
                state.backoff_ceiling_ms = ceiling.map(|c| c.as_millis() as u64);
                state.last_error = Some(error.to_string());
                state.updated_at = now_secs();
                state.expires_at = stored.as_ref().map(|s| s.expires_at);
                match &error {
                    RequestError::Rejected { code, reason, .. } => {
                        state.state = "failing".into();
                        state.error_code = code.clone();
                        tracing::error!(
                            profile = %name,
                            code = code.as_deref().unwrap_or("-"),
                            reason = %reason,
                            retry_in_s = next.as_secs(),
                            token_still_valid = valid_token,
                            "the token endpoint refused the credentials"
                        );
                    }
                    _ => {
                        state.state = if valid_token {
                            "ok".into()
                        } else {
                            "failing".into()
                        };
                        state.error_code = None;
                        tracing::warn!(
                            profile = %name,
                            error = %error,
                            retry_in_ms = next.as_millis() as u64,
                            token_still_valid = valid_token,
                            "token refresh failed; retrying"
                        );
                    }
                }
                let message = error.to_string();
                self.heartbeat
                    .update(|h| h.last_error = Some(format!("{name}: {message}")));
            }
        }
        self.metrics
            .refreshes
            .with_label_values(&[&name, outcome])
            .inc();
        state.credential = Some(kind.to_string());
        state.credential_used = used;
        state.credential_expires_at = self.watch.expires_at;
        state.credential_error = unusable;
        self.write_state(&state).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn ago(secs: u64) -> Option<Duration> {
        Some(Duration::from_secs(secs))
    }

    #[test]
    fn expiry_warning_inside_30_days_at_most_once_a_day() {
        let cases = [
            // (seconds left, last warning, due)
            (31 * DAY, None, false),
            (30 * DAY, None, false), // exactly 30 days: not yet inside
            (30 * DAY - 1, None, true),
            (7 * DAY, None, true),
            (7 * DAY, ago(60), false),
            (7 * DAY, ago(86_399), false), // a second short of a day
            (7 * DAY, ago(86_400), true),
            (7 * DAY, ago(3 * 86_400), true),
            (0, None, true),    // expires now
            (-DAY, None, true), // expired: logged as an error, same cadence
            (-DAY, ago(3_600), false),
            (-DAY, ago(86_400), true),
            (31 * DAY, ago(5 * 86_400), false), // far off: never
        ];
        for (left, since_last, due) in cases {
            assert_eq!(
                expiry_warning_due(left, since_last),
                due,
                "{left} s left, last warning {since_last:?} ago"
            );
        }
    }

    /// A day of looks every [`CREDENTIAL_CHECK`] inside the window logs
    /// exactly one warning, and the next day another.
    #[test]
    fn one_warning_per_day_of_looks() {
        let mut warned: Option<u64> = None;
        let mut warnings = Vec::new();
        let step = CREDENTIAL_CHECK.as_secs();
        for now in (0..2 * 86_400).step_by(step as usize) {
            let left = 10 * DAY - now as i64;
            if expiry_warning_due(left, warned.map(|w| Duration::from_secs(now - w))) {
                warned = Some(now);
                warnings.push(now);
            }
        }
        assert_eq!(warnings, vec![0, 86_400]);
    }
}
