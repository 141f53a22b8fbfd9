//! Fine-tuning a classifier: its data, its objective in the shared loop ([`super::run_loop`]),
//! the test scores and the saved model. Blocking, device-agnostic, reporting through an
//! [`Observer`]; shared by the service's worker and the `train` command.

use super::checkpoint::CheckpointMeta;
use super::data::{epoch_batches, label_set, query_split, random_split, stratified_split, to_examples, Example, Labeling};
pub use super::events::{EpochReport, EpochStats, Event, Finished, Observer, Outcome, RunStats, StepInfo, TestReport, TrainError};
use super::hyper::Hyperparameters;
use super::kept::{Kept, Validated};
use super::objective::{balanced_weights, prior_log_odds, Task};
pub use super::request::{TrainRequest, ONE_OUTPUT};
use super::run_loop::{self, EpochEnd, EpochSums, Run, Schedule};
use crate::dataset::Row;
use crate::model::encoder::params::Params;
use crate::model::encoder::Getter;
use crate::model::hf::artifacts::{load_weights, open};
use crate::model::hf::tokenize::{pad_batch_typed, Batch};
use crate::model::ops::layers::Mode;
use crate::model::{Classifier, EncoderConfig, Pooling};
use crate::train::hyper::Method;
use crate::train::method::Trainable;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::time::Instant;

