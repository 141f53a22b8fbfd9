//! The job worker: takes queued jobs one at a time, trains each on a blocking thread, and
//! records every state change, progress step and epoch in the database as it happens.

use super::hyper::Hyperparameters;
use super::mlm::{self, MlmRequest, ScratchSpec, Start};
use super::objective::Task;
use super::trainer::{self, Event, Observer, Outcome, TrainError, TrainRequest};
use crate::catalog::Catalog;
use crate::dataset::read_stored;
use crate::store::Pool;
use crate::store::{self, datasets, jobs, jobs::JobRecord, models};
use candle_core::Device;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Steps between progress events.
const PROGRESS_EVERY: usize = 25;

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

impl WorkerContext {
    /// Where a job's checkpoints live.
    pub fn checkpoint_dir(data_dir: &std::path::Path, job: &str) -> PathBuf {
        data_dir.join("checkpoints").join(job)
    }
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
            match jobs::renew_lease(&pool, &job, &worker, lease.as_secs() as i64).await {
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

struct ChannelObserver {
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Observer for ChannelObserver {
    fn on_event(&mut self, event: Event) {
        let _ = self.tx.send(event);
    }
    fn should_stop(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.shutdown.is_cancelled()
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled() && !self.cancel.load(Ordering::SeqCst)
    }
}

async fn event(pool: &Pool, job: &str, level: &str, message: &str) {
    if let Err(e) = jobs::add_event(pool, job, level, "message", message, None).await {
        tracing::error!(error = %e, "recording a job event failed");
    }
}

async fn run_job(ctx: &WorkerContext, job: JobRecord, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let pool = &ctx.pool;
    tracing::info!("job started");
    // Registered before anything slow, so that a cancel arriving during preparation is seen.
    let cancel = Arc::new(AtomicBool::new(false));
    ctx.queue.cancel_flags.lock().unwrap().insert(job.id.clone(), cancel.clone());
    let ckpt_dir = WorkerContext::checkpoint_dir(&ctx.data_dir, &job.id);
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
    while let Some(ev) = rx.recv().await {
        record(pool, &job.id, ev).await;
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
        && jobs::get(pool, &job.id).await?.is_none_or(|j| j.status != "cancelled");
    match result {
        Ok(Ok(Outcome::Finished(done))) => {
            let trainer::Finished { best, labels, .. } = *done;
            let metrics = json!({"train_loss": best.train_loss, "validation": {
                "loss": best.loss, "accuracy": best.report.accuracy, "macro_f1": best.report.macro_f1}, "epoch": best.epoch});
            let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())?;
            let rec = new_model(&job, &model_id, "classifier", labels, metrics, Some(pooling), hp.max_seq_len);
            persist(ctx, shutdown, "registering the model", || finish(ctx, &job, rec.clone(), &out_dir)).await?;
        }
        Ok(Ok(Outcome::Pretrained { before, last })) => {
            let metrics = json!({"train_loss": last.train_loss, "validation": {"loss": last.loss, "perplexity": last.perplexity},
                                 "validation_before": {"loss": before, "perplexity": before.exp()}, "epoch": last.epoch});
            let hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone())?;
            let rec = new_model(&job, &model_id, "base", vec![], metrics, None, hp.max_seq_len);
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

/// A job taken over from a worker elsewhere has its checkpoints in the object store, not here:
/// fetches the newest whole one (true when one arrived). Without it the job starts over (with
/// a warning when the store could not be read).
async fn fetch_checkpoint(ctx: &WorkerContext, job: &str) -> bool {
    let objects = &ctx.catalog.objects;
    if !objects.enabled() {
        return false;
    }
    let rel = format!("checkpoints/{job}");
    let mut names = match objects.list_dirs(&rel).await {
        Ok(n) => n,
        Err(e) => {
            event(&ctx.pool, job, "warning", &format!("the job's checkpoints could not be listed ({e}): it starts over")).await;
            return false;
        }
    };
    // Zero-padded step numbers: the newest sorts last.
    names.sort();
    for name in names.iter().rev() {
        let one = format!("{rel}/{name}");
        if let Err(e) = objects.fetch(&one).await {
            event(&ctx.pool, job, "warning", &format!("checkpoint {name} could not be fetched ({e})")).await;
            continue;
        }
        if ctx.data_dir.join(&one).join(super::checkpoint::COMPLETE_WITH).exists() {
            return true;
        }
        // Its worker died while copying it.
        let _ = tokio::fs::remove_dir_all(ctx.data_dir.join(&one)).await;
    }
    false
}

/// Copies checkpoints to the object store in the background, the newest first: training does
/// not wait for the store, and a checkpoint superseded before its turn is skipped. The task
/// ends once the returned mirror (held by the run's checkpoint plan) is dropped and the newest
/// checkpoint is copied; those no longer kept are removed from the store.
fn checkpoint_mirror(ctx: &WorkerContext, job: &str) -> Option<(super::checkpoint::Mirror, tokio::task::JoinHandle<()>)> {
    if !ctx.catalog.objects.enabled() {
        return None;
    }
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<(PathBuf, Vec<PathBuf>)>>(None);
    let (objects, data_dir, pool, job) = (ctx.catalog.objects.clone(), ctx.data_dir.clone(), ctx.pool.clone(), job.to_string());
    let task = tokio::spawn(async move {
        let rel = format!("checkpoints/{job}");
        while rx.changed().await.is_ok() {
            let Some((saved, kept)) = rx.borrow_and_update().clone() else { continue };
            let Ok(saved) = saved.strip_prefix(&data_dir).map(|p| p.to_string_lossy().to_string()) else { continue };
            let copied = async {
                objects.put_last(&saved, Some(super::checkpoint::COMPLETE_WITH)).await?;
                let kept: std::collections::HashSet<String> =
                    kept.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).collect();
                for name in objects.list_dirs(&rel).await? {
                    if !kept.contains(&name) {
                        objects.delete(&format!("{rel}/{name}")).await;
                    }
                }
                Ok::<_, crate::objects::ObjectError>(())
            };
            // A checkpoint pruned locally while it was being copied is superseded anyway.
            if let Err(e) = copied.await {
                if data_dir.join(&saved).exists() {
                    event(&pool, &job, "warning", &format!("a checkpoint could not be copied to the object store: {e}")).await;
                }
            }
        }
    });
    let mirror = super::checkpoint::Mirror(Arc::new(move |saved: &std::path::Path, kept: &[PathBuf]| {
        let _ = tx.send(Some((saved.to_path_buf(), kept.to_vec())));
        Ok(())
    }));
    Some((mirror, task))
}

/// Fails a job that `run_job` left without a final state (a write it needed failed), unless the
/// server is stopping: then the next start-up queues it again.
async fn fail_unfinished(ctx: &WorkerContext, id: &str, e: &anyhow::Error, shutdown: &CancellationToken) {
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
async fn persist<T, F, Fut>(ctx: &WorkerContext, shutdown: &CancellationToken, what: &str, mut write: F) -> anyhow::Result<T>
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

fn new_model(
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
        task: Some(job.task.clone()),
        base_model: Some(job.base_model.clone()),
        job_id: Some(job.id.clone()),
        labels,
        metrics: Some(metrics),
        path: format!("models/{id}"),
        pooling,
        max_seq_len: Some(max_len as i64),
        created_at: store::now(),
    }
}

/// Registers the model and marks the job succeeded in one transaction, unless the job was
/// cancelled meanwhile (then the model's files are removed).
async fn finish(ctx: &WorkerContext, job: &JobRecord, rec: models::ModelRecord, out_dir: &std::path::Path) -> anyhow::Result<()> {
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

/// What a job runs.
enum Work {
    Classify(TrainRequest),
    Pretrain(MlmRequest),
}

/// Reads the job's datasets and resolves its base model and output path.
/// Also returns the pooling the job trains with (`auto` resolved against the base model).
async fn prepare(
    ctx: &WorkerContext,
    job: &JobRecord,
    mirror: Option<super::checkpoint::Mirror>,
) -> Result<(Work, String, String), TrainError> {
    let internal = |e: sqlx::Error| TrainError::Internal(e.into());
    let base = match ctx.catalog.resolve(&job.base_model).await.map_err(internal)? {
        Some(base) => base,
        None if crate::hub::is_repo_id(&job.base_model) => from_hub(ctx, job).await?,
        None => return Err(TrainError::BaseModel(format!("base model {:?} no longer exists", job.base_model))),
    };
    let storage = |e: crate::objects::ObjectError| TrainError::Storage(e.to_string());
    ctx.catalog.fetch(&base).await.map_err(storage)?;
    let mut hp: Hyperparameters = serde_json::from_value(job.hyperparameters.clone()).map_err(|e| TrainError::Internal(e.into()))?;
    if hp.pooling == "auto" {
        hp.pooling = base.auto_pooling.clone();
    }
    let pooling = hp.pooling.clone();
    let mut rows = Vec::new();
    for id in [Some(&job.training_dataset), job.validation_dataset.as_ref()] {
        let Some(id) = id else {
            rows.push(None);
            continue;
        };
        let rec = datasets::get(&ctx.pool, id).await.map_err(internal)?;
        let rec = rec.ok_or_else(|| TrainError::InvalidData(format!("dataset {id} no longer exists")))?;
        ctx.catalog.objects.fetch(&rec.path).await.map_err(storage)?;
        let path = ctx.data_dir.join(&rec.path);
        let data = tokio::task::spawn_blocking(move || read_stored(&path)).await.map_err(|e| TrainError::Internal(e.into()))??;
        rows.push(Some(data));
    }
    let model_id = job.model_name.clone().unwrap_or_else(|| format!("ft-{}", job.id.trim_start_matches("job_")));
    let validation_rows = rows.pop().flatten();
    let train_rows = rows.pop().flatten().unwrap_or_default();
    let out_dir = Some(ctx.data_dir.join("models").join(&model_id));
    let checkpoints = Some(super::checkpoint::CheckpointPlan {
        dir: WorkerContext::checkpoint_dir(&ctx.data_dir, &job.id),
        every: ctx.checkpoint_every,
        keep: ctx.keep_checkpoints,
        mirror,
    });
    if job.task == "mlm" {
        let start = match &job.config {
            Some(c) => {
                let spec: ScratchSpec = serde_json::from_value(c.clone()).map_err(|e| TrainError::Internal(e.into()))?;
                Start::Scratch { spec, tokenizer_dir: base.path }
            }
            None => Start::Checkpoint(base.path),
        };
        let req = MlmRequest {
            start,
            train_rows,
            validation_rows,
            hp,
            device: ctx.device.clone(),
            out_dir,
            mask_prob: 0.15,
            checkpoints,
            precision: ctx.precision,
        };
        return Ok((Work::Pretrain(req), model_id, pooling));
    }
    let req = TrainRequest {
        out_dir,
        checkpoints,
        task: if job.task == "multi_label_classification" { Task::MultiLabel } else { Task::SingleLabel },
        precision: ctx.precision,
        ..TrainRequest::new(base.path, train_rows, validation_rows, hp, ctx.device.clone())
    };
    Ok((Work::Classify(req), model_id, pooling))
}

/// Fetches the job's base model from the hub (once: later jobs find it in the cache).
async fn from_hub(ctx: &WorkerContext, job: &JobRecord) -> Result<crate::catalog::Resolved, TrainError> {
    let repo = &job.base_model;
    event(&ctx.pool, &job.id, "info", &format!("fetching base model {repo} from the hub")).await;
    let dir = crate::hub::fetch(repo, &ctx.hub)
        .await
        .map_err(|e| TrainError::BaseModel(format!("base model {repo:?} could not be fetched from the hub: {e:#}")))?;
    let info = crate::model::artifacts::inspect(&dir)
        .map_err(|e| TrainError::BaseModel(format!("{repo} from the hub is not a supported checkpoint: {e:#}")))?;
    Ok(crate::catalog::Resolved {
        id: repo.clone(),
        path: dir,
        stored_at: None,
        is_classifier: info.labels.is_some(),
        auto_pooling: info.auto_pooling(),
    })
}

async fn record(pool: &Pool, job: &str, ev: Event) {
    let result = match ev {
        Event::Message(m) => jobs::add_event(pool, job, "info", "message", &m, None).await,
        Event::Warning(m) => jobs::add_event(pool, job, "warning", "message", &m, None).await,
        Event::Step(s) => {
            metrics::gauge!("finetuned_training_examples_per_second").set(s.examples_per_second);
            metrics::gauge!("finetuned_training_loss").set(s.loss);
            metrics::counter!("finetuned_training_steps_total").increment(1);
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
            let mut summary = json!({"train_loss": e.train_loss, "validation": {
                "loss": e.loss, "accuracy": e.report.accuracy, "macro_f1": e.report.macro_f1}, "epoch": e.epoch});
            if let Some(mib) = e.peak_gpu_mib {
                summary["peak_gpu_mib"] = json!(mib);
                metrics::gauge!("finetuned_training_gpu_memory_peak_mib").set(mib as f64);
            }
            let msg = format!(
                "epoch {}: train loss {:.4}, validation loss {:.4}, accuracy {:.4}, macro-F1 {:.4}",
                e.epoch, e.train_loss, e.loss, e.report.accuracy, e.report.macro_f1
            );
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

async fn record_pretrain(pool: &Pool, job: &str, r: mlm::MlmReport) -> sqlx::Result<()> {
    let data = serde_json::to_value(&r).unwrap_or(Value::Null);
    let msg = match r.train_loss {
        None => format!("before training: validation MLM loss {:.4}, perplexity {:.2}", r.loss, r.perplexity),
        Some(t) => format!("epoch {}: train loss {t:.4}, validation MLM loss {:.4}, perplexity {:.2}", r.epoch, r.loss, r.perplexity),
    };
    jobs::add_validation_metric(pool, job, r.epoch as i64, &data).await?;
    let summary = json!({"train_loss": r.train_loss, "validation": {"loss": r.loss, "perplexity": r.perplexity}, "epoch": r.epoch});
    jobs::set_metrics(pool, job, &summary).await?;
    jobs::add_event(pool, job, "info", "metrics", &msg, Some(&data)).await
}
