//! The one writer task per process: it gathers the ops waiting at that
//! moment into one transaction (group commit), each in its own savepoint.
//! A transient failure fails the whole batch and every caller retries; any
//! other failure rolls back that op's savepoint only. Callers hear the
//! outcome only after the commit, so they ack only what is committed.

use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::Executor;
use tokio::sync::{mpsc, oneshot};

use super::sql::{self, Inserted};
use super::{is_transient, Error, NewFailure, NewRecord, Pool, Result, Store};
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

/// Runs one op's statements inside the savepoint `op`, on one backend:
/// `$insert_record` and `$insert_failure` are its statements (`sql`).
macro_rules! exec_op {
    ($conn:expr, $op:expr, $insert_record:path, $insert_failure:path) => {{
        let conn = $conn;
        match $op {
            Op::Reject(failure, _) => match $insert_failure(&mut *conn, failure).await? {
                Some(id) => Ok(Done::Reject(Stored::Failure(id))),
                None => {
                    conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                    Ok(Done::Reject(Stored::AlreadyKnown))
                }
            },
            Op::Create(record, _) => match $insert_record(&mut *conn, record).await? {
                Inserted::Record(id) => Ok(Done::Create(Created::Record(id))),
                Inserted::AlreadyKnown => {
                    conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                    Ok(Done::Create(Created::AlreadyKnown))
                }
                Inserted::Duplicate(rejection) => {
                    // Undo the record, keep the message as a failure.
                    conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                    let failure = NewFailure {
                        rejection: rejection.clone(),
                        topic: Some(record.topic.clone()),
                        source: record.source.clone(),
                    };
                    match $insert_failure(&mut *conn, &failure).await? {
                        Some(id) => Ok(Done::Create(Created::Duplicate(id, rejection))),
                        None => {
                            conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                            Ok(Done::Create(Created::AlreadyKnown))
                        }
                    }
                }
            },
        }
    }};
}

/// One backend's batch: one transaction, each op in the savepoint `op`
/// (released when the next op sets it again, in the same round trip). A
/// transient error fails the whole batch (every caller retries); any
/// other error rolls back that op's savepoint only. Answers go out after
/// the commit.
macro_rules! write_batch {
    ($name:ident, $pool:ty, $insert_record:path, $insert_failure:path) => {
        async fn $name(pool: &$pool, ops: Vec<Op>) {
            let mut tx = match pool.begin().await {
                Ok(tx) => tx,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot begin a record store transaction; its messages will be retried");
                    ops.into_iter()
                        .for_each(|op| op.answer(Err(Error::batch("begin a transaction", &e))));
                    return;
                }
            };
            let mut results: Vec<Option<Result<Done, sqlx::Error>>> = Vec::with_capacity(ops.len());
            let mut failed: Option<sqlx::Error> = None;
            for (i, op) in ops.iter().enumerate() {
                if failed.is_some() {
                    results.push(None);
                    continue;
                }
                let savepoint = if i == 0 {
                    "SAVEPOINT op"
                } else {
                    "RELEASE SAVEPOINT op; SAVEPOINT op"
                };
                if let Err(e) = (&mut *tx).execute(savepoint).await {
                    failed = Some(e);
                    results.push(None);
                    continue;
                }
                let done: Result<Done, sqlx::Error> =
                    async { exec_op!(&mut *tx, op, $insert_record, $insert_failure) }.await;
                match done {
                    Ok(done) => results.push(Some(Ok(done))),
                    Err(e) if is_transient(&e) => {
                        failed = Some(e);
                        results.push(None);
                    }
                    Err(e) => match (&mut *tx).execute("ROLLBACK TO SAVEPOINT op").await {
                        Ok(_) => results.push(Some(Err(e))),
                        Err(rollback) => {
                            failed = Some(rollback);
                            results.push(None);
                        }
                    },
                }
            }
            let failed = match failed {
                Some(e) => Some(e),
                None => tx.commit().await.err(),
            };
            if let Some(e) = failed {
                tracing::warn!(error = %e, "record store batch failed; its messages will be retried");
                ops.into_iter()
                    .for_each(|op| op.answer(Err(Error::batch("write", &e))));
                return;
            }
            for (op, result) in ops.into_iter().zip(results) {
                match result {
                    Some(Ok(done)) => op.answer(Ok(done)),
                    Some(Err(e)) => op.answer(Err(Error::from_sqlx("write", e))),
                    None => op.answer(Err(Error::Closed)),
                }
            }
        }
    };
}

