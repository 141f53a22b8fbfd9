//! Checkpoints of a fine-tuning run: weights, optimiser moments and step, the generator's
//! position, where in the data order the run stands, the running epoch sums and the best
//! epoch so far — everything needed to go on exactly as an uninterrupted run would.
//!
//! One directory per checkpoint, `<dir>/step-00000120/`, written under a temp name and renamed
//! into place with `checkpoint.json` last, so a crash mid-save leaves no checkpoint that looks
//! whole. Only the newest `keep` are kept.

use super::events::{EpochReport, Event, MlmReport, Observer};
use super::optim::{AdamW, OptimState};
use crate::model::encoder::params::Params;
use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const META: &str = "checkpoint.json";
const PARAMS: &str = "params.safetensors";
const OPTIM: &str = "optimizer.safetensors";
const BEST: &str = "best.safetensors";

/// Where and how often a run saves checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    pub dir: PathBuf,
    /// Steps between checkpoints; 0 saves only when the server stops.
    pub every: usize,
    /// How many of the newest checkpoints to keep (at least 1).
    pub keep: usize,
    /// Told of each checkpoint saved, with every checkpoint kept: copies them where other
    /// processes find them (the object store). An error is reported as a warning.
    pub mirror: Option<Mirror>,
}

/// See [`CheckpointPlan::mirror`]: `(saved, kept)`.
#[derive(Clone)]
pub struct Mirror(pub std::sync::Arc<MirrorFn>);

/// The function behind a [`Mirror`].
pub type MirrorFn = dyn Fn(&Path, &[PathBuf]) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mirror")
    }
}

/// The file a checkpoint directory is whole with: written last, and copied last.
pub const COMPLETE_WITH: &str = META;

/// What a checkpoint records besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimisation steps done.
    pub step: usize,
    /// The epoch in progress (1-based) and how many of its batches are done.
    pub epoch: usize,
    pub batches_done: usize,
    /// Running sums of the epoch in progress.
    pub loss_sum: f64,
    pub seen: usize,
    pub real_tokens: usize,
    pub padded_tokens: usize,
    /// The dropout generator's position (a u128, as text).
    pub rng_word_pos: String,
    pub optimizer_step: i32,
    /// Epochs since the best one (early stopping), and the best epoch's report.
    pub since_best: usize,
    pub best: Option<EpochReport>,
    pub num_parameters: usize,
    pub created_at: i64,
    /// Pre-training runs: held-out loss before training, and the last epoch's report.
    #[serde(default)]
    pub mlm_before: Option<f64>,
    #[serde(default)]
    pub mlm_last: Option<MlmReport>,
}

impl CheckpointMeta {
    /// Mean training loss of the epoch in progress so far.
    pub fn epoch_train_loss(&self) -> Option<f64> {
        (self.seen > 0).then(|| self.loss_sum / self.seen as f64)
    }

    pub fn rng_word_pos(&self) -> anyhow::Result<u128> {
        self.rng_word_pos.parse().context("bad generator position")
    }
}

