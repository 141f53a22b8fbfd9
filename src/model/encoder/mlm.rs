//! The masked-language-model head (`BertForMaskedLM`'s `cls.predictions`, ModernBERT's `head`), its decoder tied
//! to the word embeddings, and the masking of inputs.

use super::config::EncoderConfig;
use super::post_norm::Getter;
use super::Encoder;
use crate::model::ops::layers::{activation, Act, LayerNorm, Linear, Mode};
use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;

/// The prefix of BERT's head tensors (our names).
pub const MLM_HEAD_PREFIX: &str = "cls.";

/// Head parameters (name, shape) after the encoder's, our names. ModernBERT's head (`head.dense`
/// → GELU → `head.norm`) goes by what a classifier calls its pooler (`pooler.dense`,
/// `pooler.norm`), as its checkpoints share it, and its decoder's bias by BERT's
/// `cls.predictions.bias`; each bias only where the config has one.
pub fn head_params(cfg: &EncoderConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    if let Some(m) = modern(cfg) {
        let mut spec = vec![("pooler.dense.weight".to_string(), vec![h, h])];
        if m.classifier_bias {
            spec.push(("pooler.dense.bias".into(), vec![h]));
        }
        spec.push(("pooler.norm.weight".into(), vec![h]));
        if m.norm_bias {
            spec.push(("pooler.norm.bias".into(), vec![h]));
        }
        if m.decoder_bias {
            spec.push(("cls.predictions.bias".into(), vec![cfg.vocab_size]));
        }
        return spec;
    }
    vec![
        ("cls.predictions.transform.dense.weight".into(), vec![h, h]),
        ("cls.predictions.transform.dense.bias".into(), vec![h]),
        ("cls.predictions.transform.LayerNorm.weight".into(), vec![h]),
        ("cls.predictions.transform.LayerNorm.bias".into(), vec![h]),
        ("cls.predictions.bias".into(), vec![cfg.vocab_size]),
    ]
}

/// Which tensors are the prediction head of `cfg`'s masked LM (a plain function, as the
/// training loop's head-first phase takes it): BERT's `cls.*`, and ModernBERT's `pooler.*` too.
pub fn head_param(cfg: &EncoderConfig) -> fn(&str) -> bool {
    match cfg.arch() {
        super::arch::Arch::ModernBert => |n| n.starts_with("pooler.") || n.starts_with(MLM_HEAD_PREFIX),
        _ => |n| n.starts_with(MLM_HEAD_PREFIX),
    }
}

/// ModernBERT's fields of `cfg`, when it is one.
fn modern(cfg: &EncoderConfig) -> Option<crate::model::encoder::modernbert::ModernBertConfig> {
    (cfg.arch() == super::arch::Arch::ModernBert).then(|| crate::model::encoder::modernbert::ModernBertConfig::of(cfg).ok()).flatten()
}

/// Encoder + prediction head over the vocabulary.
pub struct MaskedLm {
    pub encoder: Encoder,
    transform: Linear,
    norm: LayerNorm,
    bias: Tensor,
    word_embeddings: Tensor,
    act: Act,
}

impl MaskedLm {
    pub fn load(get: &Getter, cfg: &EncoderConfig) -> Result<Self> {
        if let Some(m) = modern(cfg) {
            let weight = get("pooler.dense.weight")?;
            let or_zeros =
                |name: &str, has: bool, n: usize| if has { get(name) } else { Tensor::zeros(n, weight.dtype(), weight.device()) };
            let h = cfg.hidden_size;
            return Ok(Self {
                encoder: Encoder::load(get, cfg)?,
                transform: Linear::new(weight.clone(), or_zeros("pooler.dense.bias", m.classifier_bias, h)?),
                norm: LayerNorm {
                    weight: get("pooler.norm.weight")?,
                    bias: or_zeros("pooler.norm.bias", m.norm_bias, h)?,
                    eps: cfg.layer_norm_eps,
                },
                bias: or_zeros("cls.predictions.bias", m.decoder_bias, cfg.vocab_size)?,
                word_embeddings: get("embeddings.tok_embeddings.weight")?,
                act: cfg.act(),
            });
        }
        let p = "cls.predictions";
        Ok(Self {
            encoder: Encoder::load(get, cfg)?,
            transform: Linear::new(get(&format!("{p}.transform.dense.weight"))?, get(&format!("{p}.transform.dense.bias"))?),
            norm: LayerNorm {
                weight: get(&format!("{p}.transform.LayerNorm.weight"))?,
                bias: get(&format!("{p}.transform.LayerNorm.bias"))?,
                eps: cfg.layer_norm_eps,
            },
            bias: get(&format!("{p}.bias"))?,
            word_embeddings: get("embeddings.word_embeddings.weight")?,
            act: cfg.act(),
        })
    }

    /// Vocabulary logits `[n, vocab]` at the flat positions `rows` (u32, index into `batch × seq`).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, rows: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        Ok(self.forward_with_hidden(ids, type_ids, mask, rows, mode)?.0)
    }

    /// The logits of [`Self::forward`] and the encoder's last hidden states `[batch, seq, hidden]`.
    pub fn forward_with_hidden(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        rows: &Tensor,
        mode: &mut Mode,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self.encoder.forward(ids, type_ids, mask, mode)?;
        let (b, s, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * s, h))?.index_select(rows, 0)?;
        let x = activation(&self.transform.forward(&picked)?, self.act)?;
        let x = self.norm.forward(&x, mode)?;
        // As a dense layer (the tied embeddings are its `[vocab, hidden]` weight), whose own
        // backward writes the embeddings' gradient untransposed and sums the bias gradient.
        let logits = Linear::new(self.word_embeddings.clone(), self.bias.clone()).forward(&x)?;
        Ok((logits, hidden))
    }
}

/// One masked sequence: the model's input and what it must predict where.
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    pub input: Vec<u32>,
    pub positions: Vec<usize>,
    pub labels: Vec<u32>,
}

/// BERT's masking: `prob` of the non-special tokens are chosen (at least one when any can
/// be); of those 80 % become `mask_id`, 10 % a random token, 10 % stay.
pub fn mask_tokens(ids: &[u32], special: &HashSet<u32>, mask_id: u32, vocab: u32, prob: f64, rng: &mut ChaCha8Rng) -> Masked {
    let candidates: Vec<usize> = (0..ids.len()).filter(|&i| !special.contains(&ids[i])).collect();
    let mut positions: Vec<usize> = candidates.iter().copied().filter(|_| rng.random::<f64>() < prob).collect();
    if positions.is_empty() && !candidates.is_empty() {
        positions.push(candidates[rng.random_range(0..candidates.len())]);
    }
    let mut input = ids.to_vec();
    let labels = positions.iter().map(|&p| ids[p]).collect();
    for &p in &positions {
        let r: f64 = rng.random();
        if r < 0.8 {
            input[p] = mask_id;
        } else if r < 0.9 {
            input[p] = rng.random_range(0..vocab);
        }
    }
    Masked { input, positions, labels }
}
