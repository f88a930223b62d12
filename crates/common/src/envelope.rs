//! The message contract of §5: a fetched mail as an AMQP message.
//!
//! Body: the raw RFC 5322 bytes. Properties: `content-type: message/rfc822`,
//! persistent delivery, `message-id` = the dedupe key, timestamp. Headers:
//! mail config, mailbox, protocol, UID/UIDVALIDITY or UIDL, action, fetcher
//! instance, W3C `traceparent`.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use sha2::{Digest, Sha256};

use crate::config::{Action, Protocol};
use crate::error::{Error, Result};

/// `content-type` of every envelope.
pub const CONTENT_TYPE: &str = "message/rfc822";

/// Header names, in one place.
pub mod headers {
    /// Name of the incoming-mail config.
    pub const MAIL_CONFIG: &str = "x-mail-config";
    /// Mailbox address.
    pub const MAILBOX: &str = "x-mailbox";
    /// `imap` or `pop3`.
    pub const PROTOCOL: &str = "x-protocol";
    /// IMAP UID.
    pub const UID: &str = "x-uid";
    /// IMAP UIDVALIDITY.
    pub const UIDVALIDITY: &str = "x-uidvalidity";
    /// POP3 UIDL.
    pub const UIDL: &str = "x-uidl";
    /// The configured action (`CREATE`).
    pub const ACTION: &str = "x-action";
    /// Fetcher instance id.
    pub const FETCHER: &str = "x-fetcher";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// Why a message was dead-lettered.
    pub const REASON: &str = "x-reason";
    /// On a message `mailagent dead-letters replay` sent back: the id of the
    /// failure it replays, which the processor forgets before processing.
    pub const REPLAY: &str = "x-replay";
}

/// Where in the mailbox a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageRef {
    /// IMAP: UID within a UIDVALIDITY epoch.
    Imap {
        /// The message's UID.
        uid: u32,
        /// The folder's UIDVALIDITY.
        uidvalidity: u32,
    },
    /// POP3: the unique-id listing.
    Pop3 {
        /// The message's UIDL.
        uidl: String,
    },
}

impl MessageRef {
    /// The protocol this reference belongs to.
    pub fn protocol(&self) -> Protocol {
        match self {
            Self::Imap { .. } => Protocol::Imap,
            Self::Pop3 { .. } => Protocol::Pop3,
        }
    }
}

/// A fetched message and its provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// SHA-256 (hex) of mailbox + Message-ID, or of the raw bytes without one.
    pub dedupe_key: String,
    /// The raw RFC 5322 message.
    pub body: Vec<u8>,
    /// Fetch time, seconds since the Unix epoch.
    pub timestamp: u64,
    /// Name of the incoming-mail config.
    pub mail_config: String,
    /// Mailbox address.
    pub mailbox: String,
    /// UID/UIDVALIDITY or UIDL.
    pub message_ref: MessageRef,
    /// The configured action.
    pub action: Action,
    /// Instance id of the fetcher that published it.
    pub fetcher: String,
    /// W3C `traceparent` of the fetch span, when tracing.
    pub traceparent: Option<String>,
}

