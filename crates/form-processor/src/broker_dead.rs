//! Dead letters RabbitMQ made on its own (§7a): a quorum queue past its
//! `x-delivery-limit`, a consumer's reject without requeue, an expired TTL.
//! RabbitMQ moves such a message to the dead-letter exchange with an
//! `x-death` header but without our `x-reason`, and no failures row exists
//! for it: `mailagent dead-letters` could neither list nor replay it.
//!
//! [`reconcile`] closes that gap. It looks at every message waiting in the
//! dead-letter queue once; one that carries `x-death` but no `x-reason`:
//!
//! 1. is recorded as a failure whose reason is RabbitMQ's (`delivery_limit`,
//!    `rejected`, `expired`, `maxlen`), unless its dedupe key is settled
//!    already (then the existing failure is used, or, when the mail became a
//!    record after all, the dead letter is only tagged);
//! 2. is put back into the dead-letter queue with `x-reason` and
//!    `x-reason-detail` set (published to the dead-letter exchange, confirmed);
//! 3. and only then is the original acked.
//!
//! Every other message is put back unchanged (published again, confirmed,
//! then acked) rather than returned: on a quorum queue a return counts as a
//! delivery, and past the dead-letter queue's own delivery limit RabbitMQ
//! would drop it. A crash at any step leaves the original in the queue or a
//! second copy of it; the next run finds the failure already recorded.
//!
//! `mailagent dead-letters list` and `replay` run it first, so what they show
//! and replay includes these messages.

use common::envelope::headers::REASON;
use common::envelope::Envelope;
use common::topology::Topology;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use crate::deadletter::REASON_DETAIL;
use crate::mime::MimeLimits;
use crate::reject::{Reason, Rejection};
use crate::store::{Known, NewFailure, Source, Store, Stored};

/// Why reconciling stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel or connection failed.
    #[error("cannot reconcile the dead-letter queue: {0}")]
    Amqp(#[from] lapin::Error),
    /// The record store failed.
    #[error("cannot record a dead letter RabbitMQ made: {0}")]
    Store(#[from] crate::store::Error),
    /// A dead letter could not be put back (nack, or no queue bound).
    #[error("cannot put a dead letter back into {queue} (is it bound to {exchange}?); nothing was removed")]
    PutBack {
        /// The dead-letter queue.
        queue: String,
        /// The dead-letter exchange.
        exchange: String,
    },
}

/// What one [`reconcile`] run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Messages looked at.
    pub seen: u32,
    /// New failures recorded for dead letters RabbitMQ made.
    pub recorded: Vec<i64>,
    /// Dead letters RabbitMQ made whose dedupe key was settled already
    /// (tagged with the existing failure's reason, or a record's id).
    pub known: u32,
}

/// RabbitMQ's reason for its most recent dead-lettering of a message: the
/// first `x-death` entry's `reason` (newest first), or
/// `x-first-death-reason`. `None` when RabbitMQ never dead-lettered it.
pub fn death_reason(props: &BasicProperties) -> Option<(String, String)> {
    let headers = props.headers().as_ref()?;
    let text = |v: &AMQPValue| match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    let first = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(t)) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    };
    if let Some(t) = first {
        let reason = t.inner().get("reason").and_then(text)?;
        let queue = t.inner().get("queue").and_then(text).unwrap_or_default();
        return Some((reason, queue));
    }
    let reason = headers.inner().get("x-first-death-reason").and_then(text)?;
    let queue = headers
        .inner()
        .get("x-first-death-queue")
        .and_then(text)
        .unwrap_or_default();
    Some((reason, queue))
}

