//! Confirmed publishing of envelopes (§4, §5, §8), shared by both fetchers.
//!
//! A [`Publisher`] owns one channel in confirm mode. Publishes and confirms
//! are pipelined: up to `window` messages and `max-in-flight-bytes` of
//! bodies are outstanding at once (bodies RabbitMQ has not confirmed may
//! still sit in the connection's buffers: a blocked connection holds them),
//! and the oldest confirmation is awaited only when the window is full (or
//! on [`Publisher::flush`]). Confirmations are handed back in publish order, so
//! a caller may apply its after-fetch action and advance its checkpoint for
//! exactly the confirmed prefix.
//!
//! - A nack, or a message returned as unroutable (`mandatory`), is an error:
//!   the message is *not* confirmed and the caller must not flag it.
//! - A *blocked* connection (RabbitMQ resource alarm) is waited on: there is
//!   no confirm timeout, confirmations simply arrive once the alarm clears,
//!   and nothing is ever republished while the connection lives. A warning is
//!   logged every [`BLOCKED_WARN_EVERY`] while confirmations are overdue.
//! - A channel or connection error fails the outstanding publishes; what the
//!   broker confirmed before it is still handed back, and the caller
//!   reconnects and fetches the rest again (a duplicate, never a loss).
//! - A message over the broker's size limit (`max_message_size`): RabbitMQ
//!   closes the channel with 406 PRECONDITION_FAILED. That is
//!   [`PublishError::TooLarge`], a per-message outcome: the caller takes the
//!   refused message ([`Publisher::take_refused`]), records it as oversized,
//!   and goes on with a new publisher; only the few publishes whose confirms
//!   the closed channel lost are sent again.
//!
//! An [`AmqpLink`] is a replica's one AMQP connection, shared by its mailbox
//! workers and reopened on demand when it has died (RabbitMQ restarted):
//! each batch of work asks it for a fresh [`Publisher`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::{Channel, Connection};

use crate::config::Config;
use crate::envelope::Envelope;

/// How often a warning is logged while a confirmation is overdue.
pub const BLOCKED_WARN_EVERY: Duration = Duration::from_secs(10);

/// How long a confirm outstanding on a failed channel is waited for.
const LOST_CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// Default number of outstanding (unconfirmed) publishes.
pub const DEFAULT_WINDOW: usize = 256;

/// Why a publish did not get a positive confirmation.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to RabbitMQ could be opened.
    #[error(transparent)]
    Connect(crate::Error),
    /// The channel or connection failed (RabbitMQ down, channel closed).
    #[error("cannot publish to RabbitMQ: {0}")]
    Channel(#[from] lapin::Error),
    /// The broker refused the message (negative acknowledgement).
    #[error("cannot publish message {dedupe_key}: RabbitMQ nacked it")]
    Nacked {
        /// The dedupe key of the refused message.
        dedupe_key: String,
    },
    /// The broker refused a message for its size (406 PRECONDITION_FAILED,
    /// RabbitMQ's `max_message_size`) and closed the channel.
    #[error("RabbitMQ refused message {dedupe_key} of {bytes} bytes as too large: {detail}")]
    TooLarge {
        /// The dedupe key of the refused message.
        dedupe_key: String,
        /// Its size.
        bytes: usize,
        /// The broker's reason.
        detail: String,
    },
    /// The message reached no queue (the exchange has no matching binding).
    #[error("cannot publish message {dedupe_key}: exchange {exchange} routed it to no queue (key {routing_key})")]
    Unroutable {
        /// The dedupe key of the returned message.
        dedupe_key: String,
        /// The exchange.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },
}

impl PublishError {
    /// True when retrying later (after reconnecting) may succeed. Every kind
    /// is retried by the fetchers; an unroutable message points at a
    /// topology problem a human should look at. A message too large is
    /// handled by the caller, message by message, and never retried.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Unroutable { .. } | Self::TooLarge { .. })
    }

    /// A short label for the `errors` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) | Self::Channel(_) => "amqp",
            Self::Nacked { .. } => "nack",
            Self::Unroutable { .. } => "unroutable",
            Self::TooLarge { .. } => "too-large",
        }
    }
}

