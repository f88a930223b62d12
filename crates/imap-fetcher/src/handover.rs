//! One pass over the folder: find what is new by the checkpoint rules
//! ([`crate::checkpoint`]), then hand it over in half batches — the sizes
//! of all of it first (oversized messages are never fetched in full), then
//! per half batch `BODY.PEEK[]` and publish through the kit. Three half
//! batches are under way at once: one fetched and published, the one
//! before it waiting for its confirms, and the one before that settled —
//! the after-fetch action applied to its confirmed messages only
//! ([`crate::after_fetch`]), on a second session while the first fetches
//! when the server allows one, and the checkpoint advanced over the fully
//! handed-over prefix.

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

/// A batch whose confirms are in: its confirmed messages wait for the
/// after-fetch action, then the checkpoint advances over it.
struct Handed {
    /// Its UIDs (ascending).
    chunk: Vec<u32>,
    /// Those fetched in full.
    wanted: Vec<u32>,
    /// Those recorded as oversized (by size, by length, or refused by the
    /// broker for their size).
    oversized: Vec<u32>,
    /// Those RabbitMQ confirmed: the only ones the action touches.
    confirmed: Vec<u32>,
    /// The channel failed: the confirmed ones are still flagged, then the
    /// pass ends with this error.
    failed: Option<PublishError>,
    /// A refusal for size closed the channel.
    reopen: bool,
}

