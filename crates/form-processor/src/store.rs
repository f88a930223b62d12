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

use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value as Json};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor, Row};
use tokio::sync::{mpsc, oneshot};

use crate::analyze::Accepted;
use crate::objectmap::Fields;
use crate::reject::{Reason, Rejection};

/// Most messages written in one transaction.
const MAX_BATCH: usize = 128;

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

    fn from_sqlx(action: &'static str, source: sqlx::Error) -> Self {
        if is_transient(&source) {
            Self::Transient { action, source }
        } else {
            Self::Permanent { action, source }
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

/// Where a message came from, kept with its record or failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Source {
    /// The dedupe key.
    pub dedupe_key: String,
    /// The incoming-mail config.
    pub mail_config: String,
    /// The mailbox.
    pub mailbox: String,
    /// Message-ID header.
    pub message_id: Option<String>,
    /// Sender (first From address).
    pub sender: String,
    /// Subject.
    pub subject: String,
    /// When the mail was received (Date header, else fetch time), epoch seconds.
    pub received_at: i64,
}

/// A rejection to store.
#[derive(Debug, Clone)]
pub struct NewFailure {
    /// Why.
    pub rejection: Rejection,
    /// The topic, when one matched.
    pub topic: Option<String>,
    /// Where the message came from.
    pub source: Source,
}

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

/// What the store knows about a dedupe key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// It made this record.
    Record(i64),
    /// It was rejected as this failure.
    Failure {
        /// Failure id.
        id: i64,
        /// The reason code.
        reason: String,
        /// The human detail.
        detail: String,
        /// Whether the dead-letter copy was confirmed.
        dead_lettered: bool,
    },
}

/// A child record as read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StoredChild {
    /// Record id.
    pub id: i64,
    /// Association name.
    pub association: String,
    /// Module.
    pub module: String,
    /// Business object.
    pub business_object: String,
    /// Field name to typed JSON value.
    pub fields: Map<String, Json>,
}

/// A root record as read back, with children and source.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StoredRecord {
    /// Record id.
    pub id: i64,
    /// Module.
    pub module: String,
    /// Business object.
    pub business_object: String,
    /// Topic subject.
    pub topic: Option<String>,
    /// Field name to typed JSON value.
    pub fields: Map<String, Json>,
    /// Child records.
    pub children: Vec<StoredChild>,
    /// Where it came from.
    pub source: Source,
    /// Creation time, epoch seconds.
    pub created_at: i64,
}

/// A failure as read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StoredFailure {
    /// Failure id.
    pub id: i64,
    /// Reason code.
    pub reason: String,
    /// Human detail.
    pub detail: String,
    /// Topic, when one matched.
    pub topic: Option<String>,
    /// Whether the dead-letter copy was confirmed.
    pub dead_lettered: bool,
    /// Where it came from.
    pub source: Source,
    /// Creation time, epoch seconds.
    pub created_at: i64,
}

/// Which records to list.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Only this topic (its configured subject).
    pub topic: Option<String>,
    /// Only records created at or after this time, epoch seconds.
    pub since: Option<i64>,
    /// At most this many.
    pub limit: Option<i64>,
}

/// Which backend a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend of a store URL.
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Self::Postgres)
        } else {
            None
        }
    }
}

enum Work {
    Create(Box<(Accepted, Source)>),
    Reject(Box<NewFailure>),
}

enum Done {
    Create(Created),
    Reject(Stored),
}

enum ReplyTx {
    Create(oneshot::Sender<Result<Created>>),
    Reject(oneshot::Sender<Result<Stored>>),
}

impl ReplyTx {
    fn send(self, result: Result<Done>) {
        match self {
            Self::Create(tx) => {
                let _ = tx.send(result.map(|d| match d {
                    Done::Create(c) => c,
                    Done::Reject(_) => Created::AlreadyKnown,
                }));
            }
            Self::Reject(tx) => {
                let _ = tx.send(result.map(|d| match d {
                    Done::Reject(s) => s,
                    Done::Create(_) => Stored::AlreadyKnown,
                }));
            }
        }
    }
}