impl Envelope {
    /// The AMQP routing key (the action's queue).
    pub fn routing_key(&self) -> &'static str {
        self.action.routing_key()
    }

    /// The AMQP properties carrying everything but the body.
    pub fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        let mut put = |k: &str, v: AMQPValue| h.insert(ShortString::from(k.to_string()), v);
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_string()));
        put(headers::MAIL_CONFIG, s(&self.mail_config));
        put(headers::MAILBOX, s(&self.mailbox));
        put(headers::PROTOCOL, s(self.message_ref.protocol().as_str()));
        match &self.message_ref {
            MessageRef::Imap { uid, uidvalidity } => {
                put(headers::UID, AMQPValue::LongLongInt(i64::from(*uid)));
                put(
                    headers::UIDVALIDITY,
                    AMQPValue::LongLongInt(i64::from(*uidvalidity)),
                );
            }
            MessageRef::Pop3 { uidl } => put(headers::UIDL, s(uidl)),
        }
        put(headers::ACTION, s(self.action.as_str()));
        put(headers::FETCHER, s(&self.fetcher));
        if let Some(tp) = &self.traceparent {
            put(headers::TRACEPARENT, s(tp));
        }
        BasicProperties::default()
            .with_content_type(ShortString::from(CONTENT_TYPE.to_string()))
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(self.dedupe_key.clone()))
            .with_timestamp(self.timestamp)
            .with_headers(h)
    }

    /// Rebuilds an envelope from a delivery's properties and body. Anything
    /// missing or malformed is an error naming the field.
    pub fn from_amqp(props: &BasicProperties, body: Vec<u8>) -> Result<Self> {
        let bad = |m: String| Error::Envelope(m);
        if let Some(ct) = props.content_type() {
            if ct.as_str() != CONTENT_TYPE {
                return Err(bad(format!(
                    "content-type is {:?}, expected {CONTENT_TYPE}",
                    ct.as_str()
                )));
            }
        }
        let dedupe_key = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .ok_or_else(|| bad("message-id (dedupe key) is missing".into()))?;
        if dedupe_key.len() != 64 || !dedupe_key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("message-id is not a SHA-256 dedupe key".into()));
        }
        let timestamp = props.timestamp().unwrap_or(0);
        let empty = FieldTable::default();
        let h = props.headers().as_ref().unwrap_or(&empty);
        let text = |k: &str| -> Result<String> {
            match h.inner().get(k) {
                Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec())
                    .map_err(|_| bad(format!("header {k} is not UTF-8"))),
                Some(AMQPValue::ShortString(s)) => Ok(s.as_str().to_string()),
                Some(_) => Err(bad(format!("header {k} is not a string"))),
                None => Err(bad(format!("header {k} is missing"))),
            }
        };
        let number = |k: &str| -> Result<u32> {
            let v: Option<i128> = match h.inner().get(k) {
                Some(AMQPValue::LongLongInt(n)) => Some(i128::from(*n)),
                Some(AMQPValue::LongInt(n)) => Some(i128::from(*n)),
                Some(AMQPValue::LongUInt(n)) => Some(i128::from(*n)),
                Some(AMQPValue::ShortInt(n)) => Some(i128::from(*n)),
                Some(AMQPValue::ShortUInt(n)) => Some(i128::from(*n)),
                Some(AMQPValue::Timestamp(n)) => Some(i128::from(*n)),
                Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
                    .ok()
                    .and_then(|t| t.parse().ok()),
                None => return Err(bad(format!("header {k} is missing"))),
                Some(_) => None,
            };
            v.and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(format!("header {k} is not a 32-bit unsigned number")))
        };
        let protocol_text = text(headers::PROTOCOL)?;
        let protocol = Protocol::parse(&protocol_text).ok_or_else(|| {
            bad(format!(
                "header {} has unknown protocol {protocol_text:?}",
                headers::PROTOCOL
            ))
        })?;
        let message_ref = match protocol {
            Protocol::Imap => MessageRef::Imap {
                uid: number(headers::UID)?,
                uidvalidity: number(headers::UIDVALIDITY)?,
            },
            Protocol::Pop3 => MessageRef::Pop3 {
                uidl: text(headers::UIDL)?,
            },
        };
        let action_text = text(headers::ACTION)?;
        let action = Action::parse(&action_text).ok_or_else(|| {
            bad(format!(
                "header {} has unsupported action {action_text:?}",
                headers::ACTION
            ))
        })?;
        let traceparent = match text(headers::TRACEPARENT) {
            Ok(tp) => Some(tp),
            Err(_) if !h.inner().contains_key(headers::TRACEPARENT) => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            dedupe_key,
            body,
            timestamp,
            mail_config: text(headers::MAIL_CONFIG)?,
            mailbox: text(headers::MAILBOX)?,
            message_ref,
            action,
            fetcher: text(headers::FETCHER)?,
            traceparent,
        })
    }
}

