//! One pass over the folder: find what is new by the checkpoint rules
//! ([`crate::checkpoint`]), then hand it over batch by batch — the sizes of
//! all of it first (oversized messages are never fetched in full), then per
//! batch `BODY.PEEK[]` and publish through the kit; while the next batch is
//! fetched and published, the confirms of the one before come in, and only
//! then is it settled: the after-fetch action applied to its confirmed
//! messages only ([`crate::after_fetch`]), and the checkpoint advanced over
//! the fully handed-over prefix.

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

/// A batch fetched and published, not yet settled.
struct Fetched {
    /// Its UIDs (ascending).
    chunk: Vec<u32>,
    /// Those fetched in full (on the server, within the size limit).
    wanted: Vec<u32>,
    /// Those recorded as oversized by their RFC822.SIZE.
    oversized: Vec<u32>,
    /// Those whose body turned out longer than the limit: their lengths.
    longer: HashMap<u32, u32>,
    /// A graceful stop cut it short.
    stopped: bool,
    /// The broker refused a message for its size and closed the channel.
    too_large: Option<PublishError>,
}

/// How settling a batch ended.
struct Settled {
    /// A refusal for size closed the channel: `rest` needs a new publisher.
    reopen: bool,
    /// The fetched messages not handed over (unconfirmed).
    rest: Vec<u32>,
}

