//! A classifier loaded for inference: detached weights, tokenizer and labels.

use crate::model::encoder::classifier::{Classifier, Pooling, HEAD_NAMES, POOLER_NAMES};
use crate::model::hf::artifacts::{self, load_weights};
use crate::model::hf::lora;
use crate::model::hf::tokenize::{encode_all, encode_pair, encode_pairs_with, pad_batch_typed, pair_truncating, truncate, truncate_left};
use crate::model::ops::layers::Mode;
use crate::model::ops::packed;
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::Tokenizer;

/// A ready-to-run classifier.
pub struct LoadedClassifier {
    pub(super) model: Classifier,
    tokenizer: Tokenizer,
    pub labels: Vec<String>,
    /// What the head's outputs are.
    pub head: Head,
    /// A multi-label model's decision threshold per label, tuned on validation when it trained.
    pub thresholds: Option<Vec<f32>>,
    /// Divides the logits before the probabilities are taken (fitted on validation; 1 for none).
    pub temperature: f32,
    /// Longest input the position embeddings allow.
    pub max_len: usize,
    /// Whether the model has a second token type (a pair's second text is type 1).
    typed: bool,
    /// The tokenizer set to cut pairs at `max_len`, made on the first pair.
    pair_tokenizer: std::sync::OnceLock<Tokenizer>,
    pub(super) pad_id: u32,
    pub(super) device: Device,
    /// Approximate bytes of weights held.
    pub bytes: usize,
    /// What activations are computed in (bf16 where every weight is, on a GPU).
    pub(super) dtype: candle_core::DType,
}

/// A sequence's token ids and token types (empty: all 0).
pub type Typed = (Vec<u32>, Vec<u32>);

/// An input longer than the model allows, with `truncate: false`.
#[derive(Debug, thiserror::Error)]
#[error("input {index} has {tokens} tokens, more than the model's {max} (set \"truncate\": true)")]
pub struct TooLong {
    pub index: usize,
    pub tokens: usize,
    pub max: usize,
}

/// Cuts `order` (indices sorted by length) into forward passes of at most `batch_size`
/// sequences, starting a new one when the next sequence is much longer than the first of the
/// current pass, so that short texts are not padded to the longest one in the request. A pass
/// is not cut below `MIN_TOKENS` real tokens: smaller matrix products lose more to overhead
/// than padding costs.
pub(super) fn length_buckets<'a>(order: &'a [usize], seqs: &[Vec<u32>], batch_size: usize) -> Vec<&'a [usize]> {
    const MIN_TOKENS: usize = 256;
    let mut out = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    for (pos, &i) in order.iter().enumerate() {
        let len = seqs[i].len();
        let first = seqs[order[start]].len();
        let full = pos - start == batch_size;
        let too_long = len * 4 > first * 5 + 16 && tokens >= MIN_TOKENS;
        if pos > start && (full || too_long) {
            out.push(&order[start..pos]);
            start = pos;
            tokens = 0;
        }
        tokens += len;
    }
    if start < order.len() {
        out.push(&order[start..]);
    }
    out
}

/// What a loaded classifier's dense layers compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weights {
    /// f32, as trained and saved: logits match transformers'.
    #[default]
    F32,
    /// bf16 encoder weights on a CPU with AVX512-BF16 (see `model::ops::packed`), or the whole
    /// model in bf16 on a GPU: faster, logits within about 1e-2 of f32. On a CPU without
    /// AVX512-BF16 the model loads in f32.
    Bf16,
}

impl Weights {
    /// `f32` or `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// What a model loaded on `device` will actually use.
    pub fn effective(self, device: &Device) -> Self {
        if self == Self::Bf16 && (device.is_cuda() || (device.is_cpu() && packed::bf16_supported())) {
            Self::Bf16
        } else {
            Self::F32
        }
    }

