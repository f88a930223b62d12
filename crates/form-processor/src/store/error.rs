//! Store failures, classified at the boundary: transient (retry later) or
//! permanent (the store refuses this data or is misconfigured).

/// The underlying error: sqlx's, or rusqlite's from the SQLite writer.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

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
        source: Cause,
    },
    /// Retrying cannot help: the store refuses this data or is misconfigured.
    #[error("cannot {action} in the record store: {source}")]
    Permanent {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: Cause,
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
            Self::Transient {
                action,
                source: source.into(),
            }
        } else {
            Self::permanent(action, source)
        }
    }

    /// Classifies a rusqlite error met by the SQLite writer.
    pub(super) fn from_sqlite(action: &'static str, source: rusqlite::Error) -> Self {
        if is_transient_sqlite(&source) {
            Self::Transient {
                action,
                source: source.into(),
            }
        } else {
            Self::permanent(action, source)
        }
    }

    /// A permanent failure with this cause.
    pub(super) fn permanent(action: &'static str, source: impl Into<Cause>) -> Self {
        Self::Permanent {
            action,
            source: source.into(),
        }
    }

    /// A transient failure that every op of a failed batch shares: each
    /// caller gets its own copy of the cause's text.
    pub(super) fn batch(action: &'static str, cause: &dyn std::fmt::Display) -> Self {
        Self::Transient {
            action,
            source: cause.to_string().into(),
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
            outage(&code).is_some() || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// Whether an error of the SQLite writer is an outage (busy, locked, I/O,
/// disk full: [`outage`] of its extended code) rather than a refusal.
pub fn is_transient_sqlite(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => outage(&f.extended_code.to_string()).is_some(),
        _ => false,
    }
}

/// Why a database error code is an outage of the store, retried for as long
/// as it lasts (§6: never dead-lettered), or `None` when it is a refusal of
/// the statement itself (a constraint, bad SQL), which retrying cannot fix.
///
/// SQLite codes are numbers below 10000, the primary code in the low byte
/// of an extended one; PostgreSQL codes are SQLSTATEs, five characters
/// whose first two name the class.
pub fn outage(code: &str) -> Option<&'static str> {
    // A SQLSTATE has five characters; SQLite's codes stay below 10000.
    if let Some(n) = code.parse::<u32>().ok().filter(|_| code.len() < 5) {
        return match n & 0xff {
            5 => Some("SQLite BUSY: another connection holds the database"),
            6 => Some("SQLite LOCKED: a table is locked"),
            8 => Some("SQLite READONLY: the file or its directory cannot be written now"),
            10 => Some("SQLite IOERR: the disk failed a read or write"),
            13 => Some("SQLite FULL: the disk is full"),
            14 => Some("SQLite CANTOPEN: the file cannot be opened now"),
            15 => Some("SQLite PROTOCOL: a locking race"),
            _ => None,
        };
    }
    match code {
        "25006" => Some("PostgreSQL read-only transaction: a standby, or a failover under way"),
        "40001" => Some("PostgreSQL serialization failure"),
        "40P01" => Some("PostgreSQL deadlock"),
        "55P03" => Some("PostgreSQL lock not available"),
        "57014" => Some("PostgreSQL statement cancelled"),
        _ => match code.get(..2) {
            Some("08") => Some("PostgreSQL connection exception"),
            Some("53") => Some("PostgreSQL insufficient resources (disk, memory, connections)"),
            Some("57") => Some("PostgreSQL operator intervention (shutdown, restart)"),
            Some("58") => Some("PostgreSQL system error (I/O)"),
            _ => None,
        },
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

        // The SQLite writer's errors, by extended code.
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let cases = [
            (failure(5), true),     // BUSY
            (failure(773), true),   // BUSY_TIMEOUT
            (failure(1290), true),  // IOERR_FSYNC
            (failure(13), true),    // FULL
            (failure(2067), false), // CONSTRAINT_UNIQUE
            (rusqlite::Error::InvalidParameterCount(1, 2), false),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(is_transient_sqlite(&e), want, "{text}");
            assert_eq!(
                Error::from_sqlite("write", e).is_transient(),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn every_database_code_has_a_class_and_a_reason() {
        let cases: &[(&str, bool)] = &[
            // SQLite, primary and extended codes.
            ("5", true),     // BUSY
            ("261", true),   // BUSY_RECOVERY
            ("517", true),   // BUSY_SNAPSHOT
            ("773", true),   // BUSY_TIMEOUT
            ("6", true),     // LOCKED
            ("262", true),   // LOCKED_SHAREDCACHE
            ("8", true),     // READONLY
            ("264", true),   // READONLY_RECOVERY
            ("520", true),   // READONLY_CANTLOCK
            ("776", true),   // READONLY_ROLLBACK
            ("1032", true),  // READONLY_DBMOVED
            ("10", true),    // IOERR
            ("266", true),   // IOERR_READ
            ("778", true),   // IOERR_WRITE
            ("1290", true),  // IOERR_FSYNC
            ("13", true),    // FULL
            ("14", true),    // CANTOPEN
            ("19", false),   // CONSTRAINT
            ("2067", false), // CONSTRAINT_UNIQUE
            ("1", false),    // ERROR (bad SQL)
            ("11", false),   // CORRUPT
            // PostgreSQL SQLSTATEs.
            ("08000", true),  // connection_exception
            ("08006", true),  // connection_failure
            ("08P01", true),  // protocol_violation
            ("25006", true),  // read_only_sql_transaction
            ("40001", true),  // serialization_failure
            ("40P01", true),  // deadlock_detected
            ("53100", true),  // disk_full
            ("53200", true),  // out_of_memory
            ("53300", true),  // too_many_connections
            ("55P03", true),  // lock_not_available
            ("57014", true),  // query_canceled
            ("57P01", true),  // admin_shutdown
            ("57P02", true),  // crash_shutdown
            ("57P03", true),  // cannot_connect_now
            ("58030", true),  // io_error
            ("23505", false), // unique_violation
            ("23502", false), // not_null_violation
            ("42P01", false), // undefined_table
            ("22001", false), // string_data_right_truncation
            ("25001", false), // active_sql_transaction
        ];
        for (code, transient) in cases {
            let class = outage(code);
            assert_eq!(class.is_some(), *transient, "{code}: {class:?}");
            if let Some(reason) = class {
                assert!(!reason.is_empty());
            }
        }
    }
}
