//! What the worker writes to the store as a job goes: its events, progress and metrics, and
//! its final state (the model registered, or the failure), retried until it lands.

use super::WorkerContext;
use crate::store::{self, jobs, jobs::JobRecord, models, Pool};
use crate::train::events::{Event, MlmReport};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Steps between progress events.
pub(super) const PROGRESS_EVERY: usize = 25;

pub(super) async fn event(pool: &Pool, job: &str, level: &str, message: &str) {
    if let Err(e) = jobs::add_event(pool, job, level, "message", message, None).await {
        tracing::error!(error = %e, "recording a job event failed");
    }
}

/// Fails a job that `run_job` left without a final state (a write it needed failed), unless the
/// server is stopping: then the next start-up queues it again.
pub(super) async fn fail_unfinished(ctx: &WorkerContext, id: &str, e: &anyhow::Error, shutdown: &CancellationToken) {
    ctx.queue.cancel_flags.lock().unwrap().remove(id);
    if shutdown.is_cancelled() {
        return;
    }
    let code = if crate::reserve::is_disk_full(e) { "storage_error" } else { "internal_error" };
    let message = format!("{e:#}");
    tracing::error!(job_id = %id, error = %message, "job stopped before it could end");
    let _ = persist(ctx, shutdown, "recording the job's failure", || async { Ok(jobs::fail(&ctx.pool, id, code, &message).await?) }).await;
}

