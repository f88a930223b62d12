//! The write statements, one set per backend: a record with its children,
//! unique values and dedupe key; a failure with its dedupe key; and the two
//! updates the consumer and the CLI make outside the writer.
//!
//! The dedupe key is claimed by the insert that settles it
//! (`INSERT INTO processed … ON CONFLICT DO NOTHING`, with the record or
//! failure id): no separate read, claim and update. When the key turns out
//! to be settled already, or a unique value is taken, the caller rolls the
//! message's savepoint back.
//!
//! - SQLite: four statements per record (root, key, children in one
//!   multi-row insert, unique values in one multi-row insert), run by
//!   rusqlite on the writer's own thread: no hop to another thread per
//!   statement, no network;
//! - PostgreSQL: one statement per record, a data-modifying `WITH` whose
//!   parts insert the root, the key, the children (`UNNEST` of arrays, so
//!   the text and its prepared statement are the same for any number of
//!   children) and the unique values: one round trip instead of four.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value as Json};
use sqlx::{PgConnection, Row};

use super::{on_pool, Error, NewFailure, NewRecord, Result, Source, Store};
use crate::objectmap::Fields;
use crate::reject::{Reason, Rejection};

/// The source columns of `records` and `failures`, in the order they are
/// bound and `read::source_from_row` reads them (a macro, so that the
/// insert statements below are constants).
macro_rules! source_columns {
    () => {
        "dedupe_key, mail_config, mailbox, message_id, sender, subject, received_at"
    };
}

/// [`source_columns!`] as a constant, for the reads.
pub(super) const SOURCE_COLUMNS: &str = source_columns!();

/// What inserting a record found.
pub(super) enum Inserted {
    /// Created, with this id.
    Record(i64),
    /// The dedupe key was settled before: roll back.
    AlreadyKnown,
    /// A unique value is taken: roll back, store this rejection instead.
    Duplicate(Rejection),
}

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

/// A message's [`Source`] as stored, NUL characters removed, its values in
/// [`SOURCE_COLUMNS`] order: built once for both stores' inserts.
struct SourceRow<'a> {
    dedupe_key: &'a str,
    mail_config: String,
    mailbox: String,
    message_id: Option<String>,
    sender: String,
    subject: String,
    received_at: i64,
}

impl<'a> SourceRow<'a> {
    fn of(s: &'a Source) -> Self {
        Self {
            dedupe_key: &s.dedupe_key,
            mail_config: clean(&s.mail_config),
            mailbox: clean(&s.mailbox),
            message_id: s.message_id.as_deref().map(clean),
            sender: clean(&s.sender),
            subject: clean(&s.subject),
            received_at: s.received_at,
        }
    }

    /// The values as SQLite parameters, in order.
    fn sqlite(&self) -> [&dyn rusqlite::ToSql; 7] {
        [
            &self.dedupe_key,
            &self.mail_config,
            &self.mailbox,
            &self.message_id,
            &self.sender,
            &self.subject,
            &self.received_at,
        ]
    }

    /// `query` with the values bound next, in order (PostgreSQL).
    fn bind_pg<'q>(self, query: PgQuery<'q>) -> PgQuery<'q>
    where
        'a: 'q,
    {
        query
            .bind(self.dedupe_key)
            .bind(self.mail_config)
            .bind(self.mailbox)
            .bind(self.message_id)
            .bind(self.sender)
            .bind(self.subject)
            .bind(self.received_at)
    }
}

/// A PostgreSQL statement being bound.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The rejection for the unique fields of `r` that `inserted` lacks.
fn duplicate(r: &NewRecord, inserted: &[String]) -> Option<Rejection> {
    let (field, value) = r
        .unique
        .iter()
        .find(|(field, _)| !inserted.iter().any(|f| f == &clean(field)))?;
    Some(Rejection::new(
        Reason::Duplicate,
        format!(
            "{field} {value:?} already belongs to another {}",
            r.form.business_object
        ),
    ))
}