impl Handed {
    /// Nothing went wrong: it can be flagged while the next batch is
    /// fetched on the same channel.
    fn clean(&self) -> bool {
        !self.reopen && self.failed.is_none()
    }
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
    /// half batches go through a pipeline three deep: half batch n+1 is
    /// fetched and published while n's confirms arrive and n−1, confirmed,
    /// is settled — its confirmed messages flagged (or moved, deleted) and
    /// the checkpoint advanced. The flags go over a second session on the
    /// folder ([`Worker::second_session`]), so that the server's work on
    /// them overlaps the fetch on the first; when the server refuses a
    /// second session, the first flags between its fetches. At most one
    /// and a half `batch-size` are handed over and not yet flagged at any
    /// time: what a lost session makes the next one fetch again. (Thirds
    /// of a batch, to keep that at one `batch-size`, measured slower: each
    /// command costs the server a sync of the folder.) Memory stays bounded
    /// by the publisher's window and `max-in-flight-bytes`; nothing is
    /// flagged before its confirm.
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
        let uidvalidity = cp.uidvalidity;
        let mut publisher: Publisher<Tag> = self.mb.publisher().await?;
        let sizes = self.sizes(session, uids).await?;
        let half = (self.mb.cfg.batch_size as usize).div_ceil(2).max(1);
        let chunks: Vec<&[u32]> = uids.chunks(half).collect();
        // Only a pass long enough to settle one half batch while fetching
        // another has use for a second session; it logs in while the first
        // half batch is fetched (nothing waits to be settled yet).
        let mut open_second = chunks.len() > 2;
        let mut second: Option<ImapSession> = None;
        let mut confirmed: Vec<Confirmed<Tag>> = Vec::new();
        // Published, its confirms still coming in.
        let mut previous: Option<Fetched> = None;
        // Confirmed, not yet flagged.
        let mut handed: Option<Handed> = None;
        let mut complete = true;
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
                // The oldest half batch is settled on the second session
                // while this one fetches, or first when there is none.
                let flagging = match (handed.take(), second.as_mut()) {
                    (Some(h), Some(flagger)) => Some((h, flagger)),
                    (Some(h), None) => {
                        self.flag(session, h, cp, caps).await?;
                        None
                    }
                    (None, _) => None,
                };
                let fetch = self.fetch_publish(
                    session,
                    &mut publisher,
                    &todo,
                    uidvalidity,
                    &sizes,
                    &mut confirmed,
                );
                let fetched = match flagging {
                    Some((h, flagger)) => {
                        tokio::try_join!(fetch, self.flag(flagger, h, cp, caps))?.0
                    }
                    None if std::mem::take(&mut open_second) => {
                        let (fetched, opened) = tokio::join!(fetch, self.flag_session(uidvalidity));
                        second = opened;
                        fetched?
                    }
                    None => fetch.await?,
                };
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
                    let h = self
                        .confirm(
                            session,
                            &mut publisher,
                            p,
                            uidvalidity,
                            &mut confirmed,
                            false,
                        )
                        .await?;
                    if h.clean() {
                        handed = Some(h);
                        break;
                    }
                    // A failed channel ends the pass here, once what it
                    // confirmed is flagged.
                    let rest = self.flag(session, h, cp, caps).await?;
                    // A refusal for size closed the channel under the
                    // batch just published too: settle what of it was
                    // confirmed, and publish the rest of both again (a
                    // refused message of the current batch was recorded as
                    // oversized, and is `ahead` now).
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
                    todo = rest
                        .into_iter()
                        .chain(current.rest)
                        .filter(|u| !cp.ahead.contains(u))
                        .collect();
                    continue;
                }
                break;
            }
        }
        // A graceful stop between batches: what is under way is settled
        // before the session ends.
        if let Some(h) = handed.take() {
            self.flag(session, h, cp, caps).await?;
        }
        if let Some(p) = previous.take() {
            self.settle(session, &mut publisher, p, cp, caps, &mut confirmed, true)
                .await?;
        }
        publisher.close().await;
        if let Some(flagger) = second {
            crate::worker::logout(flagger).await;
        }
        Ok(complete)
    }

    /// A second session for the after-fetch action, or `None`: with
    /// `keep` there is nothing to store, and a server that refuses one
    /// (a limit on sessions per mailbox) leaves the flags to the first.
    async fn flag_session(&self, uidvalidity: u32) -> Option<ImapSession> {
        if matches!(self.mb.cfg.after_fetch, AfterFetch::Keep) {
            return None;
        }
        match self.second_session(uidvalidity).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(config = %self.mb.cfg.name, error = %e, "no second session for the after-fetch action; the first flags between its fetches");
                None
            }
        }
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
        uidvalidity: u32,
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
            self.oversized(session, &oversized, sizes, uidvalidity)
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
            // Replies for a wanted message without its body, and the
            // messages whose body came: flag updates made by the second
            // session arrive here too, as body-less FETCH replies.
            let mut bodyless: Vec<u32> = Vec::new();
            let mut bodies: HashSet<u32> = HashSet::new();
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
                    bodyless.push(uid);
                    continue;
                };
                bodies.insert(uid);
                if body.len() as u64 > max {
                    fetched
                        .longer
                        .insert(uid, u32::try_from(body.len()).unwrap_or(u32::MAX));
                    continue;
                }
                let message_ref = MessageRef::Imap { uid, uidvalidity };
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
            bodyless.sort_unstable();
            bodyless.dedup();
            for uid in bodyless {
                if !bodies.contains(&uid) && fetched.wanted.binary_search(&uid).is_ok() {
                    // Not handed over: the checkpoint waits for it, and the
                    // next pass asks for it again.
                    tracing::warn!(config = %name, uid, "FETCH reply without BODY[]; the message is fetched again on the next pass");
                }
            }
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

    /// Settles a batch (or two, after a refusal or a stop) on `session`:
    /// [`Worker::confirm`], then [`Worker::flag`]. Returns what of `group`
    /// is not handed over, and whether a refusal for size closed the
    /// channel (then that needs a new publisher).
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
        let handed = self
            .confirm(session, publisher, group, cp.uidvalidity, confirmed, all)
            .await?;
        let reopen = handed.reopen;
        let rest = self.flag(session, handed, cp, caps).await?;
        Ok(Settled { reopen, rest })
    }

    /// Waits for `group`'s confirms — all outstanding ones when `all`, else
    /// only those of `group`'s messages — and records as oversized those
    /// longer than the limit and one the broker refused for its size (on
    /// `session`, when the config moves them).
    async fn confirm(
        &self,
        session: &mut ImapSession,
        publisher: &mut Publisher<Tag>,
        group: Fetched,
        uidvalidity: u32,
        confirmed: &mut Vec<Confirmed<Tag>>,
        all: bool,
    ) -> Result<Handed> {
        let mb = self.mb;
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
            self.oversized(session, &uids, &longer, uidvalidity).await?;
            oversized.extend(uids);
        }
        let mut reopen = false;
        let failed = match flushed {
            Err(e @ PublishError::TooLarge { .. }) => {
                if let Some((uid, bytes)) = publisher.take_refused() {
                    tracing::warn!(config = %mb.cfg.name, uid, error = %e, "RabbitMQ refused the message for its size");
                    let sizes = HashMap::from([(uid, bytes as u32)]);
                    self.oversized(session, &[uid], &sizes, uidvalidity).await?;
                    oversized.push(uid);
                }
                reopen = true;
                None
            }
            Err(e) => Some(e),
            Ok(()) => None,
        };
        Ok(Handed {
            chunk,
            wanted,
            oversized,
            confirmed: ours.iter().map(|c| c.tag.0).collect(),
            failed,
            reopen,
        })
    }

    /// Applies the after-fetch action (on `session`) to `handed`'s
    /// confirmed messages, then advances the checkpoint over what is fully
    /// handed over (see `Checkpoint::advance`). A failed channel is the
    /// error, after the flags. Returns the fetched messages not handed over
    /// (unconfirmed).
    async fn flag(
        &self,
        session: &mut ImapSession,
        handed: Handed,
        cp: &mut Checkpoint,
        caps: Caps,
    ) -> Result<Vec<u32>> {
        let mb = self.mb;
        let Handed {
            chunk,
            wanted,
            oversized,
            confirmed,
            failed,
            ..
        } = handed;
        self.after_fetch(session, &confirmed, &mb.cfg.after_fetch, caps)
            .await?;
        if let Some(e) = failed {
            return Err(FetchError::from(e).into());
        }
        // Confirmed, oversized, or gone from the server.
        let handled: HashSet<u32> = confirmed.iter().chain(oversized.iter()).copied().collect();
        let present: HashSet<u32> = wanted.iter().chain(oversized.iter()).copied().collect();
        if cp.advance(&chunk, &handled, |uid| present.contains(&uid)) {
            let mut redis = mb.kit.redis.clone();
            checkpoint::save(&mut redis, &mb.kit.keys, &mb.cfg.name, &mb.kit.instance, cp).await?;
        }
        // What the channel did not confirm goes again after a reopen.
        Ok(wanted
            .into_iter()
            .filter(|u| !handled.contains(u))
            .collect())
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
