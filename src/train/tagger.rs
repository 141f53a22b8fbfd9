//! Token classification (named entities) in the shared loop: words split into sub-words, the
//! first sub-word of each word carrying its tag (every sub-word with `label_all_tokens`), the
//! others and the special tokens left out of the loss, as transformers' `run_ner.py` does; a
//! sentence longer than the model takes is cut into overlapping windows, never cut short.
//! Scored by entity F1 ([`super::entities`]); saved as a `…ForTokenClassification`.

use super::checkpoint::CheckpointMeta;
use super::data::{batch_order, label_set, random_split};
use super::entities::tagging_report;
use super::events::{Event, Finished, Observer, Outcome, RunStats, TestReport, TrainError};
use super::hyper::Hyperparameters;
use super::kept::{Kept, Validated};
use super::method::Trainable;
use super::objective::Task;
use super::request::TrainRequest;
use super::run_loop::{self, EpochEnd, EpochSums, Run, Schedule};
use crate::dataset::Row;
use crate::model::encoder::classifier::POOLER_NAMES;
use crate::model::encoder::params::Params;
use crate::model::encoder::Getter;
use crate::model::hf::artifacts::{load_weights, open};
use crate::model::hf::tokenize::{pad_batch_typed, Batch};
use crate::model::hf::words::{best_window, cut, encode_words};
use crate::model::ops::layers::Mode;
use crate::model::{Classifier, EncoderConfig, Pooling};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// Target of a sub-word the loss leaves out.
const IGNORED: i64 = -1;

/// One window of a sentence: its ids and each position's tag id (or [`IGNORED`]).
struct Window {
    ids: Vec<u32>,
    targets: Vec<i64>,
}

/// A sentence as it is scored: its windows (indices into the windows, with the positions of
/// the whole sequence each covers and where that range starts in the window), and each scored
/// word's first sub-word with its true tag.
struct Sentence {
    windows: Vec<(usize, Range<usize>, usize)>,
    words: Vec<(usize, usize)>,
}

/// The windows and sentences of `rows`, tags as ids into `tags`.
fn prepare(
    rows: &[Row],
    tags: &[String],
    tok: &tokenizers::Tokenizer,
    max_len: usize,
    all_tokens: bool,
) -> anyhow::Result<(Vec<Window>, Vec<Sentence>)> {
    let words: Vec<Vec<String>> = rows.iter().map(|r| r.tokens.clone().unwrap_or_default()).collect();
    let encoded = encode_words(tok, &words)?;
    let id_of = |t: &str| tags.binary_search_by(|l| l.as_str().cmp(t)).map(|i| i as i64).map_err(|_| anyhow::anyhow!("unknown tag {t}"));
    let (mut windows, mut sentences) = (Vec::new(), Vec::new());
    for (row, pieces) in rows.iter().zip(&encoded) {
        let row_tags = row.tags.as_deref().unwrap_or_default();
        let mut targets = vec![IGNORED; pieces.ids.len()];
        let mut scored = Vec::new();
        let mut prev = None;
        for (p, w) in pieces.words.iter().enumerate() {
            let Some(w) = w.map(|w| w as usize) else {
                prev = None;
                continue;
            };
            let tag = row_tags.get(w).map(String::as_str).unwrap_or("O");
            if prev != Some(w) {
                targets[p] = id_of(tag)?;
                scored.push((p, targets[p] as usize));
            } else if all_tokens {
                // The word's later sub-words continue its entity.
                targets[p] = id_of(&tag.replacen("B-", "I-", 1)).or_else(|_| id_of(tag))?;
            }
            prev = Some(w);
        }
        let head = pieces.content().start;
        let mut spans = Vec::new();
        for (ids, range) in cut(pieces, max_len) {
            let mut t = vec![IGNORED; ids.len()];
            t[head..head + range.len()].copy_from_slice(&targets[range.clone()]);
            spans.push((windows.len(), range, head));
            windows.push(Window { ids, targets: t });
        }
        sentences.push(Sentence { windows: spans, words: scored });
    }
    Ok((windows, sentences))
}

/// Mean loss over the scored sub-words, and the report, of `model` on `windows`/`sentences`.
fn evaluate(
    model: &Classifier,
    windows: &[Window],
    sentences: &[Sentence],
    tags: &[String],
    pad: u32,
    batch_size: usize,
    device: &Device,
) -> candle_core::Result<(f64, crate::train::metrics::ClassificationReport)> {
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.sort_by_key(|&i| windows[i].ids.len());
    let mut logits: Vec<Vec<Vec<f32>>> = vec![vec![]; windows.len()];
    let (mut loss_sum, mut scored) = (0.0, 0usize);
    for chunk in order.chunks(batch_size.max(1)) {
        let seqs: Vec<&[u32]> = chunk.iter().map(|&i| windows[i].ids.as_slice()).collect();
        let batch = pad_batch_typed(&seqs, &[], pad, device)?;
        let out = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Eval)?.to_dtype(DType::F32)?;
        if let Some((sum, n)) = loss_terms(&out, chunk.iter().map(|&i| windows[i].targets.as_slice()), device)? {
            loss_sum += sum.to_scalar::<f32>()? as f64;
            scored += n;
        }
        for (&i, rows) in chunk.iter().zip(out.to_vec3::<f32>()?) {
            logits[i] = rows;
        }
    }
    let (mut truth, mut pred) = (Vec::new(), Vec::new());
    for s in sentences {
        let ranges: Vec<Range<usize>> = s.windows.iter().map(|(_, r, _)| r.clone()).collect();
        let (mut t, mut p) = (Vec::new(), Vec::new());
        for &(pos, tag) in &s.words {
            let (w, range, head) = &s.windows[best_window(&ranges, pos)];
            let row = &logits[*w][head + pos - range.start];
            t.push(tag);
            p.push(row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i));
        }
        truth.push(t);
        pred.push(p);
    }
    Ok((loss_sum / scored.max(1) as f64, tagging_report(tags, &truth, &pred)))
}

