//! The `jobs` table and its events and metrics.

pub use super::job_types::{JobStatus, JobTask};
use super::Pool;
use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A job as stored; serialises to the contract's job object.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(rename = "object")]
    pub object: &'static str,
    pub task: JobTask,
    pub status: JobStatus,
    pub base_model: String,
    pub training_dataset: String,
    pub validation_dataset: Option<String>,
    pub model_name: Option<String>,
    /// The caller's string pairs, if any.
    pub metadata: Option<Value>,
    pub hyperparameters: Value,
    /// For a pre-training job from scratch: the architecture.
    pub config: Option<Value>,
    pub progress: Option<Value>,
    pub metrics: Option<Value>,
    pub model: Option<String>,
    pub error: Option<Value>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "id, task, status, base_model, training_dataset, validation_dataset, model_name, metadata, \
    hyperparameters, config, progress, metrics, model, error, created_at, started_at, finished_at";

impl<'r> sqlx::FromRow<'r, AnyRow> for JobRecord {
    fn from_row(row: &'r AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            object: "job",
            task: super::job_types::column(row, "task")?,
            status: super::job_types::column(row, "status")?,
            base_model: row.try_get("base_model")?,
            training_dataset: row.try_get("training_dataset")?,
            validation_dataset: row.try_get("validation_dataset")?,
            model_name: row.try_get("model_name")?,
            metadata: super::json_column_opt(row, "metadata")?,
            hyperparameters: super::json_column(row, "hyperparameters")?,
            config: super::json_column_opt(row, "config")?,
            progress: super::json_column_opt(row, "progress")?,
            metrics: super::json_column_opt(row, "metrics")?,
            model: row.try_get("model")?,
            error: super::json_column_opt(row, "error")?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }
}

/// A new job to queue.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub task: JobTask,
    pub base_model: &'a str,
    pub training_dataset: &'a str,
    pub validation_dataset: Option<&'a str>,
    pub model_name: Option<&'a str>,
    pub hyperparameters: &'a Value,
    pub config: Option<&'a Value>,
    /// Gets a POST on each state change (see `crate::webhooks`).
    pub webhook_url: Option<&'a str>,
    pub metadata: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// Why a job could not be queued.
pub enum InsertOutcome {
    Queued,
    DatasetMissing,
    NameTaken,
}

/// Queues a job in one statement that also checks its datasets still exist and that no
/// model or active job already has its `model_name`.
pub async fn insert(tx: &mut crate::store::Tx, j: &NewJob<'_>) -> sqlx::Result<InsertOutcome> {
    let keys = [
        Some(format!("dataset:{}", j.training_dataset)),
        j.validation_dataset.map(|d| format!("dataset:{d}")),
        j.model_name.map(|m| format!("model:{m}")),
        Some(format!("model:{}", j.base_model)),
    ];
    tx.lock(&keys.iter().flatten().map(String::as_str).collect::<Vec<_>>()).await?;
    let done = sqlx::query(
        r#"insert into jobs (id, task, status, base_model, training_dataset, validation_dataset, model_name,
                             hyperparameters, created_at, config, webhook_url, metadata)
           select $1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11
           where exists (select 1 from datasets where id = $4)
             and ($5 is null or exists (select 1 from datasets where id = $5))
             and ($6 is null or (not exists (select 1 from models where id = $6)
                  and not exists (select 1 from jobs where model_name = $6 and status in ('queued', 'running'))))"#,
    )
    .bind(j.id)
    .bind(j.task.as_str())
    .bind(j.base_model)
    .bind(j.training_dataset)
    .bind(j.validation_dataset)
    .bind(j.model_name)
    .bind(j.hyperparameters.to_string())
    .bind(super::now())
    .bind(j.config.map(Value::to_string))
    .bind(j.webhook_url)
    .bind(j.metadata.map(|m| serde_json::to_string(m).expect("metadata serialises")))
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 1 {
        super::job_metadata::insert(tx, j.id, j.metadata.unwrap_or(&Default::default())).await?;
        return Ok(InsertOutcome::Queued);
    }
    let datasets_ok: i64 = sqlx::query_scalar(
        "select case when exists (select 1 from datasets where id = $1) \
         and ($2 is null or exists (select 1 from datasets where id = $2)) then 1 else 0 end",
    )
    .bind(j.training_dataset)
    .bind(j.validation_dataset)
    .fetch_one(&mut **tx)
    .await?;
    Ok(if datasets_ok == 1 { InsertOutcome::NameTaken } else { InsertOutcome::DatasetMissing })
}

