//! SQLite's writer: a thread of its own with its own connection (rusqlite
//! over the same SQLite library sqlx links), so that a batch of messages is
//! one hand-off between threads rather than one per statement.
//!
//! Through sqlx every statement went to sqlx's SQLite worker thread and its
//! answer came back: about five round trips a message, each waking a tokio
//! worker, which cost the processor more CPU than SQLite's own work
//! (docs/benchmarks.md). Here the thread takes the ops waiting at that
//! moment, writes them in one transaction (group commit: one fsync under
//! `synchronous = FULL`), each in its own savepoint, and answers each
//! caller after the commit — the same contract as the PostgreSQL writer.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use common::config::SqliteSynchronous;
use rusqlite::Connection;
use tokio::sync::mpsc;

use super::sql::{self, Inserted};
use super::writer::{
    answer_batch, fail_batch, BatchObserver, Created, Done, Op, Stored, MAX_BATCH,
};
use super::{is_transient_sqlite, Error, Result};

/// Prepared statements the writer's connection keeps: its own, and the
/// multi-row child inserts of every row count up to a chunk.
const STATEMENT_CACHE: usize = 128;

/// Opens the writer's connection to the (migrated) store file: WAL, the
/// configured `synchronous`, a 5 s busy timeout, savepoint journals in
/// memory, foreign keys on.
pub(super) fn connect(path: &Path, synchronous: SqliteSynchronous) -> Result<Connection> {
    let open = |e| Error::from_sqlite("open the store for writing", e);
    let conn = Connection::open(path).map_err(open)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; \
         PRAGMA temp_store = MEMORY; PRAGMA foreign_keys = ON;",
        synchronous.as_str()
    ))
    .map_err(open)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Starts the writer thread; it ends when every sender is gone.
