//! Masked-language-model pre-training: continues a checkpoint (or starts from a fresh
//! config) on a dataset's texts and writes a new base model.

use super::anchor::{self, Anchor};
use super::checkpoint::{CheckpointMeta, CheckpointPlan};
use super::data::batch_order;
pub use super::events::MlmReport;
use super::events::{Event, Observer, Outcome, TrainError};
use super::hyper::Hyperparameters;
pub use super::hyper::ScratchSpec;
use super::precision::Precision;
use super::run_loop::{self, EpochEnd, EpochSums, Run, Schedule};
use crate::dataset::Row;
use crate::model::encoder::classifier::Pooling;
use crate::model::encoder::encoder_params;
use crate::model::encoder::mlm::{head_param, head_params, mask_tokens, Masked, MaskedLm};
use crate::model::encoder::params::Params;
use crate::model::encoder::Getter;
use crate::model::hf::artifacts::{load_weights, open, write_model_dir};
use crate::model::hf::tokenize::{encode_all, load_tokenizer, pad_batch, truncate};
use crate::model::ops::layers::Mode;
use crate::model::EncoderConfig;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

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
    /// The base's unit embeddings of the batch's clean texts, when the anchor is on.
    targets: Option<Tensor>,
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
        targets: None,
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

/// Steps that train only the masked-LM head: as asked, else a fifth of the run (at least 20
/// steps, at most half the run) when the head is new, else none. A random head's first
/// gradients are noise; passed into the encoder they undo what it knew (an adapted
/// all-minilm-l6-v2 scored below its parent), so the head first learns to read the encoder as it is.
pub fn head_warmup(asked: Option<usize>, head_is_new: bool, total_steps: usize) -> usize {
    match asked {
        Some(n) => n.min(total_steps),
        None if head_is_new => (total_steps / 5).max(20.min(total_steps / 2)).min(total_steps / 2),
        None => 0,
    }
}