pub async fn get(pool: &Pool, id: &str) -> sqlx::Result<Option<JobRecord>> {
    let j: Option<JobRecord> = sqlx::query_as(&format!("select {COLUMNS} from jobs where id = $1")).bind(id).fetch_optional(pool).await?;
    Ok(j)
}

/// Jobs newest first, optionally of one status and with every pair of `metadata`, after the
/// cursor `after` (a job id).
pub async fn list(
    pool: &Pool,
    status: Option<JobStatus>,
    metadata: &[(String, String)],
    after: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<JobRecord>> {
    let sql = format!(
        r#"select {COLUMNS} from jobs
           where ($1 is null or status = $1)
             and ($2 is null or seq < (select seq from jobs where id = $2)){}
           order by seq desc limit $3"#,
        super::job_metadata::filter_sql(4, metadata.len())
    );
    let mut query = sqlx::query_as(&sql).bind(status.map(JobStatus::as_str)).bind(after).bind(limit + 1);
    for (key, value) in metadata {
        query = query.bind(key).bind(value);
    }
    query.fetch_all(pool).await
}

/// A job a worker claimed, and the worker it took the job over from when that worker's lease
/// had run out.
pub struct Claimed {
    pub job: JobRecord,
    pub taken_over_from: Option<String>,
}

/// Claims the oldest job that is queued, or running under a lease that has run out (its worker
/// stopped renewing: it died), for `worker`, with a lease of `lease_secs`. The claim is a
/// compare-and-set on the state just read, so two workers never claim the same job.
pub async fn claim_next(pool: &Pool, worker: &str, lease_secs: i64) -> sqlx::Result<Option<Claimed>> {
    if super::is_postgres(pool) {
        return claim_next_postgres(pool, worker, lease_secs).await;
    }
    loop {
        let now = super::now();
        let candidate: Option<(String, String, Option<String>)> = sqlx::query_as(
            "select id, status, worker from jobs where status = 'queued' or (status = 'running' and lease_expires_at < $1) order by seq limit 1",
        )
        .bind(now)
        .fetch_optional(pool)
        .await?;
        let Some((id, status, previous)) = candidate else { return Ok(None) };
        let j: Option<JobRecord> = sqlx::query_as(&format!(
            r#"update jobs set status = 'running', started_at = $1, progress = null, error = null, worker = $2, lease_expires_at = $3
               where id = $4 and status = $5 and (status = 'queued' or lease_expires_at < $1)
               returning {COLUMNS}"#
        ))
        .bind(now)
        .bind(worker)
        .bind(now + lease_secs)
        .bind(&id)
        .bind(&status)
        .fetch_optional(pool)
        .await?;
        if let Some(j) = j {
            let taken_over_from = (status == "running").then(|| previous.unwrap_or_default());
            return Ok(Some(Claimed { job: j, taken_over_from }));
        }
        // Another worker claimed it between the two statements: look again.
    }
}

/// [`claim_next`] on Postgres: one statement, which skips rows other workers are claiming at
/// the same moment instead of waiting for them.
async fn claim_next_postgres(pool: &Pool, worker: &str, lease_secs: i64) -> sqlx::Result<Option<Claimed>> {
    use sqlx::FromRow;
    let columns: Vec<String> = COLUMNS.split(", ").map(|c| format!("jobs.{}", c.trim())).collect();
    let now = super::now();
    let row = sqlx::query(&format!(
        r#"with c as (select id, status as previous_status, worker as previous_worker from jobs
                      where status = 'queued' or (status = 'running' and lease_expires_at < $1)
                      order by seq limit 1 for update skip locked)
           update jobs set status = 'running', started_at = $1, progress = null, error = null, worker = $2, lease_expires_at = $3
           from c where jobs.id = c.id
           returning {}, c.previous_status, c.previous_worker"#,
        columns.join(", ")
    ))
    .bind(now)
    .bind(worker)
    .bind(now + lease_secs)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let previous: String = row.try_get("previous_status")?;
    let previous_worker: Option<String> = row.try_get("previous_worker")?;
    let taken_over_from = (previous == "running").then(|| previous_worker.unwrap_or_default());
    Ok(Some(Claimed { job: JobRecord::from_row(&row)?, taken_over_from }))
}

/// What renewing a lease found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lease {
    /// Still this worker's, for another lease period.
    Held,
    /// The job was cancelled (through any API process).
    Cancelled,
    /// Another worker holds it now, or it is no longer running.
    Lost,
}

