//! The epoch and step driver that fine-tuning and masked-LM pre-training share: resuming from
//! the newest checkpoint, periodic checkpoints, stopping (cancel or server stop), the
//! mixed-precision step with loss scaling, and progress events. What differs between them (the
//! batches, the loss, what an epoch ends with) comes from an [`Objective`].

use super::checkpoint::{self, CheckpointMeta, CheckpointPlan};
use super::events::{Event, Observer, StepInfo, TrainError};
use super::hyper::Hyperparameters;
use super::optim::{linear_schedule, AdamW};
use super::precision::{LossScaler, Precision};
use crate::model::encoder::params::Params;
use crate::model::encoder::Getter;
use crate::model::ops::tape::backward;
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Steps of a run: per epoch, in all, and of learning-rate warm-up.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub warmup: usize,
}

impl Schedule {
    /// The schedule of `n_train` examples in batches of `hp.batch_size` for `hp.epochs`.
    pub fn new(n_train: usize, hp: &Hyperparameters) -> Self {
        let steps_per_epoch = n_train.div_ceil(hp.batch_size);
        let total_steps = steps_per_epoch * hp.epochs;
        let warmup = (hp.warmup_ratio * total_steps as f64).ceil() as usize;
        Self { steps_per_epoch, total_steps, warmup }
    }
}

/// Running sums of the epoch in progress (a checkpoint holds them, to resume mid-epoch).
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochSums {
    /// Batches of the epoch done (skipped ones too).
    pub done: usize,
    pub loss_sum: f64,
    /// The weight of the batches in `loss_sum` (see [`Objective::weight`]).
    pub seen: usize,
    pub real_tokens: usize,
    pub padded_tokens: usize,
}

/// An epoch's training, as the loop saw it.
pub struct EpochEnd {
    pub epoch: usize,
    /// Optimisation steps done so far in the run.
    pub step: usize,
    pub sums: EpochSums,
    pub train_seconds: f64,
    /// Process CPU seconds of the epoch's training loop.
    pub train_cpu_seconds: f64,
    /// Peak device memory of the run so far (GPU runs only), MiB.
    pub peak_gpu_mib: Option<u64>,
}

impl EpochEnd {
    /// The epoch's mean training loss.
    pub fn train_loss(&self) -> f64 {
        self.sums.loss_sum / self.sums.seen.max(1) as f64
    }
}

/// What a kind of training brings to the shared loop.
pub trait Objective {
    /// The network trained.
    type Model;
    /// One batch, ready for the forward pass.
    type Batch;

    /// Builds the network over `weights` (the f32 masters, or one step's cast of them).
    fn model(&self, weights: &Getter) -> candle_core::Result<Self::Model>;
    /// The batches of `epoch` (1-based), as indices into the training data.
    fn batches(&self, epoch: usize) -> Vec<Vec<usize>>;
    /// Prepares one batch (it may draw from `rng`, and tally tokens in `sums`); `None` when the
    /// batch has nothing to learn from: it is skipped without a step.
    fn prepare(&mut self, indices: &[usize], rng: &mut ChaCha8Rng, sums: &mut EpochSums) -> Result<Option<Self::Batch>, TrainError>;
    /// The batch's training loss, an f32 scalar.
    fn loss(&self, model: &Self::Model, batch: &Self::Batch, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError>;
    /// How much a batch counts in the epoch's mean training loss.
    fn weight(&self, indices: &[usize]) -> usize;
    /// Whether a checkpoint can resume this run, checked before anything is loaded.
    fn resumable(&self, _meta: &CheckpointMeta) -> anyhow::Result<()> {
        Ok(())
    }
    /// Takes over what a checkpoint recorded of this objective (and the best weights it kept).
    fn resumed(&mut self, meta: &CheckpointMeta, best: Option<HashMap<String, Tensor>>);
    /// Runs once, after any resume and before the first step.
    fn begin(&mut self, _resumed: bool, _obs: &mut dyn Observer) -> Result<(), TrainError> {
        Ok(())
    }
    /// Adds this objective's state to a checkpoint's record.
    fn record(&self, meta: &mut CheckpointMeta);
    /// The best epoch's weights, when it keeps them (they go into checkpoints).
    fn best_weights(&self) -> Option<&HashMap<String, Tensor>> {
        None
    }
    /// Evaluates and reports after an epoch; true stops the run early.
    fn end_epoch(&mut self, end: EpochEnd, obs: &mut dyn Observer) -> Result<bool, TrainError>;
}

/// What the loop needs besides the objective.
pub struct Run<'a> {
    pub params: &'a Params,
    pub hp: &'a Hyperparameters,
    pub schedule: Schedule,
    pub device: &'a Device,
    /// What the steps compute in.
    pub precision: Precision,
    /// Global L2 norm gradients are clipped to.
    pub max_grad_norm: f64,
    pub checkpoints: Option<&'a CheckpointPlan>,
    /// For the first `.0` steps only the parameters `.1` accepts train; the others are held
    /// (no gradient flows into them): a freshly made head learns before it moves the encoder.
    pub head_first: Option<HeadFirst>,
}

