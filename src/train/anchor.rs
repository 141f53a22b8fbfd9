//! The sentence-embedding anchor of masked-LM training: a base built for sentence embeddings
//! (sentence-transformers files name its pooling) keeps, while it learns to predict tokens,
//! each text's embedding where the base put it.
//!
//! Token prediction alone moves such an encoder away from the embeddings it was trained for:
//! an all-minilm-l6-v2 adapted by one masked-LM epoch fine-tuned worse than its parent
//! (BENCHMARKS §6b). The anchor adds `weight × (1 − cos)` between the pooled output of the
//! masked text and the base's embedding of the clean text, computed once before training.

use crate::model::encoder::classifier::{mean_pool, Pooling};
use crate::model::encoder::Encoder;
use crate::model::hf::tokenize::pad_batch;
use crate::model::ops::layers::Mode;
use candle_core::{DType, Device, Result, Tensor, D};

/// The anchor's weight when a request gives none: on for a base whose sentence-transformers
/// files name its pooling (a sentence-embedding model), off for any other (a masked-LM
/// checkpoint such as bert-base, whose own pre-training task this continues).
pub fn default_weight(sentence_pooling: Option<Pooling>) -> f64 {
    if sentence_pooling.is_some() {
        DEFAULT_WEIGHT
    } else {
        0.0
    }
}

/// Weights from 30 to 1,000 fine-tuned alike on banking77, 10 a little worse (BENCHMARKS §6b);
/// the higher the weight, the less the prediction head learns (held-out perplexity 358 at 30,
/// 515 at 100, 1,090 at 1,000): 100 sits inside the plateau with the head still learning.
const DEFAULT_WEIGHT: f64 = 100.0;

/// The sentence embedding as the base's sentence-transformers pooling reads it, `[b, h]` f32:
/// the mean over real tokens, or the first token's hidden state.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let hidden = hidden.to_dtype(DType::F32)?;
    match pooling {
        // A sentence embedding never reads every token: `token` pools as the mean.
        Pooling::Mean | Pooling::Token => mean_pool(&hidden, mask),
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
    }
}

/// Rows scaled to unit length (a zero row stays zero).
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// The unit-length embeddings `[n, h]` of `seqs` under `bert` (eval mode), in order.
pub fn embed(bert: &Encoder, seqs: &[Vec<u32>], pooling: Pooling, pad: u32, device: &Device) -> Result<Tensor> {
    // Sorted by length so that each chunk pads little; put back in order at the end.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut parts = Vec::new();
    for chunk in order.chunks(64) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
        let b = pad_batch(&batch, pad, device)?;
        let hidden = bert.forward(&b.ids, &b.type_ids, &b.mask, &mut Mode::Eval)?;
        parts.push(unit_rows(&pool(&hidden, &b.mask, pooling)?)?);
    }
    if parts.is_empty() {
        candle_core::bail!("no texts to embed");
    }
    let sorted = Tensor::cat(&parts, 0)?;
    let mut back = vec![0u32; seqs.len()];
    for (pos, &i) in order.iter().enumerate() {
        back[i] = pos as u32;
    }
    sorted.index_select(&Tensor::new(back, device)?, 0)
}

/// Mean of `1 − cos(pooled_i, target_i)` over the rows; `targets` are unit length.
pub fn loss(pooled: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let cos = unit_rows(pooled)?.mul(targets)?.sum(D::Minus1)?;
    cos.affine(-1.0, 1.0)?.mean_all()
}

/// Mean cosine similarity of two sets of unit rows, row by row.
pub fn similarity(a: &Tensor, b: &Tensor) -> Result<f64> {
    a.mul(b)?.sum(D::Minus1)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// A pre-training run's anchor: the base's embeddings of its texts, taken before training.
pub struct Anchor {
    pub pooling: Pooling,
    pub weight: f64,
    /// The base's unit embeddings of the training texts (`None` when the weight is 0: only
    /// the drift is measured).
    train: Option<Tensor>,
    held_out: Vec<Vec<u32>>,
    /// The base's unit embeddings of `held_out`.
    held_out_base: Tensor,
    pad: u32,
}

impl Anchor {
    /// Embeds the texts under `base` (the base's weights, before any step).
    pub fn new(base: &Encoder, train: &[Vec<u32>], held_out: Vec<Vec<u32>>, pooling: Pooling, weight: f64, pad: u32) -> Result<Self> {
        let device = base.device();
        let train = if weight > 0.0 { Some(embed(base, train, pooling, pad, &device)?) } else { None };
        let held_out_base = embed(base, &held_out, pooling, pad, &device)?;
        Ok(Self { pooling, weight, train, held_out, held_out_base, pad })
    }

    /// What the event log says of it.
    pub fn describe(&self) -> String {
        match self.train {
            Some(_) => {
                format!("keeping sentence embeddings ({} pooling) near the base's: anchor weight {}", self.pooling.as_str(), self.weight)
            }
            None => format!("sentence embeddings ({} pooling) are free to move: anchor weight 0", self.pooling.as_str()),
        }
    }

    /// The base's embeddings of the training texts `indices`, when the anchor is on.
    pub fn targets(&self, indices: &[usize]) -> Result<Option<Tensor>> {
        let Some(all) = &self.train else { return Ok(None) };
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        all.index_select(&Tensor::new(idx, all.device())?, 0).map(Some)
    }

    /// `weight × (1 − cos)` of a batch's last hidden states against its `targets`.
    pub fn term(&self, hidden: &Tensor, mask: &Tensor, targets: &Tensor) -> Result<Tensor> {
        loss(&pool(hidden, mask, self.pooling)?, targets)?.affine(self.weight, 0.0)
    }

    /// How close the held-out texts' embeddings under `now` stay to the base's.
    pub fn similarity(&self, now: &Encoder) -> Result<f64> {
        similarity(&embed(now, &self.held_out, self.pooling, self.pad, &now.device())?, &self.held_out_base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_is_zero_on_the_target_direction_and_one_when_orthogonal() -> Result<()> {
        let d = Device::Cpu;
        let targets = unit_rows(&Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &d)?)?;
        let same = Tensor::new(&[[6f32, 8.0], [0.0, 0.5]], &d)?;
        assert!(loss(&same, &targets)?.to_scalar::<f32>()?.abs() < 1e-6);
        let orthogonal = Tensor::new(&[[-4f32, 3.0], [1.0, 0.0]], &d)?;
        assert!((loss(&orthogonal, &targets)?.to_scalar::<f32>()? - 1.0).abs() < 1e-6);
        assert!((similarity(&unit_rows(&same)?, &targets)? - 1.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn only_a_sentence_embedding_base_is_anchored_by_default() {
        assert!(default_weight(Some(Pooling::Mean)) > 0.0);
        assert!(default_weight(Some(Pooling::Cls)) > 0.0);
        assert_eq!(default_weight(None), 0.0);
    }
}
