//! The job worker: takes queued jobs one at a time, trains each on a blocking thread, and
//! records every state change, progress step and epoch in the database as it happens.

use super::hyper::Hyperparameters;
use super::mlm;
use super::trainer::{self, Event, Observer, Outcome};
use crate::catalog::Catalog;
use crate::store::jobs::{self, JobRecord, JobStatus};
use crate::store::Pool;
use candle_core::Device;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

mod prepare;
mod record;

use prepare::{checkpoint_mirror, fetch_checkpoint, prepare, Work};
use record::{event, fail_unfinished, finish, new_model, persist, record};

/// Wakes the worker and carries the cancel flags of running jobs.
#[derive(Clone, Default)]
pub struct JobQueue {
    wake: Arc<Notify>,
    cancel_flags: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    /// Worker loops running now (one per device).
    alive: Arc<AtomicUsize>,
}

impl JobQueue {
    /// Tells the worker a job was queued (call after the commit).
    pub fn notify(&self) {
        self.wake.notify_waiters();
    }

    /// Asks a running job to stop before its next step.
    pub fn cancel(&self, id: &str) {
        if let Some(flag) = self.cancel_flags.lock().unwrap().get(id) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Whether a worker loop is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) > 0
    }
}

/// What the worker needs.
pub struct WorkerContext {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub data_dir: PathBuf,
    pub device: Device,
    pub queue: JobQueue,
    /// The pool training runs on (its thread budget).
    pub threads: Arc<rayon::ThreadPool>,
    /// Where hub base models come from and are cached.
    pub hub: crate::hub::HubConfig,
    /// Steps between checkpoints of fine-tuning jobs (0: only on shutdown), and how many to keep.
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// What training steps compute in (`--dtype`).
    pub precision: crate::train::precision::Precision,
    /// This worker's name in the queue (`--worker-id`, plus the device when a process runs several).
    pub worker_id: String,
    /// How long a claim holds without renewal (`--lease-seconds`).
    pub lease: Duration,
    /// How often an idle worker looks for jobs queued elsewhere (`--poll-interval-ms`).
    pub poll_interval: Duration,
}

/// Runs jobs until `shutdown` fires. A job interrupted by shutdown goes back to the queue.
pub async fn run_worker_until_stopped(ctx: WorkerContext, shutdown: CancellationToken) {
    ctx.queue.alive.fetch_add(1, Ordering::SeqCst);
    let lease = ctx.lease.as_secs() as i64;
    while !shutdown.is_cancelled() {
        // Registered before the claim, so a job queued in between still wakes this loop.
        let woken = ctx.queue.wake.notified();
        match jobs::claim_next(&ctx.pool, &ctx.worker_id, lease).await {
            Ok(Some(claimed)) => {
                let job = claimed.job;
                if claimed.taken_over_from.is_none() {
                    let wait = (crate::store::now() - job.created_at).max(0);
                    metrics::histogram!(crate::monitoring::JOB_QUEUE_WAIT_SECONDS).record(wait as f64);
                }
                let span = tracing::info_span!("job", job_id = %job.id);
                let id = job.id.clone();
                if let Some(from) = claimed.taken_over_from {
                    let msg = format!("worker {from} stopped renewing its lease on this job; worker {} takes it over", ctx.worker_id);
                    tracing::warn!(job_id = %id, "{msg}");
                    event(&ctx.pool, &id, "warning", &msg).await;
                }
                let dir = ctx.data_dir.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || crate::reserve::ensure(&dir)).await {
                    tracing::warn!(error = %e, "the data dir has no room for its reserve");
                }
                let run = run_job(&ctx, job, &shutdown);
                if let Err(e) = tracing::Instrument::instrument(run, span).await {
                    fail_unfinished(&ctx, &id, &e, &shutdown).await;
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(ctx.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming a job failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    ctx.queue.alive.fetch_sub(1, Ordering::SeqCst);
}

/// Renews this worker's lease on `job` three times a lease period until `done` fires. A cancel
/// recorded by any process, or the lease lost to another worker, raises `cancel` (the job stops
/// before its next step); a loss also raises `lost`, so that nothing more is recorded for the job.
fn keep_lease(
    ctx: &WorkerContext,
    job: &str,
    cancel: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    done: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (pool, worker, job) = (ctx.pool.clone(), ctx.worker_id.clone(), job.to_string());
    let lease = ctx.lease;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease / 3) => {}
                _ = done.cancelled() => return,
            }
            let renewed = jobs::renew_lease(&pool, &job, &worker, lease.as_secs() as i64).await;
            let result = match &renewed {
                Ok(jobs::Lease::Held) => "held",
                Ok(jobs::Lease::Cancelled) => "cancelled",
                Ok(jobs::Lease::Lost) => "lost",
                Err(_) => "error",
            };
            metrics::counter!(crate::monitoring::LEASE_RENEWALS, "result" => result).increment(1);
            match renewed {
                Ok(jobs::Lease::Held) => {}
                Ok(jobs::Lease::Cancelled) => cancel.store(true, Ordering::SeqCst),
                Ok(jobs::Lease::Lost) => {
                    tracing::warn!(job_id = %job, "this worker's lease on the job was lost to another worker; stopping it");
                    lost.store(true, Ordering::SeqCst);
                    cancel.store(true, Ordering::SeqCst);
                    return;
                }
                // The lease may run out meanwhile; the next renewal tells.
                Err(e) => tracing::warn!(job_id = %job, error = %e, "renewing the job's lease failed"),
            }
        }
    })
}

