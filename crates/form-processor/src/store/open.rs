//! Opening the store: which backend a URL names, the connection pool (SQLite
//! in WAL mode, created when absent), the schema migrations, and the writer
//! task.

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::SqliteSynchronous;
use sqlx::pool::PoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::ConnectOptions;
use tokio::sync::mpsc;

use super::sqlite_writer;
use super::writer::{writer, BatchObserver, MAX_BATCH};
use super::{on_pool, Error, Pool, Result, Store};

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

/// A SQLite URL with `mode=rwc` (create the file), and its parent directory.
fn sqlite_url(url: &str) -> (String, Option<PathBuf>) {
    let path = url
        .trim_start_matches("sqlite:")
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let parent = Path::new(&path).parent().map(|p| p.to_path_buf());
    let url = if url.contains("mode=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    };
    (url, parent.filter(|p| !p.as_os_str().is_empty()))
}

/// Prepared statements kept per connection (sqlx's cache, LRU): the
/// writer's statements, the multi-row child inserts of every row count up
/// to a chunk, and the reads.
const STATEMENT_CACHE: usize = 512;

impl Store {
    /// Opens (and for SQLite creates) the store, applies the schema and
    /// starts the writer task. `observe` is called after every batch.
    /// SQLite commits are fully synchronous ([`Store::open_with`] chooses).
    pub async fn open(url: &str, observe: Option<BatchObserver>) -> Result<Self> {
        Self::open_with(url, observe, SqliteSynchronous::Full).await
    }

    /// [`Store::open`] with SQLite's `synchronous` setting: `FULL` syncs
    /// every commit (a record acked to RabbitMQ survives a power loss),
    /// `NORMAL` only the WAL checkpoints.
    pub async fn open_with(
        url: &str,
        observe: Option<BatchObserver>,
        synchronous: SqliteSynchronous,
    ) -> Result<Self> {
        let backend = Backend::of(url).ok_or_else(|| {
            Error::permanent("open", "the store URL must start with sqlite: or postgres:")
        })?;
        let connect = |e| Error::from_sqlx("connect", e);
        let parse = |e| Error::from_sqlx("parse the store URL", e);
        let pool = match backend {
            Backend::Sqlite => {
                let (url, parent) = sqlite_url(url);
                if let Some(dir) = parent {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| Error::permanent("create the store directory", e))?;
                }
                let options = url.parse::<SqliteConnectOptions>().map_err(parse)?;
                if options.get_filename() == Path::new(":memory:") || url.contains(":memory:") {
                    return Err(Error::permanent(
                        "open",
                        "the SQLite store must be a file, not :memory:",
                    ));
                }
                let options = options
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(
                        synchronous
                            .as_str()
                            .parse()
                            .unwrap_or(sqlx::sqlite::SqliteSynchronous::Full),
                    )
                    .busy_timeout(Duration::from_secs(5))
                    // The writer's per-message savepoints journal the pages
                    // they change; in memory that costs no file writes (the
                    // WAL alone makes commits durable).
                    .pragma("temp_store", "memory")
                    .foreign_keys(true)
                    .statement_cache_capacity(STATEMENT_CACHE)
                    .disable_statement_logging();
                Pool::Sqlite(
                    PoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_with(options)
                        .await
                        .map_err(connect)?,
                )
            }
            Backend::Postgres => {
                let options = url
                    .parse::<PgConnectOptions>()
                    .map_err(parse)?
                    .statement_cache_capacity(STATEMENT_CACHE)
                    .disable_statement_logging();
                Pool::Postgres(
                    PoolOptions::new()
                        .max_connections(8)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_with(options)
                        .await
                        .map_err(connect)?,
                )
            }
        };
        migrate(&pool).await?;
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        match &pool {
            Pool::Postgres(p) => drop(tokio::spawn(writer(p.clone(), rx, observe))),
            Pool::Sqlite(p) => {
                // The writer's own connection, to the file the pool opened.
                let file = p.connect_options().get_filename().to_path_buf();
                let conn =
                    tokio::task::spawn_blocking(move || sqlite_writer::connect(&file, synchronous))
                        .await
                        .map_err(|e| Error::permanent("open the store for writing", e))??;
                sqlite_writer::start(conn, rx, observe)
                    .map_err(|e| Error::permanent("start the SQLite writer", e))?;
            }
        }
        Ok(Self {
            pool,
            backend,
            writer: tx,
        })
    }
}

/// Applies the backend's schema. Several processes may start on one new
/// store at once: the loser of that race fails ("table already exists", a
/// lock) and, retried, finds the schema applied.
async fn migrate(pool: &Pool) -> Result<()> {
    let migrator = match pool {
        Pool::Sqlite(_) => sqlx::migrate!("./migrations/sqlite"),
        Pool::Postgres(_) => sqlx::migrate!("./migrations/postgres"),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match on_pool!(pool, p => migrator.run(p).await) {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %e, attempt, "applying the schema failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(sqlx::migrate::MigrateError::Execute(source)) => {
                return Err(Error::from_sqlx("apply the schema", source))
            }
            Err(other) => return Err(Error::permanent("apply the schema", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQLite connections run WAL with `synchronous = FULL` (a commit
    /// acked to RabbitMQ survives a power loss) and keep savepoint
    /// journals in memory (`temp_store = MEMORY`).
    #[tokio::test]
    async fn sqlite_connections_are_durable_and_journal_savepoints_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/records.db", dir.path().display());
        let store = Store::open(&url, None).await.unwrap();
        let Pool::Sqlite(pool) = &store.pool else {
            panic!("a SQLite pool")
        };
        let pragma = |name: &'static str| async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT CAST({name} AS TEXT) FROM pragma_{name}"
            ))
            .fetch_one(pool)
            .await
            .unwrap()
        };
        assert_eq!(pragma("journal_mode").await, "wal");
        assert_eq!(pragma("synchronous").await, "2", "FULL");
        assert_eq!(pragma("temp_store").await, "2", "MEMORY");
        store.close().await;
    }

    /// An in-memory SQLite store is refused with a clear, permanent error:
    /// the writer's own connection would open a database of its own.
    #[tokio::test]
    async fn an_in_memory_sqlite_store_is_refused() {
        for url in ["sqlite::memory:", "sqlite://:memory:"] {
            let e = Store::open(url, None).await.err().expect(url);
            assert!(!e.is_transient(), "{url}: {e}");
            assert!(e.to_string().contains("must be a file"), "{url}: {e}");
        }
    }

    #[test]
    fn store_urls_table() {
        let cases = [
            ("sqlite:data/records.db", Some(Backend::Sqlite)),
            ("postgres://u@h/db", Some(Backend::Postgres)),
            ("postgresql://u@h/db", Some(Backend::Postgres)),
            ("mysql://u@h/db", None),
        ];
        for (url, want) in cases {
            assert_eq!(Backend::of(url), want, "{url}");
        }
        let cases = [
            (
                "sqlite:data/records.db",
                "sqlite:data/records.db?mode=rwc",
                Some("data"),
            ),
            (
                "sqlite://data/r.db?cache=shared",
                "sqlite://data/r.db?cache=shared&mode=rwc",
                Some("data"),
            ),
            ("sqlite:r.db?mode=ro", "sqlite:r.db?mode=ro", None),
        ];
        for (url, want, dir) in cases {
            let (got, parent) = sqlite_url(url);
            assert_eq!(got, want, "{url}");
            assert_eq!(parent.as_deref(), dir.map(Path::new), "{url}");
        }
    }
}
