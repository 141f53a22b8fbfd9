//! Masked-language-model pre-training: continues a checkpoint (or starts from a fresh
//! config) on a dataset's texts and writes a new base model.

use super::checkpoint::{self, CheckpointMeta, CheckpointPlan};
use super::data::batch_order;
pub use super::events::MlmReport;
use super::events::{Event, Observer, Outcome, StepInfo, TrainError};
use super::hyper::Hyperparameters;
use super::optim::{linear_schedule, AdamW};
use super::precision::{LossScaler, Precision};
use crate::dataset::Row;
use crate::model::artifacts::{inspect, load_weights, write_model_dir};
use crate::model::bert::encoder_params;
use crate::model::layers::Mode;
use crate::model::mlm::{head_params, mask_tokens, Masked, MaskedLm};
use crate::model::params::Params;
use crate::model::tokenize::{encode_all, load_tokenizer, pad_batch, truncate};
use crate::model::BertConfig;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

/// Where pre-training starts.
pub enum Start {
    /// A checkpoint directory (its MLM head too, when it has one).
    Checkpoint(PathBuf),
    /// Random weights of the shape `spec`, with the tokenizer of `tokenizer_dir`.
    Scratch { spec: ScratchSpec, tokenizer_dir: PathBuf },
}

/// One pre-training run.
pub struct MlmRequest {
    pub start: Start,
    pub train_rows: Vec<Row>,
    pub validation_rows: Option<Vec<Row>>,
    pub hp: Hyperparameters,
    pub device: Device,
    pub out_dir: Option<PathBuf>,
    /// Share of tokens chosen for prediction.
    pub mask_prob: f64,
    /// Where to checkpoint, and resume from the newest checkpoint found there.
    pub checkpoints: Option<CheckpointPlan>,
    /// What the training steps compute in (evaluation and the saved weights are f32).
    pub precision: Precision,
}

fn tokenize(rows: &[Row], tok: &tokenizers::Tokenizer, max_len: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let mut ids = encode_all(tok, &texts)?;
    ids.iter_mut().for_each(|s| truncate(s, max_len));
    Ok(ids)
}

struct Batch {
    ids: Tensor,
    type_ids: Tensor,
    mask: Tensor,
    rows: Tensor,
    labels: Tensor,
    count: usize,
}

fn make_batch(masked: &[Masked], pad: u32, device: &Device) -> candle_core::Result<Batch> {
    let seqs: Vec<&[u32]> = masked.iter().map(|m| m.input.as_slice()).collect();
    let b = pad_batch(&seqs, pad, device)?;
    let s = b.ids.dim(1)?;
    let rows: Vec<u32> = masked.iter().enumerate().flat_map(|(i, m)| m.positions.iter().map(move |&p| (i * s + p) as u32)).collect();
    let labels: Vec<u32> = masked.iter().flat_map(|m| m.labels.iter().copied()).collect();
    let count = rows.len();
    Ok(Batch {
        ids: b.ids,
        type_ids: b.type_ids,
        mask: b.mask,
        rows: Tensor::new(rows, device)?,
        labels: Tensor::new(labels, device)?,
        count,
    })
}

/// Mean loss over every masked token of `data` (masked once, by `seed`, so that every
/// evaluation sees the same positions).
fn evaluate(model: &MaskedLm, data: &[Masked], pad: u32, device: &Device) -> candle_core::Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in data.chunks(64) {
        let b = make_batch(chunk, pad, device)?;
        if b.count == 0 {
            continue;
        }
        let logits = model.forward(&b.ids, &b.type_ids, &b.mask, &b.rows, &mut Mode::Eval)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &b.labels)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        sum += loss * b.count as f64;
        n += b.count;
    }
    Ok(if n > 0 { sum / n as f64 } else { f64::NAN })
}

