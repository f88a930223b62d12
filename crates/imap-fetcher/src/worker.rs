//! One IMAP session on a mail config: log in (asking the broker for a
//! fresh token when the server refuses one), SELECT, then pass over the
//! folder ([`crate::handover`]) and wait with IDLE or polling, until a
//! graceful stop or an error.

use std::future::Future;
use std::time::{Duration, Instant};

use common::config::MailAuth;
use common::fetch::Mailbox;
use common::token::AccessToken;
use futures::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::session::{self, Credentials, ImapSession};
use crate::utf7;

/// Server capabilities that change what we send.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Caps {
    pub idle: bool,
    pub mv: bool,
    pub uidplus: bool,
}

/// The IMAP side of one mailbox's worker.
pub struct Worker<'a> {
    pub(crate) mb: &'a Mailbox,
}

impl Worker<'_> {
    /// Maps an error of `action` after login (Exchange's "authenticated but
    /// not connected" is a missing permission).
    pub fn err(&self, action: &'static str) -> impl Fn(async_imap::error::Error) -> Error + '_ {
        move |e| session::after_login_error(&self.mb.cfg, &self.mb.app, action, e)
    }

    /// The answer to one command, within `command-timeout`; a silent
    /// server ends the session ([`Error::Timeout`]).
    pub(crate) async fn cmd<T>(
        &self,
        action: &'static str,
        answer: impl Future<Output = async_imap::error::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.mb.cfg.command_timeout, answer).await {
            Ok(r) => r.map_err(self.err(action)),
            Err(_) => Err(self.timed_out(action)),
        }
    }

    /// The next part of a command's answer, within `command-timeout`: a
    /// long FETCH is timed by its progress, not as a whole.
    pub(crate) async fn next<S, T>(&self, action: &'static str, answer: &mut S) -> Result<Option<T>>
    where
        S: Stream<Item = async_imap::error::Result<T>> + Unpin,
    {
        match tokio::time::timeout(self.mb.cfg.command_timeout, answer.next()).await {
            Ok(None) => Ok(None),
            Ok(Some(r)) => r.map(Some).map_err(self.err(action)),
            Err(_) => Err(self.timed_out(action)),
        }
    }

    fn timed_out(&self, action: &'static str) -> Error {
        Error::Timeout {
            action,
            endpoint: session::endpoint(&self.mb.cfg),
            secs: self.mb.cfg.command_timeout.as_secs(),
        }
    }

    /// Sessions until stopped or failed: a session opened with a token ends
    /// (LOGOUT) before that token expires and a new one starts at once with
    /// a fresh token, so a server that ends sessions at token expiry
    /// (Exchange Online's `BYE … AccessTokenExpired`) never cuts a batch.
    pub async fn session(&self) -> Result<()> {
        let mut previous = None;
        loop {
            match self.one_session(previous.take()).await? {
                (Ended::Stopped, _) => return Ok(()),
                (Ended::TokenDue, fingerprint) => {
                    tracing::info!(config = %self.mb.cfg.name, "renewing the session before its token expires");
                    previous = fingerprint;
                }
            }
        }
    }

    /// One session: login, select, then pass/wait until stopped, failed,
    /// or its token is due for renewal. When the broker has no newer token
    /// than `previous` (the one the last session was renewed from), this
    /// session is not renewed: it runs until the server ends it, rather
    /// than logging in again and again with the same token.
    async fn one_session(&self, previous: Option<String>) -> Result<(Ended, Option<String>)> {
        let cfg = &self.mb.cfg;
        let (mut session, token) = self.login().await?;
        let renew_at = token
            .as_ref()
            .filter(|t| previous.as_ref() != Some(&t.fingerprint))
            .map(|t| renewal_due(t.expires_at));
        let fingerprint = token.map(|t| t.fingerprint);
        let folder = utf7::encode(&cfg.folder);
        let mailbox = self.cmd("SELECT", session.select(&folder)).await?;
        let uidvalidity = mailbox.uid_validity.ok_or_else(|| {
            Error::Unsupported(format!(
                "folder {} of {} has no UIDVALIDITY",
                cfg.folder, cfg.username
            ))
        })?;
        let caps = self.cmd("CAPABILITY", session.capabilities()).await?;
        let caps = Caps {
            idle: caps.has_str("IDLE"),
            mv: caps.has_str("MOVE"),
            uidplus: caps.has_str("UIDPLUS"),
        };
        tracing::info!(config = %cfg.name, uidvalidity, exists = mailbox.exists, idle = caps.idle, "selected folder");
        let mut uid_next = mailbox.uid_next;
        loop {
            let started = Instant::now();
            self.pass(&mut session, uidvalidity, uid_next.take(), caps)
                .await?;
            self.mb.passed(started);
            if self.mb.stopping() {
                logout(session).await;
                return Ok((Ended::Stopped, None));
            }
            if renew_at.is_some_and(|t| Instant::now() >= t) {
                logout(session).await;
                return Ok((Ended::TokenDue, fingerprint));
            }
            if new_mail_reported(&session) {
                // Mail that arrived during the pass was announced then; IDLE
                // would not announce it again.
                tracing::debug!(config = %cfg.name, "new mail announced during the pass; passing again");
                continue;
            }
            let until_renewal = renew_at.map(|t| t.saturating_duration_since(Instant::now()));
            session = if cfg.idle && caps.idle {
                let wait = until_renewal.map_or(cfg.idle_renew, |d| d.min(cfg.idle_renew));
                self.idle(session, wait).await?
            } else {
                let wait = until_renewal.map_or(cfg.poll_interval, |d| d.min(cfg.poll_interval));
                tokio::select! {
                    _ = self.mb.graceful.cancelled() => {
                        logout(session).await;
                        return Ok((Ended::Stopped, None));
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                self.cmd("NOOP", session.noop()).await?;
                session
            };
            if self.mb.stopping() {
                logout(session).await;
                return Ok((Ended::Stopped, None));
            }
        }
    }

    /// Logs in; on a refused token asks the broker for a forced refresh of
    /// that token and retries once with the replacement. With a token, also
    /// the token it logged in with.
    async fn login(&self) -> Result<(ImapSession, Option<AccessToken>)> {
        let (cfg, tls) = (&self.mb.cfg, &self.mb.kit.tls);
        match &cfg.auth {
            MailAuth::Password { password } => {
                let password = password.as_ref().map(|p| p.expose()).unwrap_or("");
                session::open(cfg, tls, Credentials::Password { password })
                    .await
                    .map(|s| (s, None))
                    .map_err(|e| self.refused_is_permission(e))
            }
            MailAuth::OAuth { profile } => {
                let token = self.mb.token(profile).await?;
                let xoauth2 = |token| Credentials::XOAuth2 { token };
                match session::open(cfg, tls, xoauth2(token.token.expose())).await {
                    Err(e) if e.is_auth() => {
                        let Some(fresh) = self.mb.replacement(profile, &token).await? else {
                            return Err(self.refused_is_permission(e));
                        };
                        session::open(cfg, tls, xoauth2(fresh.token.expose()))
                            .await
                            .map(|s| (s, Some(fresh)))
                            .map_err(|e| self.refused_is_permission(e))
                    }
                    other => other.map(|s| (s, Some(token))),
                }
            }
        }
    }

    /// A second session on the folder, for the after-fetch action while
    /// this one fetches: logged in with the current token (no forced
    /// refresh: a refusal here only means working with one session) and
    /// the folder selected, which must still have `uidvalidity`.
    pub(crate) async fn second_session(&self, uidvalidity: u32) -> Result<ImapSession> {
        let (cfg, tls) = (&self.mb.cfg, &self.mb.kit.tls);
        let token;
        let credentials = match &cfg.auth {
            MailAuth::Password { password } => Credentials::Password {
                password: password.as_ref().map(|p| p.expose()).unwrap_or(""),
            },
            MailAuth::OAuth { profile } => {
                token = self.mb.token(profile).await?;
                Credentials::XOAuth2 {
                    token: token.token.expose(),
                }
            }
        };
        let mut session = session::open(cfg, tls, credentials).await?;
        let folder = utf7::encode(&cfg.folder);
        let mailbox = self.cmd("SELECT", session.select(&folder)).await?;
        if mailbox.uid_validity != Some(uidvalidity) {
            logout(session).await;
            return Err(Error::Unsupported(format!(
                "folder {} of {} changed its UIDVALIDITY",
                cfg.folder, cfg.username
            )));
        }
        Ok(session)
    }

    /// A refused login that a fresh token did not fix is a missing grant.
    fn refused_is_permission(&self, e: Error) -> Error {
        match e {
            Error::AuthFailed { detail, .. } => self
                .mb
                .permission(format!("the server refused the login ({detail}); grant the app access to the mailbox, or check the credentials"))
                .into(),
            other => other,
        }
    }

    /// IDLE until the server reports a change, `wait` (`idle-renew`, or less
    /// when the token is due) passes, or a graceful stop is asked for.
    /// Returns the session, ready for commands.
    async fn idle(&self, session: ImapSession, wait: Duration) -> Result<ImapSession> {
        use async_imap::extensions::idle::IdleResponse;
        use async_imap::imap_proto::{Response, Status};
        let mut handle = session.idle();
        self.cmd("IDLE", handle.init()).await?;
        let outcome = {
            // async-imap's own timeout starts again with every untagged
            // response, so a server that keeps talking would hold IDLE past
            // `wait` (and a session past its token): the deadline is ours.
            let (fut, stop) = handle.wait_with_timeout(wait);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => r,
                _ = tokio::time::sleep(wait) => {
                    drop(stop);
                    fut.await
                }
                _ = self.mb.graceful.cancelled() => {
                    drop(stop);
                    fut.await
                }
            }
        };
        let ended = match outcome {
            Ok(IdleResponse::NewData(data))
                if matches!(
                    data.parsed(),
                    Response::Data {
                        status: Status::Bye,
                        ..
                    }
                ) =>
            {
                Some(Error::Imap {
                    action: "IDLE",
                    endpoint: session::endpoint(&self.mb.cfg),
                    source: async_imap::error::Error::ConnectionLost,
                })
            }
            Ok(_) => None,
            Err(e) => Some(self.err("IDLE")(e)),
        };
        if let Some(e) = ended {
            self.mb
                .kit
                .metrics
                .idle_reconnects
                .with_label_values(&[&self.mb.cfg.name])
                .inc();
            return Err(e);
        }
        self.cmd("DONE", handle.done()).await
    }
}

/// Why a session ended without an error.
enum Ended {
    /// A graceful stop.
    Stopped,
    /// Its token is about to expire: start a new session.
    TokenDue,
}

/// When a session opened with a token expiring at `expires_at` (epoch
/// seconds) should end: a quarter of its remaining life before expiry,
/// between 5 s and 2 min ahead (an Entra token of 60–90 min: 2 min; the
/// broker has a fresh one long before).
fn renewal_due(expires_at: u64) -> Instant {
    let left = Duration::from_secs(expires_at.saturating_sub(common::heartbeat::now_secs()));
    let margin = (left / 4).clamp(Duration::from_secs(5), Duration::from_secs(120));
    Instant::now() + left.saturating_sub(margin)
}

/// Ends a session (LOGOUT, briefly waited for).
pub(crate) async fn logout(mut session: ImapSession) {
    let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
}

/// Drains the responses the server sent unasked (async-imap queues them in
/// a bounded channel and drops them once it is full) and tells whether one
/// announced new mail (`EXISTS`, `RECENT`), or may have: see
/// [`may_have_announced_new_mail`]. A message appended while a pass runs is
/// announced during one of its commands, after its `UID SEARCH`; a
/// following IDLE would wait for the *next* change, so the caller passes
/// again instead.
fn new_mail_reported(session: &ImapSession) -> bool {
    let queue = &session.unsolicited_responses;
    let full = queue.is_full();
    may_have_announced_new_mail(full, std::iter::from_fn(|| queue.try_recv().ok()))
}

/// Whether the unasked responses `drained` (all of them are consumed) from
/// a queue that was `full` or not announced new mail. A full queue may have
/// dropped the announcement — a long pass that moves mail fills it with an
/// `EXPUNGE` per message, and the second session's flags with a `FETCH`
/// each — so it counts as one: the cost is one `UID SEARCH` that finds
/// nothing.
fn may_have_announced_new_mail(
    full: bool,
    drained: impl Iterator<Item = async_imap::types::UnsolicitedResponse>,
) -> bool {
    use async_imap::types::UnsolicitedResponse;
    let mut announced = full;
    for r in drained {
        announced |= matches!(
            r,
            UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
        );
    }
    announced
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::types::UnsolicitedResponse::{Exists, Expunge, Recent};

    #[test]
    fn an_announcement_or_a_full_queue_means_new_mail_may_be_there() {
        assert!(may_have_announced_new_mail(
            false,
            [Expunge(3), Exists(9)].into_iter()
        ));
        assert!(may_have_announced_new_mail(false, [Recent(1)].into_iter()));
        assert!(!may_have_announced_new_mail(
            false,
            [Expunge(3), Expunge(2)].into_iter()
        ));
        assert!(!may_have_announced_new_mail(false, std::iter::empty()));
        // Full: an EXISTS may have been dropped behind these expunges.
        assert!(may_have_announced_new_mail(true, (1..=100).map(Expunge)));
    }

    #[test]
    fn every_queued_response_is_consumed() {
        let mut queue = vec![Expunge(1), Exists(2), Expunge(3)].into_iter();
        assert!(may_have_announced_new_mail(false, queue.by_ref()));
        assert_eq!(queue.next(), None);
    }
}