impl Fetched {
    /// This batch and the `next` one as one group to settle together.
    fn then(mut self, next: Fetched) -> Fetched {
        self.chunk.extend(next.chunk);
        self.wanted.extend(next.wanted);
        self.oversized.extend(next.oversized);
        self.longer.extend(next.longer);
        self.stopped |= next.stopped;
        self.too_large = self.too_large.or(next.too_large);
        self
    }
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
    ///
    /// The sizes of all of them come in one `UID FETCH` first. Then the
    /// batches form a pipeline one deep: batch n+1 is fetched and published
    /// while batch n's confirms arrive, and only then is batch n settled —
    /// its confirmed messages flagged (or moved, deleted) and the checkpoint
    /// advanced. Memory stays bounded by the publisher's window and
    /// `max-in-flight-bytes`; nothing is flagged before its confirm.
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
        let sizes = self.sizes(session, uids).await?;
        // Two half batches are in flight at once (one settling while the
        // next is fetched), so at most `batch-size` messages are handed
        // over and not yet flagged at any time: what a lost session makes
        // the next one fetch again.
        let batch = (self.mb.cfg.batch_size as usize).div_ceil(2).max(1);
        let mut confirmed: Vec<Confirmed<Tag>> = Vec::new();
        // The batch published and not yet settled.
        let mut previous: Option<Fetched> = None;
        let mut complete = true;
        let chunks: Vec<&[u32]> = uids.chunks(batch).collect();
        'chunks: for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let mut todo = chunk.to_vec();
            while !todo.is_empty() {
                if self.mb.stopping() {
                    complete = false;
                    break 'chunks;
                }
                // On an error the publisher goes with this function: what
                // it had outstanding counts as unconfirmed.
                let fetched = self
                    .fetch_publish(session, &mut publisher, &todo, cp, &sizes, &mut confirmed)
                    .await?;
                if last || fetched.stopped || fetched.too_large.is_some() {
                    // Settle everything now: the pass ends, the channel is
                    // closed, or the worker stops.
                    let group = match previous.take() {
                        Some(p) => p.then(fetched),
                        None => fetched,
                    };
                    let stopped = group.stopped;
                    let settled = self
                        .settle(
                            session,
                            &mut publisher,
                            group,
                            cp,
                            caps,
                            &mut confirmed,
                            true,
                        )
                        .await?;
                    if stopped {
                        complete = false;
                        break 'chunks;
                    }
                    if settled.reopen {
                        // The broker closed the channel on a message too
                        // large: a new one for what it did not confirm.
                        publisher = self.mb.publisher().await?;
                        todo = settled.rest;
                        continue;
                    }
                    break;
                }
                if let Some(p) = previous.replace(fetched) {
                    let settled = self
                        .settle(session, &mut publisher, p, cp, caps, &mut confirmed, false)
                        .await?;
                    if settled.reopen {
                        // A refusal for size closed the channel under the
                        // batch just published too: settle what of it was
                        // confirmed, and publish the rest of both again
                        // (a refused message of the current batch was
                        // recorded as oversized, and is `ahead` now).
                        let current = previous.take().expect("the batch just published");
                        let current = self
                            .settle(
                                session,
                                &mut publisher,
                                current,
                                cp,
                                caps,
                                &mut confirmed,
                                true,
                            )
                            .await?;
                        publisher = self.mb.publisher().await?;
                        todo = settled
                            .rest
                            .into_iter()
                            .chain(current.rest)
                            .filter(|u| !cp.ahead.contains(u))
                            .collect();
                        continue;
                    }
                }
                break;
            }
        }
        // A graceful stop between half batches: the one published is
        // settled before the session ends.
        if let Some(p) = previous.take() {
            self.settle(session, &mut publisher, p, cp, caps, &mut confirmed, true)
                .await?;
        }
        publisher.close().await;
        Ok(complete)
    }

    /// The sizes of `uids`' messages still on the server.
    async fn sizes(&self, session: &mut ImapSession, uids: &[u32]) -> Result<HashMap<u32, u32>> {
        let mut sizes = HashMap::new();
        let mut stream = self
            .cmd(
                "UID FETCH",
                session.uid_fetch(uid_set(uids), "(UID RFC822.SIZE)"),
            )
            .await?;
        while let Some(f) = self.next("UID FETCH", &mut stream).await? {
            if let (Some(uid), Some(size)) = (f.uid, f.size) {
                sizes.insert(uid, size);
            }
        }
        Ok(sizes)
    }

    /// The first half of a batch: oversized messages (by `sizes`) recorded,
    /// the rest fetched with `BODY.PEEK[]` and published. Confirms that come
    /// in meanwhile (of this batch or the one before) go to `confirmed`.
    async fn fetch_publish(
        &self,
        session: &mut ImapSession,
        publisher: &mut Publisher<Tag>,
        chunk: &[u32],
        cp: &Checkpoint,
        sizes: &HashMap<u32, u32>,
        confirmed: &mut Vec<Confirmed<Tag>>,
    ) -> Result<Fetched> {
        let (mb, cfg) = (self.mb, &self.mb.cfg);
        let name = &cfg.name;
        let started = Instant::now();
        // Oversized messages are never fetched in full.
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
            self.oversized(session, &oversized, sizes, cp.uidvalidity)
                .await?;
        }
        let mut fetched = Fetched {
            chunk: chunk.to_vec(),
            wanted,
            oversized,
            longer: HashMap::new(),
            stopped: false,
            too_large: None,
        };
        if !fetched.wanted.is_empty() {
            let mut stream = self
                .cmd(
                    "UID FETCH",
                    session.uid_fetch(uid_set(&fetched.wanted), "(UID BODY.PEEK[])"),
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
                if fetched.stopped || failure.is_some() || fetched.too_large.is_some() {
                    continue; // drain the response so the session stays usable
                }
                if mb.stopping() {
                    fetched.stopped = true;
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
                    fetched
                        .longer
                        .insert(uid, u32::try_from(body.len()).unwrap_or(u32::MAX));
                    continue;
                }
                let message_ref = MessageRef::Imap {
                    uid,
                    uidvalidity: cp.uidvalidity,
                };
                let envelope = mb.envelope(message_ref, body);
                match publisher
                    .publish(&envelope, body, (uid, body.len()), confirmed)
                    .await
                {
                    Ok(()) => {}
                    Err(e @ PublishError::TooLarge { .. }) => fetched.too_large = Some(e),
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
        Ok(fetched)
    }

    /// The second half of a batch (or of two, after a refusal or a stop):
    /// waits for `group`'s confirms — all outstanding ones when `all`, else
    /// only those of `group`'s messages — applies the after-fetch action to
    /// the confirmed ones and advances the checkpoint over what is fully
    /// handed over. Returns what of `group` is not handed over, and whether
    /// a refusal for size closed the channel (then that needs a new
    /// publisher).
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        session: &mut ImapSession,
        publisher: &mut Publisher<Tag>,
        group: Fetched,
        cp: &mut Checkpoint,
        caps: Caps,
        confirmed: &mut Vec<Confirmed<Tag>>,
        all: bool,
    ) -> Result<Settled> {
        let (mb, cfg) = (self.mb, &self.mb.cfg);
        let name = &cfg.name;
        let Fetched {
            chunk,
            wanted,
            mut oversized,
            longer,
            too_large,
            ..
        } = group;
        let mine: HashSet<u32> = wanted.iter().copied().collect();
        let flushed = match too_large {
            Some(e) => Err(e),
            None if all => publisher.flush(confirmed).await,
            None => {
                publisher
                    .confirm_while(|t| mine.contains(&t.0), confirmed)
                    .await
            }
        };
        // This group's confirms; a later batch's stay for its own turn.
        let (ours, later): (Vec<_>, Vec<_>) =
            confirmed.drain(..).partition(|c| mine.contains(&c.tag.0));
        *confirmed = later;
        mb.count_confirmed(&ours, |t| t.1);
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
        let uids: Vec<u32> = ours.iter().map(|c| c.tag.0).collect();
        self.after_fetch(session, &uids, &cfg.after_fetch, caps)
            .await?;
        flushed.map_err(FetchError::from)?;
        // Advance the checkpoint over what is fully handed over (confirmed,
        // oversized, or gone from the server); see `Checkpoint::advance`.
        let handled: HashSet<u32> = uids.iter().chain(oversized.iter()).copied().collect();
        let present: HashSet<u32> = wanted.iter().chain(oversized.iter()).copied().collect();
        if cp.advance(&chunk, &handled, |uid| present.contains(&uid)) {
            let mut redis = mb.kit.redis.clone();
            checkpoint::save(&mut redis, &mb.kit.keys, name, &mb.kit.instance, cp).await?;
        }
        // What the channel did not confirm goes again after a reopen.
        let rest = wanted
            .into_iter()
            .filter(|u| !handled.contains(u))
            .collect();
        Ok(Settled { reopen, rest })
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