    /// `f32` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl LoadedClassifier {
    /// Loads a classifier directory (ours or transformers') in f32.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        Self::load_as(dir, device, Weights::F32)
    }

    /// Loads a classifier directory (or a peft LoRA adapter over a base beside it, merged) with
    /// its dense layers in `weights_as`.
    pub fn load_as(dir: &Path, device: &Device, weights_as: Weights) -> anyhow::Result<Self> {
        let (info, weights, tokenizer) = if lora::is_adapter(dir) {
            let (adapter, tokenizer) = lora::open_adapter(dir)?;
            let mut weights = load_weights(&adapter.base, device)?;
            lora::Adapter::load(dir, device)?.merge_into(&mut weights)?;
            (adapter.info, weights, tokenizer)
        } else {
            let (info, tokenizer) = artifacts::open(dir)?;
            (info, load_weights(dir, device)?, tokenizer)
        };
        let Some(labels) = info.labels.clone() else { bail!("not a sequence-classification model") };
        // A token classifier reads every token, whoever saved it.
        let pooling = match info.config.is_token_classifier() {
            true => Pooling::Token,
            false => info.config.pooling().and_then(|p| Pooling::parse(&p)).unwrap_or(Pooling::Cls),
        };
        Self::build(&info, weights, tokenizer, labels, pooling, device, weights_as)
    }

    /// Loads a base model's encoder (and its pooler, where it has one) to serve adapters over:
    /// each brings its own head and pooling (see `model::predict::adapter_serving`); this
    /// model's own head is a placeholder.
    pub fn load_encoder(dir: &Path, device: &Device, weights_as: Weights) -> anyhow::Result<Self> {
        let (info, tokenizer) = artifacts::open(dir)?;
        let mut weights = load_weights(dir, device)?;
        let pooling = if weights.contains_key(POOLER_NAMES[0]) { Pooling::Cls } else { Pooling::Mean };
        let hidden = info.config.hidden_size;
        // A placeholder head of one output (a zero-size one would be a zero-byte device allocation).
        weights.insert(HEAD_NAMES[0].into(), Tensor::zeros((1, hidden), candle_core::DType::F32, device)?);
        weights.insert(HEAD_NAMES[1].into(), Tensor::zeros(1, candle_core::DType::F32, device)?);
        if info.config.arch() == crate::model::encoder::arch::Arch::ModernBert {
            // ModernBERT's head runs under every pooling: a placeholder where the base has none
            // (each adapter brings its own).
            let [dense, norm] = info.config.arch().pooler_names();
            if !weights.contains_key(dense) {
                weights.insert(dense.into(), Tensor::zeros((hidden, hidden), candle_core::DType::F32, device)?);
                weights.insert(norm.into(), Tensor::ones(hidden, candle_core::DType::F32, device)?);
            }
        }
        Self::build(&info, weights, tokenizer, Vec::new(), pooling, device, weights_as)
    }

    fn build(
        info: &artifacts::ModelInfo,
        weights: std::collections::HashMap<String, Tensor>,
        tokenizer: Tokenizer,
        labels: Vec<String>,
        pooling: Pooling,
        device: &Device,
        weights_as: Weights,
    ) -> anyhow::Result<Self> {
        // On a GPU, bf16 means every weight in bf16 (the CPU packs only the dense layers).
        let all_bf16 = weights_as.effective(device) == Weights::Bf16 && !device.is_cpu();
        // Each tensor is taken out of the map as the model takes it, so that preparing a layer
        // for inference frees its f32 weight at once rather than after the whole model is built.
        let weights = std::cell::RefCell::new(weights);
        let get = |n: &str| {
            let t = weights.borrow_mut().remove(n).ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {n}")))?;
            if all_bf16 {
                t.to_dtype(candle_core::DType::BF16)
            } else {
                Ok(t)
            }
        };
        let mut model = Classifier::load(&get, &info.config, pooling).context("building the model")?;
        model.prepare_for_inference(weights_as.effective(device) == Weights::Bf16)?;
        // The model holds what it still needs; packed layers released their f32 weights.
        drop(weights);
        crate::compute::release_freed_memory();
        let bytes = model.bytes();
        let head = Head::of(&info.config);
        Ok(Self {
            model,
            tokenizer,
            thresholds: info.config.thresholds(&labels).filter(|_| head == Head::MultiLabel),
            temperature: info.config.temperature(),
            labels,
            head,
            max_len: info.config.max_tokens(),
            typed: info.config.type_vocab_size > 1,
            pair_tokenizer: std::sync::OnceLock::new(),
            pad_id: info.config.pad_token_id as u32,
            device: device.clone(),
            bytes,
            dtype: if all_bf16 { candle_core::DType::BF16 } else { candle_core::DType::F32 },
        })
    }

    /// Whether a batch runs with its texts packed without padding (see `Classifier::packs`).
    pub fn unpadded(&self) -> bool {
        self.model.packs()
    }

    /// What activations are computed in: an adapter served over this model takes the same.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// Token ids of each text, truncated to `max_len` when `truncate`, else refused when longer.
    pub fn tokenize(&self, texts: &[&str], truncate_long: bool) -> anyhow::Result<Result<Vec<Vec<u32>>, TooLong>> {
        let overflow = if truncate_long { Overflow::Truncate } else { Overflow::Refuse };
        Ok(self.tokenize_windows(texts, overflow)?.map(|w| w.into_iter().map(|mut v| v.remove(0)).collect()))
    }

    /// Each text as one or more sequences of at most `max_len` tokens: one (truncated or
    /// refused when longer), or with [`Overflow::Chunk`] overlapping windows (half a window
    /// apart) that together cover the whole text, each with its own `[CLS]`/`[SEP]`.
    pub fn tokenize_windows(&self, texts: &[&str], overflow: Overflow) -> anyhow::Result<Result<Vec<Vec<Vec<u32>>>, TooLong>> {
        let seqs = encode_all(&self.tokenizer, texts)?;
        let mut out = Vec::with_capacity(seqs.len());
        for (index, mut s) in seqs.into_iter().enumerate() {
            if s.len() <= self.max_len {
                out.push(vec![s]);
                continue;
            }
            match overflow {
                Overflow::Refuse => return Ok(Err(TooLong { index, tokens: s.len(), max: self.max_len })),
                Overflow::Truncate => {
                    truncate(&mut s, self.max_len);
                    out.push(vec![s]);
                }
                Overflow::TruncateLeft => {
                    truncate_left(&mut s, self.max_len);
                    out.push(vec![s]);
                }
                Overflow::Chunk => out.push(windows(&s, self.max_len)),
            }
        }
        Ok(Ok(out))
    }

    /// Each text's sub-words with their characters, for entities (see [`crate::model::hf::words`]).
    pub fn pieces(&self, texts: &[&str]) -> anyhow::Result<Vec<crate::model::hf::words::Pieces>> {
        crate::model::hf::words::encode_texts(&self.tokenizer, texts)
    }

    /// Token ids and token types of each pair of texts (by the tokenizer's pair template), cut
    /// to `max_len` from the longer text first with [`Overflow::Truncate`], refused when longer
    /// with [`Overflow::Refuse`]. The types are empty (all 0) for a model with one token type.
    pub fn tokenize_pairs(&self, pairs: &[(&str, &str)], overflow: Overflow) -> anyhow::Result<Result<Vec<Typed>, TooLong>> {
        let encoded = match overflow {
            Overflow::Truncate => {
                let tok = match self.pair_tokenizer.get() {
                    Some(t) => t,
                    None => {
                        let made = pair_truncating(&self.tokenizer, self.max_len)?;
                        self.pair_tokenizer.get_or_init(|| made)
                    }
                };
                encode_pairs_with(tok, pairs)?
            }
            Overflow::Refuse => {
                let all = pairs.iter().map(|(a, b)| encode_pair(&self.tokenizer, a, b)).collect::<anyhow::Result<Vec<_>>>()?;
                if let Some((index, (ids, _))) = all.iter().enumerate().find(|(_, (ids, _))| ids.len() > self.max_len) {
                    return Ok(Err(TooLong { index, tokens: ids.len(), max: self.max_len }));
                }
                all
            }
            _ => bail!("a pair of texts is truncated or refused when too long, not cut from the left or into windows"),
        };
        Ok(Ok(encoded.into_iter().map(|(ids, types)| (ids, if self.typed { types } else { vec![] })).collect()))
    }

    /// Each text's tokens with their offsets, `[CLS]`/`[SEP]` included when `special`.
    pub fn tokens(&self, texts: &[String], special: bool) -> anyhow::Result<Vec<Vec<Token>>> {
        let one = |text: &String| -> anyhow::Result<Vec<Token>> {
            let enc = self.tokenizer.encode(text.as_str(), special).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let parts = enc.get_ids().iter().zip(enc.get_tokens()).zip(enc.get_offsets()).zip(enc.get_special_tokens_mask());
            Ok(parts
                .map(|(((&id, tok), &(start, stop)), &mask)| match mask {
                    1 => Token { id, text: tok.clone(), special: true, start: None, stop: None },
                    _ => {
                        let text = text.get(start..stop).unwrap_or(tok).to_string();
                        Token { id, text, special: false, start: Some(start), stop: Some(stop) }
                    }
                })
                .collect())
        };
        texts.iter().map(one).collect()
    }

    /// Raw logits for each sequence, in input order. Sequences are run in batches of
    /// similar length so that little time goes to padding.
    pub fn logits(&self, seqs: &[Vec<u32>], batch_size: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        self.logits_typed(seqs, &[], batch_size)
    }

    /// [`Self::logits`] with each sequence's token types (`types` empty, or an empty entry,
    /// for all 0).
    pub fn logits_typed(&self, seqs: &[Vec<u32>], types: &[Vec<u32>], batch_size: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![Vec::new(); seqs.len()];
        if self.model.packs() {
            // No padding at all: each forward pass takes `batch_size` texts one after another.
            for chunk in order.chunks(batch_size.max(1)) {
                let lens: Vec<usize> = chunk.iter().map(|&i| seqs[i].len()).collect();
                let ids: Vec<u32> = chunk.iter().flat_map(|&i| seqs[i].iter().copied()).collect();
                let typed = chunk.iter().any(|&i| types.get(i).is_some_and(|t| !t.is_empty()));
                let type_ids: Vec<u32> = if typed {
                    chunk
                        .iter()
                        .flat_map(|&i| types.get(i).filter(|t| !t.is_empty()).cloned().unwrap_or_else(|| vec![0; seqs[i].len()]))
                        .collect()
                } else {
                    Vec::new()
                };
                let logits = self.model.logits_packed(&ids, &type_ids, &lens)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
                for (&i, row) in chunk.iter().zip(logits) {
                    out[i] = row;
                }
            }
            return Ok(out);
        }
        for chunk in length_buckets(&order, seqs, batch_size.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            let type_refs: Vec<&[u32]> = chunk.iter().map(|&i| types.get(i).map_or(&[][..], Vec::as_slice)).collect();
            let batch = pad_batch_typed(&refs, &type_refs, self.pad_id, &self.device)?;
            let logits = self.model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Eval)?;
            let rows = rows_of(&logits, &refs)?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    /// Scores from logits as the head says ([`Head::scores`]); at the model's temperature when
    /// `calibrated`.
    pub fn probabilities(&self, logits: &[f32], calibrated: bool) -> Vec<f32> {
        self.head.scores(logits, if calibrated { self.temperature } else { 1.0 })
    }

    /// Forward pass on already padded tensors (for tests and benchmarks).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.model.forward(ids, type_ids, mask, &mut Mode::Eval)
    }
}