// --- SQLite ---------------------------------------------------------------

/// Rows per multi-row insert of children on SQLite (6 + 4 × 100
/// parameters, far below SQLite's limit); the texts of multi-row inserts
/// of up to this many rows are built once, so every length stays in the
/// prepared-statement cache.
const SQLITE_CHILD_CHUNK: usize = 100;

/// The text `build` makes for `n` rows: built once for every `n` up to
/// [`SQLITE_CHILD_CHUNK`], each time past it.
fn rows_sql(
    cache: &'static OnceLock<Vec<String>>,
    n: usize,
    build: fn(usize) -> String,
) -> Cow<'static, str> {
    match cache
        .get_or_init(|| (0..=SQLITE_CHILD_CHUNK).map(build).collect())
        .get(n)
    {
        Some(sql) => Cow::Borrowed(sql),
        None => Cow::Owned(build(n)),
    }
}

/// `INSERT INTO records … VALUES (…), (…)` for `n` children: `?1` is the
/// parent id and `?2` the creation time, shared by every row.
fn sqlite_children_sql(n: usize) -> Cow<'static, str> {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    rows_sql(&SQL, n, |n| {
        let rows: Vec<String> = (0..n)
            .map(|i| {
                let p = 3 + 4 * i;
                format!("(?1, ?{}, ?{}, ?{}, ?{}, ?2)", p, p + 1, p + 2, p + 3)
            })
            .collect();
        format!(
            "INSERT INTO records (parent_id, association, module, business_object, fields, created_at) \
             VALUES {}",
            rows.join(", ")
        )
    })
}

/// `INSERT INTO unique_values … RETURNING field` for `n` values: `?1` is
/// the business object, `?2` the record id.
fn sqlite_unique_sql(n: usize) -> Cow<'static, str> {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    rows_sql(&SQL, n, |n| {
        let rows: Vec<String> = (0..n)
            .map(|i| format!("(?1, ?{}, ?{}, ?2)", 3 + 2 * i, 4 + 2 * i))
            .collect();
        format!(
            "INSERT INTO unique_values (business_object, field, value, record_id) VALUES {} \
             ON CONFLICT (business_object, field, value) DO NOTHING RETURNING field",
            rows.join(", ")
        )
    })
}

/// A root record (SQLite).
const SQLITE_INSERT_RECORD: &str = concat!(
    "INSERT INTO records (parent_id, association, module, business_object, fields, topic, ",
    source_columns!(),
    ", created_at) VALUES (NULL, NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING id"
);

/// A failure (SQLite).
const SQLITE_INSERT_FAILURE: &str = concat!(
    "INSERT INTO failures (reason, detail, topic, ",
    source_columns!(),
    ", dead_lettered, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11) RETURNING id"
);

/// Settles a dedupe key with a record (SQLite).
const SQLITE_CLAIM_FOR_RECORD: &str = "INSERT INTO processed (dedupe_key, record_id, created_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT (dedupe_key) DO NOTHING";

/// Settles a dedupe key with a failure (SQLite).
const SQLITE_CLAIM_FOR_FAILURE: &str =
    "INSERT INTO processed (dedupe_key, failure_id, created_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT (dedupe_key) DO NOTHING";

