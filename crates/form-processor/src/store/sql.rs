//! The write statements: claiming a dedupe key, inserting a record with its
//! children and unique values, inserting a failure, and the two updates the
//! consumer and the CLI make outside the writer.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value as Json};
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};

use super::{Error, NewFailure, NewRecord, Result, Source, Store};
use crate::objectmap::Fields;
use crate::reject::{Reason, Rejection};

/// The source columns of `records` and `failures`, in the order
/// [`bind_source`] binds and `read::source_from_row` reads them.
pub(super) const SOURCE_COLUMNS: &str =
    "dedupe_key, mail_config, mailbox, message_id, sender, subject, received_at";

/// A query of the `Any` driver.
type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

/// Now, epoch seconds.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Fields as the JSON object text kept in `records.fields`.
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

/// Binds the [`SOURCE_COLUMNS`] values, in order.
fn bind_source<'q>(query: AnyQuery<'q>, s: &'q Source) -> AnyQuery<'q> {
    query
        .bind(&s.dedupe_key)
        .bind(clean(&s.mail_config))
        .bind(clean(&s.mailbox))
        .bind(s.message_id.as_deref().map(clean))
        .bind(clean(&s.sender))
        .bind(clean(&s.subject))
        .bind(s.received_at)
}

/// Claims the dedupe key; false when it was already settled.
pub(super) async fn claim(conn: &mut AnyConnection, key: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("INSERT INTO processed (dedupe_key, created_at) VALUES ($1, $2) ON CONFLICT (dedupe_key) DO NOTHING")
        .bind(key)
        .bind(now())
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Inserts the failure and settles its (claimed) dedupe key with it.
pub(super) async fn insert_failure(
    conn: &mut AnyConnection,
    f: &NewFailure,
) -> Result<i64, sqlx::Error> {
    let sql = format!(
        "INSERT INTO failures (reason, detail, topic, {SOURCE_COLUMNS}, dead_lettered, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11) RETURNING id"
    );
    let query = sqlx::query(&sql)
        .bind(f.rejection.reason.code())
        .bind(clean(&f.rejection.detail))
        .bind(f.topic.as_deref().map(clean));
    let row = bind_source(query, &f.source)
        .bind(now())
        .fetch_one(&mut *conn)
        .await?;
    let id: i64 = row.try_get(0)?;
    settle(conn, "failure_id", id, &f.source.dedupe_key).await?;
    Ok(id)
}

/// Inserts the record, its children and its unique values, and settles its
/// (claimed) dedupe key with it. `Ok(Err(_))`: a unique value is taken; the
/// caller rolls back what was inserted and stores the rejection instead.
pub(super) async fn insert_record(
    conn: &mut AnyConnection,
    r: &NewRecord,
) -> Result<Result<i64, Rejection>, sqlx::Error> {
    let created = now();
    let form = &r.form;
    let sql = format!(
        "INSERT INTO records (parent_id, association, module, business_object, fields, topic, {SOURCE_COLUMNS}, \
         created_at) VALUES (NULL, NULL, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id"
    );
    let query = sqlx::query(&sql)
        .bind(clean(&form.module))
        .bind(clean(&form.business_object))
        .bind(fields_json(&form.fields))
        .bind(clean(&r.topic));
    let row = bind_source(query, &r.source)
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
    for (field, value) in &r.unique {
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
    settle(conn, "record_id", id, &r.source.dedupe_key).await?;
    Ok(Ok(id))
}

/// Notes which record or failure (`column`) settled the dedupe key.
async fn settle(
    conn: &mut AnyConnection,
    column: &'static str,
    id: i64,
    dedupe_key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE processed SET {column} = $1 WHERE dedupe_key = $2"
    ))
    .bind(id)
    .bind(dedupe_key)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
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
}
