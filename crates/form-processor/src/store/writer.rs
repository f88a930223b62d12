//! The one writer task per process: it gathers the ops waiting at that
//! moment into one transaction, each in its own savepoint. A transient
//! failure fails the whole batch and every caller retries; any other
//! failure rolls back that op's savepoint only.

use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool, Executor};
use tokio::sync::{mpsc, oneshot};

use super::sql::{claim, insert_failure, insert_record};
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
enum Done {
    Create(Created),
    Reject(Stored),
}

impl Op {
    /// Runs the op's statements (inside the caller's savepoint).
    async fn exec(&self, conn: &mut AnyConnection) -> Result<Done, sqlx::Error> {
        match self {
            Op::Reject(failure, _) => {
                if !claim(conn, &failure.source.dedupe_key).await? {
                    return Ok(Done::Reject(Stored::AlreadyKnown));
                }
                Ok(Done::Reject(Stored::Failure(
                    insert_failure(conn, failure).await?,
                )))
            }
            Op::Create(record, _) => {
                let key = &record.source.dedupe_key;
                if !claim(conn, key).await? {
                    return Ok(Done::Create(Created::AlreadyKnown));
                }
                match insert_record(conn, record).await? {
                    Ok(id) => Ok(Done::Create(Created::Record(id))),
                    Err(rejection) => {
                        // Undo the partial record, keep the claim as a failure.
                        conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                        let failure = NewFailure {
                            rejection: rejection.clone(),
                            topic: Some(record.topic.clone()),
                            source: record.source.clone(),
                        };
                        claim(conn, key).await?;
                        Ok(Done::Create(Created::Duplicate(
                            insert_failure(conn, &failure).await?,
                            rejection,
                        )))
                    }
                }
            }
        }
    }

    /// Sends the answer to the caller, who may have gone away.
    fn answer(self, result: Result<Done>) {
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

/// Runs one op inside a savepoint. The outer error is transient and fails
/// the whole batch; the inner one is this op's own permanent failure, rolled
/// back alone.
async fn run_one(
    conn: &mut AnyConnection,
    op: &Op,
) -> Result<Result<Done, sqlx::Error>, sqlx::Error> {
    conn.execute("SAVEPOINT op").await?;
    match op.exec(conn).await {
        Ok(done) => {
            conn.execute("RELEASE SAVEPOINT op").await?;
            Ok(Ok(done))
        }
        Err(e) if is_transient(&e) => Err(e),
        Err(e) => {
            conn.execute("ROLLBACK TO SAVEPOINT op").await?;
            conn.execute("RELEASE SAVEPOINT op").await?;
            Ok(Err(e))
        }
    }
}

/// The writer task: one transaction per batch of waiting ops.
pub(super) async fn writer(
    pool: AnyPool,
    mut rx: mpsc::Receiver<Op>,
    observe: Option<BatchObserver>,
) {
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let n = batch.len();
        write_batch(&pool, std::mem::take(&mut batch)).await;
        if let Some(observe) = &observe {
            observe(n, started.elapsed());
        }
    }
}

async fn write_batch(pool: &AnyPool, ops: Vec<Op>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, "cannot begin a record store transaction; its messages will be retried");
            ops.into_iter()
                .for_each(|op| op.answer(Err(Error::batch("begin a transaction", &e))));
            return;
        }
    };
    let mut results = Vec::with_capacity(ops.len());
    let mut failed: Option<sqlx::Error> = None;
    for op in ops {
        if failed.is_some() {
            results.push((op, None));
            continue;
        }
        match run_one(&mut tx, &op).await {
            Ok(result) => results.push((op, Some(result))),
            Err(e) => {
                failed = Some(e);
                results.push((op, None));
            }
        }
    }
    let failed = match failed {
        Some(e) => Some(e),
        None => tx.commit().await.err(),
    };
    if let Some(e) = failed {
        tracing::warn!(error = %e, "record store batch failed; its messages will be retried");
        results
            .into_iter()
            .for_each(|(op, _)| op.answer(Err(Error::batch("write", &e))));
        return;
    }
    for (op, result) in results {
        match result {
            Some(Ok(done)) => op.answer(Ok(done)),
            Some(Err(e)) => op.answer(Err(Error::from_sqlx("write", e))),
            None => op.answer(Err(Error::Closed)),
        }
    }
}