struct Op {
    work: Work,
    reply: ReplyTx,
}

/// Batch timing, reported to metrics by the caller.
pub type BatchObserver = std::sync::Arc<dyn Fn(usize, Duration) + Send + Sync>;

/// A handle on the record store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<Op>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A SQLite URL with `mode=rwc` (create the file), and its parent directory.
fn sqlite_url(url: &str) -> (String, Option<std::path::PathBuf>) {
    let path = url
        .trim_start_matches("sqlite:")
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let parent = std::path::Path::new(&path)
        .parent()
        .map(|p| p.to_path_buf());
    let url = if url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    };
    (url, parent.filter(|p| !p.as_os_str().is_empty()))
}

static DRIVERS: Once = Once::new();

impl Store {
    /// Opens (and for SQLite creates) the store, applies the schema and
    /// starts the writer task. `observe` is called after every batch.
    pub async fn open(url: &str, observe: Option<BatchObserver>) -> Result<Self> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = Backend::of(url).ok_or_else(|| Error::Permanent {
            action: "open",
            source: sqlx::Error::Configuration(
                "the store URL must start with sqlite: or postgres:".into(),
            ),
        })?;
        let (url, max) = match backend {
            Backend::Sqlite => {
                let (url, parent) = sqlite_url(url);
                if let Some(dir) = parent {
                    std::fs::create_dir_all(&dir).map_err(|e| Error::Permanent {
                        action: "create the store directory",
                        source: sqlx::Error::Io(e),
                    })?;
                }
                (url, 4)
            }
            Backend::Postgres => (url.to_string(), 8),
        };
        let options: AnyConnectOptions = url
            .parse()
            .map_err(|e| Error::from_sqlx("parse the store URL", e))?;
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| Error::from_sqlx("connect", e))?;
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        // Several processes may start on one new store at once: the loser of
        // that race fails ("table already exists", a lock) and, retried,
        // finds the schema applied.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    tracing::debug!(error = %e, attempt, "applying the schema failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(sqlx::migrate::MigrateError::Execute(source)) => {
                    return Err(Error::from_sqlx("apply the schema", source))
                }
                Err(other) => {
                    return Err(Error::Permanent {
                        action: "apply the schema",
                        source: sqlx::Error::Migrate(Box::new(other)),
                    })
                }
            }
        }
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(writer(pool.clone(), rx, observe));
        Ok(Self {
            pool,
            backend,
            writer: tx,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool (after the writer finished its batch).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// What the store knows about a dedupe key.
    pub async fn lookup(&self, dedupe_key: &str) -> Result<Option<Known>> {
        let row = sqlx::query(
            "SELECT p.record_id, p.failure_id, f.reason, f.detail, f.dead_lettered \
             FROM processed p LEFT JOIN failures f ON f.id = p.failure_id WHERE p.dedupe_key = $1",
        )
        .bind(dedupe_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::from_sqlx("look up a dedupe key", e))?;
        let Some(row) = row else { return Ok(None) };
        let get = |e| Error::from_sqlx("read a dedupe key", e);
        if let Some(id) = row.try_get::<Option<i64>, _>(0).map_err(get)? {
            return Ok(Some(Known::Record(id)));
        }
        let id: Option<i64> = row.try_get(1).map_err(get)?;
        Ok(Some(Known::Failure {
            id: id.unwrap_or(0),
            reason: row
                .try_get::<Option<String>, _>(2)
                .map_err(get)?
                .unwrap_or_default(),
            detail: row
                .try_get::<Option<String>, _>(3)
                .map_err(get)?
                .unwrap_or_default(),
            dead_lettered: row.try_get::<Option<i64>, _>(4).map_err(get)?.unwrap_or(0) != 0,
        }))
    }

    /// Creates the record, its children, its dedupe key and unique values in
    /// one transaction.
    pub async fn create(&self, accepted: Accepted, source: Source) -> Result<Created> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Op {
                work: Work::Create(Box::new((accepted, source))),
                reply: ReplyTx::Create(tx),
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Stores a rejection with its dedupe key.
    pub async fn reject(&self, failure: NewFailure) -> Result<Stored> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Op {
                work: Work::Reject(Box::new(failure)),
                reply: ReplyTx::Reject(tx),
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Notes that the failure's dead-letter copy was confirmed.
    pub async fn mark_dead_lettered(&self, failure_id: i64) -> Result<()> {
        sqlx::query("UPDATE failures SET dead_lettered = 1 WHERE id = $1")
            .bind(failure_id)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("mark a failure dead-lettered", e))?;
        Ok(())
    }

    /// Forgets a dedupe key (for replaying a dead-lettered message).
    pub async fn forget(&self, dedupe_key: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM processed WHERE dedupe_key = $1 AND record_id IS NULL")
            .bind(dedupe_key)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("forget a dedupe key", e))?;
        Ok(done.rows_affected() > 0)
    }

    /// How many root records exist.
    pub async fn count_records(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM records WHERE parent_id IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::from_sqlx("count records", e))?;
        row.try_get::<i64, _>(0)
            .map_err(|e| Error::from_sqlx("count records", e))
    }

    /// Root records with their children, oldest first.
    pub async fn records(&self, filter: &RecordFilter) -> Result<Vec<StoredRecord>> {
        let err = |e| Error::from_sqlx("list records", e);
        let roots = sqlx::query(
            "SELECT id, module, business_object, topic, fields, dedupe_key, mail_config, mailbox, \
             message_id, sender, subject, received_at, created_at FROM records \
             WHERE parent_id IS NULL AND ($1 IS NULL OR topic = $1) AND ($2 IS NULL OR created_at >= $2) \
             ORDER BY id LIMIT $3",
        )
        .bind(filter.topic.clone())
        .bind(filter.since)
        .bind(filter.limit.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        let mut out = Vec::with_capacity(roots.len());
        for r in roots {
            let fields: String = r.try_get(4).map_err(err)?;
            out.push(StoredRecord {
                id: r.try_get(0).map_err(err)?,
                module: r.try_get(1).map_err(err)?,
                business_object: r.try_get(2).map_err(err)?,
                topic: r.try_get(3).map_err(err)?,
                fields: serde_json::from_str(&fields).unwrap_or_default(),
                children: Vec::new(),
                source: Source {
                    dedupe_key: r
                        .try_get::<Option<String>, _>(5)
                        .map_err(err)?
                        .unwrap_or_default(),
                    mail_config: r
                        .try_get::<Option<String>, _>(6)
                        .map_err(err)?
                        .unwrap_or_default(),
                    mailbox: r
                        .try_get::<Option<String>, _>(7)
                        .map_err(err)?
                        .unwrap_or_default(),
                    message_id: r.try_get(8).map_err(err)?,
                    sender: r
                        .try_get::<Option<String>, _>(9)
                        .map_err(err)?
                        .unwrap_or_default(),
                    subject: r
                        .try_get::<Option<String>, _>(10)
                        .map_err(err)?
                        .unwrap_or_default(),
                    received_at: r.try_get::<Option<i64>, _>(11).map_err(err)?.unwrap_or(0),
                },
                created_at: r.try_get(12).map_err(err)?,
            });
        }
        if let (Some(first), Some(last)) = (out.first().map(|r| r.id), out.last().map(|r| r.id)) {
            let children = sqlx::query(
                "SELECT id, parent_id, association, module, business_object, fields FROM records \
                 WHERE parent_id >= $1 AND parent_id <= $2 ORDER BY id",
            )
            .bind(first)
            .bind(last)
            .fetch_all(&self.pool)
            .await
            .map_err(err)?;
            let index: std::collections::HashMap<i64, usize> =
                out.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
            for c in children {
                let parent: i64 = c.try_get(1).map_err(err)?;
                let Some(&i) = index.get(&parent) else {
                    continue;
                };
                let fields: String = c.try_get(5).map_err(err)?;
                out[i].children.push(StoredChild {
                    id: c.try_get(0).map_err(err)?,
                    association: c
                        .try_get::<Option<String>, _>(2)
                        .map_err(err)?
                        .unwrap_or_default(),
                    module: c.try_get(3).map_err(err)?,
                    business_object: c.try_get(4).map_err(err)?,
                    fields: serde_json::from_str(&fields).unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// Stored rejections, oldest first.
    pub async fn failures(&self) -> Result<Vec<StoredFailure>> {
        let err = |e| Error::from_sqlx("list failures", e);
        let rows = sqlx::query(
            "SELECT id, reason, detail, topic, dead_lettered, dedupe_key, mail_config, mailbox, message_id, \
             sender, subject, received_at, created_at FROM failures ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredFailure {
                    id: r.try_get(0)?,
                    reason: r.try_get(1)?,
                    detail: r.try_get(2)?,
                    topic: r.try_get(3)?,
                    dead_lettered: r.try_get::<i64, _>(4)? != 0,
                    source: Source {
                        dedupe_key: r.try_get(5)?,
                        mail_config: r.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
                        mailbox: r.try_get::<Option<String>, _>(7)?.unwrap_or_default(),
                        message_id: r.try_get(8)?,
                        sender: r.try_get::<Option<String>, _>(9)?.unwrap_or_default(),
                        subject: r.try_get::<Option<String>, _>(10)?.unwrap_or_default(),
                        received_at: r.try_get::<Option<i64>, _>(11)?.unwrap_or(0),
                    },
                    created_at: r.try_get(12)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(err)
    }
}

fn fields_json(fields: &Fields) -> String {
    let map: Map<String, Json> = fields
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect();
    Json::Object(map).to_string()
}

/// Removes NUL characters, which PostgreSQL text cannot hold.
fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_string()
    }
}

/// Claims the dedupe key; false when it was already settled.
async fn claim(conn: &mut AnyConnection, key: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("INSERT INTO processed (dedupe_key, created_at) VALUES ($1, $2) ON CONFLICT (dedupe_key) DO NOTHING")
        .bind(key)
        .bind(now())
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_failure(conn: &mut AnyConnection, f: &NewFailure) -> Result<i64, sqlx::Error> {
    let s = &f.source;
    let row = sqlx::query(
        "INSERT INTO failures (dedupe_key, reason, detail, topic, mail_config, mailbox, message_id, sender, subject, \
         received_at, dead_lettered, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11) RETURNING id",
    )
    .bind(&s.dedupe_key)
    .bind(f.rejection.reason.code())
    .bind(clean(&f.rejection.detail))
    .bind(f.topic.as_deref().map(clean))
    .bind(clean(&s.mail_config))
    .bind(clean(&s.mailbox))
    .bind(s.message_id.as_deref().map(clean))
    .bind(clean(&s.sender))
    .bind(clean(&s.subject))
    .bind(s.received_at)
    .bind(now())
    .fetch_one(&mut *conn)
    .await?;
    let id: i64 = row.try_get(0)?;
    sqlx::query("UPDATE processed SET failure_id = $1 WHERE dedupe_key = $2")
        .bind(id)
        .bind(&s.dedupe_key)
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

async fn do_reject(conn: &mut AnyConnection, f: &NewFailure) -> Result<Stored, sqlx::Error> {
    if !claim(conn, &f.source.dedupe_key).await? {
        return Ok(Stored::AlreadyKnown);
    }
    Ok(Stored::Failure(insert_failure(conn, f).await?))
}

/// The CREATE itself, inside the caller's savepoint. `Err(None)` asks the
/// caller to roll back the savepoint and store a duplicate rejection.
async fn do_create(
    conn: &mut AnyConnection,
    a: &Accepted,
    s: &Source,
) -> Result<Result<i64, Rejection>, sqlx::Error> {
    let created = now();
    let form = &a.form;
    let row = sqlx::query(
        "INSERT INTO records (parent_id, association, module, business_object, fields, topic, dedupe_key, mail_config, \
         mailbox, message_id, sender, subject, received_at, created_at) \
         VALUES (NULL, NULL, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(clean(&form.module))
    .bind(clean(&form.business_object))
    .bind(fields_json(&form.fields))
    .bind(clean(&a.topic))
    .bind(&s.dedupe_key)
    .bind(clean(&s.mail_config))
    .bind(clean(&s.mailbox))
    .bind(s.message_id.as_deref().map(clean))
    .bind(clean(&s.sender))
    .bind(clean(&s.subject))
    .bind(s.received_at)
    .bind(created)
    .fetch_one(&mut *conn)
    .await?;
    let id: i64 = row.try_get(0)?;
    for child in &form.children {
        sqlx::query(
            "INSERT INTO records (parent_id, association, module, business_object, fields, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(clean(&child.association))
        .bind(clean(&child.module))
        .bind(clean(&child.business_object))
        .bind(fields_json(&child.fields))
        .bind(created)
        .execute(&mut *conn)
        .await?;
    }
    for (field, value) in &a.unique {
        let done = sqlx::query(
            "INSERT INTO unique_values (business_object, field, value, record_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (business_object, field, value) DO NOTHING",
        )
        .bind(clean(&form.business_object))
        .bind(clean(field))
        .bind(clean(value))
        .bind(id)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(Err(Rejection::new(
                Reason::Duplicate,
                format!(
                    "{field} {value:?} already belongs to another {}",
                    form.business_object
                ),
            )));
        }
    }
    sqlx::query("UPDATE processed SET record_id = $1 WHERE dedupe_key = $2")
        .bind(id)
        .bind(&s.dedupe_key)
        .execute(&mut *conn)
        .await?;
    Ok(Ok(id))
}

async fn exec(conn: &mut AnyConnection, work: &Work) -> Result<Done, sqlx::Error> {
    match work {
        Work::Reject(failure) => Ok(Done::Reject(do_reject(conn, failure).await?)),
        Work::Create(boxed) => {
            let (accepted, source) = &**boxed;
            if !claim(conn, &source.dedupe_key).await? {
                return Ok(Done::Create(Created::AlreadyKnown));
            }
            match do_create(conn, accepted, source).await? {
                Ok(id) => Ok(Done::Create(Created::Record(id))),
                Err(rejection) => {
                    // Undo the partial record, keep the claim as a failure.
                    conn.execute("ROLLBACK TO SAVEPOINT op").await?;
                    let failure = NewFailure {
                        rejection: rejection.clone(),
                        topic: Some(accepted.topic.clone()),
                        source: source.clone(),
                    };
                    claim(conn, &source.dedupe_key).await?;
                    Ok(Done::Create(Created::Duplicate(
                        insert_failure(conn, &failure).await?,
                        rejection,
                    )))
                }
            }
        }
    }
}

/// Runs one op inside a savepoint. The outer error is transient and fails
/// the whole batch; the inner one is this op's own permanent failure, rolled
/// back alone.
async fn run_one(
    conn: &mut AnyConnection,
    work: &Work,
) -> Result<Result<Done, sqlx::Error>, sqlx::Error> {
    conn.execute("SAVEPOINT op").await?;
    match exec(conn, work).await {
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

fn transient(action: &'static str, e: &sqlx::Error) -> Error {
    Error::Transient {
        action,
        source: sqlx::Error::Protocol(e.to_string()),
    }
}

/// The writer task: one transaction per batch of waiting ops.
async fn writer(pool: AnyPool, mut rx: mpsc::Receiver<Op>, observe: Option<BatchObserver>) {
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
                .for_each(|op| op.reply.send(Err(transient("begin a transaction", &e))));
            return;
        }
    };
    let mut results = Vec::with_capacity(ops.len());
    let mut failed: Option<sqlx::Error> = None;
    for op in ops {
        if failed.is_some() {
            results.push((op.reply, None));
            continue;
        }
        match run_one(&mut tx, &op.work).await {
            Ok(result) => results.push((op.reply, Some(result))),
            Err(e) => {
                failed = Some(e);
                results.push((op.reply, None));
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
            .for_each(|(reply, _)| reply.send(Err(transient("write", &e))));
        return;
    }
    for (reply, result) in results {
        match result {
            Some(Ok(done)) => reply.send(Ok(done)),
            Some(Err(e)) => reply.send(Err(Error::from_sqlx("write", e))),
            None => reply.send(Err(Error::Closed)),
        }
    }
}