/// What to do with a text longer than the model allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Refuse,
    Truncate,
    /// Truncate, keeping the end of the text rather than its start.
    TruncateLeft,
    Chunk,
}

/// One token of a text, as `POST /tokenize` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Token {
    pub id: u32,
    /// The text it covers, or the token itself for a special token.
    pub text: String,
    pub special: bool,
    /// Byte offsets into the text; none for a special token.
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// Overlapping windows of `max_len` tokens over `ids` (`[CLS] … [SEP]`), stride half a window.
pub fn windows(ids: &[u32], max_len: usize) -> Vec<Vec<u32>> {
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    let body = &ids[1..ids.len() - 1];
    let width = max_len.saturating_sub(2).max(1);
    let stride = (width / 2).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + width).min(body.len());
        let mut w = Vec::with_capacity(end - start + 2);
        w.push(first);
        w.extend_from_slice(&body[start..end]);
        w.push(last);
        out.push(w);
        if end == body.len() {
            return out;
        }
        start += stride;
    }
}

/// Each sequence's logits as one row: a classifier's `[batch, labels]` as they are, a token
/// classifier's `[batch, tokens, labels]` cut to each sequence's own tokens, flattened.
pub fn rows_of(logits: &Tensor, seqs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    if logits.rank() == 2 {
        return logits.to_vec2();
    }
    Ok(logits.to_vec3::<f32>()?.into_iter().zip(seqs).map(|(rows, s)| rows.into_iter().take(s.len()).flatten().collect()).collect())
}

