//! Handing messages over (§4, §5): the envelope of a fetched message, a
//! confirm-mode publisher, what is counted once RabbitMQ confirmed, and
//! the record of a message too large to publish. The protocol decides
//! what to fetch and what to do with the server's copy after the confirm;
//! everything between is here.

use redis::AsyncCommands;

use super::error::FetchError;
use super::publish::{Confirmed, Publisher};
use super::worker::Mailbox;
use crate::envelope::{dedupe_key, Envelope, MessageRef};
use crate::heartbeat::now_secs;

impl Mailbox {
    /// The largest message handed over: `max-message-bytes`, and never more
    /// than the broker takes (`[amqp] broker-max-message-bytes`). Larger
    /// ones are recorded as oversized.
    pub fn max_message_bytes(&self) -> u64 {
        self.cfg
            .max_message_bytes
            .min(self.kit.config.amqp.broker_max_message_bytes)
    }

    /// A confirm-mode publisher to the exchange, with the configured window
    /// of outstanding confirms and at most `max-in-flight-bytes` of bodies
    /// awaiting them (the replica's connection is reopened first when it
    /// died).
    pub async fn publisher<T>(&self) -> Result<Publisher<T>, FetchError> {
        let kit = &self.kit;
        Ok(kit
            .amqp
            .publisher(
                &kit.exchange,
                kit.options.window,
                self.cfg.max_in_flight_bytes,
            )
            .await?)
    }

    /// The envelope of the fetched message `body`: its dedupe key, where
    /// it came from, the action, this fetcher, and the trace it starts. Its
    /// own `body` stays empty: [`Publisher::publish`] takes the bytes from
    /// the fetcher's buffer, so a mail is not copied once more.
    ///
    /// [`Publisher::publish`]: crate::fetch::publish::Publisher::publish
    pub fn envelope(&self, message_ref: MessageRef, body: &[u8]) -> Envelope {
        let name = &self.cfg.name;
        let traceparent = crate::telemetry::fetched_message_trace(name, &reference(&message_ref));
        Envelope {
            dedupe_key: dedupe_key(&self.cfg.username, body),
            body: Vec::new(),
            timestamp: now_secs(),
            mail_config: name.clone(),
            mailbox: self.cfg.username.clone(),
            message_ref,
            action: self.cfg.action,
            fetcher: self.kit.instance.clone(),
            traceparent,
        }
    }

    /// Counts messages RabbitMQ confirmed: messages, bytes (`bytes` of each
    /// tag), confirm latency, and the heartbeat's handled total.
    pub fn count_confirmed<T>(&self, confirmed: &[Confirmed<T>], bytes: impl Fn(&T) -> usize) {
        if confirmed.is_empty() {
            return;
        }
        let m = &self.kit.metrics;
        let name = &self.cfg.name;
        let mut total = 0u64;
        for c in confirmed {
            total += bytes(&c.tag) as u64;
            m.confirm_seconds
                .with_label_values(&[])
                .observe(c.latency.as_secs_f64());
        }
        let n = confirmed.len() as u64;
        m.messages.with_label_values(&[name]).inc_by(n);
        m.bytes.with_label_values(&[name]).inc_by(total);
        self.kit.heartbeat.update(|s| s.handled += n);
    }

    /// A message over `max-message-bytes`: not published, but logged,
    /// counted and recorded in Redis (`Keys::oversized`), where
    /// `mailagent status` and the operator find it.
    pub async fn record_oversized(
        &self,
        message_ref: &MessageRef,
        bytes: u64,
    ) -> Result<(), FetchError> {
        let name = &self.cfg.name;
        let limit = self.max_message_bytes();
        let reference = reference(message_ref);
        tracing::warn!(config = %name, message = %reference, bytes, limit, "message over max-message-bytes (or the broker's limit); not published");
        self.kit.metrics.oversized.with_label_values(&[name]).inc();
        let (field, record) = oversized_record(message_ref, bytes, now_secs());
        let mut redis = self.kit.redis.clone();
        let () = redis
            .hset(self.kit.keys.oversized(name), field, record)
            .await
            .map_err(|source| FetchError::Redis {
                action: "record an oversized message",
                source,
            })?;
        Ok(())
    }
}

/// How a message is named in logs and traces: its UID or its UIDL.
fn reference(message_ref: &MessageRef) -> String {
    match message_ref {
        MessageRef::Imap { uid, .. } => uid.to_string(),
        MessageRef::Pop3 { uidl } => uidl.clone(),
    }
}

/// The Redis hash field and JSON record of an oversized message: IMAP by
/// `uidvalidity:uid`, POP3 by UIDL (the set of already-known oversized
/// messages a POP3 poll skips).
fn oversized_record(message_ref: &MessageRef, bytes: u64, seen_at: u64) -> (String, String) {
    match message_ref {
        MessageRef::Imap { uid, uidvalidity } => (
            format!("{uidvalidity}:{uid}"),
            serde_json::json!({
                "uid": uid,
                "uidvalidity": uidvalidity,
                "bytes": bytes,
                "seen-at": seen_at,
            })
            .to_string(),
        ),
        MessageRef::Pop3 { uidl } => (
            uidl.clone(),
            serde_json::json!({ "uidl": uidl, "bytes": bytes, "seen-at": seen_at }).to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_records_keep_each_protocols_field_and_shape() {
        let (field, json) = oversized_record(
            &MessageRef::Imap {
                uid: 7,
                uidvalidity: 42,
            },
            900,
            5,
        );
        assert_eq!(field, "42:7");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"uid": 7, "uidvalidity": 42, "bytes": 900, "seen-at": 5})
        );
        let (field, json) = oversized_record(&MessageRef::Pop3 { uidl: "abc".into() }, 900, 5);
        assert_eq!(field, "abc");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"uidl": "abc", "bytes": 900, "seen-at": 5})
        );
    }
}
