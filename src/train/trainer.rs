//! The fine-tuning loop: blocking, device-agnostic, reporting through an [`Observer`].
//! Shared by the service's worker and the `train` command.

use super::checkpoint::{self, CheckpointMeta, CheckpointPlan};
use super::data::{epoch_batches, label_set, stratified_split, Example};
pub use super::events::{EpochReport, EpochStats, Event, Finished, Observer, Outcome, RunStats, StepInfo, TestReport, TrainError};
use super::hyper::Hyperparameters;
use super::objective::{balanced_weights, prior_log_odds, Task};
use super::optim::{linear_schedule, AdamW};
use super::precision::{LossScaler, Precision};
use crate::dataset::Row;
use crate::model::artifacts::{inspect, load_weights, write_model_dir};
use crate::model::layers::Mode;
use crate::model::params::Params;
use crate::model::tokenize::{encode_all, load_tokenizer, pad_batch, truncate};
use crate::model::{BertConfig, Classifier, Pooling};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

/// Everything one fine-tuning run needs.
pub struct TrainRequest {
    pub base_dir: PathBuf,
    pub train_rows: Vec<Row>,
    pub validation_rows: Option<Vec<Row>>,
    pub hp: Hyperparameters,
    /// Scored with the kept weights after training, when given.
    pub test_rows: Option<Vec<Row>>,
    pub device: Device,
    /// Where the finished model directory goes (written atomically), if anywhere.
    pub out_dir: Option<PathBuf>,
    /// Global L2 norm gradients are clipped to.
    pub max_grad_norm: f64,
    pub eval_batch_size: usize,
    pub task: Task,
    /// Where to checkpoint, and resume from the newest checkpoint found there.
    pub checkpoints: Option<CheckpointPlan>,
    /// What the training steps compute in (evaluation and the saved weights are f32).
    pub precision: Precision,
}

impl TrainRequest {
    /// A request with the usual defaults (clipping at 1.0, evaluation batches of 64).
    pub fn new(base_dir: PathBuf, train_rows: Vec<Row>, validation_rows: Option<Vec<Row>>, hp: Hyperparameters, device: Device) -> Self {
        Self {
            base_dir,
            train_rows,
            validation_rows,
            hp,
            test_rows: None,
            device,
            out_dir: None,
            max_grad_norm: 1.0,
            eval_batch_size: 64,
            task: Task::SingleLabel,
            checkpoints: None,
            precision: Precision::F32,
        }
    }
}

fn to_examples(rows: &[Row], labels: &[String], tok: &tokenizers::Tokenizer, max_len: usize) -> anyhow::Result<Vec<Example>> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let ids = encode_all(tok, &texts)?;
    rows.iter()
        .zip(ids)
        .map(|(r, mut ids)| {
            truncate(&mut ids, max_len);
            let ids_of = r
                .labels()
                .iter()
                .map(|name| labels.binary_search_by(|l| l.as_str().cmp(name)).map_err(|_| anyhow::anyhow!("unknown label {name}")))
                .collect::<anyhow::Result<Vec<usize>>>()?;
            Ok(Example { ids, labels: ids_of })
        })
        .collect()
}