/// The rejection recorded for RabbitMQ's dead-letter `reason` from `queue`.
pub fn rejection_for(reason: &str, queue: &str) -> Rejection {
    let (code, why) = match reason {
        "delivery_limit" => (
            Reason::BrokerDeliveryLimit,
            "was delivered more often than the quorum queue's x-delivery-limit ([amqp] delivery-limit) allows",
        ),
        "rejected" => (
            Reason::BrokerRejected,
            "was rejected by a consumer without requeueing",
        ),
        "expired" => (Reason::BrokerExpired, "expired (message or queue TTL)"),
        "maxlen" => (Reason::BrokerMaxLength, "overflowed the queue's length limit"),
        _ => (Reason::BrokerOther, "was dead-lettered"),
    };
    Rejection::new(
        code,
        format!("RabbitMQ dead-lettered it from queue {queue:?} itself ({reason}): the message {why}; no processor recorded it"),
    )
}

fn has_reason(props: &BasicProperties) -> bool {
    props
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(REASON))
}

/// Records and tags the dead letters RabbitMQ made in `topology`'s
/// dead-letter queue (see the module documentation). Looks at as many
/// messages as the queue held when it started.
pub async fn reconcile(
    store: &Store,
    conn: &Connection,
    topology: &Topology,
    limits: MimeLimits,
) -> Result<Reconciled, Error> {
    let channel = conn.create_channel().await?;
    let publisher = common::topology::confirming_channel(conn).await?;
    let result = scan(store, &channel, &publisher, topology, limits).await;
    let _ = publisher.close(200, "done").await;
    let _ = channel.close(200, "done").await;
    result
}