/// What a classifier's outputs are, from its config ([`crate::model::EncoderConfig::head_task`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// One label per input: softmax.
    SingleLabel,
    /// Any number of labels: sigmoid per label.
    MultiLabel,
    /// One number per input: the logit itself.
    Regression,
    /// A cross-encoder's relevance of a pair: the sigmoid of its one logit.
    Rerank,
    /// A tag per token: each token's row of logits, a softmax each.
    Tokens,
}

impl Head {
    /// The head a config describes.
    pub fn of(cfg: &crate::model::EncoderConfig) -> Self {
        match cfg.head_task() {
            "multi_label_classification" => Head::MultiLabel,
            "regression" => Head::Regression,
            "rerank" => Head::Rerank,
            "token_classification" => Head::Tokens,
            _ => Head::SingleLabel,
        }
    }

    /// Whether each input gets one number (`{"score"}`) rather than a score per label.
    pub fn one_output(self) -> bool {
        matches!(self, Head::Regression | Head::Rerank)
    }

    /// Scores of one row of logits divided by `temperature`: softmax, sigmoid (multi-label,
    /// reranker) or the logits as they are (regression, never scaled).
    pub fn scores(self, logits: &[f32], temperature: f32) -> Vec<f32> {
        match self {
            Head::Regression => logits.to_vec(),
            Head::SingleLabel | Head::Tokens => probabilities(false, logits, temperature),
            Head::MultiLabel | Head::Rerank => probabilities(true, logits, temperature),
        }
    }
}

