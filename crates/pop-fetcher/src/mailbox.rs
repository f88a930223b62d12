//! One mail config's worker: poll sessions at `poll-interval`, reconnecting
//! with backoff after errors.
//!
//! A poll session: connect and log in; UIDL + LIST; plan against the UIDL
//! set ([`crate::uidls`]); DELE again what was handed over but not deleted;
//! then RETR in batches (pipelined where offered), publish each message
//! with confirms, and for the confirmed prefix only: record the UIDL, then
//! DELE (`delete`). QUIT commits the deletions. Nothing is deleted before
//! RabbitMQ confirmed it, and a session cut anywhere before QUIT deletes
//! nothing at all (RFC 1939 §6).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backoff::Backoff;
use common::config::{AfterFetch, Config, IncomingMail, MailAuth};
use common::envelope::{dedupe_key, Envelope, MessageRef};
use common::heartbeat::{now_secs, Heartbeat};
use common::keys::Keys;
use common::publish::{Confirmed, Publisher};
use common::shutdown::CancellationToken;
use common::token::{AccessToken, TokenClient};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::amqp::AmqpLink;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::pop3::{self, wire, Session, Transport};
use crate::uidls::{self, Listed, UidlSet};

/// What every worker of a replica shares.
pub struct Shared {
    /// The whole configuration.
    pub config: Arc<Config>,
    /// This replica's instance id.
    pub instance: String,
    /// Redis key names.
    pub keys: Keys,
    /// Redis.
    pub redis: ConnectionManager,
    /// RabbitMQ, reconnected on demand.
    pub amqp: AmqpLink,
    /// The exchange to publish to.
    pub exchange: String,
    /// TLS trust.
    pub tls: Arc<rustls::ClientConfig>,
    /// Tokens from the broker.
    pub tokens: TokenClient,
    /// Metrics.
    pub metrics: Metrics,
    /// This instance's heartbeat.
    pub heartbeat: Heartbeat,
    /// Tunables.
    pub options: crate::Options,
}

/// The confirmed tag of a published message.
type Tag = (u32, String, usize);

