//! The `datasets` table.

use super::Pool;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeMap;

/// A stored dataset, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetRecord {
    pub id: String,
    pub name: String,
    pub format: String,
    pub rows: i64,
    pub labels: BTreeMap<String, i64>,
    pub multi_label: bool,
    /// The line of the first label that is not a number (a regression job is refused with it).
    #[serde(skip)]
    pub text_label_line: Option<i64>,
    /// What a row holds: `texts`, `pairs` (of texts) or `tokens` (tagged words); `texts` for a
    /// dataset stored before this was recorded.
    pub kind: String,
    pub bytes: i64,
    #[serde(skip)]
    pub path: String,
    pub created_at: i64,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for DatasetRecord {
    fn from_row(row: &'r AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            format: row.try_get("format")?,
            rows: row.try_get("rows")?,
            labels: super::json_column(row, "labels")?,
            multi_label: row.try_get::<i64, _>("multi_label")? != 0,
            text_label_line: row.try_get("text_label_line")?,
            kind: row.try_get::<Option<String>, _>("kind")?.unwrap_or_else(|| "texts".into()),
            bytes: row.try_get("bytes")?,
            path: row.try_get("path")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

const COLUMNS: &str = "id, name, format, rows, labels, multi_label, text_label_line, kind, bytes, path, created_at";

/// Inserts a dataset row inside `tx`.
pub async fn insert(tx: &mut crate::store::Tx, d: &DatasetRecord) -> sqlx::Result<()> {
    sqlx::query(
        r#"insert into datasets (id, name, format, rows, labels, multi_label, text_label_line, kind, bytes, path, created_at)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"#,
    )
    .bind(&d.id)
    .bind(&d.name)
    .bind(&d.format)
    .bind(d.rows)
    .bind(serde_json::to_string(&d.labels).expect("labels serialise"))
    .bind(d.multi_label as i64)
    .bind(d.text_label_line)
    .bind(&d.kind)
    .bind(d.bytes)
    .bind(&d.path)
    .bind(d.created_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn get(pool: &Pool, id: &str) -> sqlx::Result<Option<DatasetRecord>> {
    sqlx::query_as(&format!("select {COLUMNS} from datasets where id = $1")).bind(id).fetch_optional(pool).await
}

/// Datasets newest first, after the cursor `after` (an id), `limit + 1` rows to tell `has_more`.
pub async fn list(pool: &Pool, after: Option<&str>, limit: i64) -> sqlx::Result<Vec<DatasetRecord>> {
    sqlx::query_as(&format!(
        r#"select {COLUMNS} from datasets
           where ($1 is null or rowid < (select rowid from datasets where id = $1))
           order by rowid desc limit $2"#
    ))
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await
}

/// Outcome of a delete.
pub enum Deleted {
    Yes(DatasetRecord),
    NotFound,
    InUse,
}

/// Deletes a dataset unless a queued or running job uses it, in one statement so that a job
/// created at the same moment cannot slip in between the check and the delete.
pub async fn delete(pool: &Pool, id: &str) -> sqlx::Result<Deleted> {
    let Some(rec) = get(pool, id).await? else { return Ok(Deleted::NotFound) };
    let mut tx = super::Tx::begin(pool).await?;
    // Serialised with job creation naming this dataset (see `Tx::lock`).
    tx.lock(&[&format!("dataset:{id}")]).await?;
    let done = sqlx::query(
        r#"delete from datasets where id = $1 and not exists (
             select 1 from jobs where status in ('queued', 'running')
             and (training_dataset = $1 or validation_dataset = $1))"#,
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if done.rows_affected() == 1 {
        return Ok(Deleted::Yes(rec));
    }
    Ok(if get(pool, id).await?.is_some() { Deleted::InUse } else { Deleted::NotFound })
}

/// Every stored dataset path (for removing orphaned files at start-up).
pub async fn all_paths(pool: &Pool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select path from datasets").fetch_all(pool).await
}