/// Runs pre-training; reports `Event::Pretrain` per epoch.
pub fn run(req: MlmRequest, obs: &mut dyn Observer) -> Result<Outcome, TrainError> {
    crate::compute::keep_freed_memory();
    let hp = &req.hp;
    let base_err = |e: anyhow::Error| TrainError::BaseModel(format!("{e:#}"));
    // `sentence`: the pooling sentence-transformers files give the base; `pooling`: how the
    // anchor reads a sentence embedding (`None` from scratch: there is nothing to keep).
    let (mut cfg, tok, tokenizer_dir, weights, sentence, pooling) = match &req.start {
        Start::Checkpoint(dir) => {
            let (info, tok) = open(dir).map_err(base_err)?;
            let sentence = info.sentence_pooling.as_deref().and_then(Pooling::parse);
            let pooling = Pooling::parse(&info.auto_pooling()).unwrap_or(Pooling::Cls);
            (info.config, tok, dir.clone(), load_weights(dir, &req.device).map_err(base_err)?, sentence, Some(pooling))
        }
        Start::Scratch { spec, tokenizer_dir } => {
            let tok = load_tokenizer(tokenizer_dir).map_err(base_err)?;
            let pad = tok.token_to_id("[PAD]").unwrap_or(0) as usize;
            (spec.config(tok.get_vocab_size(true), pad), tok, tokenizer_dir.clone(), HashMap::new(), None, None)
        }
    };
    if let Some(msg) = cfg.pretraining_refusal() {
        return Err(TrainError::BaseModel(msg));
    }
    let anchor_weight = pooling.map_or(0.0, |_| hp.mlm_anchor_weight.unwrap_or_else(|| anchor::default_weight(sentence)));
    // BERT's mask token, or RoBERTa's.
    let mask_id = ["[MASK]", "<mask>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .ok_or_else(|| TrainError::BaseModel("the tokenizer has no mask token ([MASK] or <mask>)".into()))?;
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
    // No longer than the model's position table holds, whatever the job asked.
    let max_len = hp.max_seq_len.min(cfg.max_tokens());
    let train = tokenize(&train_rows, &tok, max_len)?;
    let vocab = cfg.vocab_size as u32;
    let mut val_rng = ChaCha8Rng::seed_from_u64(hp.seed.wrapping_add(1));
    let val_clean = tokenize(&val_rows, &tok, max_len)?;
    let val: Vec<Masked> = val_clean.iter().map(|ids| mask_tokens(ids, &special, mask_id, vocab, req.mask_prob, &mut val_rng)).collect();
    let mut spec = encoder_params(&cfg);
    let h = cfg.hidden_size;
    // BERT's pooler travels with the encoder; where the pooler is part of the classification
    // head (RoBERTa, DistilBERT), a masked LM has none.
    if !cfg.arch().pooler_in_head() {
        spec.push(("pooler.dense.weight".into(), vec![h, h]));
        spec.push(("pooler.dense.bias".into(), vec![h]));
    }
    spec.extend(head_params(&cfg));
    let params = Params::build(&cfg, &spec, &weights, &[], &mut rng, &req.device).map_err(base_err)?;
    let fresh: Vec<&str> = spec.iter().filter(|(n, _)| !weights.contains_key(n)).map(|(n, _)| n.as_str()).collect();
    // A base that ships no masked-LM head (sentence-transformers checkpoints) gets a random one.
    let fresh_head: Vec<String> = fresh.iter().filter(|n| head_param(&cfg)(n)).map(|n| n.to_string()).collect();
    if !fresh.is_empty() {
        obs.on_event(Event::Message(format!("{} of {} tensors start from random initialisation", fresh.len(), spec.len())));
    }
    drop(weights);
    let schedule = Schedule::new(train.len(), hp);
    obs.on_event(Event::Message(format!(
        "masked-LM training on {} texts, {} held out; {} steps ({} warmup); {} parameters",
        train.len(),
        val.len(),
        schedule.total_steps,
        schedule.warmup,
        params.count()
    )));
    let model_eval = MaskedLm::load(&|n| params.detached(n), &cfg)?;
    // The drift is measured over a sentence-embedding base even when it is free to move.
    // Embedded on the base's weights: a resumed run restores its own only inside the loop.
    let anchor = match sentence.or(pooling.filter(|_| anchor_weight > 0.0)) {
        Some(p) => {
            let a = Anchor::new(&model_eval.encoder, &train, val_clean, p, anchor_weight, cfg.pad_token_id as u32)?;
            obs.on_event(Event::Message(a.describe()));
            Some(a)
        }
        None => None,
    };
    let mut obj = Pretrain {
        lengths: train.iter().map(Vec::len).collect(),
        train,
        val,
        special,
        mask_id,
        vocab,
        mask_prob: req.mask_prob,
        cfg: &cfg,
        hp,
        device: &req.device,
        model_eval,
        anchor,
        before: None,
        last: None,
    };
    let head_steps = head_warmup(hp.mlm_head_warmup_steps, !fresh_head.is_empty(), schedule.total_steps);
    if head_steps > 0 {
        obs.on_event(Event::Message(format!(
            "training the {}prediction head alone for the first {head_steps} of {} steps (the encoder held), then the whole model",
            if fresh_head.is_empty() { "" } else { "new " },
            schedule.total_steps
        )));
    }
    let run = Run {
        head_first: Some((head_steps, head_param(&cfg))),
        params: &params,
        hp,
        schedule,
        device: &req.device,
        precision: req.precision,
        max_grad_norm: 1.0,
        checkpoints: req.checkpoints.as_ref(),
    };
    if run_loop::drive(run, &mut obj, &mut rng, obs)? == run_loop::Ended::Cancelled {
        return Ok(Outcome::Cancelled);
    }
    let (before, last) = (obj.before.expect("evaluated before training"), obj.last.expect("at least one epoch"));
    if let Some(out) = &req.out_dir {
        cfg.set_masked_lm();
        write_model_dir(out, &cfg, &params.snapshot()?, &tokenizer_dir)
            .map_err(|e| TrainError::Storage(format!("saving the model to {}: {e:#}", out.display())))?;
    }
    Ok(Outcome::Pretrained { before, last })
}

/// Pre-training as the shared loop's [`run_loop::Objective`]: masks each batch afresh and
/// reports the held-out loss before training and after every epoch.
struct Pretrain<'a> {
    train: Vec<Vec<u32>>,
    lengths: Vec<usize>,
    val: Vec<Masked>,
    special: HashSet<u32>,
    mask_id: u32,
    vocab: u32,
    mask_prob: f64,
    cfg: &'a EncoderConfig,
    hp: &'a Hyperparameters,
    device: &'a Device,
    model_eval: MaskedLm,
    anchor: Option<Anchor>,
    /// Held-out loss before training (from the checkpoint when resumed).
    before: Option<f64>,
    last: Option<MlmReport>,
}

