//! Dead-lettering (§6): a rejected or poison message is published to the
//! dead-letter exchange with its `x-reason` header, `mandatory`, on a
//! channel in confirm mode; only a confirmed publish that reached a queue
//! lets the original be acked. A nack, a return (the dead-letter queue or
//! its binding is missing) or a channel error leaves the original unacked;
//! a channel error also marks the publisher [broken](DeadLetters::broken),
//! which ends the consuming session so that a new one opens a new channel.

use common::envelope::headers::REASON;
use lapin::options::BasicPublishOptions;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

/// Header with the human-readable detail of the reason.
pub const REASON_DETAIL: &str = "x-reason-detail";

/// Why a dead-letter publish failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel or connection failed.
    #[error("cannot publish to the dead-letter exchange: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused the message.
    #[error("cannot publish to the dead-letter exchange: the broker nacked it")]
    Nacked,
    /// The message reached no queue: the dead-letter queue or its binding
    /// is missing.
    #[error("cannot dead-letter: exchange {0} routed the message to no queue (is the dead-letter queue declared and bound?)")]
    Unroutable(String),
}

/// A confirming publisher to the dead-letter exchange.
pub struct DeadLetters {
    channel: Channel,
    exchange: String,
    broken: tokio_util::sync::CancellationToken,
}

impl DeadLetters {
    /// Opens a channel in confirm mode on `conn`.
    pub async fn open(conn: &Connection, exchange: &str) -> Result<Self, lapin::Error> {
        let channel = common::topology::confirming_channel(conn).await?;
        Ok(Self {
            channel,
            exchange: exchange.to_string(),
            broken: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Publishes `body` with the original properties plus `x-reason` and
    /// `x-reason-detail`, and waits for the broker's confirmation.
    pub async fn publish(
        &self,
        props: &BasicProperties,
        body: &[u8],
        reason: &str,
        detail: &str,
    ) -> Result<(), Error> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(REASON),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            ShortString::from(REASON_DETAIL),
            AMQPValue::LongString(LongString::from(detail)),
        );
        let props = props.clone().with_headers(headers).with_delivery_mode(2);
        let published = async {
            self.channel
                .basic_publish(
                    &self.exchange,
                    "",
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?
                .await
        };
        match published.await {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(Error::Unroutable(self.exchange.clone())),
            Ok(Confirmation::Nack(_)) => Err(Error::Nacked),
            Err(e) => {
                self.broken.cancel();
                Err(e.into())
            }
        }
    }

    /// Cancelled once the channel failed: no publish can succeed on it any
    /// more, and the consuming session should end (and open a new one).
    pub fn broken(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.broken.cancelled()
    }

    /// Closes the channel.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "shutdown").await;
    }
}
