//! Dead-lettering (§6): a rejected or poison message is published to the
//! dead-letter exchange with its `x-reason` header on a channel in confirm
//! mode; only a confirmed publish lets the original be acked.

use common::envelope::headers::REASON;
use lapin::options::BasicPublishOptions;
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
}

/// A confirming publisher to the dead-letter exchange.
pub struct DeadLetters {
    channel: Channel,
    exchange: String,
}

impl DeadLetters {
    /// Opens a channel in confirm mode on `conn`.
    pub async fn open(conn: &Connection, exchange: &str) -> Result<Self, lapin::Error> {
        let channel = common::topology::confirming_channel(conn).await?;
        Ok(Self {
            channel,
            exchange: exchange.to_string(),
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
        let confirm = self
            .channel
            .basic_publish(
                &self.exchange,
                "",
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(Error::Nacked);
        }
        Ok(())
    }

    /// Closes the channel.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "shutdown").await;
    }
}
