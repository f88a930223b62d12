//! Errors of the IMAP fetcher: the protocol's own failures beside the
//! shared ones of the fetch kit ([`common::fetch::FetchError`]), classified
//! through [`Failure`].

use common::fetch::{Class, Failure, FetchError};

/// Why a mailbox session failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect, TLS handshake or a read/write failed.
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The IMAP conversation failed (connection lost, BAD, NO, parse error).
    #[error("cannot {action} on {endpoint}: {source}")]
    Imap {
        /// What was being done.
        action: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The cause.
        #[source]
        source: async_imap::error::Error,
    },
    /// The server stayed silent for longer than `command-timeout`.
    #[error("cannot {action} on {endpoint}: no answer within {secs} s (command-timeout)")]
    Timeout {
        /// What was being done.
        action: &'static str,
        /// `host:port`.
        endpoint: String,
        /// The timeout.
        secs: u64,
    },
    /// The server does not offer what the config requires (STARTTLS, UIDs).
    #[error("{0}")]
    Unsupported(String),
    /// The server refused the credentials (token or password).
    #[error(
        "cannot log in to {mailbox}: the server refused the {mechanism} credentials ({detail})"
    )]
    AuthFailed {
        /// The mailbox address.
        mailbox: String,
        /// `XOAUTH2` or `LOGIN`.
        mechanism: &'static str,
        /// The server's answer (never the token).
        detail: String,
    },
    /// A folder name cannot be used.
    #[error("folder {0:?} cannot be used: {1}")]
    Folder(String, String),
    /// A failure every fetcher shares (token, publish, Redis, permission,
    /// lease).
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl Failure for Error {
    fn class(&self) -> Class<'_> {
        let kind = match self {
            Self::Fetch(e) => return Class::Shared(e),
            Self::Connect { .. } => "connect",
            Self::Imap { .. } => "imap",
            Self::Timeout { .. } => "timeout",
            Self::AuthFailed { .. } => "auth",
            Self::Unsupported(_) => "unsupported",
            Self::Folder(..) => "folder",
        };
        let needs_human = matches!(self, Self::Unsupported(_) | Self::Folder(..));
        Class::Own { kind, needs_human }
    }
}

impl Error {
    /// True when the server refused the credentials: ask for a fresh token.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::AuthFailed { .. })
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
