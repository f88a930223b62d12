//! One pass over the folder: find what is new by the checkpoint rules
//! ([`crate::checkpoint`]), then hand it over batch by batch — sizes first
//! (oversized messages are never fetched in full), `BODY.PEEK[]`, publish
//! through the kit, wait for the confirms, apply the after-fetch action to
//! the confirmed messages only ([`crate::after_fetch`]), and advance the
//! checkpoint over the fully handed-over prefix.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use common::config::{AfterFetch, StartFrom};
use common::envelope::MessageRef;
use common::fetch::publish::{Confirmed, PublishError, Publisher};
use common::fetch::FetchError;

use crate::after_fetch::uid_set;
use crate::checkpoint::{self, Checkpoint};
use crate::error::Result;
use crate::session::ImapSession;
use crate::worker::{Caps, Worker};

/// A published message's tag: its UID and size.
type Tag = (u32, usize);

/// How a batch ended.
enum Batch {
    /// Every message handed over (or left as oversized).
    Done,
    /// A graceful stop cut it short.
    Stopped,
    /// The broker refused a message for its size and closed the channel:
    /// these UIDs still need a publisher.
    Reopen(Vec<u32>),
}

impl Worker<'_> {
    /// Hands over everything new, per the checkpoint rules.
    pub(crate) async fn pass(
        &self,
        session: &mut ImapSession,
        uidvalidity: u32,
        uid_next: Option<u32>,
        caps: Caps,
    ) -> Result<()> {
        let (kit, cfg) = (&self.mb.kit, &self.mb.cfg);
        let mut redis = kit.redis.clone();
        let name = &cfg.name;
        let mut cp = checkpoint::load(&mut redis, &kit.keys, name).await?;
        let fresh = match &cp {
            None => true,
            Some(c) => c.uidvalidity != uidvalidity,
        };
        if fresh {
            let criterion = match &cp {
                None => match cfg.start_from {
                    StartFrom::Unseen => Some("UNSEEN".to_string()),
                    StartFrom::All => Some("ALL".to_string()),
                    StartFrom::Now => None,
                },
                Some(old) => {
                    tracing::warn!(config = %name, old = old.uidvalidity, new = uidvalidity, "UIDVALIDITY changed; re-scanning the folder");
                    Some(checkpoint::rescan_criterion(&cfg.after_fetch, old.saved_at))
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
                    ..Default::default()
                },
                _ => Checkpoint {
                    uidvalidity,
                    last_uid: top,
                    ..Default::default()
                },
            };
            if cp.is_none() && cfg.start_from == StartFrom::Now && top > 0 {
                // A first start, or Redis lost the checkpoint: the two look
                // alike, so say what is skipped (docs/operations.md).
                tracing::warn!(config = %name, up_to_uid = top, "start-from now: existing messages recorded, not fetched");
            }
            checkpoint::save(&mut redis, &kit.keys, name, &kit.instance, &new).await?;
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
                .filter(|u| *u > lo && *u <= hi && !cp.ahead.contains(u))
                .collect();
            if !self.process(session, &uids, &mut cp, caps).await? {
                return Ok(());
            }
            if uids
                .iter()
                .any(|u| *u > cp.last_uid && !cp.ahead.contains(u))
            {
                // A message of the scan was not handed over: the scan goes on
                // at the next pass, and nothing above it is looked at yet.
                return Ok(());
            }
            cp.last_uid = cp.scan_until;
            cp.ahead.retain(|u| *u > cp.scan_until);
            cp.scan_until = 0;
            cp.scan_criterion.clear();
            checkpoint::save(&mut redis, &kit.keys, name, &kit.instance, &cp).await?;
        }
        let last = cp.last_uid;
        let uids: Vec<u32> = self
            .search(session, &format!("UID {}:*", last.saturating_add(1)))
            .await?
            .into_iter()
            .filter(|u| *u > last && !cp.ahead.contains(u))
            .collect();
        self.process(session, &uids, &mut cp, caps).await?;
        Ok(())
    }

    async fn search(&self, session: &mut ImapSession, query: &str) -> Result<Vec<u32>> {
        let mut uids: Vec<u32> = self
            .cmd("UID SEARCH", session.uid_search(query))
            .await?
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
        let mut publisher: Publisher<Tag> = self.mb.publisher().await?;
        let batch = self.mb.cfg.batch_size.max(1) as usize;
        let mut complete = true;
        'chunks: for chunk in uids.chunks(batch) {
            let mut todo = chunk.to_vec();
            while !todo.is_empty() {
                if self.mb.stopping() {
                    complete = false;
                    break 'chunks;
                }
                match self.batch(session, &mut publisher, &todo, cp, caps).await {
                    Ok(Batch::Done) => break,
                    Ok(Batch::Stopped) => {
                        complete = false;
                        break 'chunks;
                    }
                    Ok(Batch::Reopen(rest)) => {
                        // The broker closed the channel on a message too
                        // large: a new one for the rest of the chunk.
                        publisher = self.mb.publisher().await?;
                        todo = rest;
                    }
                    Err(e) => {
                        publisher.abandon();
                        return Err(e);
                    }
                }
            }
        }
        publisher.close().await;
        Ok(complete)
    }

    /// The sizes of `chunk`'s messages still on the server.
    async fn sizes(&self, session: &mut ImapSession, chunk: &[u32]) -> Result<HashMap<u32, u32>> {
        let mut sizes = HashMap::new();
        let mut stream = self
            .cmd(
                "UID FETCH",
                session.uid_fetch(uid_set(chunk), "(UID RFC822.SIZE)"),
            )
            .await?;
        while let Some(f) = self.next("UID FETCH", &mut stream).await? {
            if let (Some(uid), Some(size)) = (f.uid, f.size) {
                sizes.insert(uid, size);
            }
        }
        Ok(sizes)
    }

    /// One batch: what was published is confirmed, flagged and checkpointed
    /// before it returns, also when a graceful stop cut it short.
    async fn batch(
        &self,
        session: &mut ImapSession,
        publisher: &mut Publisher<Tag>,
        chunk: &[u32],
        cp: &mut Checkpoint,
        caps: Caps,
    ) -> Result<Batch> {
        let (mb, cfg) = (self.mb, &self.mb.cfg);
        let name = &cfg.name;
        let started = Instant::now();
        // Sizes first: oversized messages are never fetched in full.
        let sizes = self.sizes(session, chunk).await?;
        let max = mb.max_message_bytes();
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
        let mut confirmed: Vec<Confirmed<Tag>> = Vec::new();
        // Longer than RFC822.SIZE said, and over the limit: the real length
        // decides.
        let mut longer: HashMap<u32, u32> = HashMap::new();
        let mut stopped = false;
        // A message the broker refused for its size closes the channel: the
        // batch stops publishing there and goes on with a new publisher.
        let mut too_large: Option<PublishError> = None;
        if !wanted.is_empty() {
            let mut stream = self
                .cmd(
                    "UID FETCH",
                    session.uid_fetch(uid_set(&wanted), "(UID BODY.PEEK[])"),
                )
                .await?;
            let mut failure = None;
            loop {
                let f = match self.next("UID FETCH", &mut stream).await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                if stopped || failure.is_some() || too_large.is_some() {
                    continue; // drain the response so the session stays usable
                }
                if mb.stopping() {
                    stopped = true;
                    continue;
                }
                let Some(uid) = f.uid else {
                    continue; // an unsolicited FETCH (flags of another message)
                };
                let Some(body) = f.body() else {
                    // Not handed over: the checkpoint waits for it, and the
                    // next pass asks for it again.
                    tracing::warn!(config = %name, uid, "FETCH reply without BODY[]; the message is fetched again on the next pass");
                    continue;
                };
                if body.len() as u64 > max {
                    longer.insert(uid, u32::try_from(body.len()).unwrap_or(u32::MAX));
                    continue;
                }
                let message_ref = MessageRef::Imap {
                    uid,
                    uidvalidity: cp.uidvalidity,
                };
                let envelope = mb.envelope(message_ref, body.to_vec());
                match publisher
                    .publish(&envelope, (uid, body.len()), &mut confirmed)
                    .await
                {
                    Ok(()) => {}
                    Err(e @ PublishError::TooLarge { .. }) => too_large = Some(e),
                    Err(e) => {
                        failure = Some(FetchError::from(e).into());
                        break;
                    }
                }
                tracing::debug!(config = %name, uid, bytes = body.len(), "published message");
            }
            drop(stream);
            if let Some(e) = failure {
                // The session may be mid-response: flag nothing more here; what
                // was confirmed is fetched again later (a duplicate, never a loss).
                return Err(e);
            }
        }
        mb.kit
            .metrics
            .fetch_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let flushed = match too_large.take() {
            Some(e) => Err(e),
            None => publisher.flush(&mut confirmed).await,
        };
        mb.count_confirmed(&confirmed, |t| t.1);
        let mut oversized = oversized;
        if !longer.is_empty() {
            let uids: Vec<u32> = longer.keys().copied().collect();
            self.oversized(session, &uids, &longer, cp.uidvalidity)
                .await?;
            oversized.extend(uids);
        }
        let mut reopen = false;
        let flushed = match flushed {
            Err(e @ PublishError::TooLarge { .. }) => {
                if let Some((uid, bytes)) = publisher.take_refused() {
                    tracing::warn!(config = %name, uid, error = %e, "RabbitMQ refused the message for its size");
                    let sizes = HashMap::from([(uid, bytes as u32)]);
                    self.oversized(session, &[uid], &sizes, cp.uidvalidity)
                        .await?;
                    oversized.push(uid);
                }
                reopen = true;
                Ok(())
            }
            other => other,
        };
        let uids: Vec<u32> = confirmed.iter().map(|c| c.tag.0).collect();
        self.after_fetch(session, &uids, &cfg.after_fetch, caps)
            .await?;
        flushed.map_err(FetchError::from)?;
        // Advance the checkpoint over what is fully handed over (confirmed,
        // oversized, or gone from the server); see `Checkpoint::advance`.
        let handled: HashSet<u32> = uids.iter().chain(oversized.iter()).copied().collect();
        if cp.advance(chunk, &handled, |uid| sizes.contains_key(&uid)) {
            let mut redis = mb.kit.redis.clone();
            checkpoint::save(&mut redis, &mb.kit.keys, name, &mb.kit.instance, cp).await?;
        }
        if reopen {
            // What the closed channel did not confirm goes again.
            let rest = wanted
                .into_iter()
                .filter(|u| !handled.contains(u))
                .collect();
            return Ok(Batch::Reopen(rest));
        }
        Ok(if stopped { Batch::Stopped } else { Batch::Done })
    }

    /// Records the oversized messages; they are left in place, or moved when
    /// the config moves handled mail.
    async fn oversized(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        sizes: &HashMap<u32, u32>,
        uidvalidity: u32,
    ) -> Result<()> {
        for &uid in uids {
            let size = sizes.get(&uid).copied().unwrap_or(0);
            self.mb
                .record_oversized(&MessageRef::Imap { uid, uidvalidity }, u64::from(size))
                .await?;
        }
        let action = &self.mb.cfg.after_fetch;
        if let AfterFetch::Move(_) = action {
            self.after_fetch(session, uids, action, Caps::default())
                .await?;
        }
        Ok(())
    }
}