fn name_of(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint and prunes all but the newest `plan.keep`.
pub fn save(
    plan: &CheckpointPlan,
    meta: &CheckpointMeta,
    params: &Params,
    opt: &AdamW,
    best: Option<&HashMap<String, Tensor>>,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&plan.dir)?;
    let name = name_of(meta.step);
    let tmp = plan.dir.join(format!(".tmp-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> anyhow::Result<()> {
        let weights: HashMap<String, Tensor> =
            params.names.iter().cloned().zip(params.vars.iter().map(|v| v.as_detached_tensor())).collect();
        candle_core::safetensors::save(&weights, tmp.join(PARAMS))?;
        let state = opt.export()?;
        let mut moments = HashMap::new();
        for (n, m) in params.names.iter().zip(state.moments) {
            if let Some((m, v)) = m {
                moments.insert(format!("m.{n}"), m);
                moments.insert(format!("v.{n}"), v);
            }
        }
        candle_core::safetensors::save(&moments, tmp.join(OPTIM))?;
        if let Some(b) = best {
            candle_core::safetensors::save(b, tmp.join(BEST))?;
        }
        let meta = CheckpointMeta { optimizer_step: state.step, ..meta.clone() };
        std::fs::write(tmp.join(META), serde_json::to_vec_pretty(&meta)?)?;
        for entry in std::fs::read_dir(&tmp)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        let dest = plan.dir.join(&name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::rename(&tmp, &dest)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let all = list(&plan.dir);
    for (path, _) in all.iter().take(all.len().saturating_sub(plan.keep.max(1))) {
        let _ = std::fs::remove_dir_all(path);
    }
    Ok(plan.dir.join(name))
}

/// Saves a checkpoint and tells the observer; a failure to save is a warning and the run goes on.
pub fn save_and_report(
    plan: &CheckpointPlan,
    meta: &CheckpointMeta,
    params: &Params,
    opt: &AdamW,
    best: Option<&HashMap<String, Tensor>>,
    obs: &mut dyn Observer,
) {
    obs.wait_recorded();
    match save(plan, meta, params, opt, best) {
        Ok(saved) => {
            obs.on_event(Event::Message(format!("checkpoint saved at step {} (epoch {})", meta.step, meta.epoch)));
            if let Some(Mirror(mirror)) = &plan.mirror {
                let kept: Vec<PathBuf> = list(&plan.dir).into_iter().map(|(p, _)| p).collect();
                if let Err(e) = mirror(&saved, &kept) {
                    obs.on_event(Event::Warning(format!(
                        "the checkpoint at step {} could not be copied to the object store: {e}",
                        meta.step
                    )));
                }
            }
        }
        Err(e) => obs.on_event(Event::Warning(format!("could not save a checkpoint at step {}: {e:#}", meta.step))),
    }
}

/// Every whole checkpoint in `dir`, oldest first. Temp dirs and unreadable entries are skipped.
pub fn list(dir: &Path) -> Vec<(PathBuf, CheckpointMeta)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut found: Vec<(PathBuf, CheckpointMeta)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .filter_map(|e| {
            let meta = serde_json::from_slice(&std::fs::read(e.path().join(META)).ok()?).ok()?;
            Some((e.path(), meta))
        })
        .collect();
    found.sort_by_key(|(_, m)| m.step);
    found
}

/// Where a job's checkpoints live in the data dir.
pub fn job_dir(data_dir: &Path, job: &str) -> PathBuf {
    data_dir.join("checkpoints").join(job)
}

/// One whole checkpoint of a job: its name (`step-00000120`) and record.
pub struct JobCheckpoint {
    pub name: String,
    pub meta: CheckpointMeta,
}

/// Every whole checkpoint of `job` in the data dir, oldest first (reads the disk: call off the
/// async runtime).
pub fn of_job(data_dir: &Path, job: &str) -> Vec<JobCheckpoint> {
    list(&job_dir(data_dir, job))
        .into_iter()
        .map(|(path, meta)| JobCheckpoint { name: path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), meta })
        .collect()
}

/// The newest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Option<(PathBuf, CheckpointMeta)> {
    list(dir).pop()
}

/// Loads a checkpoint into `params` and `opt` (checked whole before anything is changed) and
/// returns the best epoch's weights when it has them.
pub fn load(
    path: &Path,
    meta: &CheckpointMeta,
    params: &Params,
    opt: &mut AdamW,
    device: &Device,
) -> anyhow::Result<Option<HashMap<String, Tensor>>> {
    let weights = candle_core::safetensors::load(path.join(PARAMS), device)?;
    let mut moments = candle_core::safetensors::load(path.join(OPTIM), device)?;
    for (n, v) in params.names.iter().zip(&params.vars) {
        let w = weights.get(n).with_context(|| format!("checkpoint has no parameter {n}"))?;
        anyhow::ensure!(w.shape() == v.shape(), "parameter {n} is {:?} in the checkpoint, {:?} in the model", w.shape(), v.shape());
    }
    anyhow::ensure!(weights.len() == params.names.len(), "checkpoint has {} parameters, the model {}", weights.len(), params.names.len());
    let best = if meta.best.is_some() { Some(candle_core::safetensors::load(path.join(BEST), device)?) } else { None };
    let state = OptimState {
        step: meta.optimizer_step,
        moments: params.names.iter().map(|n| Some((moments.remove(&format!("m.{n}"))?, moments.remove(&format!("v.{n}"))?))).collect(),
    };
    opt.restore(&params.vars, state)?;
    for (n, v) in params.names.iter().zip(&params.vars) {
        v.set(&weights[n])?;
    }
    Ok(best)
}

/// Removes every checkpoint of a run (once its job has ended).
pub fn remove_all(dir: &Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove checkpoints");
        }
    }
}
