//! Errors of the IMAP fetcher, classified at the boundary (see
//! [`FetchError::kind`] and [`FetchError::is_auth`]).

use common::publish::PublishError;

/// Why a mailbox session failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
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
    /// Logged in, but the app may not use the mailbox (Exchange's "User is
    /// authenticated but not connected", or a refused login on a mailbox the
    /// app has no grant for).
    #[error("no permission on mailbox {mailbox} for app {app}: {detail}")]
    Permission {
        /// The mailbox address.
        mailbox: String,
        /// The application (client) id, or the login name for passwords.
        app: String,
        /// What the server said.
        detail: String,
    },
    /// No token is available for the profile yet.
    #[error("no access token for oauth profile {profile} in Redis (is the token broker running?)")]
    NoToken {
        /// The profile name.
        profile: String,
    },
    /// The token store failed.
    #[error("cannot read the token of oauth profile {profile}: {detail}")]
    Token {
        /// The profile name.
        profile: String,
        /// The cause (never the token).
        detail: String,
    },
    /// Publishing failed (RabbitMQ down, nack, unroutable).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Redis failed (checkpoint, oversized records).
    #[error("cannot {action} in Redis: {source}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// The lease was lost while working: stop at once.
    #[error("lease on {0} lost")]
    LeaseLost(String),
    /// A folder name cannot be used.
    #[error("folder {0:?} cannot be used: {1}")]
    Folder(String, String),
}

impl FetchError {
    /// A short label for the `errors` metric and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Imap { .. } => "imap",
            Self::Unsupported(_) => "unsupported",
            Self::AuthFailed { .. } => "auth",
            Self::Permission { .. } => "permission",
            Self::NoToken { .. } | Self::Token { .. } => "token",
            Self::Publish(e) => e.kind(),
            Self::Redis { .. } => "redis",
            Self::LeaseLost(_) => "lease",
            Self::Folder(..) => "folder",
        }
    }

    /// True when the server refused the credentials: ask for a fresh token.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::AuthFailed { .. })
    }

    /// True when a human must act (grant, config); retried slowly.
    pub fn needs_human(&self) -> bool {
        matches!(
            self,
            Self::Permission { .. } | Self::Unsupported(_) | Self::Folder(..)
        )
    }
}

/// Result with [`FetchError`].
pub type Result<T, E = FetchError> = std::result::Result<T, E>;