pub(super) fn start(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    observe: Option<BatchObserver>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || run(conn, rx, observe))
        .map(drop)
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Op>, observe: Option<BatchObserver>) {
    while let Some(first) = rx.blocking_recv() {
        let started = Instant::now();
        let mut ops = Vec::with_capacity(MAX_BATCH);
        ops.push(first);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let n = ops.len();
        // A panic must not end the writer (every later write would wait
        // for a closed store forever): the batch's callers see their
        // answer channel dropped, a transient error, and retry.
        if std::panic::catch_unwind(AssertUnwindSafe(|| write_batch(&conn, ops))).is_err() {
            tracing::error!(
                messages = n,
                "the record store writer panicked on a batch; its messages will be retried"
            );
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        if let Some(observe) = &observe {
            observe(n, started.elapsed());
        }
    }
}

/// Runs one op's statements inside the savepoint `op`.
fn write_op(conn: &Connection, op: &Op) -> rusqlite::Result<Done> {
    let rollback = || conn.prepare_cached("ROLLBACK TO SAVEPOINT op")?.execute([]);
    match op {
        Op::Reject(failure, _) => match sql::sqlite_insert_failure(conn, failure)? {
            Some(id) => Ok(Done::Reject(Stored::Failure(id))),
            None => {
                rollback()?;
                Ok(Done::Reject(Stored::AlreadyKnown))
            }
        },
        Op::Create(record, _) => match sql::sqlite_insert_record(conn, record)? {
            Inserted::Record(id) => Ok(Done::Create(Created::Record(id))),
            Inserted::AlreadyKnown => {
                rollback()?;
                Ok(Done::Create(Created::AlreadyKnown))
            }
            Inserted::Duplicate(rejection) => {
                // Undo the record, keep the message as a failure.
                rollback()?;
                match sql::sqlite_insert_failure(conn, &record.as_failure(&rejection))? {
                    Some(id) => Ok(Done::Create(Created::Duplicate(id, rejection))),
                    None => {
                        rollback()?;
                        Ok(Done::Create(Created::AlreadyKnown))
                    }
                }
            }
        },
    }
}

/// One batch: one transaction (`BEGIN IMMEDIATE`: the write lock up front,
/// so a busy store is met by the busy timeout, not by a failed upgrade),
/// each op in the savepoint `op`. A transient error fails the whole batch
/// (every caller retries); any other error rolls back that op's savepoint
/// only. Answers go out after the commit.
fn write_batch(conn: &Connection, ops: Vec<Op>) {
    let statement = |sql: &str| conn.prepare_cached(sql)?.execute([]).map(drop);
    if let Err(e) = statement("BEGIN IMMEDIATE") {
        return fail_batch(ops, "begin a transaction", &e);
    }
    let mut results: Vec<rusqlite::Result<Done>> = Vec::with_capacity(ops.len());
    let mut failed: Option<rusqlite::Error> = None;
    for (i, op) in ops.iter().enumerate() {
        let savepoint = if i == 0 {
            Ok(())
        } else {
            statement("RELEASE SAVEPOINT op")
        };
        if let Err(e) = savepoint.and_then(|()| statement("SAVEPOINT op")) {
            failed = Some(e);
            break;
        }
        match write_op(conn, op) {
            Ok(done) => results.push(Ok(done)),
            Err(e) if is_transient_sqlite(&e) => {
                failed = Some(e);
                break;
            }
            Err(e) => match statement("ROLLBACK TO SAVEPOINT op") {
                Ok(()) => results.push(Err(e)),
                Err(rollback) => {
                    failed = Some(rollback);
                    break;
                }
            },
        }
    }
    let failed = match failed {
        Some(e) => Some(e),
        None => statement("COMMIT").err(),
    };
    if failed.is_some() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    answer_batch(ops, results, failed, Error::from_sqlite);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::*;
    use crate::objectmap::{Child, Form};
    use crate::store::{NewRecord, Source, Store};
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

    /// A migrated store in a temporary directory, and its file.
    async fn store() -> (tempfile::TempDir, Store, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("records.db");
        let store = Store::open(&format!("sqlite://{}", file.display()), None)
            .await
            .unwrap();
        (dir, store, file)
    }

    /// Queues `records` as creates on `tx`; their answers.
    fn queue(
        tx: &mpsc::Sender<Op>,
        records: Vec<NewRecord>,
    ) -> Vec<oneshot::Receiver<Result<Created>>> {
        records
            .into_iter()
            .map(|r| {
                let (answer, rx) = oneshot::channel();
                tx.try_send(Op::Create(Box::new(r), answer)).unwrap();
                rx
            })
            .collect()
    }

    /// Starts a writer of its own on `file`, reading `rx`.
    fn writer(file: &Path, rx: mpsc::Receiver<Op>, busy: Duration, observe: Option<BatchObserver>) {
        let conn = connect(file, SqliteSynchronous::Full).unwrap();
        conn.busy_timeout(busy).unwrap();
        start(conn, rx, observe).unwrap();
    }

    async fn answers(rx: Vec<oneshot::Receiver<Result<Created>>>) -> Vec<Result<Created>> {
        futures::future::join_all(rx)
            .await
            .into_iter()
            .map(|r| r.expect("an answer"))
            .collect()
    }

    /// The writer's own connection is as durable as the pool's: WAL,
    /// `synchronous` as configured (FULL by default: a record acked to
    /// RabbitMQ survives a power loss), savepoint journals in memory,
    /// foreign keys on.
    #[tokio::test]
    async fn the_writer_connection_is_durable_and_journals_savepoints_in_memory() {
        let (_dir, store, file) = store().await;
        for (synchronous, want) in [(SqliteSynchronous::Full, 2), (SqliteSynchronous::Normal, 1)] {
            let conn = connect(&file, synchronous).unwrap();
            let pragma = |name: &str| -> String {
                conn.query_row(
                    &format!("SELECT CAST({name} AS TEXT) FROM pragma_{name}"),
                    [],
                    |r| r.get(0),
                )
                .unwrap()
            };
            assert_eq!(pragma("journal_mode"), "wal");
            assert_eq!(pragma("synchronous"), want.to_string(), "{synchronous:?}");
            assert_eq!(pragma("temp_store"), "2", "MEMORY");
            assert_eq!(pragma("foreign_keys"), "1");
        }
        store.close().await;
    }

    /// Group commit: forty creates waiting at once are written in one
    /// transaction, and the two among them that cannot become records — a
    /// unique value another one of the batch took, a dedupe key another
    /// one of the batch claimed — leave it through their savepoints: the
    /// other 38 are committed with it, the clash is stored as a failure.
    #[tokio::test]
    async fn a_message_that_fails_leaves_the_batch_by_its_savepoint_and_the_rest_commits() {
        let (_dir, store, file) = store().await;
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let observe: BatchObserver = Arc::new(move |n, _| seen.lock().unwrap().push(n));
        let mut records: Vec<NewRecord> = (0..38)
            .map(|i| record(&format!("key-{i}"), &format!("L-{i}")))
            .collect();
        // A unique value record 0 takes, and a dedupe key record 1 claims.
        records.insert(10, record("key-unique-clash", "L-0"));
        records.insert(20, record("key-1", "L-other"));
        // Every op waits before the writer takes its first batch.
        let (tx, rx) = mpsc::channel(64);
        let waiting = queue(&tx, records);
        writer(&file, rx, Duration::from_secs(5), Some(observe));
        let results: Vec<Created> = answers(waiting)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();

        assert_eq!(*batches.lock().unwrap(), vec![40], "one transaction");
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

    /// A store another connection holds locked is an outage: the whole
    /// batch fails with a transient error (every caller retries), nothing
    /// of it is committed, and the writer goes on: once the lock is gone
    /// the same records are written.
    #[tokio::test]
    async fn a_locked_store_fails_the_whole_batch_transiently_and_the_writer_goes_on() {
        let (_dir, store, file) = store().await;
        let holder = Connection::open(&file).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let records: Vec<NewRecord> = (0..5)
            .map(|i| record(&format!("key-{i}"), &format!("L-{i}")))
            .collect();
        let (tx, rx) = mpsc::channel(64);
        let waiting = queue(&tx, records.clone());
        writer(&file, rx, Duration::from_millis(50), None);
        for result in answers(waiting).await {
            let e = result.expect_err("locked");
            assert!(e.is_transient(), "{e}");
        }
        assert_eq!(store.count_records().await.unwrap(), 0);
        holder.execute_batch("ROLLBACK").unwrap();
        for result in answers(queue(&tx, records)).await {
            assert!(matches!(result, Ok(Created::Record(_))), "{result:?}");
        }
        assert_eq!(store.count_records().await.unwrap(), 5);
        store.close().await;
    }
}