/// Runs a fine-tuning job to the end (or until the observer says stop).
pub fn run(req: TrainRequest, obs: &mut dyn Observer) -> Result<Outcome, TrainError> {
    crate::compute::keep_freed_memory();
    if req.task == Task::Tokens {
        return super::tagger::run(req, obs);
    }
    let hp = &req.hp;
    let t_load = Instant::now();
    let (info, tok) = open(&req.base_dir).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    if let Some(why) = info.config.arch().refusal("classification", if hp.method == Method::Lora { "lora" } else { "full" }) {
        return Err(TrainError::BaseModel(why));
    }
    let (train_rows, val_rows) = match req.validation_rows {
        Some(v) => (req.train_rows, v),
        None => {
            let (how, (t, v)) = match req.task {
                Task::SingleLabel | Task::MultiLabel => ("stratified 10 %", stratified_split(req.train_rows, 0.1, hp.seed)),
                Task::Regression => ("10 % at random", random_split(req.train_rows, 0.1, hp.seed)),
                Task::Rerank => ("10 % of the queries, with all their documents", query_split(req.train_rows, 0.1, hp.seed)),
                Task::Tokens => unreachable!("the tagger runs token classification"),
            };
            obs.on_event(Event::Message(format!("held out {} of {} rows for validation ({how})", v.len(), t.len() + v.len())));
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
    let task = req.task;
    let labels = if task.one_output() {
        vec![ONE_OUTPUT.to_string()]
    } else {
        label_set(&train_rows, &[val_rows.as_slice(), test_rows.as_slice()].concat())
    };
    if labels.len() < 2 && !task.one_output() {
        return Err(TrainError::InvalidData("classification needs at least two distinct labels".into()));
    }
    if task == Task::Regression && hp.class_weights.is_some() {
        return Err(TrainError::InvalidData("class_weights applies to classification and reranking, not regression".into()));
    }
    let mut cfg: EncoderConfig = info.config.clone();
    let weights = load_weights(&req.base_dir, &req.device).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(hp.seed);
    let pooling = Pooling::parse(&hp.pooling).unwrap_or(Pooling::Cls);
    if hp.method == Method::Lora
        && pooling == Pooling::Cls
        && !weights.contains_key(cfg.arch().pooler_names()[0])
        && !cfg.arch().pooler_in_head()
    {
        // The pooler would start random and stay frozen, and the adapter would not carry it
        // (where it is part of the head, as RoBERTa's and ELECTRA's, it trains and travels).
        return Err(TrainError::InvalidData(
            "the base model has no pooler, which `cls` pooling reads: use pooling \"mean\" with method \"lora\"".into(),
        ));
    }
    let keep_head = task.continues_head(&cfg, &labels, &hp.pooling);
    if keep_head {
        obs.on_event(Event::Message("the base model is a classifier over the same labels: training continues from its head".into()));
    }
    let trainable = Trainable::new(hp.method, hp.lora.clone(), &cfg, weights, labels.len(), keep_head, &mut rng, &req.device)
        .map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let params = &trainable.params;
    let load_seconds = t_load.elapsed().as_secs_f64();
    let t_tok = Instant::now();
    let pairs = |rows: &[crate::dataset::Row]| rows.first().map(|r| r.text_pair.is_some());
    for (name, rows) in [("validation", &val_rows), ("test", &test_rows)] {
        if pairs(rows).is_some_and(|p| Some(p) != pairs(&train_rows)) {
            let (these, those) =
                if pairs(rows) == Some(true) { ("pairs of texts", "single texts") } else { ("single texts", "pairs of texts") };
            return Err(TrainError::InvalidData(format!("the {name} data are {these} but the training data are {those}")));
        }
    }
    // A pair's second text is type 1 only where the model has a second token type.
    let typed = cfg.type_vocab_size > 1;
    // No longer than the model's position table holds, whatever the job asked.
    let max_len = hp.max_seq_len.min(cfg.max_tokens());
    let labeling = match task {
        Task::SingleLabel | Task::MultiLabel => Labeling::Classes(&labels),
        Task::Regression => Labeling::Number,
        Task::Rerank => Labeling::Relevance,
        Task::Tokens => unreachable!("the tagger runs token classification"),
    };
    let examples = |rows: &[Row], what: &str| {
        to_examples(rows, labeling, &tok, max_len, typed, what).map_err(|e| TrainError::InvalidData(format!("{e:#}")))
    };
    let train = examples(&train_rows, "training")?;
    let val = examples(&val_rows, "validation")?;
    let test = examples(&test_rows, "test")?;
    let tokenize_seconds = t_tok.elapsed().as_secs_f64();
    let mut hp_run = req.hp.clone();
    if hp_run.auto_epochs {
        hp_run.epochs = super::hyper::auto_epochs_cap(train.len(), labels.len());
        let patience = *hp_run.early_stopping_patience.get_or_insert(super::hyper::AUTO_PATIENCE);
        obs.on_event(Event::Message(format!(
            "epochs auto: at most {} for {} examples of {} labels, stopping after {patience} epochs without a better validation macro-F1",
            hp_run.epochs,
            train.len(),
            labels.len()
        )));
    }
    let hp = &hp_run;
    if matches!(task, Task::MultiLabel | Task::Rerank) {
        let prior = Tensor::new(prior_log_odds(&train, labels.len()), &req.device)?;
        params.set("classifier.bias", &prior)?;
    }
    let class_weights = hp.class_weights.as_ref().map(|_| balanced_weights(task, &train, labels.len(), &req.device)).transpose()?;
    let schedule = Schedule::new(train.len(), hp);
    obs.on_event(Event::Message(format!(
        "training on {} examples, validating on {}; {} labels; {} steps ({} warmup); {} parameters trained ({}); pooling {}",
        train.len(),
        val.len(),
        labels.len(),
        schedule.total_steps,
        schedule.warmup,
        params.count(),
        serde_json::to_value(hp.method).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        pooling.as_str()
    )));
    let stats = RunStats {
        load_seconds,
        tokenize_seconds,
        train_seconds: 0.0,
        n_train: train.len(),
        n_validation: val.len(),
        num_parameters: params.count(),
        steps_per_epoch: schedule.steps_per_epoch,
        total_steps: schedule.total_steps,
        warmup_steps: schedule.warmup,
        epochs: vec![],
        max_epochs: hp.epochs,
        stop_reason: "max_epochs",
    };
    let model_eval = trainable.model(&cfg, pooling, &|n| params.detached(n))?;
    let mut obj = Classify {
        train,
        val,
        labels,
        cfg: &cfg,
        pooling,
        task,
        class_weights,
        hp,
        device: &req.device,
        eval_batch_size: req.eval_batch_size,
        params,
        trainable: &trainable,
        model_eval,
        kept: Kept::default(),
        stats,
    };
    let run = Run {
        params,
        hp,
        schedule,
        device: &req.device,
        precision: req.precision,
        max_grad_norm: req.max_grad_norm,
        checkpoints: req.checkpoints.as_ref(),
        head_first: None,
    };
    if run_loop::drive(run, &mut obj, &mut rng, obs)? == run_loop::Ended::Cancelled {
        return Ok(Outcome::Cancelled);
    }
    let Classify { labels, stats, kept, val, .. } = obj;
    let (best, tensors) = kept.best.expect("at least one epoch ran");
    let pad = cfg.pad_token_id as u32;
    let kept = trainable.model(&cfg, pooling, &|n| lookup(&tensors, n))?;
    // The temperature first: thresholds are tuned on the probabilities predict will return.
    let (_, _, val_logits) = task.evaluate(&kept, &val, &labels, pad, req.eval_batch_size, &req.device)?;
    let val_truth: Vec<Vec<usize>> = val.iter().map(|e| e.labels.clone()).collect();
    let validation_scatter = (task == Task::Regression)
        .then(|| val.iter().zip(&val_logits).take(super::events::SCATTER_POINTS).map(|(e, l)| [e.target, l[0]]).collect());
    // A number is not a probability to calibrate; a reranker's scores stay the sigmoid of its
    // logit, as a cross-encoder's.
    let calibration =
        if task.one_output() { super::calibration::Calibration::none() } else { super::calibration::fit(task, &val_logits, &val_truth) };
    let temperature = calibration.temperature;
    let tuned = match task {
        Task::MultiLabel => Some(super::thresholds::fit(&val_logits, &val_truth, &labels, temperature)),
        _ => None,
    };
    let (mut test_report, mut test_tuned, mut test_ece) = (None, None, None);
    if !test.is_empty() {
        let t_test = Instant::now();
        let (loss, report, logits) = task.evaluate(&kept, &test, &labels, pad, req.eval_batch_size, &req.device)?;
        let seconds = t_test.elapsed().as_secs_f64();
        let truth: Vec<Vec<usize>> = test.iter().map(|e| e.labels.clone()).collect();
        if !task.one_output() {
            test_ece =
                Some((super::calibration::ece(task, &logits, &truth, 1.0), super::calibration::ece(task, &logits, &truth, temperature)));
        }
        if let Some(t) = &tuned {
            let report = super::thresholds::report(&logits, &truth, &labels, &t.thresholds, temperature);
            test_tuned = Some(TestReport { loss, seconds, report });
        }
        test_report = Some(TestReport { loss, seconds, report });
    }
    if let Some(out) = &req.out_dir {
        cfg.set_classifier(&labels, task.problem_type(), pooling.as_str());
        if task == Task::Rerank {
            cfg.set_reranker();
        }
        cfg.set_temperature(temperature);
        if let Some(t) = &tuned {
            cfg.set_thresholds(&labels, &t.thresholds);
        }
        trainable
            .save(out, &cfg, &tensors, &req.base_dir, req.base_id.as_deref())
            .map_err(|e| TrainError::Storage(format!("saving the model to {}: {e:#}", out.display())))?;
    }
    obs.on_event(Event::Message(format!(
        "kept the weights of epoch {} (validation {} {:.4})",
        best.epoch,
        best.report.selection_name(),
        best.report.selection()
    )));
    if !task.one_output() {
        obs.on_event(Event::Message(format!(
            "scores calibrated on validation: temperature {:.3}, expected calibration error {:.4} (uncalibrated {:.4})",
            temperature, calibration.validation_ece_after, calibration.validation_ece_before
        )));
    }
    if let Some(t) = &tuned {
        obs.on_event(Event::Message(format!(
            "thresholds tuned per label on validation: macro-F1 {:.4} (at 0.5: {:.4}), micro-F1 {:.4} (at 0.5: {:.4})",
            t.validation.macro_f1,
            best.report.macro_f1,
            t.validation.micro_f1.unwrap_or(f64::NAN),
            best.report.micro_f1.unwrap_or(f64::NAN)
        )));
    }
    Ok(Outcome::Finished(Box::new(Finished {
        best,
        labels,
        stats,
        test: test_report,
        tuned,
        test_tuned,
        calibration,
        test_ece,
        validation_scatter,
    })))
}

/// Fine-tuning as the shared loop's [`run_loop::Objective`]: keeps the best epoch's weights and
/// stops early when the hyperparameters say so.
struct Classify<'a> {
    train: Vec<Example>,
    val: Vec<Example>,
    labels: Vec<String>,
    cfg: &'a EncoderConfig,
    pooling: Pooling,
    task: Task,
    class_weights: Option<Tensor>,
    hp: &'a Hyperparameters,
    device: &'a Device,
    eval_batch_size: usize,
    params: &'a Params,
    trainable: &'a Trainable,
    model_eval: Classifier,
    kept: Kept,
    stats: RunStats,
}

impl run_loop::Objective for Classify<'_> {
    type Model = Classifier;
    type Batch = (Batch, Tensor);

    fn model(&self, weights: &Getter) -> candle_core::Result<Classifier> {
        self.trainable.model(self.cfg, self.pooling, weights)
    }

    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        epoch_batches(&self.train, self.hp.batch_size, self.hp.seed, epoch - 1, self.hp.group_by_length)
    }

    fn prepare(&mut self, indices: &[usize], _rng: &mut ChaCha8Rng, sums: &mut EpochSums) -> Result<Option<(Batch, Tensor)>, TrainError> {
        let seqs: Vec<&[u32]> = indices.iter().map(|&i| self.train[i].ids.as_slice()).collect();
        let types: Vec<&[u32]> = indices.iter().map(|&i| self.train[i].type_ids.as_slice()).collect();
        let batch = pad_batch_typed(&seqs, &types, self.cfg.pad_token_id as u32, self.device)?;
        sums.real_tokens += seqs.iter().map(|s| s.len()).sum::<usize>();
        sums.padded_tokens += batch.ids.elem_count();
        let examples: Vec<&Example> = indices.iter().map(|&i| &self.train[i]).collect();
        let targets = self.task.targets(&examples, self.labels.len(), self.device)?;
        Ok(Some((batch, targets)))
    }

    fn loss(&self, model: &Classifier, (batch, targets): &(Batch, Tensor), rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
        let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(rng))?.to_dtype(DType::F32)?;
        Ok(self.task.loss(&logits, targets, self.class_weights.as_ref())?)
    }

    fn weight(&self, indices: &[usize]) -> usize {
        indices.len()
    }

    fn resumed(&mut self, meta: &CheckpointMeta, best: Option<HashMap<String, Tensor>>) {
        self.kept.resumed(meta, best);
    }

    fn record(&self, meta: &mut CheckpointMeta) {
        self.kept.record(meta);
    }

    fn best_weights(&self) -> Option<&HashMap<String, Tensor>> {
        self.kept.weights()
    }

    fn end_epoch(&mut self, end: EpochEnd, obs: &mut dyn Observer) -> Result<bool, TrainError> {
        let t_eval = Instant::now();
        let pad = self.cfg.pad_token_id as u32;
        let (loss, report, _) = self.task.evaluate(&self.model_eval, &self.val, &self.labels, pad, self.eval_batch_size, self.device)?;
        let val = Validated { loss, report, seconds: t_eval.elapsed().as_secs_f64() };
        self.kept.close_epoch(end, val, &self.labels, self.params, self.hp.early_stopping_patience, &mut self.stats, obs)
    }
}

fn lookup(tensors: &HashMap<String, Tensor>, name: &str) -> candle_core::Result<Tensor> {
    tensors.get(name).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
}
