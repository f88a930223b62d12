//! The AMQP topology of §5, declared idempotently by every binary at start.
//!
//! - exchange `<prefix>.incoming` (direct, durable): fetchers publish here
//!   with the action as routing key;
//! - queue `<prefix>.create` (durable, `classic` or `quorum`), bound with
//!   `create`, dead-lettering to `<prefix>.dead`;
//! - exchange and queue `<prefix>.dead` (fanout, durable): rejected and
//!   poison messages, each with an `x-reason` header.

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{Action, AmqpConfig, QueueType};

/// The names of one deployment's exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Where fetchers publish.
    pub exchange: String,
    /// The CREATE action's queue.
    pub create_queue: String,
    /// Dead-letter exchange.
    pub dead_exchange: String,
    /// Dead-letter queue.
    pub dead_queue: String,
}

impl Topology {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            exchange: format!("{prefix}.incoming"),
            create_queue: format!("{prefix}.{}", Action::Create.routing_key()),
            dead_exchange: format!("{prefix}.dead"),
            dead_queue: format!("{prefix}.dead"),
        }
    }

    /// The queue of an action.
    pub fn queue_for(&self, action: Action) -> &str {
        match action {
            Action::Create => &self.create_queue,
        }
    }
}

fn queue_args(config: &AmqpConfig, dead_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(config.queue_type.as_str())),
    );
    if let Some(dlx) = dead_exchange {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(dlx)),
        );
    }
    if config.queue_type == QueueType::Quorum {
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(config.delivery_limit as i32),
        );
    }
    args
}

/// Declares the whole topology. Safe to call from every binary at every
/// start: declaring what exists with the same arguments changes nothing.
/// With `passive`, only checks that it exists (for users without configure
/// permission).
pub async fn declare(
    channel: &Channel,
    config: &AmqpConfig,
    passive: bool,
) -> Result<Topology, lapin::Error> {
    let topo = Topology::new(&config.prefix);
    let durable = |passive| ExchangeDeclareOptions {
        durable: true,
        passive,
        ..Default::default()
    };
    channel
        .exchange_declare(
            &topo.exchange,
            ExchangeKind::Direct,
            durable(passive),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            &topo.dead_exchange,
            ExchangeKind::Fanout,
            durable(passive),
            FieldTable::default(),
        )
        .await?;
    let qopts = QueueDeclareOptions {
        durable: true,
        passive,
        ..Default::default()
    };
    let dead_args = if passive {
        FieldTable::default()
    } else {
        queue_args(config, None)
    };
    channel
        .queue_declare(&topo.dead_queue, qopts, dead_args)
        .await?;
    let create_args = if passive {
        FieldTable::default()
    } else {
        queue_args(config, Some(&topo.dead_exchange))
    };
    channel
        .queue_declare(&topo.create_queue, qopts, create_args)
        .await?;
    if !passive {
        channel
            .queue_bind(
                &topo.dead_queue,
                &topo.dead_exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                &topo.create_queue,
                &topo.exchange,
                Action::Create.routing_key(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(topo)
}

/// The number of ready messages in a queue (a passive declare).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let q = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Opens a channel on `conn` in publisher-confirm mode: every publish that
/// must not be lost (hand-over, dead letters) goes through one.
pub async fn confirming_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::new("mailagent");
        assert_eq!(t.exchange, "mailagent.incoming");
        assert_eq!(t.create_queue, "mailagent.create");
        assert_eq!(t.dead_exchange, "mailagent.dead");
        assert_eq!(t.dead_queue, "mailagent.dead");
        assert_eq!(Topology::new("t42").queue_for(Action::Create), "t42.create");
    }
}