/// The summed cross-entropy of `logits` `[b, t, k]` over the positions `targets` scores, and
/// how many there are; `None` when none is.
fn loss_terms<'a>(
    logits: &Tensor,
    targets: impl Iterator<Item = &'a [i64]>,
    device: &Device,
) -> candle_core::Result<Option<(Tensor, usize)>> {
    let (b, t, k) = logits.dims3()?;
    let (mut at, mut want) = (Vec::new(), Vec::new());
    for (row, tg) in targets.enumerate() {
        for (p, &y) in tg.iter().enumerate().filter(|(_, y)| **y >= 0) {
            at.push((row * t + p) as u32);
            want.push(y as u32);
        }
    }
    if at.is_empty() {
        return Ok(None);
    }
    let n = at.len();
    let picked = logits.reshape((b * t, k))?.index_select(&Tensor::new(at, device)?, 0)?;
    let loss = candle_nn::loss::cross_entropy(&picked, &Tensor::new(want, device)?)?;
    Ok(Some(((loss * n as f64)?, n)))
}

/// Runs a token-classification job to the end (or until the observer says stop).
pub fn run(req: TrainRequest, obs: &mut dyn Observer) -> Result<Outcome, TrainError> {
    let hp = &req.hp;
    let t_load = Instant::now();
    let (info, tok) = open(&req.base_dir).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    if let Some(why) = info.config.arch().refusal("token_classification", "full") {
        return Err(TrainError::BaseModel(why));
    }
    let (train_rows, val_rows) = match req.validation_rows {
        Some(v) => (req.train_rows, v),
        None => {
            let (t, v) = random_split(req.train_rows, 0.1, hp.seed);
            obs.on_event(Event::Message(format!(
                "held out {} of {} sentences for validation (10 % at random)",
                v.len(),
                t.len() + v.len()
            )));
            (t, v)
        }
    };
    let test_rows = req.test_rows.unwrap_or_default();
    let untagged = |rows: &[Row]| rows.iter().any(|r| r.tokens.is_none() || r.tags.is_none());
    if train_rows.is_empty() || val_rows.is_empty() || untagged(&train_rows) || untagged(&val_rows) || untagged(&test_rows) {
        return Err(TrainError::InvalidData(
            "token classification needs tagged words in every row, and a sentence or more to validate on".into(),
        ));
    }
    if hp.class_weights.is_some() {
        return Err(TrainError::InvalidData("class_weights applies to classification and reranking, not token classification".into()));
    }
    let tags = label_set(&train_rows, &[val_rows.as_slice(), test_rows.as_slice()].concat());
    let mut cfg: EncoderConfig = info.config.clone();
    let weights = load_weights(&req.base_dir, &req.device).map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(hp.seed);
    let keep_head = Task::Tokens.continues_head(&cfg, &tags, &hp.pooling);
    if keep_head {
        obs.on_event(Event::Message("the base model is a token classifier over the same tags: training continues from its head".into()));
    }
    let trainable = Trainable::new(hp.method, hp.lora.clone(), &cfg, weights, tags.len(), keep_head, &mut rng, &req.device)
        .map_err(|e| TrainError::BaseModel(format!("{e:#}")))?;
    let params = &trainable.params;
    let load_seconds = t_load.elapsed().as_secs_f64();
    let t_tok = Instant::now();
    let max_len = hp.max_seq_len.min(cfg.max_tokens());
    let encode =
        |rows: &[Row]| prepare(rows, &tags, &tok, max_len, hp.label_all_tokens).map_err(|e| TrainError::InvalidData(format!("{e:#}")));
    let (train, _) = encode(&train_rows)?;
    let val = encode(&val_rows)?;
    let test = encode(&test_rows)?;
    let tokenize_seconds = t_tok.elapsed().as_secs_f64();
    let cut_up = train.len() - train_rows.len();
    if cut_up > 0 {
        obs.on_event(Event::Message(format!(
            "{cut_up} more windows than training sentences: longer sentences are cut into overlapping windows of {max_len} tokens"
        )));
    }
    let schedule = Schedule::new(train.len(), hp);
    obs.on_event(Event::Message(format!(
        "training on {} windows of {} sentences, validating on {}; {} tags; {} steps ({} warmup); {} parameters trained",
        train.len(),
        train_rows.len(),
        val_rows.len(),
        tags.len(),
        schedule.total_steps,
        schedule.warmup,
        params.count()
    )));
    let stats = RunStats {
        load_seconds,
        tokenize_seconds,
        train_seconds: 0.0,
        n_train: train.len(),
        n_validation: val_rows.len(),
        num_parameters: params.count(),
        steps_per_epoch: schedule.steps_per_epoch,
        total_steps: schedule.total_steps,
        warmup_steps: schedule.warmup,
        epochs: vec![],
        max_epochs: hp.epochs,
        stop_reason: "max_epochs",
    };
    let model_eval = trainable.model(&cfg, Pooling::Token, &|n| params.detached(n))?;
    let mut obj = Tag {
        train,
        val,
        tags,
        cfg: &cfg,
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
    let Tag { tags, stats, kept, .. } = obj;
    let (best, mut tensors) = kept.best.expect("at least one epoch ran");
    let pad = cfg.pad_token_id as u32;
    let kept = trainable
        .model(&cfg, Pooling::Token, &|n| tensors.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {n}"))))?;
    let mut test_report = None;
    if !test.1.is_empty() {
        let t_test = Instant::now();
        let (loss, report) = evaluate(&kept, &test.0, &test.1, &tags, pad, req.eval_batch_size, &req.device)?;
        test_report = Some(TestReport { loss, seconds: t_test.elapsed().as_secs_f64(), report });
    }
    if let Some(out) = &req.out_dir {
        // A token classifier has no pooler: transformers' `…ForTokenClassification` has none,
        // except ModernBERT's, whose head runs on every token.
        // (Only `lora` keeps the pooler among the frozen weights, and an adapter saves none of those.)
        if !cfg.arch().token_head_has_pooler() {
            for name in POOLER_NAMES {
                tensors.remove(name);
            }
        }
        cfg.set_token_classifier(&tags);
        trainable
            .save(out, &cfg, &tensors, &req.base_dir, req.base_id.as_deref())
            .map_err(|e| TrainError::Storage(format!("saving the model to {}: {e:#}", out.display())))?;
    }
    obs.on_event(Event::Message(format!("kept the weights of epoch {} (validation entity F1 {:.4})", best.epoch, best.report.selection())));
    let calibration = super::calibration::Calibration::none();
    Ok(Outcome::Finished(Box::new(Finished {
        best,
        labels: tags,
        stats,
        test: test_report,
        tuned: None,
        test_tuned: None,
        calibration,
        test_ece: None,
        validation_scatter: None,
    })))
}

/// Tagging as the shared loop's [`run_loop::Objective`].
struct Tag<'a> {
    train: Vec<Window>,
    val: (Vec<Window>, Vec<Sentence>),
    tags: Vec<String>,
    cfg: &'a EncoderConfig,
    hp: &'a Hyperparameters,
    device: &'a Device,
    eval_batch_size: usize,
    params: &'a Params,
    trainable: &'a Trainable,
    model_eval: Classifier,
    kept: Kept,
    stats: RunStats,
}

impl run_loop::Objective for Tag<'_> {
    type Model = Classifier;
    type Batch = (Batch, Vec<usize>);

    fn model(&self, weights: &Getter) -> candle_core::Result<Classifier> {
        self.trainable.model(self.cfg, Pooling::Token, weights)
    }

    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train.iter().map(|w| w.ids.len()).collect();
        batch_order(&lengths, self.hp.batch_size, self.hp.seed, epoch - 1, self.hp.group_by_length)
    }

    fn prepare(
        &mut self,
        indices: &[usize],
        _rng: &mut ChaCha8Rng,
        sums: &mut EpochSums,
    ) -> Result<Option<(Batch, Vec<usize>)>, TrainError> {
        if !indices.iter().any(|&i| self.train[i].targets.iter().any(|&t| t >= 0)) {
            return Ok(None);
        }
        let seqs: Vec<&[u32]> = indices.iter().map(|&i| self.train[i].ids.as_slice()).collect();
        let batch = pad_batch_typed(&seqs, &[], self.cfg.pad_token_id as u32, self.device)?;
        sums.real_tokens += seqs.iter().map(|s| s.len()).sum::<usize>();
        sums.padded_tokens += batch.ids.elem_count();
        Ok(Some((batch, indices.to_vec())))
    }

    fn loss(&self, model: &Classifier, (batch, indices): &(Batch, Vec<usize>), rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
        let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(rng))?.to_dtype(DType::F32)?;
        let (sum, n) = loss_terms(&logits, indices.iter().map(|&i| self.train[i].targets.as_slice()), self.device)?
            .expect("prepare kept only batches with a scored sub-word");
        Ok((sum / n as f64)?)
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
        let (loss, report) = evaluate(&self.model_eval, &self.val.0, &self.val.1, &self.tags, pad, self.eval_batch_size, self.device)?;
        let val = Validated { loss, report, seconds: t_eval.elapsed().as_secs_f64() };
        self.kept.close_epoch(end, val, &self.tags, self.params, self.hp.early_stopping_patience, &mut self.stats, obs)
    }
}