/// A replica's AMQP connection, shared by its workers: reopened when it has
/// died, and the source of their confirm-mode [`Publisher`]s.
pub struct AmqpLink {
    config: Arc<Config>,
    name: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl AmqpLink {
    /// Starts from an open connection; `name` is the connection name shown
    /// by RabbitMQ (and used again when reconnecting).
    pub fn new(config: Arc<Config>, name: String, conn: Connection) -> Self {
        Self {
            config,
            name,
            conn: tokio::sync::Mutex::new(Some(conn)),
        }
    }

    /// A confirm-mode publisher to `exchange` with at most `window`
    /// messages and `max_bytes` of bodies awaiting their confirms, on the
    /// live connection — reconnecting first when it died.
    pub async fn publisher<T>(
        &self,
        exchange: &str,
        window: usize,
        max_bytes: u64,
    ) -> Result<Publisher<T>, PublishError> {
        let mut guard = self.conn.lock().await;
        if !guard.as_ref().is_some_and(|c| c.status().connected()) {
            *guard = None;
            let conn = crate::connect::amqp(&self.config, &self.name)
                .await
                .map_err(PublishError::Connect)?;
            *guard = Some(conn);
        }
        let conn = guard.as_ref().expect("connection set above");
        Publisher::open(conn, exchange, window, max_bytes).await
    }

    /// Closes the connection (at shutdown, after the workers stopped).
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close(200, "shutdown").await;
        }
    }
}

struct Pending<T> {
    tag: T,
    dedupe_key: String,
    bytes: usize,
    routing_key: &'static str,
    sent: Instant,
    confirm: PublisherConfirm,
}

/// A confirmed message: the caller's tag and the publish→confirm latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed<T> {
    /// What the caller attached to the publish (e.g. the IMAP UID).
    pub tag: T,
    /// Time from publish to confirmation.
    pub latency: Duration,
}

/// Publishes envelopes on a confirm-mode channel with a window of
/// outstanding confirmations. `T` is whatever the caller needs back when a
/// message is confirmed.
pub struct Publisher<T> {
    channel: Channel,
    exchange: String,
    window: usize,
    max_bytes: u64,
    pending: VecDeque<Pending<T>>,
    refused: Option<T>,
}

impl<T> Publisher<T> {
    /// Opens a channel on `conn`, puts it in confirm mode, and publishes to
    /// `exchange` with at most `window` (≥ 1) unconfirmed messages holding
    /// at most `max_bytes` of bodies (a larger message goes alone).
    pub async fn open(
        conn: &Connection,
        exchange: &str,
        window: usize,
        max_bytes: u64,
    ) -> Result<Self, PublishError> {
        let channel = crate::topology::confirming_channel(conn).await?;
        Ok(Self {
            channel,
            exchange: exchange.to_string(),
            window: window.max(1),
            max_bytes,
            pending: VecDeque::new(),
            refused: None,
        })
    }

    /// Messages published and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of bodies published and not yet confirmed.
    pub fn in_flight_bytes(&self) -> u64 {
        self.pending.iter().map(|p| p.bytes as u64).sum()
    }

    /// Publishes one message (persistent, `mandatory`): the raw mail
    /// `body` with `envelope`'s properties. The body is read where the
    /// fetcher holds it, not copied into the envelope first (the fetchers'
    /// envelopes carry an empty `body`, see [`Mailbox::envelope`]). When
    /// the window is full (by count, or by bytes with this body), first
    /// waits for the oldest confirmations; those are appended to
    /// `confirmed` in publish order, also when an error is returned, so
    /// the caller can act on what the broker did confirm.
    ///
    /// [`Mailbox::envelope`]: crate::fetch::Mailbox::envelope
    pub async fn publish(
        &mut self,
        envelope: &Envelope,
        body: &[u8],
        tag: T,
        confirmed: &mut Vec<Confirmed<T>>,
    ) -> Result<(), PublishError> {
        let bytes = body.len() as u64;
        while self.pending.len() >= self.window
            || (!self.pending.is_empty() && self.in_flight_bytes() + bytes > self.max_bytes)
        {
            self.confirm_oldest(confirmed).await?;
        }
        let routing_key = envelope.routing_key();
        let published = self
            .channel
            .basic_publish(
                &self.exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                envelope.properties(),
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(e) => return Err(self.failed(e, None, confirmed).await),
        };
        self.pending.push_back(Pending {
            tag,
            dedupe_key: envelope.dedupe_key.clone(),
            bytes: body.len(),
            routing_key,
            sent: Instant::now(),
            confirm,
        });
        Ok(())
    }

    /// Waits for every outstanding confirmation, appending them to
    /// `confirmed` in publish order (up to the first failure).
    pub async fn flush(&mut self, confirmed: &mut Vec<Confirmed<T>>) -> Result<(), PublishError> {
        while !self.pending.is_empty() {
            self.confirm_oldest(confirmed).await?;
        }
        Ok(())
    }

    /// Waits for the outstanding confirmations, oldest first, while the
    /// oldest one's tag satisfies `older` (an earlier batch's messages, when
    /// the caller publishes the next batch before settling one), appending
    /// them to `confirmed` in publish order. Later publishes stay in flight.
    pub async fn confirm_while(
        &mut self,
        older: impl Fn(&T) -> bool,
        confirmed: &mut Vec<Confirmed<T>>,
    ) -> Result<(), PublishError> {
        while self.pending.front().is_some_and(|p| older(&p.tag)) {
            self.confirm_oldest(confirmed).await?;
        }
        Ok(())
    }