/// What the training thread sends the recorder: an event, or a request to say when everything
/// before it is recorded.
enum ToRecorder {
    Event(Box<Event>),
    Flush(std::sync::mpsc::Sender<()>),
}

struct ChannelObserver {
    tx: mpsc::UnboundedSender<ToRecorder>,
    cancel: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Observer for ChannelObserver {
    fn on_event(&mut self, event: Event) {
        let _ = self.tx.send(ToRecorder::Event(Box::new(event)));
    }

    fn wait_recorded(&mut self) {
        let (done, recorded) = std::sync::mpsc::channel();
        if self.tx.send(ToRecorder::Flush(done)).is_ok() {
            // Bounded: with the database down, training goes on and the checkpoint is saved.
            let _ = recorded.recv_timeout(std::time::Duration::from_secs(30));
        }
    }
    fn should_stop(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.shutdown.is_cancelled()
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled() && !self.cancel.load(Ordering::SeqCst)
    }
}

async fn run_job(ctx: &WorkerContext, job: JobRecord, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let pool = &ctx.pool;
    tracing::info!("job started");
    // Registered before anything slow, so that a cancel arriving during preparation is seen.
    let cancel = Arc::new(AtomicBool::new(false));
    ctx.queue.cancel_flags.lock().unwrap().insert(job.id.clone(), cancel.clone());
    let ckpt_dir = super::checkpoint::job_dir(&ctx.data_dir, &job.id);
    let latest = |d: PathBuf| async move { tokio::task::spawn_blocking(move || super::checkpoint::latest(&d)).await };
    let mut resume = latest(ckpt_dir.clone()).await?;
    if resume.is_none() && fetch_checkpoint(ctx, &job.id).await {
        resume = latest(ckpt_dir.clone()).await?;
    }
    // Metrics recorded after the checkpoint the job resumes from are recorded again as it goes on.
    match &resume {
        Some((_, m)) => jobs::trim_run_metrics(pool, &job.id, m.step as i64, m.epoch as i64).await?,
        None => jobs::clear_run_metrics(pool, &job.id).await?,
    }
    event(pool, &job.id, "info", &format!("job started on worker {}", ctx.worker_id)).await;
    let lost = Arc::new(AtomicBool::new(false));
    let lease_done = CancellationToken::new();
    let _lease_guard = lease_done.clone().drop_guard();
    keep_lease(ctx, &job.id, cancel.clone(), lost.clone(), lease_done);
    let (mirror, uploads) = checkpoint_mirror(ctx, &job.id).unzip();
    let prepared = prepare(ctx, &job, mirror).await;
    let (work, model_id, pooling) = match prepared {
        Ok(p) => p,
        Err(e) => {
            ctx.queue.cancel_flags.lock().unwrap().remove(&job.id);
            let message = e.to_string();
            persist(ctx, shutdown, "recording the job's failure", || async { Ok(jobs::fail(pool, &job.id, e.code(), &message).await?) })
                .await?;
            return Ok(());
        }
    };
    let out_dir = ctx.data_dir.join("models").join(&model_id);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut obs = ChannelObserver { tx, cancel, shutdown: shutdown.clone() };
    let threads = ctx.threads.clone();
    let handle = tokio::task::spawn_blocking(move || {
        threads.install(|| match work {
            Work::Classify(req) => trainer::run(req, &mut obs),
            Work::Pretrain(req) => mlm::run(req, &mut obs),
        })
    });
    while let Some(msg) = rx.recv().await {
        match msg {
            ToRecorder::Event(ev) => record(pool, &job.id, *ev).await,
            ToRecorder::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
    let result = handle.await;
    if let Some(uploads) = uploads {
        // The newest checkpoint (one saved at a stop above all) reaches the store before the
        // job is handed back or its checkpoints are removed.
        let _ = uploads.await;
    }
    ctx.queue.cancel_flags.lock().unwrap().remove(&job.id);
    if lost.load(Ordering::SeqCst) {
        // Another worker runs the job now: what this run did is not recorded.
        return Ok(());
    }
    let requeued = matches!(result, Ok(Ok(Outcome::Cancelled)))
        && shutdown.is_cancelled()
        && jobs::get(pool, &job.id).await?.is_none_or(|j| j.status != JobStatus::Cancelled);
    match result {
        Ok(Ok(Outcome::Finished(done))) => {
            let trainer::Finished { best, labels, stats, tuned, calibration, validation_scatter, .. } = *done;
            // The last epoch's number: a resumed run's stats hold only the epochs since the resume.
            let stopped = json!({"reason": stats.stop_reason, "epochs_run": stats.epochs.last().map_or(0, |e| e.epoch), "max_epochs": stats.max_epochs});
            let mut validation = best.report.headline();
            validation.insert("loss".into(), json!(best.loss));
            let mut metrics = json!({"train_loss": best.train_loss, "validation": validation, "epoch": best.epoch, "stopped": stopped});
            if !calibration.validation_ece_before.is_nan() {
                metrics["calibration"] = json!(calibration);
            }
            if let Some(points) = validation_scatter {
                metrics["validation_scatter"] = json!(points);
            }
            if let Some(t) = tuned {
                let per_label: serde_json::Map<String, serde_json::Value> =
                    labels.iter().cloned().zip(t.thresholds.iter().map(|&v| json!(v))).collect();
                metrics["thresholds"] = json!(per_label);
                metrics["validation_tuned"] = json!({"macro_f1": t.validation.macro_f1, "micro_f1": t.validation.micro_f1});
            }
            let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())?;
            // The job's length, capped (as training was) at what the model's positions hold.
            let max_len = crate::model::hf::artifacts::max_tokens(&out_dir).map_or(hp.max_seq_len, |m| m.min(hp.max_seq_len));
            let mut rec = new_model(&job, &model_id, "classifier", labels, metrics, Some(pooling), max_len);
            rec.architecture = crate::model::hf::artifacts::model_type(&out_dir);
            persist(ctx, shutdown, "registering the model", || finish(ctx, &job, rec.clone(), &out_dir)).await?;
        }
        Ok(Ok(Outcome::Pretrained { before, last })) => {
            let metrics = json!({"train_loss": last.train_loss, "validation": last.validation_json(),
                                 "validation_before": {"loss": before, "perplexity": before.exp()}, "epoch": last.epoch});
            let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())?;
            // The adapted base pools as its parent does (`auto` resolves the same for both).
            // The job's length, capped (as training was) at what the model's positions hold.
            let max_len = crate::model::hf::artifacts::max_tokens(&out_dir).map_or(hp.max_seq_len, |m| m.min(hp.max_seq_len));
            let mut rec = new_model(&job, &model_id, "base", vec![], metrics, Some(pooling), max_len);
            rec.architecture = crate::model::hf::artifacts::model_type(&out_dir);
            persist(ctx, shutdown, "registering the model", || finish(ctx, &job, rec.clone(), &out_dir)).await?;
        }
        Ok(Ok(Outcome::Cancelled)) => {
            if shutdown.is_cancelled() {
                jobs::requeue(pool, &job.id).await?;
                event(pool, &job.id, "info", "server stopping: job put back in the queue").await;
            }
        }
        Ok(Err(e)) => {
            let message = match e.code() {
                "device_out_of_memory" => format!("the device ran out of memory (lower batch_size or max_seq_len): {e:#}"),
                _ => format!("{e:#}"),
            };
            tracing::warn!(error = %message, "job failed");
            persist(ctx, shutdown, "recording the job's failure", || async { Ok(jobs::fail(pool, &job.id, e.code(), &message).await?) })
                .await?;
        }
        Err(panic) => {
            let message = format!("training crashed: {panic}");
            tracing::error!(error = %message, "job panicked");
            persist(ctx, shutdown, "recording the job's failure", || async {
                Ok(jobs::fail(pool, &job.id, "internal_error", &message).await?)
            })
            .await?;
        }
    }
    if !requeued {
        // Checkpoints exist to resume a job; once it has ended they are only disk.
        tokio::task::spawn_blocking(move || super::checkpoint::remove_all(&ckpt_dir)).await?;
        ctx.catalog.objects.delete(&format!("checkpoints/{}", job.id)).await;
    }
    Ok(())
}
