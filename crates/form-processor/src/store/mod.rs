//! The record store (§6): SQLite (default, WAL, `synchronous = FULL`) or
//! PostgreSQL through sqlx's typed drivers (one [`Pool`] variant each; the
//! `Any` driver cost a conversion of every argument and row), SQLite's
//! writes through rusqlite on a thread of their own, one schema
//! kept per backend under `migrations/`, applied at start.
//!
//! Writes go through one writer task per process that gathers the messages
//! waiting at that moment into one transaction (group commit), each in its
//! own savepoint: SQLite has one writer anyway, and a batch costs one commit
//! — one fsync under `synchronous = FULL` — instead of one per message. A
//! transient failure (server unreachable, lock timeout) fails the whole
//! batch and every caller retries; any other failure, and a unique-value
//! conflict, rolls back that message's savepoint only. Callers ack only
//! after the commit that holds their message (§8).
//!
//! - `error`: the failure classes;
//! - `input`: what callers hand in ([`NewRecord`], [`NewFailure`]);
//! - `open`: backends, the pool and the schema;
//! - `writer`: the batching writer (a task for PostgreSQL;
//!   `sqlite_writer`, a thread with its own rusqlite connection, for
//!   SQLite); `sql`: their statements;
//! - `read`: lookups and the CLI's listings.

mod error;
mod input;
mod open;
mod read;
mod sql;
mod sqlite_writer;
mod writer;

use sqlx::{PgPool, SqlitePool};
use tokio::sync::mpsc;

use error::is_transient_sqlite;
pub use error::{is_transient, Error, Result};
pub use input::{NewFailure, NewRecord, Source};
pub use open::Backend;
pub use read::{Known, RecordFilter, StoredChild, StoredFailure, StoredRecord};
pub use writer::{BatchObserver, Created, Stored};

/// A handle on the record store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    backend: Backend,
    writer: mpsc::Sender<writer::Op>,
}

impl Store {
    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool (after the writer finished its batch).
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }
}

/// The connection pool of one backend.
#[derive(Clone)]
pub(super) enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Runs the same code on whichever pool (or connection) `$pool` holds: the
/// statements are the same text on both backends, the types are not.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}
pub(super) use on_pool;
