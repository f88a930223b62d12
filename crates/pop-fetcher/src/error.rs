//! Errors of the POP3 fetcher: the protocol's own failures beside the
//! shared ones of the fetch kit ([`common::fetch::FetchError`]), classified
//! through [`Failure`].

use common::fetch::{Class, Failure, FetchError};

/// Why a POP3 session (or one step of it) failed. Messages never contain a
/// token or a password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect or the TLS handshake failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed after connecting (connection lost).
    #[error("cannot {action} on {endpoint}: {source}")]
    Io {
        /// What was being done (`read the RETR reply`…).
        action: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server stayed silent for longer than the read timeout.
    #[error("cannot {action} on {endpoint}: no answer within {secs} s")]
    Timeout {
        /// What was being done.
        action: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The timeout.
        secs: u64,
    },
    /// The server answered something POP3 does not allow here.
    #[error("cannot {action} on {endpoint}: unexpected reply {reply:?}")]
    Protocol {
        /// What was being done.
        action: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The reply (truncated).
        reply: String,
    },
    /// The server refused a command with `-ERR`.
    #[error("the server {endpoint} refused {command}: {reply}")]
    Refused {
        /// The command (without arguments).
        command: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The `-ERR` text.
        reply: String,
    },
    /// Exchange Online's answer to a malformed command, e.g. the one-line
    /// `AUTH XOAUTH2 <payload>`; it closes the connection afterwards.
    #[error("the server {endpoint} closed the connection with a protocol error after {command} ({reply}); Exchange Online does this for a one-line AUTH XOAUTH2 or a malformed command")]
    ProtocolClosed {
        /// The command that provoked it.
        command: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The `-ERR` text.
        reply: String,
    },
    /// The server lacks something the configuration requires (STLS,
    /// SASL XOAUTH2, UIDL).
    #[error("{0}")]
    Unsupported(String),
    /// The server refused the credentials (token or password).
    #[error("cannot log in to {mailbox} with {mechanism}: {cause} (server said: {reply})")]
    AuthFailed {
        /// The mailbox address.
        mailbox: String,
        /// `XOAUTH2` or `USER/PASS`.
        mechanism: &'static str,
        /// The likely cause, in words.
        cause: String,
        /// The server's final answer (never the token).
        reply: String,
    },
    /// A permanent setup problem (TLS configuration, server name).
    #[error("{0}")]
    Setup(String),
    /// A failure every fetcher shares (token, publish, Redis, permission,
    /// lease).
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// A refused password needs a person, as on IMAP; a refused token is
/// retried (the broker may replace it).
impl Failure for Error {
    fn class(&self) -> Class<'_> {
        let (kind, needs_human) = match self {
            Self::Fetch(e) => return Class::Shared(e),
            Self::Connect { .. } => ("connect", false),
            Self::Io { .. } | Self::Timeout { .. } => ("io", false),
            Self::Protocol { .. } | Self::Refused { .. } => ("pop3", false),
            Self::ProtocolClosed { .. } => ("pop3", true),
            Self::AuthFailed { mechanism, .. } => ("auth", *mechanism == "USER/PASS"),
            Self::Unsupported(_) => ("unsupported", true),
            Self::Setup(_) => ("setup", true),
        };
        Class::Own { kind, needs_human }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