    /// Forgets every outstanding publish without waiting (after an error,
    /// or when giving up at shutdown). Their messages count as unconfirmed.
    pub fn abandon(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// The message the broker refused for its size, after
    /// [`PublishError::TooLarge`]: the caller records it as oversized.
    pub fn take_refused(&mut self) -> Option<T> {
        self.refused.take()
    }

    /// Closes the channel (after [`Publisher::flush`]).
    pub async fn close(self) {
        let _ = self.channel.close(200, "done").await;
    }

    async fn confirm_oldest(
        &mut self,
        confirmed: &mut Vec<Confirmed<T>>,
    ) -> Result<(), PublishError> {
        let Some(mut p) = self.pending.pop_front() else {
            return Ok(());
        };
        let outcome = loop {
            tokio::select! {
                outcome = &mut p.confirm => break outcome,
                _ = tokio::time::sleep(BLOCKED_WARN_EVERY) => {
                    tracing::warn!(
                        waited_s = p.sent.elapsed().as_secs(),
                        in_flight = self.pending.len() + 1,
                        "waiting for RabbitMQ confirmations (is the connection blocked by a resource alarm?)"
                    );
                }
            }
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => return Err(self.failed(e, Some(p), confirmed).await),
        };
        match outcome {
            Confirmation::Ack(None) | Confirmation::NotRequested => {
                confirmed.push(Confirmed {
                    tag: p.tag,
                    latency: p.sent.elapsed(),
                });
                Ok(())
            }
            Confirmation::Ack(Some(_returned)) => {
                self.pending.clear();
                Err(PublishError::Unroutable {
                    dedupe_key: p.dedupe_key,
                    exchange: self.exchange.clone(),
                    routing_key: p.routing_key.to_string(),
                })
            }
            Confirmation::Nack(_) => {
                self.pending.clear();
                Err(PublishError::Nacked {
                    dedupe_key: p.dedupe_key,
                })
            }
        }
    }

    /// The channel or connection failed with `first` (while awaiting the
    /// confirm of `failing`, when given). The outstanding
    /// confirms resolve at once on a closed channel: those the broker acked
    /// before the failure are appended to `confirmed`, the rest are lost
    /// (their messages are fetched again later). When the broker closed the
    /// channel because a message was too large, that message is kept for
    /// [`Publisher::take_refused`] and the error is
    /// [`PublishError::TooLarge`].
    async fn failed(
        &mut self,
        first: lapin::Error,
        failing: Option<Pending<T>>,
        confirmed: &mut Vec<Confirmed<T>>,
    ) -> PublishError {
        let mut refusal = size_refusal(&first.to_string()).map(|size| (size, first.to_string()));
        let mut lost: Vec<Pending<T>> = failing.into_iter().collect();
        while let Some(mut p) = self.pending.pop_front() {
            match tokio::time::timeout(LOST_CONFIRM_WAIT, &mut p.confirm).await {
                Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {
                    confirmed.push(Confirmed {
                        tag: p.tag,
                        latency: p.sent.elapsed(),
                    });
                }
                Ok(Err(e)) => {
                    if refusal.is_none() {
                        let text = e.to_string();
                        refusal = size_refusal(&text).map(|size| (size, text));
                    }
                    lost.push(p);
                }
                Ok(Ok(_)) | Err(_) => lost.push(p),
            }
        }
        let Some((size, detail)) = refusal else {
            return PublishError::Channel(first);
        };
        // The refused message is the one of the size the broker named; the
        // largest lost one when none matches exactly.
        let at = lost
            .iter()
            .position(|p| p.bytes as u64 == size)
            .or_else(|| (0..lost.len()).max_by_key(|&i| lost[i].bytes));
        match at {
            Some(i) => {
                let p = lost.swap_remove(i);
                self.refused = Some(p.tag);
                PublishError::TooLarge {
                    dedupe_key: p.dedupe_key,
                    bytes: p.bytes,
                    detail,
                }
            }
            None => PublishError::Channel(first),
        }
    }
}

/// The size of the message in RabbitMQ's refusal for size, "PRECONDITION_FAILED
/// - message size 2097152 is larger than configured max size 1048576".
fn size_refusal(reason: &str) -> Option<u64> {
    if !reason.contains("PRECONDITION_FAILED") {
        return None;
    }
    let rest = &reason[reason.find("message size ")? + "message size ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod size_tests {
    use super::size_refusal;

    #[test]
    fn rabbitmqs_refusal_for_size_names_the_size() {
        let reason = "PRECONDITION-FAILED: PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576";
        assert_eq!(size_refusal(reason), Some(2_097_152));
        assert_eq!(
            size_refusal("PRECONDITION_FAILED - inequivalent arg 'durable'"),
            None
        );
        assert_eq!(size_refusal("NOT_FOUND - no exchange 'x'"), None);
    }
}