/// Extends `worker`'s lease on a running job by `lease_secs`.
pub async fn renew_lease(pool: &Pool, id: &str, worker: &str, lease_secs: i64) -> sqlx::Result<Lease> {
    let done = sqlx::query("update jobs set lease_expires_at = $1 where id = $2 and worker = $3 and status = 'running'")
        .bind(super::now() + lease_secs)
        .bind(id)
        .bind(worker)
        .execute(pool)
        .await?;
    if done.rows_affected() == 1 {
        return Ok(Lease::Held);
    }
    let status: Option<String> = sqlx::query_scalar("select status from jobs where id = $1").bind(id).fetch_optional(pool).await?;
    Ok(if status.as_deref() == Some("cancelled") { Lease::Cancelled } else { Lease::Lost })
}

/// Puts the jobs that `worker` (or a process from before leases) left `running` when it
/// stopped back in the queue. Returns their ids. Jobs of other workers are theirs until their
/// lease runs out.
pub async fn requeue_running(pool: &Pool, worker: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "update jobs set status = 'queued', started_at = null, progress = null, worker = null, lease_expires_at = null \
         where status = 'running' and (worker is null or worker = $1) returning id",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
}

/// Puts one running job back in the queue (the process is stopping).
pub async fn requeue(pool: &Pool, id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "update jobs set status = 'queued', started_at = null, progress = null, worker = null, lease_expires_at = null \
         where id = $1 and status = 'running'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ids of the jobs running now under a lease that still holds (their checkpoints are being
/// written by a live worker, perhaps in another process).
pub async fn leased_ids(pool: &Pool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select id from jobs where status = 'running' and lease_expires_at >= $1").bind(super::now()).fetch_all(pool).await
}

// A terminal status and the event that announces it commit together, so whoever sees the job
// ended (the SSE stream above all) also sees its closing event.

/// Marks a queued or running job cancelled, with its closing event. False when it had already ended.
pub async fn cancel(pool: &Pool, id: &str) -> sqlx::Result<bool> {
    let mut tx = crate::store::Tx::begin(pool).await?;
    let done = sqlx::query("update jobs set status = 'cancelled', finished_at = $1 where id = $2 and status in ('queued', 'running')")
        .bind(super::now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    add_event(&mut *tx, id, "info", "message", "job cancelled", None).await?;
    tx.commit().await?;
    Ok(true)
}

/// Marks a running job failed with `{code, message}`, with its closing event.
pub async fn fail(pool: &Pool, id: &str, code: &str, message: &str) -> sqlx::Result<()> {
    let err = serde_json::json!({"code": code, "message": message});
    let mut tx = crate::store::Tx::begin(pool).await?;
    let done = sqlx::query("update jobs set status = 'failed', error = $1, finished_at = $2 where id = $3 and status = 'running'")
        .bind(err.to_string())
        .bind(super::now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 1 {
        add_event(&mut *tx, id, "error", "message", &format!("job failed: {message}"), None).await?;
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

/// Marks a running job succeeded with its model, with its closing event, inside `tx`.
/// False when it was cancelled meanwhile.
pub async fn succeed(tx: &mut crate::store::Tx, id: &str, model: &str) -> sqlx::Result<bool> {
    let done = sqlx::query("update jobs set status = 'succeeded', model = $1, finished_at = $2 where id = $3 and status = 'running'")
        .bind(model)
        .bind(super::now())
        .bind(id)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    add_event(&mut **tx, id, "info", "message", &format!("job succeeded: model {model}"), None).await?;
    Ok(true)
}

pub async fn set_progress(pool: &Pool, id: &str, progress: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set progress = $1 where id = $2").bind(progress.to_string()).bind(id).execute(pool).await?;
    Ok(())
}

pub async fn set_metrics(pool: &Pool, id: &str, metrics: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set metrics = $1 where id = $2").bind(metrics.to_string()).bind(id).execute(pool).await?;
    Ok(())
}

/// One job event, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    #[serde(skip)]
    pub seq: i64,
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub level: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub data: Option<Value>,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for EventRecord {
    fn from_row(row: &'r AnyRow) -> sqlx::Result<Self> {
        let seq: i64 = row.try_get("seq")?;
        Ok(Self {
            seq,
            id: format!("ev_{seq}"),
            object: "event",
            created_at: row.try_get("created_at")?,
            level: row.try_get("level")?,
            kind: row.try_get("type")?,
            message: row.try_get("message")?,
            data: super::json_column_opt(row, "data")?,
        })
    }
}

/// Records an event of `job`, on the pool or inside a transaction.
pub async fn add_event<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    ex: E,
    job: &str,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<&Value>,
) -> sqlx::Result<()> {
    sqlx::query("insert into job_events (job_id, created_at, level, type, message, data) values ($1, $2, $3, $4, $5, $6)")
        .bind(job)
        .bind(super::now())
        .bind(level)
        .bind(kind)
        .bind(message)
        .bind(data.map(Value::to_string))
        .execute(ex)
        .await?;
    Ok(())
}

/// Events of a job in order, after event id `after` (`ev_<n>`), at most `limit + 1`.
pub async fn events(pool: &Pool, job: &str, after: i64, limit: i64) -> sqlx::Result<Vec<EventRecord>> {
    let rows: Vec<EventRecord> = sqlx::query_as(
        "select seq, created_at, level, type, message, data from job_events where job_id = $1 and seq > $2 order by seq limit $3",
    )
    .bind(job)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

pub async fn add_train_metric(pool: &Pool, job: &str, step: i64, epoch: i64, loss: f64, lr: f64) -> sqlx::Result<()> {
    sqlx::query(
        "insert into train_metrics (job_id, step, epoch, loss, learning_rate) values ($1, $2, $3, $4, $5) \
         on conflict (job_id, step) do update set epoch = excluded.epoch, loss = excluded.loss, learning_rate = excluded.learning_rate",
    )
    .bind(job)
    .bind(step)
    .bind(epoch)
    .bind(loss)
    .bind(lr)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn add_validation_metric(pool: &Pool, job: &str, epoch: i64, data: &Value) -> sqlx::Result<()> {
    sqlx::query("insert into validation_metrics (job_id, epoch, data) values ($1, $2, $3) on conflict (job_id, epoch) do update set data = excluded.data")
        .bind(job)
        .bind(epoch)
        .bind(data.to_string())
        .execute(pool)
        .await?;
    Ok(())
}

/// Clears what an earlier, interrupted run of the job recorded, before it runs again.
pub async fn clear_run_metrics(pool: &Pool, job: &str) -> sqlx::Result<()> {
    sqlx::query("delete from train_metrics where job_id = $1").bind(job).execute(pool).await?;
    sqlx::query("delete from validation_metrics where job_id = $1").bind(job).execute(pool).await?;
    Ok(())
}

/// Ids of the jobs that are queued or running (whose checkpoints are kept).
pub async fn active_ids(pool: &Pool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select id from jobs where status in ('queued', 'running')").fetch_all(pool).await
}

/// Drops a job's metrics recorded after step `step` (training) and from epoch `epoch` on
/// (validation): what a run resumed from that point records again.
pub async fn trim_run_metrics(pool: &Pool, job: &str, step: i64, epoch: i64) -> sqlx::Result<()> {
    sqlx::query("delete from train_metrics where job_id = $1 and step > $2").bind(job).bind(step).execute(pool).await?;
    sqlx::query("delete from validation_metrics where job_id = $1 and epoch >= $2").bind(job).bind(epoch).execute(pool).await?;
    Ok(())
}

/// `(step, epoch, loss, learning_rate)` rows and validation JSON of a job.
pub async fn metrics(pool: &Pool, job: &str) -> sqlx::Result<(Vec<(i64, i64, f64, f64)>, Vec<Value>)> {
    let train = sqlx::query_as("select step, epoch, loss, learning_rate from train_metrics where job_id = $1 order by step")
        .bind(job)
        .fetch_all(pool)
        .await?;
    let val: Vec<String> =
        sqlx::query_scalar("select data from validation_metrics where job_id = $1 order by epoch").bind(job).fetch_all(pool).await?;
    Ok((train, val.iter().filter_map(|s| serde_json::from_str(s).ok()).collect()))
}

/// Sets a job's metrics inside `tx`.
pub async fn set_metrics_tx(tx: &mut crate::store::Tx, id: &str, metrics: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set metrics = $1 where id = $2").bind(metrics.to_string()).bind(id).execute(&mut **tx).await?;
    Ok(())
}

/// How many jobs have each status (every status, zero when none has it).
pub async fn status_counts(pool: &Pool) -> sqlx::Result<Vec<(JobStatus, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as("select status, count(*) from jobs group by status").fetch_all(pool).await?;
    Ok(JobStatus::ALL.into_iter().map(|s| (s, rows.iter().find(|(t, _)| t == s.as_str()).map_or(0, |(_, n)| *n))).collect())
}

/// The queue's health for monitoring: the creation time of the oldest queued job, and how many
/// running jobs hold a lease that has run out (their worker stopped renewing it).
pub async fn queue_health(pool: &Pool) -> sqlx::Result<(Option<i64>, i64)> {
    let oldest: Option<i64> = sqlx::query_scalar("select min(created_at) from jobs where status = 'queued'").fetch_one(pool).await?;
    let expired: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'running' and lease_expires_at < $1")
        .bind(super::now())
        .fetch_one(pool)
        .await?;
    Ok((oldest, expired))
}
