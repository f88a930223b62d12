//! One poll session on a POP3 mail config, run by the fetch kit's worker
//! every `poll-interval`.
//!
//! A poll session: connect and log in; UIDL + LIST; plan against the UIDL
//! set ([`crate::uidls`]); DELE again what was handed over but not deleted;
//! then RETR in batches (pipelined where offered), publish each message
//! with confirms, and for the confirmed prefix only: record the UIDL, then
//! DELE (`delete`). QUIT commits the deletions. Nothing is deleted before
//! RabbitMQ confirmed it, and a session cut anywhere before QUIT deletes
//! nothing at all (RFC 1939 §6).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use common::config::{AfterFetch, MailAuth};
use common::envelope::MessageRef;
use common::fetch::publish::{Confirmed, PublishError, Publisher};
use common::fetch::{FetchError, Mailbox};
use common::heartbeat::now_secs;
use redis::AsyncCommands;

use crate::error::{Error, Result};
use crate::pop3::{self, wire, Retrieved, Session, Transport};
use crate::uidls::{self, Listed, UidlSet};

/// The confirmed tag of a published message: message number, UIDL, size.
type Tag = (u32, String, usize);

/// The POP3 side of one mailbox's worker.
pub struct Worker<'a> {
    pub(crate) mb: &'a Mailbox,
}

