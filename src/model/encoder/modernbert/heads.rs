//! The task heads over ModernBERT: sequence and token classification, masked LM.

use super::{Dense, ModernBert, ModernBertConfig, Norm};
use crate::model::encoder::post_norm::Getter;
use crate::model::ops::layers::Mode;
use candle_core::{Result, Tensor, D};

/// ModernBERT's prediction head: `head.dense` → GELU → `head.norm`, under every task's output layer.
struct PredictionHead {
    dense: Dense,
    norm: Norm,
}

impl PredictionHead {
    fn load(get: &Getter, cfg: &ModernBertConfig) -> Result<Self> {
        Ok(Self {
            dense: Dense::load(get, "head.dense", cfg.classifier_bias)?,
            norm: Norm::load(get, "head.norm", cfg.norm_bias, cfg.norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.dense.forward(x)?.gelu_erf()?)
    }
}

/// The encoder's tensors, whose names carry `model.` under a task's head.
fn inner<'a>(get: &'a Getter) -> impl Fn(&str) -> Result<Tensor> + 'a {
    move |n: &str| get(&format!("model.{n}"))
}

/// ModernBertForSequenceClassification (pooling `[CLS]` or the mean over tokens, then the head,
/// dropout and `classifier`) or, `per_token`, ModernBertForTokenClassification (the head and
/// `classifier` on every token).
pub struct ModernBertClassifier {
    pub encoder: ModernBert,
    head: PredictionHead,
    classifier: Dense,
    per_token: bool,
}

impl ModernBertClassifier {
    /// Builds the classifier from tensors under transformers' names (the encoder's under `model.`).
    pub fn load(get: &Getter, cfg: &ModernBertConfig, per_token: bool) -> anyhow::Result<Self> {
        Ok(Self {
            encoder: ModernBert::load(&inner(get), cfg)?,
            head: PredictionHead::load(get, cfg)?,
            classifier: Dense::load(get, "classifier", true)?,
            per_token,
        })
    }

    /// Logits `[batch, labels]`, or `[batch, seq, labels]` per token.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let hidden = self.encoder.forward(ids, mask, mode)?;
        let pooled = match (self.per_token, self.encoder.cfg.classifier_pooling.as_str()) {
            (true, _) => hidden,
            (false, "mean") => {
                let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
                hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?
            }
            (false, _) => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let head = self.head.forward(&pooled)?;
        self.classifier.forward(&mode.dropout(&head, self.encoder.cfg.classifier_dropout)?)
    }
}

/// ModernBertForMaskedLM: the head, then a decoder tied to the token embeddings with its own
/// bias (`decoder.bias`, where the config's `decoder_bias` is on).
pub struct ModernBertMaskedLm {
    pub encoder: ModernBert,
    head: PredictionHead,
    decoder_bias: Option<Tensor>,
}

impl ModernBertMaskedLm {
    pub fn load(get: &Getter, cfg: &ModernBertConfig) -> anyhow::Result<Self> {
        Ok(Self {
            encoder: ModernBert::load(&inner(get), cfg)?,
            head: PredictionHead::load(get, cfg)?,
            decoder_bias: if cfg.decoder_bias { Some(get("decoder.bias")?) } else { None },
        })
    }

    /// Logits over the vocabulary `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let h = self.head.forward(&self.encoder.forward(ids, mask, mode)?)?;
        let logits = h.broadcast_matmul(&self.encoder.embeddings.t()?)?;
        match &self.decoder_bias {
            Some(b) => logits.broadcast_add(b),
            None => Ok(logits),
        }
    }
}
