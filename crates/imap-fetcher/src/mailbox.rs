//! The work on one mail config while this replica holds its lease: log in,
//! SELECT, hand over every new message (fetch → publish → confirm →
//! after-fetch → checkpoint), then wait with IDLE or polling; reconnect
//! with backoff on errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backoff::Backoff;
use common::config::{AfterFetch, Config, IncomingMail, MailAuth, StartFrom};
use common::envelope::{dedupe_key, Envelope, MessageRef};
use common::heartbeat::Heartbeat;
use common::keys::Keys;
use common::publish::{AmqpLink, Confirmed, Publisher};
use common::token::{AccessToken, TokenClient};
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, Checkpoint};
use crate::error::{FetchError, Result};
use crate::metrics::Metrics;
use crate::session::{self, Credentials, ImapSession};
use crate::utf7;

/// IDLE is re-issued after this long (servers may drop it after 30 min).
pub const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);

/// How long to wait for the broker to replace a refused token.
pub const TOKEN_REPLACEMENT_WAIT: Duration = Duration::from_secs(20);

/// What every mailbox worker shares.
pub struct Shared {
    /// The whole configuration.
    pub config: Arc<Config>,
    /// This replica's id (lease owner, `x-fetcher` header).
    pub instance: String,
    /// Redis key names.
    pub keys: Keys,
    /// Redis.
    pub redis: ConnectionManager,
    /// RabbitMQ, reconnected on demand.
    pub amqp: AmqpLink,
    /// The exchange to publish to.
    pub exchange: String,
    /// Outstanding confirmations per publisher.
    pub window: usize,
    /// TLS trust.
    pub tls: Arc<rustls::ClientConfig>,
    /// Tokens from the broker.
    pub tokens: TokenClient,
    /// Metrics.
    pub metrics: Metrics,
    /// This instance's heartbeat.
    pub heartbeat: Heartbeat,
    /// Reconnect backoff: first wait and cap.
    pub backoff: (Duration, Duration),
}