impl Worker<'_> {
    async fn connect(&self) -> Result<Session<Transport>> {
        let kit = &self.mb.kit;
        pop3::connect(&self.mb.cfg, Arc::clone(&kit.tls), kit.options.read_timeout).await
    }

    /// Connects and logs in. A refused token is reported to the broker
    /// (forced refresh of that token); with a replacement the login is
    /// retried once, and a fresh token refused too means no permission.
    async fn login(&self) -> Result<Session<Transport>> {
        let (mb, cfg) = (self.mb, &self.mb.cfg);
        let user = &cfg.username;
        match &cfg.auth {
            MailAuth::Password { password } => {
                let password = password.as_ref().ok_or_else(|| {
                    Error::Setup(format!("mail config {} has no password", cfg.name))
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
                let token = mb.token(profile).await?;
                let mut s = self.connect().await?;
                let refusal = match s.auth_xoauth2(user, token.token.expose()).await? {
                    Ok(()) => return Ok(s),
                    Err(r) => r,
                };
                tracing::debug!(config = %cfg.name, reply = %refusal.reply, "XOAUTH2 refused");
                let expired = token.expires_at <= now_secs();
                let Some(fresh) = mb.replacement(profile, &token).await? else {
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
                    Err(r) => Err(mb
                        .permission(format!(
                            "a fresh token was refused too (grant the app with Add-MailboxPermission / the Exchange service principal; server said: {})",
                            r.reply
                        ))
                        .into()),
                }
            }
        }
    }

    /// One poll session, counted as a pass when it succeeds.
    pub async fn session(&self) -> Result<()> {
        let started = Instant::now();
        self.poll().await?;
        self.mb.passed(started);
        Ok(())
    }

    /// One poll; returns the number of messages handed over.
    async fn poll(&self) -> Result<usize> {
        let shared = &self.mb.kit;
        let name = &self.mb.cfg.name;
        let delete = self.mb.cfg.after_fetch == AfterFetch::Delete;
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
            .map_err(|source| FetchError::Redis {
                action: "read oversized records",
                source,
            })?;
        let plan = uidls::plan(
            &listed,
            handed.as_ref(),
            &known_oversized,
            self.mb.cfg.start_from,
            delete,
            self.mb.max_message_bytes(),
        );
        if let Some(present) = &plan.init {
            let skipped: Vec<String> = present.iter().map(|u| uidls::skipped(u)).collect();
            set.add(&skipped).await?;
            // A first start, or Redis lost the UIDL set: the two look alike,
            // so say what is skipped (docs/operations.md).
            tracing::warn!(config = %name, skipped = present.len(), "start-from now: existing messages recorded, not fetched");
            s.quit().await?;
            return Ok(0);
        }
        set.remove(&plan.prune).await?;
        for l in &plan.oversized {
            let message_ref = MessageRef::Pop3 {
                uidl: l.uidl.clone(),
            };
            self.mb.record_oversized(&message_ref, l.size).await?;
        }
        let mut deleted: Vec<String> = Vec::new();
        if delete && !plan.redelete.is_empty() {
            let msgs: Vec<u32> = plan.redelete.iter().map(|l| l.msg).collect();
            s.dele_many(&msgs).await?;
            tracing::info!(config = %name, count = msgs.len(), "deleting messages handed over in an earlier session");
            deleted.extend(plan.redelete.iter().map(|l| l.uidl.clone()));
        }
        let mut handed_over = 0;
        if !plan.fetch.is_empty() {
            let mut publisher: Publisher<Tag> = self.mb.publisher().await?;
            let outcome = self
                .transfer(&mut s, &mut publisher, &mut set, &plan.fetch, &mut deleted)
                .await;
            publisher.close().await;
            handed_over = outcome?;
        }
        self.commit(&mut s, !deleted.is_empty()).await?;
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

    /// RETR, publish and settle the planned messages, batch by batch; a
    /// message longer than `max-message-bytes` as it streams (whatever LIST
    /// said) is recorded as oversized. On an
    /// error what was confirmed is still settled (recorded, DELEd) and the
    /// session is QUIT, so confirmed mail does not come back. A message the
    /// broker refuses for its size is recorded as oversized (left on the
    /// server) and the rest goes on with a new publisher; the few messages
    /// whose confirms the closed channel lost are RETRieved again.
    async fn transfer(
        &self,
        s: &mut Session<Transport>,
        publisher: &mut Publisher<Tag>,
        set: &mut UidlSet,
        fetch: &[Listed],
        deleted: &mut Vec<String>,
    ) -> Result<usize> {
        let batch = self.mb.cfg.batch_size.max(1) as usize;
        let max = self.mb.max_message_bytes();
        let mut confirmed: Vec<Confirmed<Tag>> = Vec::new();
        let mut total = 0;
        let mut failure: Option<PublishError> = None;
        let mut todo: VecDeque<&Listed> = fetch.iter().collect();
        // Published and not yet settled, in publish order.
        let mut unsettled: Vec<&Listed> = Vec::new();
        while !todo.is_empty() {
            if self.mb.stopping() {
                tracing::info!(config = %self.mb.cfg.name, "stopping after the batch in flight");
                break;
            }
            let chunk: Vec<&Listed> = todo.drain(..batch.min(todo.len())).collect();
            let numbers: Vec<u32> = chunk.iter().map(|l| l.msg).collect();
            let mut too_large = None;
            let mut next = chunk.len();
            // Each body is published as it is read: a worker holds one body
            // being read, and the publisher at most `max-in-flight-bytes`.
            let mut read = s.retr_send(&numbers).await;
            for (i, listed) in chunk.iter().enumerate() {
                if read.is_err() {
                    break;
                }
                if too_large.is_some() || failure.is_some() {
                    // Read the RETR answers already asked for, keep nothing,
                    // so the session stays in step.
                    read = s.retr_discard(listed.msg).await;
                    continue;
                }
                let body = match s.retr_read(listed.msg, listed.size, max).await {
                    Ok(Retrieved::Body(b)) => b,
                    Ok(Retrieved::Refused(reply)) => {
                        tracing::warn!(config = %self.mb.cfg.name, msg = listed.msg, uidl = %listed.uidl, reply, "RETR refused; message skipped this time");
                        continue;
                    }
                    Ok(Retrieved::TooLarge(bytes)) => {
                        // LIST said less: the real length decides.
                        let message_ref = MessageRef::Pop3 {
                            uidl: listed.uidl.clone(),
                        };
                        self.mb.record_oversized(&message_ref, bytes).await?;
                        continue;
                    }
                    Err(e) => {
                        read = Err(e);
                        break;
                    }
                };
                let message_ref = MessageRef::Pop3 {
                    uidl: listed.uidl.clone(),
                };
                let envelope = self.mb.envelope(message_ref, &body);
                let len = body.len();
                let published = publisher
                    .publish(
                        &envelope,
                        &body,
                        (listed.msg, listed.uidl.clone(), len),
                        &mut confirmed,
                    )
                    .await;
                unsettled.push(listed);
                match published {
                    Ok(()) => {}
                    Err(e @ PublishError::TooLarge { .. }) => {
                        too_large = Some(e);
                        next = i + 1;
                    }
                    Err(e) => failure = Some(e),
                }
            }
            if let Err(e) = read {
                // The session is broken: nothing more can be DELEd in it.
                let _ = publisher.flush(&mut confirmed).await;
                let _ = self.record(set, &confirmed).await;
                return Err(e);
            }
            if failure.is_some() {
                break;
            }
            if too_large.is_none() && todo.is_empty() {
                // The last confirms; the broker may refuse a message here too.
                match publisher.flush(&mut confirmed).await {
                    Ok(()) => {}
                    Err(e @ PublishError::TooLarge { .. }) => too_large = Some(e),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = too_large {
                let refused = publisher.take_refused();
                total += self
                    .settle(s, set, &mut confirmed, deleted, &mut unsettled)
                    .await?;
                if let Some((msg, uidl, bytes)) = refused {
                    tracing::warn!(config = %self.mb.cfg.name, msg, %uidl, error = %e, "RabbitMQ refused the message for its size");
                    unsettled.retain(|l| l.msg != msg);
                    let message_ref = MessageRef::Pop3 { uidl };
                    self.mb.record_oversized(&message_ref, bytes as u64).await?;
                }
                // What the closed channel lost goes again, then the rest.
                for l in chunk[next..].iter().rev() {
                    todo.push_front(l);
                }
                for l in unsettled.drain(..).rev() {
                    todo.push_front(l);
                }
                *publisher = self.mb.publisher().await?;
                continue;
            }
            total += self
                .settle(s, set, &mut confirmed, deleted, &mut unsettled)
                .await?;
        }
        if failure.is_none() {
            if let Err(e) = publisher.flush(&mut confirmed).await {
                failure = Some(e);
            }
        }
        total += self
            .settle(s, set, &mut confirmed, deleted, &mut unsettled)
            .await?;
        if let Some(e) = failure {
            let abandoned = publisher.abandon();
            tracing::warn!(config = %self.mb.cfg.name, abandoned, error = %e, "publishing failed; unconfirmed messages stay on the server");
            self.commit(s, !deleted.is_empty()).await?;
            return Err(FetchError::from(e).into());
        }
        Ok(total)
    }

    /// QUIT, which commits the session's DELEs (`deletes`): only while this
    /// replica still holds the lease (§7a). Otherwise the session is dropped
    /// without QUIT, so the server deletes nothing; the UIDLs are recorded
    /// as handed over, and whoever holds the lease next deletes them.
    async fn commit(&self, s: &mut Session<Transport>, deletes: bool) -> Result<()> {
        if deletes {
            self.mb.fence().await?;
        }
        s.quit().await
    }

    /// For the confirmed messages: record their UIDLs, then DELE them; they
    /// leave `unsettled`.
    async fn settle(
        &self,
        s: &mut Session<Transport>,
        set: &mut UidlSet,
        confirmed: &mut Vec<Confirmed<Tag>>,
        deleted: &mut Vec<String>,
        unsettled: &mut Vec<&Listed>,
    ) -> Result<usize> {
        if confirmed.is_empty() {
            return Ok(0);
        }
        let done: HashSet<u32> = confirmed.iter().map(|c| c.tag.0).collect();
        unsettled.retain(|l| !done.contains(&l.msg));
        let n = confirmed.len();
        self.record(set, confirmed).await?;
        if self.mb.cfg.after_fetch == AfterFetch::Delete {
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
        self.mb.count_confirmed(confirmed, |t| t.2);
        for c in confirmed {
            tracing::debug!(config = %self.mb.cfg.name, msg = c.tag.0, uidl = %c.tag.1, bytes = c.tag.2, "published message");
        }
        Ok(())
    }
}
