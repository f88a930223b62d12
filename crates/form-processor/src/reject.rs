//! Why a message is rejected: a stable reason code (the `x-reason` header,
//! the failures table, the metrics label) and a human detail.

use std::fmt;

/// A rejection reason. [`Reason::code`] is the stable spelling used in the
/// `x-reason` header, the failures table and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The AMQP message is not a valid envelope.
    BadEnvelope,
    /// The mail could not be parsed at all.
    UnparseableMail,
    /// MIME nesting deeper than `max-mime-depth`.
    MimeTooDeep,
    /// More MIME parts than `max-mime-parts`.
    TooManyParts,
    /// No topic matches the subject.
    NoTopic,
    /// The sender is not in the topic's allow-list.
    SenderNotAllowed,
    /// `require-authenticated-sender` and no trusted pass result.
    UnauthenticatedSender,
    /// No `.xlsx` attachment.
    NoWorkbook,
    /// More than one `.xlsx` attachment.
    SeveralWorkbooks,
    /// The attachment is not an xlsx (zip) file.
    NotAWorkbook,
    /// The xlsx is damaged (truncated zip, bad XML).
    MalformedWorkbook,
    /// The attachment is larger than `max-workbook-bytes`.
    WorkbookTooLarge,
    /// The zip expands past `max-decompressed-bytes` (a zip bomb).
    DecompressedTooLarge,
    /// More worksheets than `max-sheets`.
    TooManySheets,
    /// A worksheet has rows past `max-rows`.
    TooManyRows,
    /// More cells than `max-cells`.
    TooManyCells,
    /// No `Tririga Object Map` worksheet.
    NoObjectMap,
    /// The object map is malformed (unknown tag, unclosed root, bad reference…).
    MalformedMap,
    /// A required field is absent or empty.
    RequiredFieldEmpty,
    /// A unique field's value already belongs to another record.
    Duplicate,
    /// The map's business object is not the topic's.
    WrongBusinessObject,
    /// The map names an action other than CREATE.
    UnsupportedAction,
    /// The store refused the record for a reason retrying cannot fix.
    Unstorable,
    /// Delivered more than `delivery-limit` times without completing.
    Poison,
    /// RabbitMQ dead-lettered it itself: past the quorum queue's
    /// `x-delivery-limit` (`x-death` reason `delivery_limit`).
    BrokerDeliveryLimit,
    /// RabbitMQ dead-lettered it itself: a consumer rejected it without
    /// requeueing (`x-death` reason `rejected`).
    BrokerRejected,
    /// RabbitMQ dead-lettered it itself: its TTL ran out (`expired`).
    BrokerExpired,
    /// RabbitMQ dead-lettered it itself: the queue's length limit (`maxlen`).
    BrokerMaxLength,
    /// RabbitMQ dead-lettered it itself for a reason not known here.
    BrokerOther,
}

impl Reason {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadEnvelope => "bad-envelope",
            Self::UnparseableMail => "unparseable-mail",
            Self::MimeTooDeep => "mime-too-deep",
            Self::TooManyParts => "too-many-parts",
            Self::NoTopic => "no-topic",
            Self::SenderNotAllowed => "sender-not-allowed",
            Self::UnauthenticatedSender => "unauthenticated-sender",
            Self::NoWorkbook => "no-workbook",
            Self::SeveralWorkbooks => "several-workbooks",
            Self::NotAWorkbook => "not-a-workbook",
            Self::MalformedWorkbook => "malformed-workbook",
            Self::WorkbookTooLarge => "workbook-too-large",
            Self::DecompressedTooLarge => "decompressed-too-large",
            Self::TooManySheets => "too-many-sheets",
            Self::TooManyRows => "too-many-rows",
            Self::TooManyCells => "too-many-cells",
            Self::NoObjectMap => "no-object-map",
            Self::MalformedMap => "malformed-map",
            Self::RequiredFieldEmpty => "required-field-empty",
            Self::Duplicate => "duplicate",
            Self::WrongBusinessObject => "wrong-business-object",
            Self::UnsupportedAction => "unsupported-action",
            Self::Unstorable => "unstorable",
            Self::Poison => "poison",
            // RabbitMQ's own `x-death` reasons, spelled as RabbitMQ does.
            Self::BrokerDeliveryLimit => "delivery_limit",
            Self::BrokerRejected => "rejected",
            Self::BrokerExpired => "expired",
            Self::BrokerMaxLength => "maxlen",
            Self::BrokerOther => "dead-lettered-by-rabbitmq",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A rejected message: the reason and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code.
    pub reason: Reason,
    /// A human-readable explanation (no message content beyond names).
    pub detail: String,
}

impl Rejection {
    /// A rejection with that reason and detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

/// Result of a check that may reject the message.
pub type Checked<T> = std::result::Result<T, Rejection>;
