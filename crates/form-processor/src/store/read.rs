//! The read side: what the consumer asks about a dedupe key, and what the
//! CLI lists (records with their children, failures).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value as Json};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::sql::SOURCE_COLUMNS;
use super::{on_pool, Error, Result, Source, Store};

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

/// A text column that may be NULL, NULL read as empty.
fn text<R>(row: &R, i: usize) -> Result<String, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(row.try_get::<Option<String>, _>(i)?.unwrap_or_default())
}

/// A JSON object column (`records.fields`); unreadable JSON reads as empty.
fn fields<R>(row: &R, i: usize) -> Result<Map<String, Json>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let fields: String = row.try_get(i)?;
    Ok(serde_json::from_str(&fields).unwrap_or_default())
}

/// The [`SOURCE_COLUMNS`] of a row, read from column `first` on.
fn source_from_row<R>(row: &R, first: usize) -> Result<Source, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(Source {
        dedupe_key: text(row, first)?,
        mail_config: text(row, first + 1)?,
        mailbox: text(row, first + 2)?,
        message_id: row.try_get(first + 3)?,
        sender: text(row, first + 4)?,
        subject: text(row, first + 5)?,
        received_at: row.try_get::<Option<i64>, _>(first + 6)?.unwrap_or(0),
    })
}

impl Store {
    /// What the store knows about a dedupe key.
    pub async fn lookup(&self, dedupe_key: &str) -> Result<Option<Known>> {
        on_pool!(&self.pool, p => {
            let row = sqlx::query(
                "SELECT p.record_id, p.failure_id, f.reason, f.detail, f.dead_lettered \
                 FROM processed p LEFT JOIN failures f ON f.id = p.failure_id WHERE p.dedupe_key = $1",
            )
            .bind(dedupe_key)
            .fetch_optional(p)
            .await
            .map_err(|e| Error::from_sqlx("look up a dedupe key", e))?;
            let Some(row) = row else { return Ok(None) };
            let known = || -> Result<Known, sqlx::Error> {
                if let Some(id) = row.try_get::<Option<i64>, _>(0)? {
                    return Ok(Known::Record(id));
                }
                Ok(Known::Failure {
                    id: row.try_get::<Option<i64>, _>(1)?.unwrap_or(0),
                    reason: text(&row, 2)?,
                    detail: text(&row, 3)?,
                    dead_lettered: row.try_get::<Option<i64>, _>(4)?.unwrap_or(0) != 0,
                })
            };
            known()
                .map(Some)
                .map_err(|e| Error::from_sqlx("read a dedupe key", e))
        })
    }

    /// How many root records exist.
    pub async fn count_records(&self) -> Result<i64> {
        on_pool!(&self.pool, p => {
            let err = |e| Error::from_sqlx("count records", e);
            let row = sqlx::query("SELECT COUNT(*) FROM records WHERE parent_id IS NULL")
                .fetch_one(p)
                .await
                .map_err(err)?;
            row.try_get::<i64, _>(0).map_err(err)
        })
    }

    /// Root records with their children, oldest first.
    pub async fn records(&self, filter: &RecordFilter) -> Result<Vec<StoredRecord>> {
        on_pool!(&self.pool, p => {
            let err = |e| Error::from_sqlx("list records", e);
            let roots = sqlx::query(&format!(
                "SELECT id, module, business_object, topic, fields, {SOURCE_COLUMNS}, created_at FROM records \
                 WHERE parent_id IS NULL AND ($1 IS NULL OR topic = $1) AND ($2 IS NULL OR created_at >= $2) \
                 ORDER BY id LIMIT $3"
            ))
            .bind(filter.topic.clone())
            .bind(filter.since)
            .bind(filter.limit.unwrap_or(i64::MAX))
            .fetch_all(p)
            .await
            .map_err(err)?;
            let mut out = roots
                .iter()
                .map(|r| {
                    Ok(StoredRecord {
                        id: r.try_get(0)?,
                        module: r.try_get(1)?,
                        business_object: r.try_get(2)?,
                        topic: r.try_get(3)?,
                        fields: fields(r, 4)?,
                        children: Vec::new(),
                        source: source_from_row(r, 5)?,
                        created_at: r.try_get(12)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(err)?;
            let (Some(first), Some(last)) = (out.first().map(|r| r.id), out.last().map(|r| r.id))
            else {
                return Ok(out);
            };
            let children = sqlx::query(
                "SELECT id, parent_id, association, module, business_object, fields FROM records \
                 WHERE parent_id >= $1 AND parent_id <= $2 ORDER BY id",
            )
            .bind(first)
            .bind(last)
            .fetch_all(p)
            .await
            .map_err(err)?;
            let index: HashMap<i64, usize> = out.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
            for c in children {
                let parent: i64 = c.try_get(1).map_err(err)?;
                let Some(&i) = index.get(&parent) else {
                    continue;
                };
                out[i].children.push(StoredChild {
                    id: c.try_get(0).map_err(err)?,
                    association: text(&c, 2).map_err(err)?,
                    module: c.try_get(3).map_err(err)?,
                    business_object: c.try_get(4).map_err(err)?,
                    fields: fields(&c, 5).map_err(err)?,
                });
            }
            Ok(out)
        })
    }

    /// Stored rejections, oldest first.
    pub async fn failures(&self) -> Result<Vec<StoredFailure>> {
        on_pool!(&self.pool, p => {
            let err = |e| Error::from_sqlx("list failures", e);
            let rows = sqlx::query(&format!(
                "SELECT id, reason, detail, topic, dead_lettered, {SOURCE_COLUMNS}, created_at \
                 FROM failures ORDER BY id"
            ))
            .fetch_all(p)
            .await
            .map_err(err)?;
            rows.iter()
                .map(|r| {
                    Ok(StoredFailure {
                        id: r.try_get(0)?,
                        reason: r.try_get(1)?,
                        detail: r.try_get(2)?,
                        topic: r.try_get(3)?,
                        dead_lettered: r.try_get::<i64, _>(4)? != 0,
                        source: source_from_row(r, 5)?,
                        created_at: r.try_get(12)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(err)
        })
    }
}