/// Runs the worker of `cfg` until `graceful` is cancelled (finishing the
/// batch in flight). Dropping the future stops it at once (lease lost).
pub async fn run(shared: Arc<Shared>, cfg: IncomingMail, graceful: CancellationToken) {
    let mut backoff = Backoff::new(shared.backoff.0, shared.backoff.1);
    let mut worker = Worker {
        shared: Arc::clone(&shared),
        app: app_of(&shared.config, &cfg),
        cfg,
        graceful: graceful.clone(),
    };
    while !graceful.is_cancelled() {
        match worker.session(&mut backoff).await {
            Ok(()) => break,
            Err(FetchError::LeaseLost(c)) => {
                tracing::warn!(config = %c, "lease lost while working; stopping");
                break;
            }
            Err(e) => {
                let config = worker.cfg.name.clone();
                shared
                    .metrics
                    .errors
                    .with_label_values(&[&config, e.kind()])
                    .inc();
                let message = format!("{config}: {e}");
                shared
                    .heartbeat
                    .update(|s| s.last_error = Some(message.clone()));
                if e.needs_human() {
                    // Back off harder: nothing changes until someone acts.
                    for _ in 0..3 {
                        let _ = backoff.next_delay();
                    }
                }
                let wait = backoff.next_delay().max(Duration::from_millis(200));
                if e.needs_human() {
                    tracing::error!(config, error = %e, retry_in_ms = wait.as_millis() as u64, "mailbox unusable");
                } else {
                    tracing::warn!(config, error = %e, kind = e.kind(), retry_in_ms = wait.as_millis() as u64, "mailbox session failed");
                }
                tokio::select! {
                    _ = graceful.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

fn app_of(config: &Config, cfg: &IncomingMail) -> String {
    match &cfg.auth {
        MailAuth::OAuth { profile } => config
            .profile(profile)
            .map(|p| p.application_key.clone())
            .unwrap_or_else(|| profile.clone()),
        MailAuth::Password { .. } => cfg.username.clone(),
    }
}

struct Worker {
    shared: Arc<Shared>,
    cfg: IncomingMail,
    app: String,
    graceful: CancellationToken,
}

/// Server capabilities that change what we send.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    idle: bool,
    mv: bool,
    uidplus: bool,
}

impl Worker {
    /// One session: login, select, then pass/wait until stopped or failed.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<()> {
        let mut session = self.login().await?;
        let folder = utf7::encode(&self.cfg.folder);
        let mailbox = session
            .select(&folder)
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "SELECT", e))?;
        let uidvalidity = mailbox.uid_validity.ok_or_else(|| {
            FetchError::Unsupported(format!(
                "folder {} of {} has no UIDVALIDITY",
                self.cfg.folder, self.cfg.username
            ))
        })?;
        let caps = session
            .capabilities()
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "CAPABILITY", e))?;
        let caps = Caps {
            idle: caps.has_str("IDLE"),
            mv: caps.has_str("MOVE"),
            uidplus: caps.has_str("UIDPLUS"),
        };
        tracing::info!(config = %self.cfg.name, uidvalidity, exists = mailbox.exists, idle = caps.idle, "selected folder");
        self.shared.heartbeat.update(|s| s.last_error = None);
        let mut uid_next = mailbox.uid_next;
        loop {
            let started = Instant::now();
            self.pass(&mut session, uidvalidity, uid_next.take(), caps)
                .await?;
            self.shared
                .metrics
                .poll_seconds
                .with_label_values(&[&self.cfg.name])
                .observe(started.elapsed().as_secs_f64());
            backoff.reset();
            self.shared
                .heartbeat
                .update(|s| s.last_poll = Some(common::heartbeat::now_secs()));
            if self.graceful.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
            if new_mail_reported(&session) {
                // Mail that arrived during the pass was announced then; IDLE
                // would not announce it again.
                tracing::debug!(config = %self.cfg.name, "new mail announced during the pass; passing again");
                continue;
            }
            session = if self.cfg.idle && caps.idle {
                self.idle(session).await?
            } else {
                tokio::select! {
                    _ = self.graceful.cancelled() => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                }
                session
                    .noop()
                    .await
                    .map_err(|e| session::after_login_error(&self.cfg, &self.app, "NOOP", e))?;
                session
            };
            if self.graceful.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
        }
    }

    /// Logs in; on a refused token asks the broker for a forced refresh of
    /// that token and retries once with the replacement.
    async fn login(&self) -> Result<ImapSession> {
        let shared = &self.shared;
        match &self.cfg.auth {
            MailAuth::Password { password } => {
                let password = password.as_ref().map(|p| p.expose()).unwrap_or("");
                session::open(&self.cfg, &shared.tls, Credentials::Password { password })
                    .await
                    .map_err(|e| self.refused_is_permission(e))
            }
            MailAuth::OAuth { profile } => {
                let token = self.token(profile).await?;
                match session::open(
                    &self.cfg,
                    &shared.tls,
                    Credentials::XOAuth2 {
                        token: token.token.expose(),
                    },
                )
                .await
                {
                    Err(e) if e.is_auth() => {
                        tracing::warn!(config = %self.cfg.name, profile, fingerprint = %token.fingerprint, "token refused; asking the broker for a forced refresh");
                        self.shared
                            .metrics
                            .errors
                            .with_label_values(&[&self.cfg.name, "auth"])
                            .inc();
                        let replacement = self.replacement(profile, &token).await?;
                        let Some(fresh) = replacement else {
                            return Err(self.refused_is_permission(e));
                        };
                        session::open(
                            &self.cfg,
                            &shared.tls,
                            Credentials::XOAuth2 {
                                token: fresh.token.expose(),
                            },
                        )
                        .await
                        .map_err(|e| self.refused_is_permission(e))
                    }
                    other => other,
                }
            }
        }
    }

    /// A refused login that a fresh token did not fix is a missing grant.
    fn refused_is_permission(&self, e: FetchError) -> FetchError {
        match e {
            FetchError::AuthFailed { detail, .. } => FetchError::Permission {
                mailbox: self.cfg.username.clone(),
                app: self.app.clone(),
                detail: format!("the server refused the login ({detail}); grant the app access to the mailbox, or check the credentials"),
            },
            other => other,
        }
    }

    async fn token(&self, profile: &str) -> Result<AccessToken> {
        match self.shared.tokens.current(profile).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(FetchError::NoToken {
                profile: profile.to_string(),
            }),
            Err(e) => Err(FetchError::Token {
                profile: profile.to_string(),
                detail: e.to_string(),
            }),
        }
    }

    async fn replacement(
        &self,
        profile: &str,
        failed: &AccessToken,
    ) -> Result<Option<AccessToken>> {
        let tokens = &self.shared.tokens;
        let terr = |e: common::token::TokenError| FetchError::Token {
            profile: profile.to_string(),
            detail: e.to_string(),
        };
        tokens.report_failure(profile, failed).await.map_err(terr)?;
        tokio::select! {
            _ = self.graceful.cancelled() => Ok(None),
            r = tokens.wait_for_replacement(profile, failed, TOKEN_REPLACEMENT_WAIT) => r.map_err(terr),
        }
    }

    /// IDLE until the server reports a change, [`IDLE_RENEW`] passes, or a
    /// graceful stop is asked for. Returns the session, ready for commands.
    async fn idle(&self, session: ImapSession) -> Result<ImapSession> {
        use async_imap::extensions::idle::IdleResponse;
        let mut handle = session.idle();
        handle
            .init()
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "IDLE", e))?;
        let outcome = {
            let (fut, stop) = handle.wait_with_timeout(IDLE_RENEW);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => r,
                _ = self.graceful.cancelled() => {
                    drop(stop);
                    fut.await
                }
            }
        };
        match outcome {
            Ok(IdleResponse::NewData(data)) => {
                use async_imap::imap_proto::{Response, Status};
                if matches!(
                    data.parsed(),
                    Response::Data {
                        status: Status::Bye,
                        ..
                    }
                ) {
                    self.shared
                        .metrics
                        .idle_reconnects
                        .with_label_values(&[&self.cfg.name])
                        .inc();
                    return Err(FetchError::Imap {
                        action: "IDLE",
                        endpoint: session::endpoint(&self.cfg),
                        source: async_imap::error::Error::ConnectionLost,
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.shared
                    .metrics
                    .idle_reconnects
                    .with_label_values(&[&self.cfg.name])
                    .inc();
                return Err(session::after_login_error(&self.cfg, &self.app, "IDLE", e));
            }
        }
        handle
            .done()
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "DONE", e))
    }

    /// Hands over everything new, per the checkpoint rules.
    async fn pass(
        &self,
        session: &mut ImapSession,
        uidvalidity: u32,
        uid_next: Option<u32>,
        caps: Caps,
    ) -> Result<()> {
        let shared = &self.shared;
        let mut redis = shared.redis.clone();
        let name = &self.cfg.name;
        let mut cp = checkpoint::load(&mut redis, &shared.keys, name).await?;
        let fresh = match &cp {
            None => true,
            Some(c) => c.uidvalidity != uidvalidity,
        };
        if fresh {
            let criterion = match &cp {
                None => match self.cfg.start_from {
                    StartFrom::Unseen => Some("UNSEEN".to_string()),
                    StartFrom::All => Some("ALL".to_string()),
                    StartFrom::Now => None,
                },
                Some(old) => {
                    tracing::warn!(config = %name, old = old.uidvalidity, new = uidvalidity, "UIDVALIDITY changed; re-scanning the folder");
                    Some(checkpoint::rescan_criterion(
                        &self.cfg.after_fetch,
                        old.saved_at,
                    ))
                }
            };
            let top = match uid_next {
                Some(n) => n.saturating_sub(1),
                None => self
                    .search(session, "ALL")
                    .await?
                    .last()
                    .copied()
                    .unwrap_or(0),
            };
            let new = match criterion {
                Some(c) if top > 0 => Checkpoint {
                    uidvalidity,
                    last_uid: 0,
                    scan_until: top,
                    scan_criterion: c,
                    saved_at: 0,
                },
                _ => Checkpoint {
                    uidvalidity,
                    last_uid: top,
                    ..Default::default()
                },
            };
            checkpoint::save(&mut redis, &shared.keys, name, &shared.instance, &new).await?;
            cp = Some(new);
        }
        let mut cp = cp.unwrap_or_default();
        if cp.scanning() {
            let query = format!(
                "UID {}:{} {}",
                cp.last_uid + 1,
                cp.scan_until,
                cp.scan_criterion
            );
            let (lo, hi) = (cp.last_uid, cp.scan_until);
            let uids: Vec<u32> = self
                .search(session, &query)
                .await?
                .into_iter()
                .filter(|u| *u > lo && *u <= hi)
                .collect();
            if !self.process(session, &uids, &mut cp, caps).await? {
                return Ok(());
            }
            cp.last_uid = cp.scan_until;
            cp.scan_until = 0;
            cp.scan_criterion.clear();
            checkpoint::save(&mut redis, &shared.keys, name, &shared.instance, &cp).await?;
        }
        let last = cp.last_uid;
        let uids: Vec<u32> = self
            .search(session, &format!("UID {}:*", last.saturating_add(1)))
            .await?
            .into_iter()
            .filter(|u| *u > last)
            .collect();
        self.process(session, &uids, &mut cp, caps).await?;
        Ok(())
    }

    async fn search(&self, session: &mut ImapSession, query: &str) -> Result<Vec<u32>> {
        let mut uids: Vec<u32> = session
            .uid_search(query)
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "UID SEARCH", e))?
            .into_iter()
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// Hands over `uids` (ascending) in batches. Returns false when stopped
    /// before the end (graceful stop).
    async fn process(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        cp: &mut Checkpoint,
        caps: Caps,
    ) -> Result<bool> {
        if uids.is_empty() {
            return Ok(true);
        }
        let shared = &self.shared;
        let mut publisher: Publisher<(u32, usize)> = shared
            .amqp
            .publisher(&shared.exchange, shared.window)
            .await?;
        let batch = self.cfg.batch_size.max(1) as usize;
        let mut complete = true;
        for chunk in uids.chunks(batch) {
            if self.graceful.is_cancelled() {
                complete = false;
                break;
            }
            let done = self.batch(session, &mut publisher, chunk, cp, caps).await;
            match done {
                Ok(true) => {}
                Ok(false) => {
                    complete = false;
                    break;
                }
                Err(e) => {
                    publisher.abandon();
                    return Err(e);
                }
            }
        }
        publisher.close().await;
        Ok(complete)
    }

    /// One batch. Returns false when a graceful stop cut it short (what was
    /// published is confirmed, flagged and checkpointed first).
    async fn batch(
        &self,
        session: &mut ImapSession,
        publisher: &mut Publisher<(u32, usize)>,
        chunk: &[u32],
        cp: &mut Checkpoint,
        caps: Caps,
    ) -> Result<bool> {
        let shared = &self.shared;
        let name = &self.cfg.name;
        let started = Instant::now();
        let set = uid_set(chunk);
        // Sizes first: oversized messages are never fetched in full.
        let mut sizes: HashMap<u32, u32> = HashMap::new();
        {
            let mut stream = session
                .uid_fetch(&set, "(UID RFC822.SIZE)")
                .await
                .map_err(|e| session::after_login_error(&self.cfg, &self.app, "UID FETCH", e))?;
            while let Some(f) = stream.next().await {
                let f = f.map_err(|e| {
                    session::after_login_error(&self.cfg, &self.app, "UID FETCH", e)
                })?;
                if let (Some(uid), Some(size)) = (f.uid, f.size) {
                    sizes.insert(uid, size);
                }
            }
        }
        let max = self.cfg.max_message_bytes;
        let oversized: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|u| sizes.get(u).is_some_and(|s| u64::from(*s) > max))
            .collect();
        let wanted: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|u| sizes.contains_key(u) && !oversized.contains(u))
            .collect();
        if !oversized.is_empty() {
            self.oversized(session, &oversized, &sizes, cp.uidvalidity)
                .await?;
        }
        let mut confirmed: Vec<Confirmed<(u32, usize)>> = Vec::new();
        let mut published = 0usize;
        let mut stopped = false;
        if !wanted.is_empty() {
            let mut stream = session
                .uid_fetch(uid_set(&wanted), "(UID BODY.PEEK[])")
                .await
                .map_err(|e| session::after_login_error(&self.cfg, &self.app, "UID FETCH", e))?;
            let mut failure = None;
            while let Some(f) = stream.next().await {
                let f = match f {
                    Ok(f) => f,
                    Err(e) => {
                        failure = Some(session::after_login_error(
                            &self.cfg,
                            &self.app,
                            "UID FETCH",
                            e,
                        ));
                        break;
                    }
                };
                if stopped || failure.is_some() {
                    continue; // drain the response so the session stays usable
                }
                if self.graceful.is_cancelled() {
                    stopped = true;
                    continue;
                }
                let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                    continue;
                };
                let envelope = Envelope {
                    dedupe_key: dedupe_key(&self.cfg.username, body),
                    body: body.to_vec(),
                    timestamp: common::heartbeat::now_secs(),
                    mail_config: name.clone(),
                    mailbox: self.cfg.username.clone(),
                    message_ref: MessageRef::Imap {
                        uid,
                        uidvalidity: cp.uidvalidity,
                    },
                    action: self.cfg.action,
                    fetcher: shared.instance.clone(),
                    traceparent: common::telemetry::fetched_message_trace(name, &uid.to_string()),
                };
                if let Err(e) = publisher
                    .publish(&envelope, (uid, body.len()), &mut confirmed)
                    .await
                {
                    failure = Some(e.into());
                    break;
                }
                published += 1;
                tracing::debug!(config = %name, uid, bytes = body.len(), "published message");
            }
            drop(stream);
            if let Some(e) = failure {
                // The session may be mid-response: flag nothing more here; what
                // was confirmed is fetched again later (a duplicate, never a loss).
                return Err(e);
            }
        }
        shared
            .metrics
            .fetch_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let flushed = publisher.flush(&mut confirmed).await;
        let uids: Vec<u32> = confirmed.iter().map(|c| c.tag.0).collect();
        for c in &confirmed {
            shared
                .metrics
                .confirm_seconds
                .with_label_values(&[])
                .observe(c.latency.as_secs_f64());
            shared
                .metrics
                .bytes
                .with_label_values(&[name])
                .inc_by(c.tag.1 as u64);
        }
        shared
            .metrics
            .messages
            .with_label_values(&[name])
            .inc_by(uids.len() as u64);
        shared.heartbeat.update(|s| s.handled += uids.len() as u64);
        self.after_fetch(session, &uids, &self.cfg.after_fetch, caps)
            .await?;
        flushed?;
        // Advance the checkpoint over the longest prefix of the chunk that is
        // fully handed over (confirmed, oversized, or gone from the server).
        let handled: std::collections::HashSet<u32> =
            uids.iter().chain(oversized.iter()).copied().collect();
        let mut last = cp.last_uid;
        for uid in chunk {
            if handled.contains(uid) || !sizes.contains_key(uid) {
                last = last.max(*uid);
            } else {
                break;
            }
        }
        if last > cp.last_uid {
            cp.last_uid = last;
            let mut redis = shared.redis.clone();
            checkpoint::save(&mut redis, &shared.keys, name, &shared.instance, cp).await?;
        }
        let _ = published;
        Ok(!stopped)
    }

    async fn oversized(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        sizes: &HashMap<u32, u32>,
        uidvalidity: u32,
    ) -> Result<()> {
        let shared = &self.shared;
        let name = &self.cfg.name;
        let mut redis = shared.redis.clone();
        for uid in uids {
            let size = sizes.get(uid).copied().unwrap_or(0);
            tracing::warn!(config = %name, uid, bytes = size, limit = self.cfg.max_message_bytes, "message over max-message-bytes; not published");
            shared.metrics.oversized.with_label_values(&[name]).inc();
            let record = serde_json::json!({
                "uid": uid,
                "uidvalidity": uidvalidity,
                "bytes": size,
                "seen-at": common::heartbeat::now_secs(),
            })
            .to_string();
            let _: () = redis
                .hset(
                    shared.keys.oversized(name),
                    format!("{uidvalidity}:{uid}"),
                    record,
                )
                .await
                .map_err(|source| FetchError::Redis {
                    action: "record an oversized message",
                    source,
                })?;
        }
        // Left in place, or moved when the config moves handled mail.
        if let AfterFetch::Move(_) = &self.cfg.after_fetch {
            self.after_fetch(session, uids, &self.cfg.after_fetch, Caps::default())
                .await?;
        }
        Ok(())
    }

    /// Applies after-fetch to confirmed messages.
    async fn after_fetch(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        action: &AfterFetch,
        caps: Caps,
    ) -> Result<()> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set(uids);
        let err = |what: &'static str| {
            let cfg = self.cfg.clone();
            let app = self.app.clone();
            move |e| session::after_login_error(&cfg, &app, what, e)
        };
        match action {
            AfterFetch::Keep => Ok(()),
            AfterFetch::MarkSeen => self.store(session, &set, "+FLAGS.SILENT (\\Seen)").await,
            AfterFetch::Delete => {
                self.store(session, &set, "+FLAGS.SILENT (\\Deleted)")
                    .await?;
                self.expunge(session, &set, caps).await?;
                self.shared
                    .metrics
                    .deleted
                    .with_label_values(&[&self.cfg.name])
                    .inc_by(uids.len() as u64);
                Ok(())
            }
            AfterFetch::Move(folder) => {
                let target = utf7::encode(folder);
                if caps.mv {
                    session.uid_mv(&set, &target).await.map_err(err("UID MOVE"))
                } else {
                    session
                        .uid_copy(&set, quote(&target))
                        .await
                        .map_err(err("UID COPY"))?;
                    self.store(session, &set, "+FLAGS.SILENT (\\Deleted)")
                        .await?;
                    self.expunge(session, &set, caps).await
                }
            }
        }
    }

    async fn store(&self, session: &mut ImapSession, set: &str, what: &str) -> Result<()> {
        let mut stream = session
            .uid_store(set, what)
            .await
            .map_err(|e| session::after_login_error(&self.cfg, &self.app, "UID STORE", e))?;
        while let Some(r) = stream.next().await {
            r.map_err(|e| session::after_login_error(&self.cfg, &self.app, "UID STORE", e))?;
        }
        Ok(())
    }

    async fn expunge(&self, session: &mut ImapSession, set: &str, caps: Caps) -> Result<()> {
        let map = |e| session::after_login_error(&self.cfg, &self.app, "EXPUNGE", e);
        if caps.uidplus {
            let stream = session.uid_expunge(set).await.map_err(map)?;
            let _: Vec<_> = stream.collect().await;
        } else {
            // Without UIDPLUS, EXPUNGE also removes other \Deleted messages.
            let stream = session.expunge().await.map_err(map)?;
            let _: Vec<_> = stream.collect().await;
        }
        Ok(())
    }
}

/// Drains the responses the server sent unasked (async-imap queues them in
/// a bounded channel and drops them once it is full) and tells whether one
/// announced new mail (`EXISTS`, `RECENT`). A message appended while a pass
/// runs is announced during one of its commands, after its `UID SEARCH`;
/// a following IDLE would wait for the *next* change, so the caller passes
/// again instead.
fn new_mail_reported(session: &ImapSession) -> bool {
    use async_imap::types::UnsolicitedResponse;
    let mut announced = false;
    while let Ok(r) = session.unsolicited_responses.try_recv() {
        announced |= matches!(
            r,
            UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
        );
    }
    announced
}

/// A quoted IMAP string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A compact UID set of ascending UIDs: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_set_table() {
        let cases: [(&[u32], &str); 5] = [
            (&[], ""),
            (&[5], "5"),
            (&[1, 2, 3], "1:3"),
            (&[1, 2, 3, 7, 9, 10], "1:3,7,9:10"),
            (&[4_000_000_000, 4_000_000_001], "4000000000:4000000001"),
        ];
        for (uids, set) in cases {
            assert_eq!(uid_set(uids), set);
        }
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
