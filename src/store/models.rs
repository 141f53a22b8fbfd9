//! The `models` table: models made by jobs.

use super::Pool;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A trained model as stored.
#[derive(Debug, Clone)]
pub struct ModelRecord {
    pub id: String,
    pub kind: String,
    /// The task of the job that made it.
    pub task: Option<super::job_types::JobTask>,
    pub base_model: Option<String>,
    pub job_id: Option<String>,
    pub labels: Vec<String>,
    pub metrics: Option<Value>,
    /// Directory relative to the data dir.
    pub path: String,
    pub pooling: Option<String>,
    pub max_seq_len: Option<i64>,
    pub created_at: i64,
    /// `full`, `lora` or `head` for a classifier (null for models stored before methods).
    pub method: Option<String>,
    pub lora_rank: Option<i64>,
    /// The encoder's `model_type` (null for models stored before it was recorded).
    pub architecture: Option<String>,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for ModelRecord {
    fn from_row(row: &'r AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            kind: row.try_get("kind")?,
            task: row
                .try_get::<Option<String>, _>("task")?
                .map(super::job_types::JobTask::try_from)
                .transpose()
                .map_err(|e| sqlx::Error::ColumnDecode { index: "task".into(), source: e.into() })?,
            base_model: row.try_get("base_model")?,
            job_id: row.try_get("job_id")?,
            labels: super::json_column(row, "labels")?,
            metrics: super::json_column_opt(row, "metrics")?,
            path: row.try_get("path")?,
            pooling: row.try_get("pooling")?,
            max_seq_len: row.try_get("max_seq_len")?,
            created_at: row.try_get("created_at")?,
            method: row.try_get("method")?,
            lora_rank: row.try_get("lora_rank")?,
            architecture: row.try_get("architecture")?,
        })
    }
}

const COLUMNS: &str =
    "id, kind, task, base_model, job_id, labels, metrics, path, pooling, max_seq_len, created_at, method, lora_rank, architecture";

pub async fn insert(tx: &mut crate::store::Tx, m: &ModelRecord) -> sqlx::Result<()> {
    sqlx::query(&format!("insert into models ({COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"))
        .bind(&m.id)
        .bind(&m.kind)
        .bind(m.task.map(|t| t.as_str()))
        .bind(&m.base_model)
        .bind(&m.job_id)
        .bind(serde_json::to_string(&m.labels).expect("labels serialise"))
        .bind(m.metrics.as_ref().map(Value::to_string))
        .bind(&m.path)
        .bind(&m.pooling)
        .bind(m.max_seq_len)
        .bind(m.created_at)
        .bind(&m.method)
        .bind(m.lora_rank)
        .bind(&m.architecture)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn get(pool: &Pool, id: &str) -> sqlx::Result<Option<ModelRecord>> {
    sqlx::query_as(&format!("select {COLUMNS} from models where id = $1")).bind(id).fetch_optional(pool).await
}

pub async fn list(pool: &Pool) -> sqlx::Result<Vec<ModelRecord>> {
    sqlx::query_as(&format!("select {COLUMNS} from models order by created_at, id")).fetch_all(pool).await
}

/// Deletes a model unless a queued or running job builds on it, or a LoRA adapter runs over
/// it. Returns rows deleted.
pub async fn delete(pool: &Pool, id: &str) -> sqlx::Result<u64> {
    let mut tx = super::Tx::begin(pool).await?;
    // Serialised with job creation naming this model (see `Tx::lock`).
    tx.lock(&[&format!("model:{id}")]).await?;
    let done = sqlx::query(
        "delete from models where id = $1 and not exists (select 1 from jobs where base_model = $1 and status in ('queued', 'running')) \
         and not exists (select 1 from models as a where a.base_model = $1 and a.method = 'lora')",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Every stored model path (for removing orphaned directories at start-up).
pub async fn all_paths(pool: &Pool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select path from models").fetch_all(pool).await
}