write_batch!(
    write_batch_sqlite,
    sqlx::SqlitePool,
    sql::sqlite_insert_record,
    sql::sqlite_insert_failure
);
write_batch!(
    write_batch_pg,
    sqlx::PgPool,
    sql::pg_insert_record,
    sql::pg_insert_failure
);

/// The writer task: one transaction per batch of waiting ops.
pub(super) async fn writer(pool: Pool, mut rx: mpsc::Receiver<Op>, observe: Option<BatchObserver>) {
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let n = batch.len();
        let ops = std::mem::take(&mut batch);
        let write = async {
            match &pool {
                Pool::Sqlite(p) => write_batch_sqlite(p, ops).await,
                Pool::Postgres(p) => write_batch_pg(p, ops).await,
            }
        };
        // A panic must not end the writer (every later write would wait
        // for a closed store forever): the batch's callers see their
        // answer channel dropped, a transient error, and retry.
        if std::panic::AssertUnwindSafe(write)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::objectmap::{Child, Form};
    use crate::store::Source;
    use crate::value::Value;

    fn record(key: &str, id: &str) -> NewRecord {
        NewRecord {
            topic: "lease".into(),
            form: Form {
                module: "triContract".into(),
                business_object: "triRealEstateContract".into(),
                action: None,
                fields: vec![("triIdTX".into(), Value::Text(id.into()))],
                children: vec![Child {
                    association: "Payments".into(),
                    module: "triPayment".into(),
                    business_object: "triPaymentSchedule".into(),
                    fields: vec![("triAmountNU".into(), Value::Number(1.0))],
                }],
            },
            unique: vec![("triIdTX".into(), id.into())],
            source: Source {
                dedupe_key: key.into(),
                ..Default::default()
            },
        }
    }

    /// Group commit: forty creates queued at once are written in one
    /// transaction, and the two among them that cannot become records — a
    /// unique value another one of the batch took, a dedupe key another
    /// one of the batch claimed — leave it through their savepoints: the
    /// other 38 are committed with it, the clash is stored as a failure.
    #[tokio::test]
    async fn a_message_that_fails_leaves_the_batch_by_its_savepoint_and_the_rest_commits() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/records.db", dir.path().display());
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let observe: BatchObserver = Arc::new(move |n, _| seen.lock().unwrap().push(n));
        let store = Store::open(&url, Some(observe)).await.unwrap();

        let mut ops: Vec<NewRecord> = (0..38)
            .map(|i| record(&format!("key-{i}"), &format!("L-{i}")))
            .collect();
        // A unique value record 0 takes, and a dedupe key record 1 claims.
        ops.insert(10, record("key-unique-clash", "L-0"));
        ops.insert(20, record("key-1", "L-other"));
        // On this test's single-threaded runtime every create is queued
        // before the writer task runs, so all forty meet in one batch.
        let results = futures::future::join_all(ops.into_iter().map(|r| store.create(r))).await;

        assert_eq!(*batches.lock().unwrap(), vec![40], "one transaction");
        let results: Vec<Created> = results.into_iter().map(|r| r.unwrap()).collect();
        assert!(
            matches!(&results[10], Created::Duplicate(_, r) if r.reason.code() == "duplicate"),
            "{:?}",
            results[10]
        );
        assert_eq!(results[20], Created::AlreadyKnown);
        let created = results
            .iter()
            .filter(|r| matches!(r, Created::Record(_)))
            .count();
        assert_eq!(created, 38);
        assert_eq!(store.count_records().await.unwrap(), 38);
        let failures = store.failures().await.unwrap();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].source.dedupe_key, "key-unique-clash");
        assert!(store
            .records(&Default::default())
            .await
            .unwrap()
            .iter()
            .all(|r| r.children.len() == 1));
        store.close().await;
    }
}