/// The dedupe key of §5: SHA-256 (hex) of the lowercased mailbox, a NUL and
/// the Message-ID header; of the raw bytes when the header is missing.
pub fn dedupe_key(mailbox: &str, raw: &[u8]) -> String {
    let mut hasher = Sha256::new();
    match message_id(raw) {
        Some(id) => {
            hasher.update(mailbox.to_lowercase().as_bytes());
            hasher.update([0u8]);
            hasher.update(id.as_bytes());
        }
        None => hasher.update(raw),
    }
    hex::encode(hasher.finalize())
}

/// The Message-ID header's value (unfolded, trimmed), if the header section
/// has one that is not empty.
pub fn message_id(raw: &[u8]) -> Option<String> {
    header_value(raw, "message-id").filter(|v| !v.is_empty())
}

/// The first header of that name (case-insensitive) in the header section,
/// unfolded and trimmed; bytes that are not UTF-8 are replaced.
pub fn header_value(raw: &[u8], name: &str) -> Option<String> {
    let mut lines = raw
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None; // end of the header section
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                value.push(b' ');
                value.extend_from_slice(next.trim_ascii());
                lines.next();
            } else {
                break;
            }
        }
        return Some(String::from_utf8_lossy(value.trim_ascii()).into_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(message_ref: MessageRef) -> Envelope {
        Envelope {
            dedupe_key: dedupe_key("forms@contoso.com", b"Message-ID: <a@b>\r\n\r\nhi"),
            body: b"Message-ID: <a@b>\r\n\r\nhi".to_vec(),
            timestamp: 1_700_000_000,
            mail_config: "lease-forms".into(),
            mailbox: "forms@contoso.com".into(),
            message_ref,
            action: Action::Create,
            fetcher: "host-1".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn envelope_round_trips_through_properties() {
        for r in [
            MessageRef::Imap {
                uid: 4_000_000_000,
                uidvalidity: 7,
            },
            MessageRef::Pop3 {
                uidl: "AAMkAD=".into(),
            },
        ] {
            let e = sample(r);
            let props = e.properties();
            assert_eq!(props.delivery_mode(), &Some(2));
            assert_eq!(
                props.content_type().as_ref().map(|c| c.as_str()),
                Some(CONTENT_TYPE)
            );
            let back = Envelope::from_amqp(&props, e.body.clone()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn envelope_without_traceparent_round_trips() {
        let mut e = sample(MessageRef::Imap {
            uid: 1,
            uidvalidity: 1,
        });
        e.traceparent = None;
        assert_eq!(
            Envelope::from_amqp(&e.properties(), e.body.clone()).unwrap(),
            e
        );
    }

    #[test]
    fn broken_envelopes_name_the_field() {
        let e = sample(MessageRef::Imap {
            uid: 1,
            uidvalidity: 1,
        });
        let cases: Vec<(BasicProperties, &str)> = vec![
            (e.properties().with_message_id("nope".into()), "message-id"),
            (
                e.properties().with_content_type("text/plain".into()),
                "content-type",
            ),
            (
                e.properties().with_headers(FieldTable::default()),
                "x-protocol",
            ),
            (BasicProperties::default(), "message-id"),
        ];
        for (props, field) in cases {
            let err = Envelope::from_amqp(&props, vec![]).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn dedupe_key_table() {
        let with_id = b"Subject: x\r\nMessage-ID:\r\n <abc@example.com>\r\n\r\nbody";
        let same_id_other_body = b"Message-Id: <abc@example.com>\r\n\r\nother";
        let no_id = b"Subject: x\r\n\r\nbody";
        let id_in_body_only = b"Subject: x\r\n\r\nMessage-ID: <abc@example.com>\r\n";
        assert_eq!(message_id(with_id).as_deref(), Some("<abc@example.com>"));
        assert_eq!(
            dedupe_key("A@x", with_id),
            dedupe_key("a@x", same_id_other_body)
        );
        assert_ne!(dedupe_key("a@x", with_id), dedupe_key("b@x", with_id));
        assert_eq!(message_id(id_in_body_only), None);
        let raw_hash = hex::encode(Sha256::digest(no_id));
        assert_eq!(dedupe_key("a@x", no_id), raw_hash);
        assert_eq!(dedupe_key("a@x", no_id).len(), 64);
    }
}