/// Inserts the record, settles its dedupe key, inserts its children and
/// unique values (SQLite, on the writer thread's connection; every
/// statement prepared once and cached).
pub(super) fn sqlite_insert_record(
    conn: &rusqlite::Connection,
    r: &NewRecord,
) -> Result<Inserted, rusqlite::Error> {
    use rusqlite::types::Value as Sql;
    let created = now();
    let form = &r.form;
    let s = &r.source;
    let (module, business_object) = (clean(&form.module), clean(&form.business_object));
    let (fields, topic) = (fields_json(&form.fields), clean(&r.topic));
    let source = SourceRow::of(s);
    let record: [&dyn rusqlite::ToSql; 4] = [&module, &business_object, &fields, &topic];
    let params = record
        .into_iter()
        .chain(source.sqlite())
        .chain([&created as &dyn rusqlite::ToSql]);
    let id: i64 = conn
        .prepare_cached(SQLITE_INSERT_RECORD)?
        .query_row(rusqlite::params_from_iter(params), |row| row.get(0))?;
    if !sqlite_claim(conn, SQLITE_CLAIM_FOR_RECORD, &s.dedupe_key, id)? {
        return Ok(Inserted::AlreadyKnown);
    }
    for chunk in form.children.chunks(SQLITE_CHILD_CHUNK) {
        let mut params = Vec::with_capacity(2 + 4 * chunk.len());
        params.extend([Sql::Integer(id), Sql::Integer(created)]);
        for child in chunk {
            params.extend([
                Sql::Text(clean(&child.association)),
                Sql::Text(clean(&child.module)),
                Sql::Text(clean(&child.business_object)),
                Sql::Text(fields_json(&child.fields)),
            ]);
        }
        conn.prepare_cached(&sqlite_children_sql(chunk.len()))?
            .execute(rusqlite::params_from_iter(params))?;
    }
    if r.unique.is_empty() {
        return Ok(Inserted::Record(id));
    }
    let mut params = Vec::with_capacity(2 + 2 * r.unique.len());
    params.extend([Sql::Text(clean(&form.business_object)), Sql::Integer(id)]);
    for (field, value) in &r.unique {
        params.extend([Sql::Text(clean(field)), Sql::Text(clean(value))]);
    }
    let mut statement = conn.prepare_cached(&sqlite_unique_sql(r.unique.len()))?;
    let inserted = statement
        .query_map(rusqlite::params_from_iter(params), |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(match duplicate(r, &inserted) {
        Some(rejection) => Inserted::Duplicate(rejection),
        None => Inserted::Record(id),
    })
}

/// Settles the dedupe key with a record or failure id (`claim`: one of
/// the two statements above); false when it was settled already.
fn sqlite_claim(
    conn: &rusqlite::Connection,
    claim: &'static str,
    key: &str,
    id: i64,
) -> Result<bool, rusqlite::Error> {
    let inserted = conn
        .prepare_cached(claim)?
        .execute(rusqlite::params![key, id, now()])?;
    Ok(inserted == 1)
}

/// Inserts the failure and settles its dedupe key with it; `None` when the
/// key was settled already (SQLite).
pub(super) fn sqlite_insert_failure(
    conn: &rusqlite::Connection,
    f: &NewFailure,
) -> Result<Option<i64>, rusqlite::Error> {
    let s = &f.source;
    let (reason, detail) = (f.rejection.reason.code(), clean(&f.rejection.detail));
    let (topic, created) = (f.topic.as_deref().map(clean), now());
    let source = SourceRow::of(s);
    let failure: [&dyn rusqlite::ToSql; 3] = [&reason, &detail, &topic];
    let params = failure
        .into_iter()
        .chain(source.sqlite())
        .chain([&created as &dyn rusqlite::ToSql]);
    let id: i64 = conn
        .prepare_cached(SQLITE_INSERT_FAILURE)?
        .query_row(rusqlite::params_from_iter(params), |row| row.get(0))?;
    Ok(sqlite_claim(conn, SQLITE_CLAIM_FOR_FAILURE, &s.dedupe_key, id)?.then_some(id))
}

// --- PostgreSQL -------------------------------------------------------------

/// The record, its dedupe key, children and unique values in one statement
/// (PostgreSQL). Returns the root id, whether the key was claimed, and the
/// unique fields inserted.
const PG_INSERT_RECORD: &str = "\
WITH root AS (
    INSERT INTO records (parent_id, association, module, business_object, fields, topic,
        dedupe_key, mail_config, mailbox, message_id, sender, subject, received_at, created_at)
    VALUES (NULL, NULL, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    RETURNING id
), claim AS (
    INSERT INTO processed (dedupe_key, record_id, created_at)
    SELECT $5, id, $12 FROM root
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING record_id
), children AS (
    INSERT INTO records (parent_id, association, module, business_object, fields, created_at)
    SELECT root.id, c.association, c.module, c.business_object, c.fields, $12
    FROM root, UNNEST($13::text[], $14::text[], $15::text[], $16::text[])
        WITH ORDINALITY AS c (association, module, business_object, fields, n)
    ORDER BY c.n
    RETURNING id
), uniq AS (
    INSERT INTO unique_values (business_object, field, value, record_id)
    SELECT $2, u.field, u.value, root.id
    FROM root, UNNEST($17::text[], $18::text[]) AS u (field, value)
    ON CONFLICT (business_object, field, value) DO NOTHING
    RETURNING field
)
SELECT (SELECT id FROM root), (SELECT count(*) FROM claim), ARRAY(SELECT field FROM uniq)";

/// The failure and its dedupe key in one statement (PostgreSQL).
const PG_INSERT_FAILURE: &str = "\
WITH failure AS (
    INSERT INTO failures (reason, detail, topic,
        dedupe_key, mail_config, mailbox, message_id, sender, subject, received_at, dead_lettered, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11)
    RETURNING id
), claim AS (
    INSERT INTO processed (dedupe_key, failure_id, created_at)
    SELECT $4, id, $11 FROM failure
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING failure_id
)
SELECT (SELECT id FROM failure), (SELECT count(*) FROM claim)";