/// Retries a write of a job's final state until it lands or the server stops. A full or
/// read-only disk can be cleared by an operator; giving up would leave the job `running` until
/// the next restart. (After a stop the next start-up queues it again, and it resumes.) On a full
/// disk the data dir's reserve is released first, which lets the write through at once.
pub(super) async fn persist<T, F, Fut>(ctx: &WorkerContext, shutdown: &CancellationToken, what: &str, mut write: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    loop {
        match write().await {
            Ok(v) => return Ok(v),
            Err(e) if crate::reserve::is_disk_full(&e) && crate::reserve::release(&ctx.data_dir) => {
                tracing::error!(error = %format!("{e:#}"), "{what} failed; retrying with the reserve freed");
            }
            Err(e) if !shutdown.is_cancelled() => {
                tracing::error!(error = %format!("{e:#}"), "{what} failed; retrying in 2 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn new_model(
    job: &JobRecord,
    id: &str,
    kind: &str,
    labels: Vec<String>,
    metrics: Value,
    pooling: Option<String>,
    max_len: usize,
) -> models::ModelRecord {
    models::ModelRecord {
        id: id.to_string(),
        kind: kind.into(),
        task: Some(job.task),
        base_model: Some(job.base_model.clone()),
        job_id: Some(job.id.clone()),
        labels,
        metrics: Some(metrics),
        path: format!("models/{id}"),
        pooling,
        max_seq_len: Some(max_len as i64),
        created_at: store::now(),
        method: (kind == "classifier").then(|| job.hyperparameters["method"].as_str().unwrap_or("full").to_string()),
        lora_rank: job.hyperparameters["lora"]["r"].as_i64(),
        architecture: None,
    }
}

/// Registers the model and marks the job succeeded in one transaction, unless the job was
/// cancelled meanwhile (then the model's files are removed).
pub(super) async fn finish(
    ctx: &WorkerContext,
    job: &JobRecord,
    rec: models::ModelRecord,
    out_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let pool = &ctx.pool;
    // In the object store before the database names it: no process reads half a model.
    ctx.catalog.objects.put(&rec.path).await?;
    let mut tx = crate::store::Tx::begin(pool).await?;
    models::insert(&mut tx, &rec).await?;
    jobs::set_metrics_tx(&mut tx, &job.id, rec.metrics.as_ref().unwrap_or(&Value::Null)).await?;
    if jobs::succeed(&mut tx, &job.id, &rec.id).await? {
        tx.commit().await?;
        tracing::info!(model = %rec.id, "job succeeded");
    } else {
        tx.rollback().await?;
        let _ = std::fs::remove_dir_all(out_dir);
        event(pool, &job.id, "info", "job was cancelled; the model was discarded").await;
    }
    Ok(())
}

pub(super) async fn record(pool: &Pool, job: &str, ev: Event) {
    let result = match ev {
        Event::Message(m) => jobs::add_event(pool, job, "info", "message", &m, None).await,
        Event::Warning(m) => jobs::add_event(pool, job, "warning", "message", &m, None).await,
        Event::Step(s) => {
            metrics::gauge!("finetuned_training_examples_per_second").set(s.examples_per_second);
            metrics::gauge!("finetuned_training_loss").set(s.loss);
            metrics::counter!("finetuned_training_steps_total").increment(1);
            metrics::histogram!(crate::monitoring::TRAINING_STEP_SECONDS).record(s.seconds);
            let progress = json!({"epoch": s.epoch, "step": s.step, "total_steps": s.total_steps,
                                  "examples_per_second": s.examples_per_second});
            let r = jobs::set_progress(pool, job, &progress).await;
            let r2 = jobs::add_train_metric(pool, job, s.step as i64, s.epoch as i64, s.loss, s.learning_rate).await;
            // A progress event every 25 steps, and at the last one, for live followers.
            let r3 = if s.step % PROGRESS_EVERY == 0 || s.step == s.total_steps {
                let msg = format!(
                    "step {}/{} (epoch {}): loss {:.4}, {:.1} examples/s",
                    s.step, s.total_steps, s.epoch, s.loss, s.examples_per_second
                );
                let data = json!({"epoch": s.epoch, "step": s.step, "total_steps": s.total_steps, "loss": s.loss,
                                  "learning_rate": s.learning_rate, "examples_per_second": s.examples_per_second});
                jobs::add_event(pool, job, "info", "message", &msg, Some(&data)).await
            } else {
                Ok(())
            };
            r.and(r2).and(r3)
        }
        Event::Epoch(e) => {
            let data: Value = serde_json::to_value(&e).unwrap_or(Value::Null);
            let mut validation = e.report.headline();
            validation.insert("loss".into(), json!(e.loss));
            let mut summary = json!({"train_loss": e.train_loss, "validation": validation, "epoch": e.epoch});
            if let Some(mib) = e.peak_gpu_mib {
                summary["peak_gpu_mib"] = json!(mib);
                metrics::gauge!("finetuned_training_gpu_memory_peak_mib").set(mib as f64);
            }
            let msg =
                format!("epoch {}: train loss {:.4}, validation loss {:.4}, {}", e.epoch, e.train_loss, e.loss, e.report.headline_text());
            let r1 = jobs::add_validation_metric(pool, job, e.epoch as i64, &data).await;
            let r2 = jobs::set_metrics(pool, job, &summary).await;
            let r3 = jobs::add_event(pool, job, "info", "metrics", &msg, Some(&data)).await;
            r1.and(r2).and(r3)
        }
        Event::Pretrain(r) => record_pretrain(pool, job, r).await,
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "recording training progress failed");
    }
}

async fn record_pretrain(pool: &Pool, job: &str, r: MlmReport) -> sqlx::Result<()> {
    let data = serde_json::to_value(&r).unwrap_or(Value::Null);
    let msg = match r.train_loss {
        None => format!("before training: validation MLM loss {:.4}, perplexity {:.2}", r.loss, r.perplexity),
        Some(t) => format!("epoch {}: train loss {t:.4}, validation MLM loss {:.4}, perplexity {:.2}", r.epoch, r.loss, r.perplexity),
    };
    let msg = match r.embedding_similarity {
        Some(s) => format!("{msg}, sentence embeddings {s:.4} similar to the base's"),
        None => msg,
    };
    jobs::add_validation_metric(pool, job, r.epoch as i64, &data).await?;
    let summary = json!({"train_loss": r.train_loss, "validation": r.validation_json(), "epoch": r.epoch});
    jobs::set_metrics(pool, job, &summary).await?;
    jobs::add_event(pool, job, "info", "metrics", &msg, Some(&data)).await
}