/// Runs the worker of `cfg` until `graceful` is cancelled (finishing the
/// batch in flight). Dropping the future stops it at once (lease lost):
/// without QUIT the server deletes nothing.
pub async fn run(shared: Arc<Shared>, cfg: IncomingMail, graceful: CancellationToken) {
    let o = &shared.options;
    let mut backoff = Backoff::new(o.backoff_initial, o.backoff_max);
    let mut slow = Backoff::new(
        o.backoff_initial.max(Duration::from_secs(1)) * 10,
        o.backoff_max.max(Duration::from_secs(300)),
    );
    let worker = Worker {
        shared: Arc::clone(&shared),
        cfg,
        graceful: graceful.clone(),
    };
    let name = worker.cfg.name.clone();
    while !graceful.is_cancelled() {
        let started = Instant::now();
        let wait = match worker.session().await {
            Ok(n) => {
                backoff.reset();
                slow.reset();
                shared
                    .metrics
                    .poll_seconds
                    .with_label_values(&[&name])
                    .observe(started.elapsed().as_secs_f64());
                shared.heartbeat.update(|s| {
                    s.last_poll = Some(now_secs());
                    s.handled += n as u64;
                    if s.last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(&format!("{name}: ")))
                    {
                        s.last_error = None;
                    }
                });
                worker.cfg.poll_interval
            }
            Err(e) => {
                shared
                    .metrics
                    .errors
                    .with_label_values(&[&name, e.kind()])
                    .inc();
                shared
                    .heartbeat
                    .update(|s| s.last_error = Some(format!("{name}: {e}")));
                let wait = if e.needs_human() {
                    slow.next_delay().max(o.backoff_initial)
                } else {
                    backoff.next_delay()
                };
                if e.needs_human() {
                    tracing::error!(config = %name, kind = e.kind(), error = %e, retry_in_ms = wait.as_millis() as u64, "mailbox needs attention");
                } else {
                    tracing::warn!(config = %name, kind = e.kind(), error = %e, retry_in_ms = wait.as_millis() as u64, "poll failed");
                }
                wait
            }
        };
        tokio::select! {
            _ = graceful.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(config = %name, "worker stopped");
}

struct Worker {
    shared: Arc<Shared>,
    cfg: IncomingMail,
    graceful: CancellationToken,
}

impl Worker {
    /// The application (client) id behind this config, for permission errors.
    fn app(&self) -> String {
        match &self.cfg.auth {
            MailAuth::OAuth { profile } => self
                .shared
                .config
                .profile(profile)
                .map(|p| p.application_key.clone())
                .unwrap_or_else(|| profile.clone()),
            MailAuth::Password { .. } => self.cfg.username.clone(),
        }
    }

    async fn connect(&self) -> Result<Session<Transport>> {
        pop3::connect(
            &self.cfg,
            Arc::clone(&self.shared.tls),
            self.shared.options.read_timeout,
        )
        .await
    }

    async fn token(&self, profile: &str) -> Result<AccessToken> {
        self.shared
            .tokens
            .current(profile)
            .await
            .map_err(|e| Error::Token {
                profile: profile.into(),
                detail: e.to_string(),
            })?
            .ok_or_else(|| Error::NoToken {
                profile: profile.into(),
            })
    }

    /// Connects and logs in. A refused token is reported to the broker
    /// (forced refresh of that token); with a replacement the login is
    /// retried once, and a fresh token refused too means no permission.
    async fn login(&self) -> Result<Session<Transport>> {
        let user = &self.cfg.username;
        match &self.cfg.auth {
            MailAuth::Password { password } => {
                let password = password.as_ref().ok_or_else(|| {
                    Error::Setup(format!("mail config {} has no password", self.cfg.name))
                })?;
                let mut s = self.connect().await?;
                match s.user_pass(user, password.expose()).await? {
                    Ok(()) => Ok(s),
                    Err(r) => Err(Error::AuthFailed {
                        mailbox: user.clone(),
                        mechanism: "USER/PASS",
                        cause: wire::explain_auth_refusal(&r.reply, false),
                        reply: r.reply,
                    }),
                }
            }
            MailAuth::OAuth { profile } => {
                let token = self.token(profile).await?;
                let mut s = self.connect().await?;
                let refusal = match s.auth_xoauth2(user, token.token.expose()).await? {
                    Ok(()) => return Ok(s),
                    Err(r) => r,
                };
                let expired = token.expires_at <= now_secs();
                tracing::warn!(config = %self.cfg.name, profile, token = %token.fingerprint, reply = %refusal.reply, "token refused; asking the broker for a fresh one");
                let tokens = &self.shared.tokens;
                let _ = tokens.report_failure(profile, &token).await;
                let fresh = tokens
                    .wait_for_replacement(profile, &token, self.shared.options.token_wait)
                    .await
                    .ok()
                    .flatten();
                let Some(fresh) = fresh else {
                    return Err(Error::AuthFailed {
                        mailbox: user.clone(),
                        mechanism: "XOAUTH2",
                        cause: wire::explain_auth_refusal(&refusal.reply, expired),
                        reply: refusal.reply,
                    });
                };
                let mut s = self.connect().await?;
                match s.auth_xoauth2(user, fresh.token.expose()).await? {
                    Ok(()) => Ok(s),
                    Err(r) => {
                        let _ = tokens.report_failure(profile, &fresh).await;
                        Err(Error::Permission {
                            mailbox: user.clone(),
                            app: self.app(),
                            reply: r.reply,
                        })
                    }
                }
            }
        }
    }

    /// One poll session; returns the number of messages handed over.
    async fn session(&self) -> Result<usize> {
        let shared = &self.shared;
        let name = &self.cfg.name;
        let delete = self.cfg.after_fetch == AfterFetch::Delete;
        let mut s = self.login().await?;
        let uidl = s.uidl().await?;
        let list = s.list().await?;
        let listed = uidls::join(&list, &uidl);
        let mut set = UidlSet::new(shared.redis.clone(), shared.keys.uidls(name));
        let handed = set.load().await?;
        let mut redis = shared.redis.clone();
        let known_oversized: HashSet<String> = redis
            .hkeys(shared.keys.oversized(name))
            .await
            .map_err(|source| Error::Redis {
                action: "read oversized records",
                source,
            })?;
        let plan = uidls::plan(
            &listed,
            handed.as_ref(),
            &known_oversized,
            self.cfg.start_from,
            delete,
            self.cfg.max_message_bytes,
        );
        if let Some(present) = &plan.init {
            let skipped: Vec<String> = present.iter().map(|u| uidls::skipped(u)).collect();
            set.add(&skipped).await?;
            tracing::info!(config = %name, skipped = present.len(), "start-from now: existing messages recorded, not fetched");
            s.quit().await?;
            return Ok(0);
        }
        set.remove(&plan.prune).await?;
        self.record_oversized(&plan.oversized).await?;
        let mut deleted: Vec<String> = Vec::new();
        if delete && !plan.redelete.is_empty() {
            let msgs: Vec<u32> = plan.redelete.iter().map(|l| l.msg).collect();
            s.dele_many(&msgs).await?;
            tracing::info!(config = %name, count = msgs.len(), "deleting messages handed over in an earlier session");
            deleted.extend(plan.redelete.iter().map(|l| l.uidl.clone()));
        }
        let mut handed_over = 0;
        if !plan.fetch.is_empty() {
            let mut publisher: Publisher<Tag> = shared
                .amqp
                .publisher(&shared.exchange, shared.options.window)
                .await?;
            let outcome = self
                .transfer(&mut s, &mut publisher, &mut set, &plan.fetch, &mut deleted)
                .await;
            publisher.close().await;
            handed_over = outcome?;
        }
        s.quit().await?;
        if delete {
            shared
                .metrics
                .deleted
                .with_label_values(&[name])
                .inc_by(deleted.len() as u64);
            // Committed: these UIDLs are gone for good.
            let _ = set.remove(&deleted).await;
        }
        if handed_over > 0 {
            tracing::info!(config = %name, messages = handed_over, deleted = deleted.len(), "poll done");
        }
        Ok(handed_over)
    }

    /// RETR, publish and settle the planned messages, batch by batch. On an
    /// error what was confirmed is still settled (recorded, DELEd) and the
    /// session is QUIT, so confirmed mail does not come back.
    async fn transfer(
        &self,
        s: &mut Session<Transport>,
        publisher: &mut Publisher<Tag>,
        set: &mut UidlSet,
        fetch: &[Listed],
        deleted: &mut Vec<String>,
    ) -> Result<usize> {
        let batch = self.cfg.batch_size.max(1) as usize;
        let mut confirmed: Vec<Confirmed<Tag>> = Vec::new();
        let mut total = 0;
        let mut failure: Option<Error> = None;
        for chunk in fetch.chunks(batch) {
            if self.graceful.is_cancelled() {
                tracing::info!(config = %self.cfg.name, "stopping after the batch in flight");
                break;
            }
            let wanted: Vec<(u32, u64)> = chunk.iter().map(|l| (l.msg, l.size)).collect();
            let bodies = match s.retr_many(&wanted).await {
                Ok(b) => b,
                Err(e) => {
                    // The session is broken: nothing more can be DELEd in it.
                    let _ = publisher.flush(&mut confirmed).await;
                    let _ = self.record(set, &confirmed).await;
                    return Err(e);
                }
            };
            for ((msg, body), listed) in bodies.into_iter().zip(chunk) {
                let body = match body {
                    Ok(b) => b,
                    Err(reply) => {
                        tracing::warn!(config = %self.cfg.name, msg, uidl = %listed.uidl, reply, "RETR refused; message skipped this time");
                        continue;
                    }
                };
                let envelope = self.envelope(&listed.uidl, body);
                let len = envelope.body.len();
                if let Err(e) = publisher
                    .publish(&envelope, (msg, listed.uidl.clone(), len), &mut confirmed)
                    .await
                {
                    failure = Some(e.into());
                    break;
                }
            }
            if failure.is_some() {
                break;
            }
            total += self.settle(s, set, &mut confirmed, deleted).await?;
        }
        if failure.is_none() {
            if let Err(e) = publisher.flush(&mut confirmed).await {
                failure = Some(e.into());
            }
        }
        total += self.settle(s, set, &mut confirmed, deleted).await?;
        if let Some(e) = failure {
            let abandoned = publisher.abandon();
            tracing::warn!(config = %self.cfg.name, abandoned, error = %e, "publishing failed; unconfirmed messages stay on the server");
            s.quit().await?;
            return Err(e);
        }
        Ok(total)
    }

    /// For the confirmed messages: record their UIDLs, then DELE them.
    async fn settle(
        &self,
        s: &mut Session<Transport>,
        set: &mut UidlSet,
        confirmed: &mut Vec<Confirmed<Tag>>,
        deleted: &mut Vec<String>,
    ) -> Result<usize> {
        if confirmed.is_empty() {
            return Ok(0);
        }
        let n = confirmed.len();
        self.record(set, confirmed).await?;
        if self.cfg.after_fetch == AfterFetch::Delete {
            let msgs: Vec<u32> = confirmed.iter().map(|c| c.tag.0).collect();
            s.dele_many(&msgs).await?;
            deleted.extend(confirmed.iter().map(|c| c.tag.1.clone()));
        }
        confirmed.clear();
        Ok(n)
    }

    async fn record(&self, set: &mut UidlSet, confirmed: &[Confirmed<Tag>]) -> Result<()> {
        if confirmed.is_empty() {
            return Ok(());
        }
        let uidls: Vec<String> = confirmed.iter().map(|c| c.tag.1.clone()).collect();
        set.add(&uidls).await?;
        let m = &self.shared.metrics;
        let name = &self.cfg.name;
        for c in confirmed {
            m.messages.with_label_values(&[name]).inc();
            m.bytes.with_label_values(&[name]).inc_by(c.tag.2 as u64);
            m.confirm_seconds
                .with_label_values(&[])
                .observe(c.latency.as_secs_f64());
            tracing::debug!(config = %name, msg = c.tag.0, uidl = %c.tag.1, bytes = c.tag.2, "published message");
        }
        Ok(())
    }

    fn envelope(&self, uidl: &str, body: Vec<u8>) -> Envelope {
        Envelope {
            dedupe_key: dedupe_key(&self.cfg.username, &body),
            body,
            timestamp: now_secs(),
            mail_config: self.cfg.name.clone(),
            mailbox: self.cfg.username.clone(),
            message_ref: MessageRef::Pop3 {
                uidl: uidl.to_string(),
            },
            action: self.cfg.action,
            fetcher: self.shared.instance.clone(),
            traceparent: common::telemetry::fetched_message_trace(&self.cfg.name, uidl),
        }
    }

    async fn record_oversized(&self, oversized: &[Listed]) -> Result<()> {
        let mut redis = self.shared.redis.clone();
        let name = &self.cfg.name;
        for l in oversized {
            tracing::warn!(config = %name, uidl = %l.uidl, bytes = l.size, limit = self.cfg.max_message_bytes, "message over max-message-bytes; not published, left on the server");
            self.shared
                .metrics
                .oversized
                .with_label_values(&[name])
                .inc();
            let record = serde_json::json!({
                "uidl": l.uidl,
                "bytes": l.size,
                "seen-at": now_secs(),
            })
            .to_string();
            let _: () = redis
                .hset(self.shared.keys.oversized(name), &l.uidl, record)
                .await
                .map_err(|source| Error::Redis {
                    action: "record an oversized message",
                    source,
                })?;
        }
        Ok(())
    }
}