/// Steps at the start, and which parameters train during them (see [`Run::head_first`]).
pub type HeadFirst = (usize, fn(&str) -> bool);

/// How the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every epoch ran, or early stopping ended the run.
    Completed,
    /// The observer asked to stop (a server stop checkpoints first).
    Cancelled,
}

/// Trains `obj` from the newest checkpoint of the run (or from the start) to its last epoch,
/// or until the observer says stop.
pub fn drive<O: Objective>(run: Run, obj: &mut O, rng: &mut ChaCha8Rng, obs: &mut dyn Observer) -> Result<Ended, TrainError> {
    let Run { params, hp, schedule, device, precision, max_grad_norm, checkpoints, head_first } = run;
    let decay: Vec<bool> = params.names.iter().map(|n| Params::decays(n)).collect();
    let mut opt = AdamW::new(decay.clone(), hp.weight_decay);
    let mut step = 0usize;
    let mut resumed: Option<CheckpointMeta> = None;
    if let Some((path, meta)) = checkpoints.and_then(|p| checkpoint::latest(&p.dir)) {
        let loaded = obj
            .resumable(&meta)
            .and_then(|_| meta.rng_word_pos())
            .and_then(|pos| Ok((pos, checkpoint::load(&path, &meta, params, &mut opt, device)?)));
        match loaded {
            Ok((pos, best)) => {
                rng.set_word_pos(pos);
                step = meta.step;
                obj.resumed(&meta, best);
                obs.on_event(Event::Message(format!("resumed from the checkpoint at step {step} (epoch {})", meta.epoch)));
                resumed = Some(meta);
            }
            Err(e) => {
                opt = AdamW::new(decay, hp.weight_decay);
                obs.on_event(Event::Warning(format!("the checkpoint at step {} could not be used ({e:#}): starting over", meta.step)));
            }
        }
    }
    obj.begin(resumed.is_some(), obs)?;
    let model_train = obj.model(&|n| params.tracked(n))?;
    // The network of the head-only steps: the other parameters enter it detached.
    let (head_steps, trains_first) = head_first.unwrap_or((0, |_| true));
    let held = |n: &str| if trains_first(n) { params.tracked(n) } else { params.detached(n) };
    let model_head = if step < head_steps { Some(obj.model(&held)?) } else { None };
    let mut scaler = LossScaler::new(precision);
    let mut saved_at = step;
    let mut peak_gpu: Option<u64> = None;
    let first_epoch = resumed.as_ref().map_or(1, |m| m.epoch);
    for epoch in first_epoch..=hp.epochs {
        let batches = obj.batches(epoch);
        let mut sums = match resumed.take() {
            Some(m) if m.epoch == epoch => EpochSums {
                done: m.batches_done,
                loss_sum: m.loss_sum,
                seen: m.seen,
                real_tokens: m.real_tokens,
                padded_tokens: m.padded_tokens,
            },
            _ => EpochSums::default(),
        };
        let started = Instant::now();
        let cpu_start = super::process_usage().0;
        let mut window: VecDeque<(Instant, usize)> = VecDeque::new();
        for indices in batches.iter().skip(sums.done) {
            // Everything a checkpoint taken now must hold to continue from this batch.
            let position = || {
                let mut meta = CheckpointMeta {
                    step,
                    epoch,
                    batches_done: sums.done,
                    loss_sum: sums.loss_sum,
                    seen: sums.seen,
                    real_tokens: sums.real_tokens,
                    padded_tokens: sums.padded_tokens,
                    rng_word_pos: rng.get_word_pos().to_string(),
                    optimizer_step: 0,
                    since_best: 0,
                    best: None,
                    num_parameters: params.count(),
                    created_at: crate::store::now(),
                    mlm_before: None,
                    mlm_last: None,
                };
                obj.record(&mut meta);
                meta
            };
            if obs.should_stop() {
                if let Some(plan) = checkpoints.filter(|_| obs.shutting_down() && saved_at != step) {
                    checkpoint::save_and_report(plan, &position(), params, &opt, obj.best_weights(), obs);
                }
                return Ok(Ended::Cancelled);
            }
            if let Some(plan) = checkpoints.filter(|p| p.every > 0 && step.is_multiple_of(p.every) && saved_at != step) {
                checkpoint::save_and_report(plan, &position(), params, &opt, obj.best_weights(), obs);
                saved_at = step;
            }
            let Some(batch) = obj.prepare(indices, rng, &mut sums)? else {
                sums.done += 1;
                continue;
            };
            let t_fwd = Instant::now();
            // Mixed precision: this step's weights, cast from the f32 masters.
            let cast;
            let head_only = step < head_steps;
            let model = match (precision, &model_head) {
                (Precision::F32, Some(m)) if head_only => m,
                (Precision::F32, _) => &model_train,
                _ => {
                    cast = if head_only {
                        obj.model(&|n| precision.cast(held(n)?))?
                    } else {
                        obj.model(&|n| precision.cast(params.tracked(n)?))?
                    };
                    &cast
                }
            };
            let loss = obj.loss(model, &batch, rng)?;
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged(loss_value, step + 1));
            }
            let t_bwd = Instant::now();
            let grads = if scaler.scale() == 1.0 { backward(&loss)? } else { backward(&(&loss * scaler.scale())?)? };
            // The activations and gradients are all alive here: the step's high-water mark.
            if let Some(used) = crate::model::device_memory_mib(device) {
                peak_gpu = Some(peak_gpu.map_or(used, |p| p.max(used)));
            }
            let t_opt = Instant::now();
            let lr = linear_schedule(hp.learning_rate, step, schedule.warmup, schedule.total_steps);
            let stepped = opt.step_scaled(&params.vars, &grads, lr, max_grad_norm, scaler.scale())?;
            scaler.update(stepped.is_some());
            tracing::debug!(
                forward_ms = (t_bwd - t_fwd).as_millis() as u64,
                backward_ms = (t_opt - t_bwd).as_millis() as u64,
                optimizer_ms = t_opt.elapsed().as_millis() as u64,
                batch = indices.len(),
                "step timings"
            );
            step += 1;
            sums.done += 1;
            let weight = obj.weight(indices);
            sums.loss_sum += loss_value * weight as f64;
            sums.seen += weight;
            window.push_back((Instant::now(), indices.len()));
            if window.len() > 20 {
                window.pop_front();
            }
            obs.on_event(Event::Step(StepInfo {
                epoch,
                step,
                total_steps: schedule.total_steps,
                loss: loss_value,
                learning_rate: lr,
                examples_per_second: rate_of(&window, started),
                seconds: t_fwd.elapsed().as_secs_f64(),
            }));
        }
        let end = EpochEnd {
            epoch,
            step,
            sums,
            train_seconds: started.elapsed().as_secs_f64(),
            train_cpu_seconds: super::process_usage().0 - cpu_start,
            peak_gpu_mib: peak_gpu,
        };
        if obj.end_epoch(end, obs)? {
            break;
        }
    }
    // Training is over: a server stop lets the result be written (seconds) rather than redo work.
    if obs.should_stop() && !obs.shutting_down() {
        return Ok(Ended::Cancelled);
    }
    Ok(Ended::Completed)
}

/// Examples per second over the last steps of `window` (since `started` for the first).
fn rate_of(window: &VecDeque<(Instant, usize)>, started: Instant) -> f64 {
    let examples: usize = window.iter().map(|(_, n)| n).sum();
    let since = if window.len() > 1 { window.front().unwrap().0 } else { started };
    let first = if window.len() > 1 { window.front().unwrap().1 } else { 0 };
    let secs = window.back().map(|(t, _)| t.duration_since(since).as_secs_f64()).unwrap_or(0.0);
    if secs > 0.0 {
        (examples - first) as f64 / secs
    } else {
        0.0
    }
}
