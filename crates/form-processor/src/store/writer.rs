//! The one writer per process (a task on PostgreSQL, a thread of its own
//! on SQLite: `sqlite_writer`): it gathers the ops waiting at that moment
//! into one transaction (group commit), each in its own savepoint.
//! A transient failure fails the whole batch and every caller retries; any
//! other failure rolls back that op's savepoint only. Callers hear the
//! outcome only after the commit, so they ack only what is committed.
//!
//! On PostgreSQL a savepoint is a round trip and a subtransaction of its
//! own, so a batch is first written without them (one statement a
//! message); only when one of its messages needs undoing — its dedupe key
//! settled, a unique value taken, a statement refused — is that attempt
//! rolled back and the batch written again with savepoints.

use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::Executor;
use tokio::sync::{mpsc, oneshot};

use super::sql::{self, Inserted};
use super::{is_transient, Error, NewFailure, NewRecord, Result, Store};
use crate::reject::Rejection;

/// Most messages written in one transaction.
pub(super) const MAX_BATCH: usize = 128;

/// Batch timing, reported to metrics by the caller.
pub type BatchObserver = std::sync::Arc<dyn Fn(usize, Duration) + Send + Sync>;

/// What a CREATE did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new record with this id.
    Record(i64),
    /// The dedupe key was already settled (a duplicate delivery).
    AlreadyKnown,
    /// A unique value is taken: stored as this failure instead.
    Duplicate(i64, Rejection),
}

/// What storing a rejection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A new failure row with this id.
    Failure(i64),
    /// The dedupe key was already settled.
    AlreadyKnown,
}

/// One write, queued for the writer task with the channel for its answer.
pub(super) enum Op {
    /// Create a record.
    Create(Box<NewRecord>, oneshot::Sender<Result<Created>>),
    /// Store a rejection.
    Reject(Box<NewFailure>, oneshot::Sender<Result<Stored>>),
}

impl Store {
    /// Creates the record, its children, its dedupe key and unique values in
    /// one transaction.
    pub async fn create(&self, record: NewRecord) -> Result<Created> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Create(Box::new(record), tx)).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Stores a rejection with its dedupe key.
    pub async fn reject(&self, failure: NewFailure) -> Result<Stored> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Reject(Box::new(failure), tx)).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn submit(&self, op: Op) -> Result<()> {
        self.writer.send(op).await.map_err(|_| Error::Closed)
    }
}

/// An op's own outcome, before it is sent back.
pub(super) enum Done {
    Create(Created),
    Reject(Stored),
}

impl Op {
    /// Sends the answer to the caller, who may have gone away.
    pub(super) fn answer(self, result: Result<Done>) {
        match self {
            Op::Create(_, tx) => {
                let _ = tx.send(result.map(|d| match d {
                    Done::Create(c) => c,
                    Done::Reject(_) => Created::AlreadyKnown,
                }));
            }
            Op::Reject(_, tx) => {
                let _ = tx.send(result.map(|d| match d {
                    Done::Reject(s) => s,
                    Done::Create(_) => Stored::AlreadyKnown,
                }));
            }
        }
    }
}

/// Runs one op's statements inside the savepoint `op` (PostgreSQL).
async fn pg_op(conn: &mut sqlx::PgConnection, op: &Op) -> Result<Done, sqlx::Error> {
    match op {
        Op::Reject(failure, _) => match sql::pg_insert_failure(&mut *conn, failure).await? {
            Some(id) => Ok(Done::Reject(Stored::Failure(id))),
            None => {
                conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                Ok(Done::Reject(Stored::AlreadyKnown))
            }
        },
        Op::Create(record, _) => match sql::pg_insert_record(&mut *conn, record).await? {
            Inserted::Record(id) => Ok(Done::Create(Created::Record(id))),
            Inserted::AlreadyKnown => {
                conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                Ok(Done::Create(Created::AlreadyKnown))
            }
            Inserted::Duplicate(rejection) => {
                // Undo the record, keep the message as a failure.
                conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                let failure = record.as_failure(&rejection);
                match sql::pg_insert_failure(&mut *conn, &failure).await? {
                    Some(id) => Ok(Done::Create(Created::Duplicate(id, rejection))),
                    None => {
                        conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                        Ok(Done::Create(Created::AlreadyKnown))
                    }
                }
            }
        },
    }
}

/// One op without a savepoint (PostgreSQL): `Some` when it did what a
/// first delivery does — a new record, or a new failure — and `None` when
/// it found its dedupe key settled or a unique value taken, which need the
/// op's own savepoint to undo.
async fn pg_op_plain(conn: &mut sqlx::PgConnection, op: &Op) -> Result<Option<Done>, sqlx::Error> {
    Ok(match op {
        Op::Reject(failure, _) => sql::pg_insert_failure(&mut *conn, failure)
            .await?
            .map(|id| Done::Reject(Stored::Failure(id))),
        Op::Create(record, _) => match sql::pg_insert_record(&mut *conn, record).await? {
            Inserted::Record(id) => Some(Done::Create(Created::Record(id))),
            Inserted::AlreadyKnown | Inserted::Duplicate(_) => None,
        },
    })
}