/// Runs a fine-tuning job to the end (or until the observer says stop).
pub fn run(req: TrainRequest, obs: &mut dyn Observer) -> Result<Outcome, TrainError> {
    crate::compute::keep_freed_memory();
    let hp = &req.hp;
    let t_load = Instant::now();
    let info = inspect(&req.base_dir).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let (train_rows, val_rows) = match req.validation_rows {
        Some(v) => (req.train_rows, v),
        None => {
            let (t, v) = stratified_split(req.train_rows, 0.1, hp.seed);
            obs.on_event(Event::Message(format!("held out {} of {} rows for validation (stratified 10 %)", v.len(), t.len() + v.len())));
            (t, v)
        }
    };
    if train_rows.is_empty() || val_rows.is_empty() {
        return Err(TrainError::InvalidData("training and validation data must each have at least one row".into()));
    }
    let seen: std::collections::HashSet<&str> = train_rows.iter().map(|r| r.text.as_str()).collect();
    let shared = val_rows.iter().filter(|r| seen.contains(r.text.as_str())).count();
    if shared > 0 {
        obs.on_event(Event::Warning(format!(
            "{shared} of {} validation texts also appear in the training data: validation scores will be optimistic",
            val_rows.len()
        )));
    }
    let test_rows = req.test_rows.unwrap_or_default();
    let labels = label_set(&train_rows, &[val_rows.as_slice(), test_rows.as_slice()].concat());
    if labels.len() < 2 {
        return Err(TrainError::InvalidData("classification needs at least two distinct labels".into()));
    }
    let tok = load_tokenizer(&req.base_dir).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let mut cfg: BertConfig = info.config.clone();
    let weights = load_weights(&req.base_dir, &req.device).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(hp.seed);
    let params =
        Params::for_classifier(&cfg, &weights, labels.len(), &mut rng, &req.device).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    drop(weights);
    let load_seconds = t_load.elapsed().as_secs_f64();
    let t_tok = Instant::now();
    let train = to_examples(&train_rows, &labels, &tok, hp.max_seq_len)?;
    let val = to_examples(&val_rows, &labels, &tok, hp.max_seq_len)?;
    let test = to_examples(&test_rows, &labels, &tok, hp.max_seq_len)?;
    let tokenize_seconds = t_tok.elapsed().as_secs_f64();
    let pooling = Pooling::parse(&hp.pooling).unwrap_or(Pooling::Cls);
    let task = req.task;
    if task == Task::MultiLabel {
        let prior = Tensor::new(prior_log_odds(&train, labels.len()), &req.device)?;
        params.set("classifier.bias", &prior)?;
    }
    let class_weights = hp.class_weights.as_ref().map(|_| balanced_weights(task, &train, labels.len(), &req.device)).transpose()?;

    let steps_per_epoch = train.len().div_ceil(hp.batch_size);
    let total_steps = steps_per_epoch * hp.epochs;
    let warmup = (hp.warmup_ratio * total_steps as f64).ceil() as usize;
    obs.on_event(Event::Message(format!(
        "training on {} examples, validating on {}; {} labels; {} steps ({} warmup); {} parameters; pooling {}",
        train.len(),
        val.len(),
        labels.len(),
        total_steps,
        warmup,
        params.count(),
        pooling.as_str()
    )));
    let mut stats = RunStats {
        load_seconds,
        tokenize_seconds,
        train_seconds: 0.0,
        n_train: train.len(),
        n_validation: val.len(),
        num_parameters: params.count(),
        steps_per_epoch,
        total_steps,
        warmup_steps: warmup,
        epochs: vec![],
    };
    let decay: Vec<bool> = params.names.iter().map(|n| Params::decays(n)).collect();
    let mut opt = AdamW::new(decay.clone(), hp.weight_decay);
    let pad = cfg.pad_token_id as u32;
    let mut step = 0usize;
    let mut best: Option<(EpochReport, std::collections::HashMap<String, Tensor>)> = None;
    let mut since_best = 0usize;
    let mut resumed = None;
    if let Some((path, meta)) = req.checkpoints.as_ref().and_then(|p| checkpoint::latest(&p.dir)) {
        let loaded = meta.rng_word_pos().and_then(|pos| Ok((pos, checkpoint::load(&path, &meta, &params, &mut opt, &req.device)?)));
        match loaded {
            Ok((pos, best_weights)) => {
                rng.set_word_pos(pos);
                step = meta.step;
                since_best = meta.since_best;
                best = meta.best.clone().zip(best_weights);
                obs.on_event(Event::Message(format!("resumed from the checkpoint at step {step} (epoch {})", meta.epoch)));
                resumed = Some(meta);
            }
            Err(e) => {
                opt = AdamW::new(decay, hp.weight_decay);
                obs.on_event(Event::Warning(format!("the checkpoint at step {} could not be used ({e:#}): starting over", meta.step)));
            }
        }
    }
    let mut saved_at = step;
    let mut peak_gpu: Option<u64> = None;
    let model_train = Classifier::load(&|n| params.tracked(n), &cfg, pooling)?;
    let mut scaler = LossScaler::new(req.precision);
    let model_eval = Classifier::load(&|n| params.detached(n), &cfg, pooling)?;
    let first_epoch = resumed.as_ref().map_or(1, |m: &CheckpointMeta| m.epoch);
    for epoch in first_epoch..=hp.epochs {
        let batches = epoch_batches(&train, hp.batch_size, hp.seed, epoch - 1, hp.group_by_length);
        let (mut done, mut loss_sum, mut seen, mut real, mut padded) = match resumed.take() {
            Some(m) if m.epoch == epoch => (m.batches_done, m.loss_sum, m.seen, m.real_tokens, m.padded_tokens),
            _ => (0, 0.0, 0usize, 0usize, 0usize),
        };
        let started = Instant::now();
        let cpu_start = super::process_usage().0;
        let mut window: std::collections::VecDeque<(Instant, usize)> = Default::default();
        for batch_idx in batches.into_iter().skip(done) {
            // Everything a checkpoint taken now must hold to continue from this batch.
            let position = |best: &Option<(EpochReport, _)>| CheckpointMeta {
                step,
                epoch,
                batches_done: done,
                loss_sum,
                seen,
                real_tokens: real,
                padded_tokens: padded,
                rng_word_pos: rng.get_word_pos().to_string(),
                optimizer_step: 0,
                since_best,
                best: best.as_ref().map(|(b, _)| b.clone()),
                num_parameters: params.count(),
                created_at: crate::store::now(),
                mlm_before: None,
                mlm_last: None,
            };
            if obs.should_stop() {
                if let Some(plan) = req.checkpoints.as_ref().filter(|_| obs.shutting_down() && saved_at != step) {
                    checkpoint::save_and_report(plan, &position(&best), &params, &opt, best.as_ref().map(|(_, t)| t), obs);
                }
                return Ok(Outcome::Cancelled);
            }
            if let Some(plan) = req.checkpoints.as_ref().filter(|p| p.every > 0 && step.is_multiple_of(p.every) && saved_at != step) {
                checkpoint::save_and_report(plan, &position(&best), &params, &opt, best.as_ref().map(|(_, t)| t), obs);
                saved_at = step;
            }
            let seqs: Vec<&[u32]> = batch_idx.iter().map(|&i| train[i].ids.as_slice()).collect();
            let batch = pad_batch(&seqs, pad, &req.device)?;
            real += seqs.iter().map(|s| s.len()).sum::<usize>();
            padded += batch.ids.elem_count();
            let examples: Vec<&Example> = batch_idx.iter().map(|&i| &train[i]).collect();
            let targets = task.targets(&examples, labels.len(), &req.device)?;
            let t_fwd = Instant::now();
            // Mixed precision: this step's weights, cast from the f32 masters.
            let cast;
            let model = if req.precision == Precision::F32 {
                &model_train
            } else {
                cast = Classifier::load(&|n| req.precision.cast(params.tracked(n)?), &cfg, pooling)?;
                &cast
            };
            let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(&mut rng))?.to_dtype(DType::F32)?;
            let loss = task.loss(&logits, &targets, class_weights.as_ref())?;
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged(loss_value, step + 1));
            }
            let t_bwd = Instant::now();
            let grads = if scaler.scale() == 1.0 { loss.backward()? } else { (&loss * scaler.scale())?.backward()? };
            // The activations and gradients are all alive here: the step's high-water mark.
            if let Some(used) = crate::model::device_memory_mib(&req.device) {
                peak_gpu = Some(peak_gpu.map_or(used, |p: u64| p.max(used)));
            }
            let t_opt = Instant::now();
            let lr = linear_schedule(hp.learning_rate, step, warmup, total_steps);
            let stepped = opt.step_scaled(&params.vars, &grads, lr, req.max_grad_norm, scaler.scale())?;
            scaler.update(stepped.is_some());
            tracing::debug!(
                forward_ms = (t_bwd - t_fwd).as_millis() as u64,
                backward_ms = (t_opt - t_bwd).as_millis() as u64,
                optimizer_ms = t_opt.elapsed().as_millis() as u64,
                shape = ?batch.ids.dims(),
                "step timings"
            );
            step += 1;
            done += 1;
            loss_sum += loss_value * batch_idx.len() as f64;
            seen += batch_idx.len();
            window.push_back((Instant::now(), batch_idx.len()));
            if window.len() > 20 {
                window.pop_front();
            }
            let rate = rate_of(&window, started);
            obs.on_event(Event::Step(StepInfo {
                epoch,
                step,
                total_steps,
                loss: loss_value,
                learning_rate: lr,
                examples_per_second: rate,
            }));
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let train_cpu_seconds = super::process_usage().0 - cpu_start;
        stats.train_seconds += train_seconds;
        let train_loss = loss_sum / seen.max(1) as f64;
        let t_eval = Instant::now();
        let (val_loss, report) = task.evaluate(&model_eval, &val, &labels, pad, req.eval_batch_size, &req.device)?;
        stats.epochs.push(EpochStats {
            epoch,
            train_seconds,
            train_cpu_seconds,
            examples_per_s: seen as f64 / train_seconds.max(1e-9),
            real_tokens: real,
            padded_tokens: padded,
            train_loss,
            val_accuracy: report.accuracy,
            val_macro_f1: report.macro_f1,
            eval_seconds: t_eval.elapsed().as_secs_f64(),
            peak_gpu_mib: peak_gpu,
        });
        let ep = EpochReport { epoch, step, train_loss, loss: val_loss, labels: labels.clone(), report, peak_gpu_mib: peak_gpu };
        obs.on_event(Event::Epoch(ep.clone()));
        let improved = best.as_ref().is_none_or(|(b, _)| is_better(&ep, b));
        if improved {
            best = Some((ep, params.snapshot()?));
            since_best = 0;
        } else {
            since_best += 1;
            if hp.early_stopping_patience.is_some_and(|p| since_best >= p) {
                obs.on_event(Event::Message(format!("early stopping after epoch {epoch}: no improvement in {since_best} epochs")));
                break;
            }
        }
    }
    let (best, tensors) = best.expect("at least one epoch ran");
    // Training is over: a server stop lets the model be written (seconds) rather than redo work.
    if obs.should_stop() && !obs.shutting_down() {
        return Ok(Outcome::Cancelled);
    }
    let test_report = if test.is_empty() {
        None
    } else {
        let t_test = Instant::now();
        let kept = Classifier::load(&|n| lookup(&tensors, n), &cfg, pooling)?;
        let (loss, report) = task.evaluate(&kept, &test, &labels, pad, req.eval_batch_size, &req.device)?;
        Some(TestReport { loss, seconds: t_test.elapsed().as_secs_f64(), report })
    };
    if let Some(out) = &req.out_dir {
        cfg.set_classifier(&labels, task.problem_type(), pooling.as_str());
        write_model_dir(out, &cfg, &tensors, &req.base_dir)
            .map_err(|e| TrainError::Storage(format!("saving the model to {}: {e:#}", out.display())))?;
    }
    obs.on_event(Event::Message(format!("kept the weights of epoch {} (validation macro-F1 {:.4})", best.epoch, best.report.macro_f1)));
    Ok(Outcome::Finished(Box::new(Finished { best, labels, stats, test: test_report })))
}

fn lookup(tensors: &std::collections::HashMap<String, Tensor>, name: &str) -> candle_core::Result<Tensor> {
    tensors.get(name).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
}

fn is_better(a: &EpochReport, b: &EpochReport) -> bool {
    a.report.macro_f1 > b.report.macro_f1 || (a.report.macro_f1 == b.report.macro_f1 && a.loss < b.loss)
}

fn rate_of(window: &std::collections::VecDeque<(Instant, usize)>, started: Instant) -> f64 {
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
