//! `[amqp]`: the RabbitMQ connection, topology names and how the topology
//! is declared.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;
use crate::secret::SecretUrl;

/// `[amqp]`: the RabbitMQ connection and topology names.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL (a secret: it holds the password).
    pub url: SecretUrl,
    /// Prefix of exchange and queue names (`mailagent`).
    pub prefix: String,
    /// `classic` (default) or `quorum` (replicated, with a delivery limit).
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries before RabbitMQ dead-letters a message.
    pub delivery_limit: u32,
    /// The broker's configured `max_message_size` (RabbitMQ 4: 16 MiB):
    /// larger mails are recorded as oversized instead of being published.
    pub broker_max_message_bytes: u64,
}

/// RabbitMQ 4's default `max_message_size`.
pub const DEFAULT_BROKER_MAX_MESSAGE_BYTES: u64 = 16 << 20;

/// `[amqp] declare`: what a service does with the topology at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Declare {
    /// Declare exchanges, queues and bindings (idempotent); needs configure
    /// permission on them. The default.
    Full,
    /// Only check that they exist (`mailagent setup` declared them), so the
    /// RabbitMQ user needs no configure permission (least privilege).
    Passive,
}

impl Declare {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Passive => "passive",
        }
    }
}

/// RabbitMQ queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    /// A classic queue (single node).
    Classic,
    /// A quorum queue (replicated across a cluster).
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// Reads `[amqp]` from the top-level `tree`: the connection and, apart,
/// its `declare` mode.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> (AmqpConfig, Declare) {
    let t = w.section(tree, Section::Amqp);
    let p = Section::Amqp.key();
    w.unknown_keys(
        t,
        p,
        &[
            "url",
            "url-file",
            "prefix",
            "queue-type",
            "delivery-limit",
            "broker-max-message-bytes",
            "declare",
        ],
    );
    let url = w.secret_url(
        t,
        p,
        "url",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &["amqp", "amqps"],
    );
    let prefix = w
        .name(t, p, "prefix", Some("mailagent"))
        .unwrap_or_default();
    let queue_type = match w.string(t, p, "queue-type").as_deref() {
        None | Some("classic") => QueueType::Classic,
        Some("quorum") => QueueType::Quorum,
        Some(other) => {
            w.err(
                join(p, "queue-type"),
                format!("unknown queue type {other:?}: expected \"classic\" or \"quorum\""),
            );
            QueueType::Classic
        }
    };
    let delivery_limit = w.int_in(t, p, "delivery-limit", 1, 1000, 5) as u32;
    // RabbitMQ accepts at most 512 MiB.
    let broker_max_message_bytes = w.int_in(
        t,
        p,
        "broker-max-message-bytes",
        1024,
        512 << 20,
        DEFAULT_BROKER_MAX_MESSAGE_BYTES,
    );
    let declare = match w.string(t, p, "declare").as_deref() {
        None | Some("full") => Declare::Full,
        Some("passive") => Declare::Passive,
        Some(other) => {
            w.err(
                join(p, "declare"),
                format!("unknown mode {other:?}: expected \"full\" (default) or \"passive\""),
            );
            Declare::Full
        }
    };
    (
        AmqpConfig {
            url,
            prefix,
            queue_type,
            delivery_limit,
            broker_max_message_bytes,
        },
        declare,
    )
}