impl run_loop::Objective for Pretrain<'_> {
    type Model = MaskedLm;
    type Batch = Batch;

    fn model(&self, weights: &Getter) -> candle_core::Result<MaskedLm> {
        MaskedLm::load(weights, self.cfg)
    }

    fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        batch_order(&self.lengths, self.hp.batch_size, self.hp.seed, epoch, self.hp.group_by_length)
    }

    fn prepare(&mut self, indices: &[usize], rng: &mut ChaCha8Rng, _sums: &mut EpochSums) -> Result<Option<Batch>, TrainError> {
        let masked: Vec<Masked> = indices
            .iter()
            .map(|&i| mask_tokens(&self.train[i], &self.special, self.mask_id, self.vocab, self.mask_prob, &mut *rng))
            .collect();
        let mut b = make_batch(&masked, self.cfg.pad_token_id as u32, self.device)?;
        if let Some(a) = &self.anchor {
            b.targets = a.targets(indices)?;
        }
        Ok((b.count > 0).then_some(b))
    }

    fn loss(&self, model: &MaskedLm, b: &Batch, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
        let (logits, hidden) = model.forward_with_hidden(&b.ids, &b.type_ids, &b.mask, &b.rows, &mut Mode::Train(rng))?;
        let mlm = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &b.labels)?;
        match (&self.anchor, &b.targets) {
            (Some(a), Some(targets)) => Ok((mlm + a.term(&hidden, &b.mask, targets)?)?),
            _ => Ok(mlm),
        }
    }

    fn weight(&self, _indices: &[usize]) -> usize {
        1
    }

    fn resumable(&self, meta: &CheckpointMeta) -> anyhow::Result<()> {
        meta.mlm_before.map(|_| ()).ok_or_else(|| anyhow::anyhow!("not a pre-training checkpoint"))
    }

    fn resumed(&mut self, meta: &CheckpointMeta, _best: Option<HashMap<String, Tensor>>) {
        self.before = meta.mlm_before;
        self.last = meta.mlm_last.clone();
    }

    fn begin(&mut self, _resumed: bool, obs: &mut dyn Observer) -> Result<(), TrainError> {
        if self.before.is_none() {
            let b = evaluate(&self.model_eval, &self.val, self.cfg.pad_token_id as u32, self.device)?;
            // A fresh run is still on the base's weights, whose embeddings the anchor just took.
            let embedding_similarity = self.anchor.as_ref().map(|_| 1.0);
            obs.on_event(Event::Pretrain(MlmReport {
                epoch: 0,
                step: 0,
                train_loss: None,
                loss: b,
                perplexity: b.exp(),
                embedding_similarity,
            }));
            self.before = Some(b);
        }
        Ok(())
    }

    fn record(&self, meta: &mut CheckpointMeta) {
        meta.mlm_before = self.before;
        meta.mlm_last = self.last.clone();
    }

    fn end_epoch(&mut self, end: EpochEnd, obs: &mut dyn Observer) -> Result<bool, TrainError> {
        let loss = evaluate(&self.model_eval, &self.val, self.cfg.pad_token_id as u32, self.device)?;
        let embedding_similarity = self.similarity()?;
        let report = MlmReport {
            epoch: end.epoch,
            step: end.step,
            train_loss: Some(end.train_loss()),
            loss,
            perplexity: loss.exp(),
            embedding_similarity,
        };
        obs.on_event(Event::Pretrain(report.clone()));
        self.last = Some(report);
        Ok(false)
    }
}

impl Pretrain<'_> {
    /// How close the held-out embeddings stay to the base's, when a pooling is known.
    fn similarity(&self) -> candle_core::Result<Option<f64>> {
        self.anchor.as_ref().map(|a| a.similarity(&self.model_eval.encoder)).transpose()
    }
}
