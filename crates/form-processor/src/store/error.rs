//! Store failures, classified at the boundary: transient (retry later) or
//! permanent (the store refuses this data or is misconfigured).

/// A store failure, classified.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Retrying later may succeed: the server is down, restarting, locked.
    #[error("cannot {action} in the record store (transient): {source}")]
    Transient {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Retrying cannot help: the store refuses this data or is misconfigured.
    #[error("cannot {action} in the record store: {source}")]
    Permanent {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// The writer task is gone (the store is shutting down).
    #[error("cannot write: the record store is closed")]
    Closed,
}

impl Error {
    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. } | Self::Closed)
    }

    /// Classifies an sqlx error met while doing `action`.
    pub(super) fn from_sqlx(action: &'static str, source: sqlx::Error) -> Self {
        if is_transient(&source) {
            Self::Transient { action, source }
        } else {
            Self::Permanent { action, source }
        }
    }

    /// A transient failure that every op of a failed batch shares: each
    /// caller gets its own copy of the cause's text.
    pub(super) fn batch(action: &'static str, cause: &sqlx::Error) -> Self {
        Self::Transient {
            action,
            source: sqlx::Error::Protocol(cause.to_string()),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an sqlx error is an outage (retry) rather than a refusal.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // SQLite: BUSY, LOCKED, IOERR, FULL, CANTOPEN (primary codes).
            // PostgreSQL: connection exceptions, resources, operator
            // intervention, serialization failure, deadlock, lock timeout.
            matches!(
                code.as_str(),
                "5" | "6"
                    | "10"
                    | "13"
                    | "14"
                    | "261"
                    | "262"
                    | "517"
                    | "40001"
                    | "40P01"
                    | "55P03"
                    | "57014"
            ) || code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_refusals_permanent() {
        let cases = [
            (sqlx::Error::PoolTimedOut, true),
            (sqlx::Error::PoolClosed, true),
            (sqlx::Error::Protocol("reset".into()), true),
            (sqlx::Error::RowNotFound, false),
            (sqlx::Error::Configuration("bad url".into()), false),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(is_transient(&e), want, "{text}");
            assert_eq!(Error::from_sqlx("write", e).is_transient(), want, "{text}");
        }
        assert!(Error::Closed.is_transient());
        assert!(Error::batch("write", &sqlx::Error::RowNotFound).is_transient());
    }
}