/// What the first attempt at a PostgreSQL batch came to.
enum Plain {
    /// Committed: every op's outcome.
    Committed(Vec<Done>),
    /// Rolled back: an op needs its savepoint (a settled key, a taken
    /// value, a refused statement): write the batch again with them.
    Careful,
    /// A transient failure: the batch fails, every caller retries.
    Failed(sqlx::Error),
}

/// The batch in one transaction without savepoints: one round trip a
/// message instead of two, and no subtransaction for PostgreSQL to keep.
/// Anything but a new record or failure rolls it all back for
/// [`pg_batch_careful`].
async fn pg_batch_plain(pool: &sqlx::PgPool, ops: &[Op]) -> Plain {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return Plain::Failed(e),
    };
    let mut done = Vec::with_capacity(ops.len());
    for op in ops {
        match pg_op_plain(&mut tx, op).await {
            Ok(Some(d)) => done.push(d),
            Ok(None) => return careful(tx).await,
            Err(e) if is_transient(&e) => return Plain::Failed(e),
            Err(_) => return careful(tx).await,
        }
    }
    match tx.commit().await {
        Ok(()) => Plain::Committed(done),
        Err(e) => Plain::Failed(e),
    }
}

/// Rolls the plain attempt back; the careful one follows.
async fn careful(tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Plain {
    match tx.rollback().await {
        Ok(()) => Plain::Careful,
        Err(e) => Plain::Failed(e),
    }
}

/// One PostgreSQL batch: first as one plain transaction; when an op in it
/// needs undoing, again with each op in its savepoint.
async fn write_batch_pg(pool: &sqlx::PgPool, ops: Vec<Op>) {
    match pg_batch_plain(pool, &ops).await {
        Plain::Committed(done) => {
            for (op, done) in ops.into_iter().zip(done) {
                op.answer(Ok(done));
            }
        }
        Plain::Careful => pg_batch_careful(pool, ops).await,
        Plain::Failed(e) => fail_batch(ops, "write", &e),
    }
}

/// One PostgreSQL batch, each op in the savepoint `op` (released when the
/// next op sets it again, in the same round trip). A transient error fails
/// the whole batch (every caller retries); any other error rolls back that
/// op's savepoint only. Answers go out after the commit.
async fn pg_batch_careful(pool: &sqlx::PgPool, ops: Vec<Op>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_batch(ops, "begin a transaction", &e),
    };
    let mut results: Vec<Result<Done, sqlx::Error>> = Vec::with_capacity(ops.len());
    let mut failed: Option<sqlx::Error> = None;
    for (i, op) in ops.iter().enumerate() {
        let savepoint = if i == 0 {
            "SAVEPOINT op"
        } else {
            "RELEASE SAVEPOINT op; SAVEPOINT op"
        };
        if let Err(e) = (&mut *tx).execute(savepoint).await {
            failed = Some(e);
            break;
        }
        match pg_op(&mut tx, op).await {
            Ok(done) => results.push(Ok(done)),
            Err(e) if is_transient(&e) => {
                failed = Some(e);
                break;
            }
            Err(e) => match (&mut *tx).execute("ROLLBACK TO SAVEPOINT op").await {
                Ok(_) => results.push(Err(e)),
                Err(rollback) => {
                    failed = Some(rollback);
                    break;
                }
            },
        }
    }
    let failed = match failed {
        Some(e) => Some(e),
        None => tx.commit().await.err(),
    };
    answer_batch(ops, results, failed, Error::from_sqlx);
}

/// Answers every op of a failed batch with the same transient error:
/// each caller retries.
pub(super) fn fail_batch(ops: Vec<Op>, action: &'static str, e: &dyn std::fmt::Display) {
    tracing::warn!(error = %e, "cannot {action} in the record store; the batch's messages will be retried");
    ops.into_iter()
        .for_each(|op| op.answer(Err(Error::batch(action, e))));
}

/// Answers every op of a batch once it is over. On `failed` (a transient
/// error, which stops the batch, or a failed commit) every op gets the same
/// transient error and retries; otherwise each its own outcome, one result
/// per op.
pub(super) fn answer_batch<E: std::fmt::Display>(
    ops: Vec<Op>,
    results: Vec<std::result::Result<Done, E>>,
    failed: Option<E>,
    classify: fn(&'static str, E) -> Error,
) {
    if let Some(e) = failed {
        return fail_batch(ops, "write", &e);
    }
    debug_assert_eq!(ops.len(), results.len());
    for (op, result) in ops.into_iter().zip(results) {
        op.answer(result.map_err(|e| classify("write", e)));
    }
}

/// The PostgreSQL writer task: one transaction per batch of waiting ops.
/// (SQLite's writer is a thread of its own: `sqlite_writer`.)
pub(super) async fn writer(
    pool: sqlx::PgPool,
    mut rx: mpsc::Receiver<Op>,
    observe: Option<BatchObserver>,
) {
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let n = batch.len();
        let ops = std::mem::take(&mut batch);
        // A panic must not end the writer (every later write would wait
        // for a closed store forever): the batch's callers see their
        // answer channel dropped, a transient error, and retry.
        if std::panic::AssertUnwindSafe(write_batch_pg(&pool, ops))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(
                messages = n,
                "the record store writer panicked on a batch; its messages will be retried"
            );
        }
        if let Some(observe) = &observe {
            observe(n, started.elapsed());
        }
    }
}
