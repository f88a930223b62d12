//! Acks of one consuming channel, coalesced (§8): a settled delivery is
//! acked only after the commit that holds it, as before, but deliveries
//! that settle together (one group commit) go back to RabbitMQ as one
//! `basic.ack` with `multiple`, not one frame each.
//!
//! `multiple` acks every unacked delivery up to its tag, so it is sent only
//! for a tag below every delivery still being processed (or left unacked
//! on purpose, for redelivery). A settled delivery above one still in
//! progress waits for it; once [`HELD_MAX`] wait, they are acked one by one
//! so that a slow message (a large workbook, a store retry, a requeue
//! pause) never holds back the prefetch window. Frames go out under one
//! lock, in the order they were decided: a `multiple` ack never follows a
//! single ack it covers, and a requeue (`nack`) is sent before any
//! `multiple` ack whose range holds it.

use std::collections::BTreeSet;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::Mutex;

/// Settled deliveries held behind one still in progress before they are
/// acked one by one.
pub const HELD_MAX: usize = 32;

/// The ack state of one channel.
pub struct Acks {
    channel: Channel,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Delivered, not yet acked or requeued (in progress, or left unacked).
    open: BTreeSet<u64>,
    /// Settled and waiting for an ack: a subset of `open`.
    settled: BTreeSet<u64>,
}

/// What to send for the deliveries settled so far.
#[derive(Debug, PartialEq, Eq)]
enum Send {
    /// Nothing yet.
    Nothing,
    /// One ack with `multiple` up to this tag.
    UpTo(u64),
    /// These acks, one by one.
    Each(Vec<u64>),
}

impl State {
    /// `tag` is settled: what to ack now.
    fn settle(&mut self, tag: u64) -> Send {
        self.settled.insert(tag);
        let lowest_open_unsettled = self
            .open
            .iter()
            .find(|t| !self.settled.contains(t))
            .copied();
        let covered: Vec<u64> = match lowest_open_unsettled {
            Some(first) => self.settled.range(..first).copied().collect(),
            None => self.settled.iter().copied().collect(),
        };
        if let Some(&up_to) = covered.last() {
            for t in &covered {
                self.settled.remove(t);
                self.open.remove(t);
            }
            return Send::UpTo(up_to);
        }
        if self.settled.len() >= HELD_MAX {
            let each: Vec<u64> = std::mem::take(&mut self.settled).into_iter().collect();
            for t in &each {
                self.open.remove(t);
            }
            return Send::Each(each);
        }
        Send::Nothing
    }

    /// Everything settled, acked one by one (the session ends).
    fn flush(&mut self) -> Vec<u64> {
        let each: Vec<u64> = std::mem::take(&mut self.settled).into_iter().collect();
        for t in &each {
            self.open.remove(t);
        }
        each
    }
}

impl Acks {
    /// Acks on `channel`, the consuming channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            state: Mutex::default(),
        }
    }

    /// A delivery arrived: called before it is handled, in delivery order.
    pub async fn delivered(&self, tag: u64) {
        self.state.lock().await.open.insert(tag);
    }

    /// The delivery `tag` is settled (its commit, and for a rejection its
    /// confirmed dead letter, are done): it is acked now or with the next
    /// ones.
    pub async fn ack(&self, tag: u64) -> Result<(), lapin::Error> {
        let mut state = self.state.lock().await;
        match state.settle(tag) {
            Send::Nothing => Ok(()),
            Send::UpTo(up_to) => {
                self.channel
                    .basic_ack(up_to, BasicAckOptions { multiple: true })
                    .await
            }
            Send::Each(tags) => self.each(&tags).await,
        }
    }

    /// Puts the delivery `tag` back in the queue.
    pub async fn requeue(&self, tag: u64) -> Result<(), lapin::Error> {
        let mut state = self.state.lock().await;
        let sent = self
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await;
        state.open.remove(&tag);
        sent
    }

    /// Acks what is settled and still held (the session ends: whatever is
    /// left open goes back to the queue when the channel closes).
    pub async fn flush(&self) -> Result<(), lapin::Error> {
        let mut state = self.state.lock().await;
        let tags = state.flush();
        self.each(&tags).await
    }

    async fn each(&self, tags: &[u64]) -> Result<(), lapin::Error> {
        let mut result = Ok(());
        for &t in tags {
            if let Err(e) = self.channel.basic_ack(t, BasicAckOptions::default()).await {
                result = Err(e);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(open: &[u64]) -> State {
        State {
            open: open.iter().copied().collect(),
            settled: BTreeSet::new(),
        }
    }

    #[test]
    fn in_order_settles_ack_one_range_each() {
        let mut s = state(&[1, 2, 3]);
        assert_eq!(s.settle(1), Send::UpTo(1));
        assert_eq!(s.settle(2), Send::UpTo(2));
        assert_eq!(s.settle(3), Send::UpTo(3));
        assert!(s.open.is_empty() && s.settled.is_empty());
    }

    #[test]
    fn a_settle_behind_one_in_progress_waits_then_goes_with_it() {
        let mut s = state(&[1, 2, 3, 4]);
        assert_eq!(s.settle(2), Send::Nothing);
        assert_eq!(s.settle(3), Send::Nothing);
        // 1 settles: 1..=3 in one frame; 4 is still in progress.
        assert_eq!(s.settle(1), Send::UpTo(3));
        assert_eq!(s.open, BTreeSet::from([4]));
    }

    #[test]
    fn multiple_never_covers_a_delivery_in_progress() {
        let mut s = state(&[1, 2, 3, 4, 5]);
        assert_eq!(s.settle(1), Send::UpTo(1));
        assert_eq!(s.settle(4), Send::Nothing);
        assert_eq!(s.settle(2), Send::UpTo(2));
        // 3 open: 4 waits for it.
        assert_eq!(s.open, BTreeSet::from([3, 4, 5]));
        assert_eq!(s.settle(3), Send::UpTo(4));
    }

    #[test]
    fn requeued_deliveries_leave_the_range() {
        let mut s = state(&[1, 2, 3]);
        // 1 was requeued (its nack sent): no longer open.
        s.open.remove(&1);
        assert_eq!(s.settle(3), Send::Nothing);
        assert_eq!(s.settle(2), Send::UpTo(3));
    }

    #[test]
    fn many_held_behind_a_slow_one_are_acked_one_by_one() {
        let tags: Vec<u64> = (1..=HELD_MAX as u64 + 2).collect();
        let mut s = state(&tags);
        for t in 2..=HELD_MAX as u64 {
            assert_eq!(s.settle(t), Send::Nothing, "tag {t}");
        }
        let each: Vec<u64> = (2..=HELD_MAX as u64 + 1).collect();
        assert_eq!(s.settle(HELD_MAX as u64 + 1), Send::Each(each));
        // The slow one and the last remain open; a later settle of the
        // slow one acks only itself.
        assert_eq!(s.open, BTreeSet::from([1, HELD_MAX as u64 + 2]));
        assert_eq!(s.settle(1), Send::UpTo(1));
    }

    #[test]
    fn flush_acks_what_is_held() {
        let mut s = state(&[1, 2, 3]);
        assert_eq!(s.settle(3), Send::Nothing);
        assert_eq!(s.flush(), vec![3]);
        assert_eq!(s.open, BTreeSet::from([1, 2]));
    }
}
