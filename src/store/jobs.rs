//! The `jobs` table and its events and metrics.

use serde::Serialize;
use serde_json::Value;
use sqlx::{Sqlite, SqlitePool};

/// A job as stored; serialises to the contract's job object.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRecord {
    pub id: String,
    #[sqlx(skip)]
    #[serde(rename = "object")]
    pub object: &'static str,
    pub task: String,
    pub status: String,
    pub base_model: String,
    pub training_dataset: String,
    pub validation_dataset: Option<String>,
    pub model_name: Option<String>,
    #[sqlx(json)]
    pub hyperparameters: Value,
    /// For a pre-training job from scratch: the architecture.
    #[sqlx(json(nullable))]
    pub config: Option<Value>,
    #[sqlx(json(nullable))]
    pub progress: Option<Value>,
    #[sqlx(json(nullable))]
    pub metrics: Option<Value>,
    pub model: Option<String>,
    #[sqlx(json(nullable))]
    pub error: Option<Value>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "id, task, status, base_model, training_dataset, validation_dataset, model_name, \
    hyperparameters, config, progress, metrics, model, error, created_at, started_at, finished_at";

fn fix(mut j: JobRecord) -> JobRecord {
    j.object = "job";
    j
}

/// A new job to queue.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub task: &'a str,
    pub base_model: &'a str,
    pub training_dataset: &'a str,
    pub validation_dataset: Option<&'a str>,
    pub model_name: Option<&'a str>,
    pub hyperparameters: &'a Value,
    pub config: Option<&'a Value>,
    /// Gets a POST on each state change (see `crate::webhooks`).
    pub webhook_url: Option<&'a str>,
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
    let done = sqlx::query(
        r#"insert into jobs (id, task, status, base_model, training_dataset, validation_dataset, model_name,
                             hyperparameters, created_at, config, webhook_url)
           select ?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10
           where exists (select 1 from datasets where id = ?4)
             and (?5 is null or exists (select 1 from datasets where id = ?5))
             and (?6 is null or (not exists (select 1 from models where id = ?6)
                  and not exists (select 1 from jobs where model_name = ?6 and status in ('queued', 'running'))))"#,
    )
    .bind(j.id)
    .bind(j.task)
    .bind(j.base_model)
    .bind(j.training_dataset)
    .bind(j.validation_dataset)
    .bind(j.model_name)
    .bind(j.hyperparameters.to_string())
    .bind(super::now())
    .bind(j.config.map(Value::to_string))
    .bind(j.webhook_url)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(InsertOutcome::Queued);
    }
    let datasets_ok: bool = sqlx::query_scalar(
        "select exists (select 1 from datasets where id = ?1) and (?2 is null or exists (select 1 from datasets where id = ?2))",
    )
    .bind(j.training_dataset)
    .bind(j.validation_dataset)
    .fetch_one(&mut **tx)
    .await?;
    Ok(if datasets_ok { InsertOutcome::NameTaken } else { InsertOutcome::DatasetMissing })
}

pub async fn get(pool: &SqlitePool, id: &str) -> sqlx::Result<Option<JobRecord>> {
    let j: Option<JobRecord> =
        sqlx::query_as(&format!("select {COLUMNS} from jobs where id = ?")).bind(id).fetch_optional(pool).await?;
    Ok(j.map(fix))
}