/// Inserts the record, settles its dedupe key, inserts its children and
/// unique values (PostgreSQL, one round trip).
pub(super) async fn pg_insert_record(
    conn: &mut PgConnection,
    r: &NewRecord,
) -> Result<Inserted, sqlx::Error> {
    let form = &r.form;
    let s = &r.source;
    let n = form.children.len();
    let (mut assoc, mut module, mut bo, mut fields) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for c in &form.children {
        assoc.push(clean(&c.association));
        module.push(clean(&c.module));
        bo.push(clean(&c.business_object));
        fields.push(fields_json(&c.fields));
    }
    let (unique_fields, unique_values): (Vec<String>, Vec<String>) =
        r.unique.iter().map(|(f, v)| (clean(f), clean(v))).unzip();
    let query = sqlx::query(PG_INSERT_RECORD)
        .bind(clean(&form.module))
        .bind(clean(&form.business_object))
        .bind(fields_json(&form.fields))
        .bind(clean(&r.topic));
    let row = SourceRow::of(s)
        .bind_pg(query)
        .bind(now())
        .bind(assoc)
        .bind(module)
        .bind(bo)
        .bind(fields)
        .bind(unique_fields)
        .bind(unique_values)
        .fetch_one(&mut *conn)
        .await?;
    let id: i64 = row.try_get(0)?;
    let claimed: i64 = row.try_get(1)?;
    let inserted: Vec<String> = row.try_get(2)?;
    if claimed == 0 {
        return Ok(Inserted::AlreadyKnown);
    }
    Ok(match duplicate(r, &inserted) {
        Some(rejection) => Inserted::Duplicate(rejection),
        None => Inserted::Record(id),
    })
}

/// Inserts the failure and settles its dedupe key with it; `None` when the
/// key was settled already (PostgreSQL, one round trip).
pub(super) async fn pg_insert_failure(
    conn: &mut PgConnection,
    f: &NewFailure,
) -> Result<Option<i64>, sqlx::Error> {
    let s = &f.source;
    let query = sqlx::query(PG_INSERT_FAILURE)
        .bind(f.rejection.reason.code())
        .bind(clean(&f.rejection.detail))
        .bind(f.topic.as_deref().map(clean));
    let row = SourceRow::of(s)
        .bind_pg(query)
        .bind(now())
        .fetch_one(&mut *conn)
        .await?;
    let id: i64 = row.try_get(0)?;
    let claimed: i64 = row.try_get(1)?;
    Ok((claimed == 1).then_some(id))
}

