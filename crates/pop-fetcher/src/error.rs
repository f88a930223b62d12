//! Errors of the POP3 fetcher, classified at the boundary: [`Error::kind`]
//! labels metrics, [`Error::is_auth`] asks for a forced token refresh and
//! [`Error::needs_human`] selects the slow retry schedule.

use common::publish::PublishError;

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
    /// A fresh token was refused too: the app has no access to the mailbox.
    #[error("no permission on mailbox {mailbox} for app {app}: a fresh token was refused too (grant the app with Add-MailboxPermission / the Exchange service principal; server said: {reply})")]
    Permission {
        /// The mailbox address.
        mailbox: String,
        /// The application (client) id.
        app: String,
        /// The server's answer.
        reply: String,
    },
    /// No usable token for the profile in Redis.
    #[error("no access token for oauth profile {profile} in Redis (is the token broker running, and is the profile failing? see `mailagent status`)")]
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
    /// Redis failed (UIDL set, oversized records).
    #[error("cannot {action} in Redis: {source}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// A permanent setup problem (TLS configuration, server name).
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// A short label for the `errors` metric and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Io { .. } | Self::Timeout { .. } => "io",
            Self::Protocol { .. } | Self::Refused { .. } | Self::ProtocolClosed { .. } => "pop3",
            Self::Unsupported(_) => "unsupported",
            Self::AuthFailed { .. } => "auth",
            Self::Permission { .. } => "permission",
            Self::NoToken { .. } | Self::Token { .. } => "token",
            Self::Publish(e) => e.kind(),
            Self::Redis { .. } => "redis",
            Self::Setup(_) => "setup",
        }
    }

    /// True when the server refused the credentials: ask for a fresh token.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::AuthFailed { .. })
    }

    /// True when a human must act (grant, server capabilities, setup);
    /// retried on the slow schedule.
    pub fn needs_human(&self) -> bool {
        matches!(
            self,
            Self::Permission { .. }
                | Self::Unsupported(_)
                | Self::Setup(_)
                | Self::ProtocolClosed { .. }
        ) || matches!(self, Self::Publish(e) if !e.is_transient())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