/// Jobs newest first, optionally of one status, after the cursor `after` (a job id).
pub async fn list(pool: &SqlitePool, status: Option<&str>, after: Option<&str>, limit: i64) -> sqlx::Result<Vec<JobRecord>> {
    let rows: Vec<JobRecord> = sqlx::query_as(&format!(
        r#"select {COLUMNS} from jobs
           where (?1 is null or status = ?1)
             and (?2 is null or seq < (select seq from jobs where id = ?2))
           order by seq desc limit ?3"#
    ))
    .bind(status)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(fix).collect())
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
pub async fn claim_next(pool: &SqlitePool, worker: &str, lease_secs: i64) -> sqlx::Result<Option<Claimed>> {
    loop {
        let now = super::now();
        let candidate: Option<(String, String, Option<String>)> = sqlx::query_as(
            "select id, status, worker from jobs where status = 'queued' or (status = 'running' and lease_expires_at < ?1) order by seq limit 1",
        )
        .bind(now)
        .fetch_optional(pool)
        .await?;
        let Some((id, status, previous)) = candidate else { return Ok(None) };
        let j: Option<JobRecord> = sqlx::query_as(&format!(
            r#"update jobs set status = 'running', started_at = ?1, progress = null, error = null, worker = ?2, lease_expires_at = ?3
               where id = ?4 and status = ?5 and (status = 'queued' or lease_expires_at < ?1)
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
            return Ok(Some(Claimed { job: fix(j), taken_over_from }));
        }
        // Another worker claimed it between the two statements: look again.
    }
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
pub async fn renew_lease(pool: &SqlitePool, id: &str, worker: &str, lease_secs: i64) -> sqlx::Result<Lease> {
    let done = sqlx::query("update jobs set lease_expires_at = ? where id = ? and worker = ? and status = 'running'")
        .bind(super::now() + lease_secs)
        .bind(id)
        .bind(worker)
        .execute(pool)
        .await?;
    if done.rows_affected() == 1 {
        return Ok(Lease::Held);
    }
    let status: Option<String> = sqlx::query_scalar("select status from jobs where id = ?").bind(id).fetch_optional(pool).await?;
    Ok(if status.as_deref() == Some("cancelled") { Lease::Cancelled } else { Lease::Lost })
}

/// Puts the jobs that `worker` (or a process from before leases) left `running` when it
/// stopped back in the queue. Returns their ids. Jobs of other workers are theirs until their
/// lease runs out.
pub async fn requeue_running(pool: &SqlitePool, worker: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "update jobs set status = 'queued', started_at = null, progress = null, worker = null, lease_expires_at = null \
         where status = 'running' and (worker is null or worker = ?) returning id",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
}

/// Puts one running job back in the queue (the process is stopping).
pub async fn requeue(pool: &SqlitePool, id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "update jobs set status = 'queued', started_at = null, progress = null, worker = null, lease_expires_at = null \
         where id = ? and status = 'running'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ids of the jobs running now under a lease that still holds (their checkpoints are being
/// written by a live worker, perhaps in another process).
pub async fn leased_ids(pool: &SqlitePool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select id from jobs where status = 'running' and lease_expires_at >= ?").bind(super::now()).fetch_all(pool).await
}

// A terminal status and the event that announces it commit together, so whoever sees the job
// ended (the SSE stream above all) also sees its closing event.

/// Marks a queued or running job cancelled, with its closing event. False when it had already ended.
pub async fn cancel(pool: &SqlitePool, id: &str) -> sqlx::Result<bool> {
    let mut tx = crate::store::Tx::begin(pool).await?;
    let done = sqlx::query(
        "update jobs set status = 'cancelled', finished_at = ? where id = ? and status in ('queued', 'running')",
    )
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
pub async fn fail(pool: &SqlitePool, id: &str, code: &str, message: &str) -> sqlx::Result<()> {
    let err = serde_json::json!({"code": code, "message": message});
    let mut tx = crate::store::Tx::begin(pool).await?;
    let done = sqlx::query("update jobs set status = 'failed', error = ?, finished_at = ? where id = ? and status = 'running'")
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
    let done = sqlx::query("update jobs set status = 'succeeded', model = ?, finished_at = ? where id = ? and status = 'running'")
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

pub async fn set_progress(pool: &SqlitePool, id: &str, progress: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set progress = ? where id = ?").bind(progress.to_string()).bind(id).execute(pool).await?;
    Ok(())
}

pub async fn set_metrics(pool: &SqlitePool, id: &str, metrics: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set metrics = ? where id = ?").bind(metrics.to_string()).bind(id).execute(pool).await?;
    Ok(())
}

/// One job event, as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRecord {
    #[serde(skip)]
    pub seq: i64,
    #[sqlx(skip)]
    pub id: String,
    #[sqlx(skip)]
    pub object: &'static str,
    pub created_at: i64,
    pub level: String,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub message: String,
    #[sqlx(json(nullable))]
    pub data: Option<Value>,
}

/// Records an event of `job`, on the pool or inside a transaction.
pub async fn add_event<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    ex: E,
    job: &str,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<&Value>,
) -> sqlx::Result<()> {
    sqlx::query("insert into job_events (job_id, created_at, level, type, message, data) values (?, ?, ?, ?, ?, ?)")
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
pub async fn events(pool: &SqlitePool, job: &str, after: i64, limit: i64) -> sqlx::Result<Vec<EventRecord>> {
    let rows: Vec<EventRecord> = sqlx::query_as(
        "select seq, created_at, level, type, message, data from job_events where job_id = ? and seq > ? order by seq limit ?",
    )
    .bind(job)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|mut e| {
            e.id = format!("ev_{}", e.seq);
            e.object = "event";
            e
        })
        .collect())
}

pub async fn add_train_metric(pool: &SqlitePool, job: &str, step: i64, epoch: i64, loss: f64, lr: f64) -> sqlx::Result<()> {
    sqlx::query("insert or replace into train_metrics (job_id, step, epoch, loss, learning_rate) values (?, ?, ?, ?, ?)")
        .bind(job)
        .bind(step)
        .bind(epoch)
        .bind(loss)
        .bind(lr)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn add_validation_metric(pool: &SqlitePool, job: &str, epoch: i64, data: &Value) -> sqlx::Result<()> {
    sqlx::query("insert or replace into validation_metrics (job_id, epoch, data) values (?, ?, ?)")
        .bind(job)
        .bind(epoch)
        .bind(data.to_string())
        .execute(pool)
        .await?;
    Ok(())
}

/// Clears what an earlier, interrupted run of the job recorded, before it runs again.
pub async fn clear_run_metrics(pool: &SqlitePool, job: &str) -> sqlx::Result<()> {
    sqlx::query("delete from train_metrics where job_id = ?").bind(job).execute(pool).await?;
    sqlx::query("delete from validation_metrics where job_id = ?").bind(job).execute(pool).await?;
    Ok(())
}

/// Ids of the jobs that are queued or running (whose checkpoints are kept).
pub async fn active_ids(pool: &SqlitePool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("select id from jobs where status in ('queued', 'running')").fetch_all(pool).await
}

/// Drops a job's metrics recorded after step `step` (training) and from epoch `epoch` on
/// (validation): what a run resumed from that point records again.
pub async fn trim_run_metrics(pool: &SqlitePool, job: &str, step: i64, epoch: i64) -> sqlx::Result<()> {
    sqlx::query("delete from train_metrics where job_id = ? and step > ?").bind(job).bind(step).execute(pool).await?;
    sqlx::query("delete from validation_metrics where job_id = ? and epoch >= ?").bind(job).bind(epoch).execute(pool).await?;
    Ok(())
}

/// `(step, epoch, loss, learning_rate)` rows and validation JSON of a job.
pub async fn metrics(pool: &SqlitePool, job: &str) -> sqlx::Result<(Vec<(i64, i64, f64, f64)>, Vec<Value>)> {
    let train = sqlx::query_as("select step, epoch, loss, learning_rate from train_metrics where job_id = ? order by step")
        .bind(job)
        .fetch_all(pool)
        .await?;
    let val: Vec<String> = sqlx::query_scalar("select data from validation_metrics where job_id = ? order by epoch")
        .bind(job)
        .fetch_all(pool)
        .await?;
    Ok((train, val.iter().filter_map(|s| serde_json::from_str(s).ok()).collect()))
}

/// Sets a job's metrics inside `tx`.
pub async fn set_metrics_tx(tx: &mut crate::store::Tx, id: &str, metrics: &Value) -> sqlx::Result<()> {
    sqlx::query("update jobs set metrics = ? where id = ?").bind(metrics.to_string()).bind(id).execute(&mut **tx).await?;
    Ok(())
}