/// Probabilities from one row of logits divided by `temperature`: sigmoid per label when
/// `multi_label`, else softmax.
pub fn probabilities(multi_label: bool, logits: &[f32], temperature: f32) -> Vec<f32> {
    let scaled = logits.iter().map(|&z| z / temperature);
    if multi_label {
        scaled.map(|x| 1.0 / (1.0 + (-x).exp())).collect()
    } else {
        softmax(&scaled.collect::<Vec<_>>())
    }
}

/// Numerically stable softmax.
pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::length_buckets;

    #[test]
    fn long_texts_do_not_pad_short_ones_and_every_text_is_kept_once() {
        let lens = [10usize, 12, 11, 60, 62, 10, 61, 12, 11, 10, 12, 11, 10, 10, 12, 11, 11, 10, 12, 10, 11, 12, 10, 11, 12, 10, 11];
        let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let buckets = length_buckets(&order, &seqs, 64);
        assert_eq!(buckets.len(), 2, "{buckets:?}");
        assert!(buckets[1].iter().all(|&i| seqs[i].len() >= 60));
        let mut all: Vec<usize> = buckets.concat();
        all.sort();
        assert_eq!(all, (0..seqs.len()).collect::<Vec<_>>());
        // At most batch_size per pass.
        assert!(length_buckets(&order, &seqs, 4).iter().all(|b| b.len() <= 4));
    }
}