async fn scan(
    store: &Store,
    channel: &Channel,
    publisher: &Channel,
    topology: &Topology,
    limits: MimeLimits,
) -> Result<Reconciled, Error> {
    let mut done = Reconciled::default();
    let depth = common::topology::queue_depth(channel, &topology.dead_queue).await?;
    for _ in 0..depth {
        let Some(m) = channel
            .basic_get(&topology.dead_queue, BasicGetOptions::default())
            .await?
        else {
            break;
        };
        done.seen += 1;
        let tags = match death_reason(&m.properties) {
            Some((reason, queue)) if !has_reason(&m.properties) => {
                Some(record(store, &m, &reason, &queue, limits, &mut done).await?)
            }
            _ => None,
        };
        let props = match tags {
            Some((reason, detail)) => with_reason(&m.properties, &reason, &detail),
            None => m.properties.clone(),
        };
        put_back(publisher, topology, &m, props).await?;
        m.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(done)
}

/// Records a dead letter RabbitMQ made; returns the `x-reason` and detail
/// to tag it with.
async fn record(
    store: &Store,
    m: &BasicGetMessage,
    reason: &str,
    queue: &str,
    limits: MimeLimits,
    done: &mut Reconciled,
) -> Result<(String, String), Error> {
    let source = source_of(m, limits).await;
    let key = source.dedupe_key.clone();
    let rejection = rejection_for(reason, queue);
    let stored = store
        .reject(NewFailure {
            rejection: rejection.clone(),
            topic: None,
            source,
        })
        .await?;
    match stored {
        Stored::Failure(id) => {
            store.mark_dead_lettered(id).await?;
            tracing::warn!(failure = id, dedupe_key = %key, reason, queue, "recorded a message RabbitMQ dead-lettered itself");
            done.recorded.push(id);
            Ok((rejection.reason.code().to_string(), rejection.detail))
        }
        Stored::AlreadyKnown => {
            done.known += 1;
            match store.lookup(&key).await? {
                Some(Known::Failure {
                    id, reason, detail, ..
                }) => {
                    store.mark_dead_lettered(id).await?;
                    Ok((reason, detail))
                }
                Some(Known::Record(id)) => Ok((
                    rejection.reason.code().to_string(),
                    format!(
                        "{}; the same mail was created as record {id} meanwhile",
                        rejection.detail
                    ),
                )),
                None => Ok((rejection.reason.code().to_string(), rejection.detail)),
            }
        }
    }
}

/// Where a dead letter came from: the envelope's headers, and what the
/// mail says about itself (parsed apart, so that a mail that kills its
/// parser only leaves those fields empty).
async fn source_of(m: &BasicGetMessage, limits: MimeLimits) -> Source {
    let envelope = Envelope::from_amqp(&m.properties, Vec::new()).ok();
    let mut source = match &envelope {
        Some(e) => Source {
            dedupe_key: e.dedupe_key.clone(),
            mail_config: e.mail_config.clone(),
            mailbox: e.mailbox.clone(),
            received_at: e.timestamp as i64,
            ..Default::default()
        },
        None => Source {
            dedupe_key: m
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            ..Default::default()
        },
    };
    let raw = m.data.clone();
    let info = tokio::task::spawn_blocking(move || {
        crate::mime::parse_mail(&raw, &limits)
            .ok()
            .map(|mail| crate::analyze::MailInfo::from(&mail))
    })
    .await
    .ok()
    .flatten();
    if let Some(info) = info {
        source.message_id = info.message_id;
        source.sender = info.sender;
        source.subject = info.subject;
        if source.received_at == 0 {
            source.received_at = info.date.unwrap_or(0);
        }
    }
    if source.dedupe_key.is_empty() {
        source.dedupe_key = hex_sha256(&m.data);
    }
    source
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `props` with `x-reason` and `x-reason-detail` set.
fn with_reason(props: &BasicProperties, reason: &str, detail: &str) -> BasicProperties {
    let mut headers: FieldTable = props.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(REASON),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        ShortString::from(REASON_DETAIL),
        AMQPValue::LongString(LongString::from(detail)),
    );
    props.clone().with_headers(headers)
}

/// Publishes `m` with `props` to the dead-letter exchange (mandatory,
/// persistent) and waits for the confirm.
async fn put_back(
    publisher: &Channel,
    topology: &Topology,
    m: &BasicGetMessage,
    props: BasicProperties,
) -> Result<(), Error> {
    let confirm = publisher
        .basic_publish(
            &topology.dead_exchange,
            "",
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &m.data,
            props.with_delivery_mode(2),
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        _ => Err(Error::PutBack {
            queue: topology.dead_queue.clone(),
            exchange: topology.dead_exchange.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn props_with(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(ShortString::from(*k), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn death(reason: &str, queue: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("reason".into(), AMQPValue::LongString(reason.into()));
        t.insert("queue".into(), AMQPValue::LongString(queue.into()));
        t.insert("count".into(), AMQPValue::LongLongInt(1));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn the_newest_x_death_entry_gives_the_reason() {
        let deaths = FieldArray::from(vec![
            death("delivery_limit", "t.create"),
            death("rejected", "t.create"),
        ]);
        let props = props_with(&[("x-death", AMQPValue::FieldArray(deaths))]);
        assert_eq!(
            death_reason(&props),
            Some(("delivery_limit".to_string(), "t.create".to_string()))
        );
        let first_only = props_with(&[
            (
                "x-first-death-reason",
                AMQPValue::LongString("expired".into()),
            ),
            ("x-first-death-queue", AMQPValue::LongString("q".into())),
        ]);
        assert_eq!(
            death_reason(&first_only),
            Some(("expired".to_string(), "q".to_string()))
        );
        assert_eq!(death_reason(&BasicProperties::default()), None);
        assert_eq!(death_reason(&props_with(&[])), None);
    }

    #[test]
    fn rabbitmqs_reasons_keep_their_spelling() {
        for (reason, code) in [
            ("delivery_limit", "delivery_limit"),
            ("rejected", "rejected"),
            ("expired", "expired"),
            ("maxlen", "maxlen"),
            ("something-new", "dead-lettered-by-rabbitmq"),
        ] {
            let r = rejection_for(reason, "t.create");
            assert_eq!(r.reason.code(), code, "{reason}");
            assert!(r.detail.contains("t.create"), "{}", r.detail);
        }
    }

    #[test]
    fn only_a_message_without_our_reason_is_rabbitmqs() {
        let ours = props_with(&[(REASON, AMQPValue::LongString("poison".into()))]);
        assert!(has_reason(&ours));
        assert!(!has_reason(&props_with(&[])));
    }
}
