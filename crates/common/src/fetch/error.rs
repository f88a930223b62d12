//! The failure classes every fetcher shares, classified once.
//!
//! [`FetchError`] is what the kit itself can fail with (tokens, publishing,
//! Redis, a missing mailbox grant, a lost lease). A protocol's error wraps it
//! (`From<FetchError>`) beside its own variants and implements [`Failure`],
//! so the kit reads every error's class the same way: the shared classes
//! by the shared rule, the protocol's own by the protocol.

use super::publish::PublishError;

/// A failure that does not depend on the mail protocol. Messages never
/// contain a token or a password.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No usable token for the profile in Redis.
    #[error("no access token for oauth profile {profile} in Redis (is the token broker running, and is the profile failing? see `mailagent status`)")]
    NoToken {
        /// The profile name.
        profile: String,
    },
    /// The token store failed, or the stored token cannot be opened.
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
    /// Redis failed (checkpoint, UIDL set, oversized records).
    #[error("cannot {action} in Redis: {source}")]
    Redis {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// Logged in, but the app may not use the mailbox: Exchange's "User is
    /// authenticated but not connected", or a login refused even with a
    /// fresh token.
    #[error("no permission on mailbox {mailbox} for app {app}: {detail}")]
    Permission {
        /// The mailbox address.
        mailbox: String,
        /// The application (client) id, or the login name for passwords.
        app: String,
        /// What the server said, and what to do.
        detail: String,
    },
    /// The lease on the mail config was lost while working: stop at once.
    #[error("lease on {0} lost")]
    LeaseLost(String),
}

impl FetchError {
    /// A short label for the `errors` metric and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoToken { .. } | Self::Token { .. } => "token",
            Self::Publish(e) => e.kind(),
            Self::Redis { .. } => "redis",
            Self::Permission { .. } => "permission",
            Self::LeaseLost(_) => "lease",
        }
    }

    /// True when nothing changes until a person acts: a missing grant, or a
    /// message the broker cannot route (a topology problem). Retried on the
    /// slow schedule and logged as an error.
    pub fn needs_human(&self) -> bool {
        match self {
            Self::Permission { .. } => true,
            Self::Publish(e) => !e.is_transient(),
            _ => false,
        }
    }
}

/// The class of a failure, as the kit reads it.
#[derive(Debug, Clone, Copy)]
pub enum Class<'a> {
    /// A failure every fetcher shares: classified by the shared rule.
    Shared(&'a FetchError),
    /// A failure of the protocol itself.
    Own {
        /// The label for the `errors` metric and logs.
        kind: &'static str,
        /// Whether nothing changes until a person acts.
        needs_human: bool,
    },
}

/// What the kit asks of a protocol's error: its [`Class`]. Everything else
/// (the metric label, the retry schedule, stopping on a lost lease) follows
/// from the class, the same way for every protocol.
pub trait Failure: std::error::Error + From<FetchError> + Send + Sync + 'static {
    /// Which class this failure is.
    fn class(&self) -> Class<'_>;

    /// A short label for the `errors` metric and logs.
    fn kind(&self) -> &'static str {
        match self.class() {
            Class::Shared(e) => e.kind(),
            Class::Own { kind, .. } => kind,
        }
    }

    /// True when a person must act; retried on the slow schedule.
    fn needs_human(&self) -> bool {
        match self.class() {
            Class::Shared(e) => e.needs_human(),
            Class::Own { needs_human, .. } => needs_human,
        }
    }

    /// True when the lease was lost: the worker stops without retrying.
    fn lease_lost(&self) -> bool {
        matches!(self.class(), Class::Shared(FetchError::LeaseLost(_)))
    }
}

impl Failure for FetchError {
    fn class(&self) -> Class<'_> {
        Class::Shared(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_needs_a_person_rule_for_the_shared_classes() {
        let unroutable = FetchError::Publish(PublishError::Unroutable {
            dedupe_key: "k".into(),
            exchange: "x".into(),
            routing_key: "create".into(),
        });
        let nacked = FetchError::Publish(PublishError::Nacked {
            dedupe_key: "k".into(),
        });
        let permission = FetchError::Permission {
            mailbox: "m".into(),
            app: "a".into(),
            detail: "d".into(),
        };
        let no_token = FetchError::NoToken {
            profile: "p".into(),
        };
        let table: [(&FetchError, bool, &str); 4] = [
            (&unroutable, true, "unroutable"),
            (&nacked, false, "nack"),
            (&permission, true, "permission"),
            (&no_token, false, "token"),
        ];
        for (e, human, kind) in table {
            assert_eq!(Failure::needs_human(e), human, "{e}");
            assert_eq!(Failure::kind(e), kind, "{e}");
        }
        assert!(FetchError::LeaseLost("c".into()).lease_lost());
    }
}
