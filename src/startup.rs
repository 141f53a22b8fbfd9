//! Building and running the application: database, worker, predictor and HTTP server.

use crate::api::{self, AppState};
use crate::catalog::Catalog;
use crate::config::{self, ServeConfig};
use crate::model::predict::predictor::Weights;
use crate::serve::Predictor;
use crate::store::{self, jobs};
use crate::train::worker::{run_worker_until_stopped, JobQueue, WorkerContext};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built, bound application, ready to run.
pub struct Application {
    addr: SocketAddr,
    listener: TcpListener,
    state: AppState,
    workers: Vec<WorkerContext>,
    webhook_signer: Option<crate::webhooks::Signer>,
    shutdown: CancellationToken,
}

/// How long a stop waits for in-flight requests, and then for the running job to checkpoint.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a leftover may be removed. When other processes share the data dir (`--role api` or
/// `worker`), what is younger than an hour may be another process's upload or model being
/// written, so only older leftovers go.
fn stale(path: &Path, shared: bool) -> bool {
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
    !shared || std::fs::metadata(path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > HOUR)
}

/// Removes what a crash may have left: temp files and directories, dataset files and model
/// directories that no database row names.
async fn clean_data_dir(pool: &crate::store::Pool, data_dir: &Path, shared: bool) -> anyhow::Result<()> {
    let keep: std::collections::HashSet<String> =
        store::datasets::all_paths(pool).await?.into_iter().chain(store::models::all_paths(pool).await?).collect();
    for sub in ["datasets", "models"] {
        let dir = data_dir.join(sub);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let rel = format!("{sub}/{name}");
            if (name.starts_with(".tmp-") || !keep.contains(&rel)) && stale(&entry.path(), shared) {
                tracing::warn!(path = %entry.path().display(), "removing leftover file");
                let p = entry.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    // Checkpoints are kept only for jobs that may still resume; a save cut short leaves a temp dir.
    let active: std::collections::HashSet<String> = jobs::active_ids(pool).await?.into_iter().collect();
    // A job running under a live lease is being checkpointed by its worker, maybe in another process.
    let leased: std::collections::HashSet<String> = jobs::leased_ids(pool).await?.into_iter().collect();
    let ckpts = data_dir.join("checkpoints");
    std::fs::create_dir_all(&ckpts)?;
    for entry in std::fs::read_dir(&ckpts)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !active.contains(&name) {
            tracing::warn!(path = %entry.path().display(), "removing the checkpoints of a job that has ended");
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        if leased.contains(&name) {
            continue;
        }
        for inner in std::fs::read_dir(entry.path())?.flatten() {
            if inner.file_name().to_string_lossy().starts_with(".tmp-") {
                tracing::warn!(path = %inner.path().display(), "removing an unfinished checkpoint");
                let _ = std::fs::remove_dir_all(inner.path());
            }
        }
    }
    Ok(())
}

impl Application {
    /// Opens the database (migrating it), recovers from an earlier stop, scans the models
    /// dir and binds the listener.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        // Settings are checked before anything on disk is touched.
        let asked = Weights::parse(&config.predict_dtype)
            .ok_or_else(|| anyhow::anyhow!("--predict-dtype: {:?} is not one of f32, bf16", config.predict_dtype))?;
        let webhook_signer = match &config.webhook_secret {
            Some(secret) => Some(crate::webhooks::Signer::new(secret).map_err(|e| anyhow::anyhow!("--webhook-secret: {e}"))?),
            None => None,
        };
        let dir = config.data_dir.display().to_string();
        std::fs::create_dir_all(&config.data_dir).with_context(|| format!("cannot create the data dir {dir}"))?;
        let probe = config.data_dir.join(format!(".tmp-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"").with_context(|| format!("the data dir {dir} is not writable"))?;
        let _ = std::fs::remove_file(&probe);
        let pool = match store::connect(&config.data_dir, config.database_url.as_deref()).await {
            Ok(pool) => pool,
            // On a full disk SQLite cannot even create its shared-memory file; the reserve is
            // there for this: freed, the server starts, serves reads and answers writes 503.
            Err(e) if crate::reserve::release(&config.data_dir) => {
                tracing::warn!(error = %format!("{e:#}"), "opening the database failed; retrying with the reserve freed");
                store::connect(&config.data_dir, config.database_url.as_deref())
                    .await
                    .with_context(|| format!("cannot open the database in the data dir {dir}"))?
            }
            Err(e) => {
                let free = crate::reserve::free_bytes(&config.data_dir).map_or(String::new(), |b| format!(" ({} KiB free)", b >> 10));
                return Err(e).with_context(|| format!("cannot open the database in the data dir {dir}{free}"));
            }
        };
        if let Err(e) = crate::reserve::ensure(&config.data_dir) {
            tracing::warn!(error = %e, "the data dir has no room for its {} MiB reserve", crate::reserve::SIZE >> 20);
        }
        let worker_name = config.worker_name();
        let worker_devices = config.worker_devices();
        let worker_ids: Vec<String> = match worker_devices.len() {
            1 => vec![worker_name.clone()],
            _ => {
                worker_devices.iter().enumerate().map(|(i, d)| format!("{worker_name}/{i}-{}", d.as_deref().unwrap_or("default"))).collect()
            }
        };
        // This process's own jobs, interrupted when it stopped, are taken back at once; other
        // workers' jobs are theirs until their leases run out.
        if config.runs_worker() {
            for me in &worker_ids {
                for id in jobs::requeue_running(&pool, me).await? {
                    tracing::warn!(job_id = %id, "job was running when the server stopped; queued again");
                    jobs::add_event(&pool, &id, "warning", "message", "the server stopped while this job ran; it was queued again", None)
                        .await?;
                }
            }
        }
        clean_data_dir(&pool, &config.data_dir, config.role != "all").await?;
        let device = config::device(config.device.as_deref())?;
        let precision = crate::train::precision::Precision::parse(&config.dtype, &device).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
        let objects = crate::objects::Objects::open(config.object_store.as_deref(), &config.data_dir)?;
        let catalog = Arc::new(Catalog::new(config.models_dir.clone(), config.data_dir.clone(), pool.clone(), objects));
        register_base_folders(&config);
        let queue = JobQueue::default();
        let infer_pool = crate::compute::pool("predict", config.predict_threads)?;
        let mut predictor =
            Predictor::new(device.clone(), config.model_cache_size, config.model_cache_mib, config.max_concurrent_predicts, infer_pool);
        predictor.weights = asked.effective(&device);
        predictor.set_adapter_budget_mib(config.adapter_cache_mib);
        predictor.limits.rejoin_wait = std::time::Duration::from_millis(config.batch_rejoin_wait_ms);
        if predictor.weights != asked {
            tracing::warn!("--predict-dtype bf16 needs a CPU with AVX512-BF16; predicting in f32");
        }
        let listener = TcpListener::bind(&config.addr).await?;
        let addr = listener.local_addr()?;
        let mut workers = Vec::new();
        if config.runs_worker() {
            let threads = crate::compute::pool("train", config.train_threads)?;
            for (spec, worker_id) in worker_devices.iter().zip(worker_ids) {
                let device = if config.devices.is_empty() { device.clone() } else { config::device(spec.as_deref())? };
                workers.push(WorkerContext {
                    pool: pool.clone(),
                    catalog: catalog.clone(),
                    data_dir: config.data_dir.clone(),
                    device,
                    queue: queue.clone(),
                    threads: threads.clone(),
                    hub: crate::hub::HubConfig::new(config.hf_endpoint.clone(), config.hf_home.as_deref(), &config.data_dir),
                    checkpoint_every: config.checkpoint_every,
                    keep_checkpoints: config.keep_checkpoints,
                    precision,
                    worker_id,
                    lease: std::time::Duration::from_secs(config.lease_seconds),
                    poll_interval: std::time::Duration::from_millis(config.poll_interval_ms),
                });
            }
        }
        let shutdown = CancellationToken::new();
        let state = AppState {
            pool,
            config: Arc::new(config),
            catalog,
            queue,
            predictor,
            metrics: crate::monitoring::prometheus(),
            shutdown: shutdown.clone(),
        };
        Ok(Self { addr, listener, state, workers, webhook_signer, shutdown })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The predictor, for tests that reach under the HTTP layer (its test hooks).
    #[doc(hidden)]
    pub fn predictor(&self) -> Predictor {
        self.state.predictor.clone()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Cancelling this token stops the server gracefully (as SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token fires; then stops accepting, finishes in-flight
    /// requests, and waits for the worker to put a running job back in the queue.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!("listening on http://{}", self.addr);
        let shutdown = self.shutdown.clone();
        let worker =
            tokio::spawn(futures::future::join_all(self.workers.into_iter().map(move |w| run_worker_until_stopped(w, shutdown.clone()))));
        let timeout = self.state.config.webhook_timeout_seconds;
        let webhooks = tokio::spawn(crate::webhooks::run_until_stopped(
            self.state.pool.clone(),
            self.webhook_signer,
            std::time::Duration::from_secs(timeout),
            self.shutdown.clone(),
        ));
        let app = api::router(self.state.clone());
        let token = self.shutdown.clone();
        let server = axum::serve(self.listener, app).with_graceful_shutdown(token.clone().cancelled_owned());
        // The stop is bounded: requests still running after the grace period are cut off, and a
        // job still busy (say, in a long evaluation) is left `running`, so the next start-up
        // queues it again and it resumes from its newest checkpoint.
        let deadline = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            served = server => served?,
            _ = deadline => tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway"),
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, worker).await.is_err() {
            tracing::warn!(
                "the running job did not stop within {SHUTDOWN_GRACE:?}; it resumes from its newest checkpoint at the next start"
            );
            return Ok(());
        }
        let _ = webhooks.await;
        self.state.pool.close().await;
        Ok(())
    }
}

/// Lets a LoRA adapter name its base by catalog id: a models-dir model, a trained model, or a
/// hub repo in the cache (see `model::hf::lora::find_base`).
fn register_base_folders(config: &ServeConfig) {
    let folders = [config.models_dir.clone(), config.data_dir.join("models")];
    let hub = crate::hub::HubConfig::new(config.hf_endpoint.clone(), config.hf_home.as_deref(), &config.data_dir).cache_dir;
    crate::model::hf::lora::add_base_resolver(std::sync::Arc::new(move |id: &str| {
        let one_component =
            matches!(std::path::Path::new(id).components().collect::<Vec<_>>().as_slice(), [std::path::Component::Normal(_)]);
        let in_folder = folders.iter().map(|f| f.join(id)).find(|d| one_component && d.is_dir());
        in_folder.or_else(|| crate::hub::cached(id, &hub))
    }));
}
