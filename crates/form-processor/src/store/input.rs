//! What the store is asked to write: a new record or a rejection, each with
//! where its message came from. The analyser converts its verdict into
//! these (`Accepted::into_record`); the store knows nothing of it.

use serde::Serialize;

use crate::objectmap::Form;
use crate::reject::Rejection;

/// Where a message came from, kept with its record or failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Source {
    /// The dedupe key.
    pub dedupe_key: String,
    /// The incoming-mail config.
    pub mail_config: String,
    /// The mailbox.
    pub mailbox: String,
    /// Message-ID header.
    pub message_id: Option<String>,
    /// Sender (first From address).
    pub sender: String,
    /// Subject.
    pub subject: String,
    /// When the mail was received (Date header, else fetch time), epoch seconds.
    pub received_at: i64,
}

/// A record to create: the form's root record and children, the values of
/// its topic's unique fields, and its source.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// The topic's configured subject.
    pub topic: String,
    /// The record and its children.
    pub form: Form,
    /// (field, canonical value) of the topic's unique fields that are present.
    pub unique: Vec<(String, String)>,
    /// Where the message came from.
    pub source: Source,
}

impl NewRecord {
    /// This record's message stored as a failure instead (a unique value
    /// of it is taken).
    pub(super) fn as_failure(&self, rejection: &Rejection) -> NewFailure {
        NewFailure {
            rejection: rejection.clone(),
            topic: Some(self.topic.clone()),
            source: self.source.clone(),
        }
    }
}

/// A rejection to store.
#[derive(Debug, Clone)]
pub struct NewFailure {
    /// Why.
    pub rejection: Rejection,
    /// The topic, when one matched.
    pub topic: Option<String>,
    /// Where the message came from.
    pub source: Source,
}