/// Runs pre-training; reports `Event::Pretrain` per epoch.
pub fn run(req: MlmRequest, obs: &mut dyn Observer) -> Result<Outcome, TrainError> {
    crate::compute::keep_freed_memory();
    let hp = &req.hp;
    let base_err = |e: anyhow::Error| TrainError::BaseModel(format!("{e:#}"));
    let (mut cfg, tokenizer_dir, weights) = match &req.start {
        Start::Checkpoint(dir) => {
            let info = inspect(dir).map_err(base_err)?;
            (info.config, dir.clone(), load_weights(dir, &req.device).map_err(base_err)?)
        }
        Start::Scratch { spec, tokenizer_dir } => {
            let tok = load_tokenizer(tokenizer_dir).map_err(base_err)?;
            let pad = tok.token_to_id("[PAD]").unwrap_or(0) as usize;
            (spec.config(tok.get_vocab_size(true), pad), tokenizer_dir.clone(), HashMap::new())
        }
    };
    let tok = load_tokenizer(&tokenizer_dir).map_err(base_err)?;
    let mask_id = tok.token_to_id("[MASK]").ok_or_else(|| TrainError::BaseModel("the tokenizer has no [MASK] token".into()))?;
    let special: HashSet<u32> = tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(hp.seed);
    let (train_rows, val_rows) = match req.validation_rows {
        Some(v) => (req.train_rows, v),
        None => {
            let mut rows = req.train_rows;
            rows.shuffle(&mut rng);
            let n_val = (rows.len() / 10).max(1).min(rows.len().saturating_sub(1));
            let val = rows.split_off(rows.len() - n_val);
            obs.on_event(Event::Message(format!("held out {} of {} texts for validation", val.len(), rows.len() + val.len())));
            (rows, val)
        }
    };
    if train_rows.is_empty() || val_rows.is_empty() {
        return Err(TrainError::InvalidData("pre-training needs at least two texts".into()));
    }
    let train = tokenize(&train_rows, &tok, hp.max_seq_len)?;
    let vocab = cfg.vocab_size as u32;
    let mut val_rng = ChaCha8Rng::seed_from_u64(hp.seed.wrapping_add(1));
    let val: Vec<Masked> = tokenize(&val_rows, &tok, hp.max_seq_len)?
        .iter()
        .map(|ids| mask_tokens(ids, &special, mask_id, vocab, req.mask_prob, &mut val_rng))
        .collect();
    let mut spec = encoder_params(&cfg);
    let h = cfg.hidden_size;
    spec.push(("pooler.dense.weight".into(), vec![h, h]));
    spec.push(("pooler.dense.bias".into(), vec![h]));
    spec.extend(head_params(&cfg));
    let params = Params::build(&cfg, &spec, &weights, &[], &mut rng, &req.device).map_err(base_err)?;
    let fresh: Vec<&str> = spec.iter().filter(|(n, _)| !weights.contains_key(n)).map(|(n, _)| n.as_str()).collect();
    if !fresh.is_empty() {
        obs.on_event(Event::Message(format!("{} of {} tensors start from random initialisation", fresh.len(), spec.len())));
    }
    drop(weights);
    let lengths: Vec<usize> = train.iter().map(Vec::len).collect();
    let steps_per_epoch = train.len().div_ceil(hp.batch_size);
    let total_steps = steps_per_epoch * hp.epochs;
    let warmup = (hp.warmup_ratio * total_steps as f64).ceil() as usize;
    obs.on_event(Event::Message(format!(
        "masked-LM training on {} texts, {} held out; {} steps ({} warmup); {} parameters",
        train.len(),
        val.len(),
        total_steps,
        warmup,
        params.count()
    )));
    let model_train = MaskedLm::load(&|n| params.tracked(n), &cfg)?;
    let mut scaler = LossScaler::new(req.precision);
    let model_eval = MaskedLm::load(&|n| params.detached(n), &cfg)?;
    let pad = cfg.pad_token_id as u32;
    let decay: Vec<bool> = params.names.iter().map(|n| Params::decays(n)).collect();
    let mut opt = AdamW::new(decay.clone(), hp.weight_decay);
    let mut step = 0;
    let mut last = None;
    let mut resumed: Option<CheckpointMeta> = None;
    if let Some((path, meta)) = req.checkpoints.as_ref().and_then(|p| checkpoint::latest(&p.dir)) {
        let loaded = meta
            .mlm_before
            .ok_or_else(|| anyhow::anyhow!("not a pre-training checkpoint"))
            .and_then(|_| meta.rng_word_pos())
            .and_then(|pos| checkpoint::load(&path, &meta, &params, &mut opt, &req.device).map(|_| pos));
        match loaded {
            Ok(pos) => {
                rng.set_word_pos(pos);
                step = meta.step;
                last = meta.mlm_last.clone();
                obs.on_event(Event::Message(format!("resumed from the checkpoint at step {step} (epoch {})", meta.epoch)));
                resumed = Some(meta);
            }
            Err(e) => {
                opt = AdamW::new(decay, hp.weight_decay);
                obs.on_event(Event::Warning(format!("the checkpoint at step {} could not be used ({e:#}): starting over", meta.step)));
            }
        }
    }
    let before = match resumed.as_ref().and_then(|m| m.mlm_before) {
        Some(b) => b,
        None => {
            let b = evaluate(&model_eval, &val, pad, &req.device)?;
            obs.on_event(Event::Pretrain(MlmReport { epoch: 0, step: 0, train_loss: None, loss: b, perplexity: b.exp() }));
            b
        }
    };
    let mut saved_at = step;
    let first_epoch = resumed.as_ref().map_or(1, |m| m.epoch);
    for epoch in first_epoch..=hp.epochs {
        let order = batch_order(&lengths, hp.batch_size, hp.seed, epoch, hp.group_by_length);
        let (mut done, mut loss_sum, mut batches) = match resumed.take() {
            Some(m) if m.epoch == epoch => (m.batches_done, m.loss_sum, m.seen),
            _ => (0, 0.0, 0usize),
        };
        let started = Instant::now();
        for chunk in order.iter().skip(done) {
            let position = || CheckpointMeta {
                step,
                epoch,
                batches_done: done,
                loss_sum,
                seen: batches,
                real_tokens: 0,
                padded_tokens: 0,
                rng_word_pos: rng.get_word_pos().to_string(),
                optimizer_step: 0,
                since_best: 0,
                best: None,
                num_parameters: params.count(),
                created_at: crate::store::now(),
                mlm_before: Some(before),
                mlm_last: last.clone(),
            };
            if obs.should_stop() {
                if let Some(plan) = req.checkpoints.as_ref().filter(|_| obs.shutting_down() && saved_at != step) {
                    checkpoint::save_and_report(plan, &position(), &params, &opt, None, obs);
                }
                return Ok(Outcome::Cancelled);
            }
            if let Some(plan) = req.checkpoints.as_ref().filter(|p| p.every > 0 && step % p.every == 0 && saved_at != step) {
                checkpoint::save_and_report(plan, &position(), &params, &opt, None, obs);
                saved_at = step;
            }
            done += 1;
            let masked: Vec<Masked> =
                chunk.iter().map(|&i| mask_tokens(&train[i], &special, mask_id, vocab, req.mask_prob, &mut rng)).collect();
            let b = make_batch(&masked, pad, &req.device)?;
            if b.count == 0 {
                continue;
            }
            let cast;
            let model = if req.precision == Precision::F32 {
                &model_train
            } else {
                cast = MaskedLm::load(&|n| req.precision.cast(params.tracked(n)?), &cfg)?;
                &cast
            };
            let logits = model.forward(&b.ids, &b.type_ids, &b.mask, &b.rows, &mut Mode::Train(&mut rng))?.to_dtype(DType::F32)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &b.labels)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(TrainError::Diverged(value, step + 1));
            }
            let grads = if scaler.scale() == 1.0 { loss.backward()? } else { (&loss * scaler.scale())?.backward()? };
            let lr = linear_schedule(hp.learning_rate, step, warmup, total_steps);
            let stepped = opt.step_scaled(&params.vars, &grads, lr, 1.0, scaler.scale())?;
            scaler.update(stepped.is_some());
            step += 1;
            loss_sum += value;
            batches += 1;
            let rate = (batches * hp.batch_size) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            obs.on_event(Event::Step(StepInfo { epoch, step, total_steps, loss: value, learning_rate: lr, examples_per_second: rate }));
        }
        let loss = evaluate(&model_eval, &val, pad, &req.device)?;
        let report = MlmReport { epoch, step, train_loss: Some(loss_sum / batches.max(1) as f64), loss, perplexity: loss.exp() };
        obs.on_event(Event::Pretrain(report.clone()));
        last = Some(report);
    }
    if obs.should_stop() && !obs.shutting_down() {
        return Ok(Outcome::Cancelled);
    }
    if let Some(out) = &req.out_dir {
        for key in ["id2label", "label2id", "problem_type", "finetuned_pooling"] {
            cfg.extra.remove(key);
        }
        cfg.extra.insert("architectures".into(), serde_json::json!(["BertForMaskedLM"]));
        write_model_dir(out, &cfg, &params.snapshot()?, &tokenizer_dir)
            .map_err(|e| TrainError::Storage(format!("saving the model to {}: {e:#}", out.display())))?;
    }
    Ok(Outcome::Pretrained { before, last: last.expect("at least one epoch") })
}

