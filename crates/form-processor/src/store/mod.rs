//! The record store (§6): SQLite (default, WAL, `synchronous = NORMAL`) or
//! PostgreSQL through sqlx's `Any` driver, one schema kept per backend under
//! `migrations/`, applied at start.
//!
//! Writes go through one writer task per process that gathers the messages
//! waiting at that moment into one transaction, each in its own savepoint:
//! SQLite has one writer anyway, and a batch costs one commit instead of
//! one per message. A transient failure (server unreachable, lock timeout)
//! fails the whole batch and every caller retries; a unique-value conflict
//! rolls back that message's savepoint only.
//!
//! - `error`: the failure classes;
//! - `input`: what callers hand in ([`NewRecord`], [`NewFailure`]);
//! - `open`: backends, the pool and the schema;
//! - `writer`: the batching writer task; `sql`: its statements;
//! - `read`: lookups and the CLI's listings.

mod error;
mod input;
mod open;
mod read;
mod sql;
mod writer;

use sqlx::AnyPool;
use tokio::sync::mpsc;

pub use error::{is_transient, Error, Result};
pub use input::{NewFailure, NewRecord, Source};
pub use open::Backend;
pub use read::{Known, RecordFilter, StoredChild, StoredFailure, StoredRecord};
pub use writer::{BatchObserver, Created, Stored};

/// A handle on the record store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
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
        self.pool.close().await;
    }
}
