//! Job preparation: the job's checkpoint (fetched from the object store when it ran elsewhere),
//! its base model, datasets and hyperparameters, turned into a training request.

use super::record::event;
use super::WorkerContext;
use crate::dataset::read_stored;
use crate::store::datasets;
use crate::store::jobs::{JobRecord, JobTask};
use crate::train::hyper::Hyperparameters;
use crate::train::mlm::{MlmRequest, ScratchSpec, Start};
use crate::train::objective::Task;
use crate::train::trainer::{TrainError, TrainRequest};
use std::path::PathBuf;
use std::sync::Arc;

/// A job taken over from a worker elsewhere has its checkpoints in the object store, not here:
/// fetches the newest whole one (true when one arrived). Without it the job starts over (with
/// a warning when the store could not be read).
pub(super) async fn fetch_checkpoint(ctx: &WorkerContext, job: &str) -> bool {
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
        if ctx.data_dir.join(&one).join(crate::train::checkpoint::COMPLETE_WITH).exists() {
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
pub(super) fn checkpoint_mirror(ctx: &WorkerContext, job: &str) -> Option<(crate::train::checkpoint::Mirror, tokio::task::JoinHandle<()>)> {
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
                objects.put_last(&saved, Some(crate::train::checkpoint::COMPLETE_WITH)).await?;
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
    let mirror = crate::train::checkpoint::Mirror(Arc::new(move |saved: &std::path::Path, kept: &[PathBuf]| {
        let _ = tx.send(Some((saved.to_path_buf(), kept.to_vec())));
        Ok(())
    }));
    Some((mirror, task))
}

/// What a job runs.
pub(super) enum Work {
    Classify(TrainRequest),
    Pretrain(MlmRequest),
}

/// Reads the job's datasets and resolves its base model and output path.
/// Also returns the pooling the job trains with (`auto` resolved against the base model).
pub(super) async fn prepare(
    ctx: &WorkerContext,
    job: &JobRecord,
    mirror: Option<crate::train::checkpoint::Mirror>,
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
    let checkpoints = Some(crate::train::checkpoint::CheckpointPlan {
        dir: crate::train::checkpoint::job_dir(&ctx.data_dir, &job.id),
        every: ctx.checkpoint_every,
        keep: ctx.keep_checkpoints,
        mirror,
    });
    if job.task == JobTask::Mlm {
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
        base_id: Some(base.id.clone()),
        out_dir,
        checkpoints,
        task: match job.task {
            JobTask::MultiLabelClassification => Task::MultiLabel,
            JobTask::Regression => Task::Regression,
            JobTask::Rerank => Task::Rerank,
            JobTask::TokenClassification => Task::Tokens,
            JobTask::Classification | JobTask::Mlm => Task::SingleLabel,
        },
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
    let info = crate::model::hf::artifacts::inspect(&dir)
        .map_err(|e| TrainError::BaseModel(format!("{repo} from the hub is not a supported checkpoint: {e:#}")))?;
    Ok(crate::catalog::Resolved {
        id: repo.clone(),
        path: dir,
        stored_at: None,
        is_classifier: info.labels.is_some(),
        auto_pooling: info.auto_pooling(),
    })
}