/// The architecture of a model trained from scratch (the `config` of an `mlm` job).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchSpec {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
}

impl ScratchSpec {
    /// Checks the ranges; returns the offending field and why.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: &str| Err((format!("config.{f}"), m.to_string()));
        if !(1..=24).contains(&self.num_hidden_layers) {
            return bad("num_hidden_layers", "must be from 1 to 24");
        }
        if !(1..=32).contains(&self.num_attention_heads) {
            return bad("num_attention_heads", "must be from 1 to 32");
        }
        if !(8..=2048).contains(&self.hidden_size) || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad("hidden_size", "must be from 8 to 2048 and a multiple of num_attention_heads");
        }
        if self.intermediate_size.is_some_and(|i| !(8..=8192).contains(&i)) {
            return bad("intermediate_size", "must be from 8 to 8192");
        }
        if self.max_position_embeddings.is_some_and(|m| !(8..=2048).contains(&m)) {
            return bad("max_position_embeddings", "must be from 8 to 2048");
        }
        Ok(())
    }

    /// A BERT config of this shape for a tokenizer of `vocab_size` tokens.
    pub fn config(&self, vocab_size: usize, pad_token_id: usize) -> BertConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size.unwrap_or(4 * self.hidden_size),
            "max_position_embeddings": self.max_position_embeddings.unwrap_or(512),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": pad_token_id,
            "position_embedding_type": "absolute"
        }))
        .expect("a valid config")
    }
}
