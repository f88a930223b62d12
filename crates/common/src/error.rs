//! Errors of the shared plumbing.

/// A failure in shared plumbing: connections, topology, TLS, envelopes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RabbitMQ could not be reached or refused an operation.
    #[error("cannot {action} on RabbitMQ at {endpoint}: {source}")]
    Amqp {
        /// What was being done.
        action: &'static str,
        /// The redacted endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: lapin::Error,
    },
    /// Redis could not be reached or refused an operation.
    #[error("cannot {action} on Redis at {endpoint}: {source}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The redacted endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// A connection to Redis or RabbitMQ failed for a known reason that
    /// retrying will not cure: a refused certificate, or TLS on one side
    /// only (`redis://` to a TLS port, `amqps://` to a plaintext one).
    #[error("cannot connect to {service} at {endpoint}: {problem} ({detail})")]
    Connect {
        /// `Redis` or `RabbitMQ`.
        service: &'static str,
        /// The redacted endpoint.
        endpoint: String,
        /// What went wrong and what to do, in an operator's words.
        problem: String,
        /// The client library's own error text.
        detail: String,
    },
    /// A TLS setting could not be applied.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// An AMQP message is not a valid envelope.
    #[error("cannot decode envelope: {0}")]
    Envelope(String),
    /// An I/O error with context.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True when retrying later may succeed (a server down or restarting),
    /// false when the input or setup is wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Amqp { .. } | Self::Redis { .. } | Self::Io { .. } => true,
            Self::Tls(_) | Self::Envelope(_) | Self::Connect { .. } => false,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