impl Store {
    /// Notes that the failure's dead-letter copy was confirmed.
    pub async fn mark_dead_lettered(&self, failure_id: i64) -> Result<()> {
        on_pool!(&self.pool, p => sqlx::query("UPDATE failures SET dead_lettered = 1 WHERE id = $1")
            .bind(failure_id)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(|e| Error::from_sqlx("mark a failure dead-lettered", e))
    }

    /// Forgets a dedupe key (for replaying a dead-lettered message).
    pub async fn forget(&self, dedupe_key: &str) -> Result<bool> {
        on_pool!(&self.pool, p => sqlx::query("DELETE FROM processed WHERE dedupe_key = $1 AND record_id IS NULL")
            .bind(dedupe_key)
            .execute(p)
            .await
            .map(|done| done.rows_affected() > 0))
        .map_err(|e| Error::from_sqlx("forget a dedupe key", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both stores bind a source with its NUL characters removed (PostgreSQL
    /// text cannot hold them), the dedupe key as it is.
    #[test]
    fn a_source_row_holds_the_values_without_nul_characters() {
        let source = Source {
            dedupe_key: "k1".into(),
            mail_config: "co\0nfig".into(),
            mailbox: "box\0".into(),
            message_id: Some("<m\0@x>".into()),
            sender: "\0a@contoso.com".into(),
            subject: "Lease\0 form".into(),
            received_at: 7,
        };
        let row = SourceRow::of(&source);
        assert_eq!(
            (
                row.mail_config.as_str(),
                row.mailbox.as_str(),
                row.message_id.as_deref()
            ),
            ("config", "box", Some("<m@x>"))
        );
        assert_eq!(
            (row.sender.as_str(), row.subject.as_str()),
            ("a@contoso.com", "Lease form")
        );
        assert_eq!((row.dedupe_key, row.received_at), ("k1", 7));
        assert_eq!(row.sqlite().len(), SOURCE_COLUMNS.split(", ").count());
    }

    /// Multi-row texts up to the chunk are built once and shared; past it
    /// they are built for the count asked, with a row each.
    #[test]
    fn multi_row_texts_are_built_once_up_to_the_chunk_and_on_demand_past_it() {
        for n in [1, 3, SQLITE_CHILD_CHUNK] {
            assert!(matches!(sqlite_children_sql(n), Cow::Borrowed(_)), "{n}");
            assert!(matches!(sqlite_unique_sql(n), Cow::Borrowed(_)), "{n}");
            assert_eq!(sqlite_children_sql(n).matches("(?1, ").count(), n);
        }
        let past = SQLITE_CHILD_CHUNK + 7;
        let unique = sqlite_unique_sql(past);
        assert!(matches!(unique, Cow::Owned(_)));
        assert_eq!(unique.matches("(?1, ").count(), past);
        assert!(unique.contains(&format!("?{}, ?2)", 4 + 2 * (past - 1))));
    }

    #[test]
    fn multi_row_statements_number_their_parameters() {
        assert_eq!(
            sqlite_children_sql(2),
            "INSERT INTO records (parent_id, association, module, business_object, fields, created_at) \
             VALUES (?1, ?3, ?4, ?5, ?6, ?2), (?1, ?7, ?8, ?9, ?10, ?2)"
        );
        assert!(sqlite_children_sql(SQLITE_CHILD_CHUNK).ends_with("?402, ?2)"));
        assert_eq!(
            sqlite_unique_sql(2),
            "INSERT INTO unique_values (business_object, field, value, record_id) \
             VALUES (?1, ?3, ?4, ?2), (?1, ?5, ?6, ?2) \
             ON CONFLICT (business_object, field, value) DO NOTHING RETURNING field"
        );
    }
}
