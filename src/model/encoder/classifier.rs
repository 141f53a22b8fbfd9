//! Sequence classification on top of our encoder: pooling, dropout and a linear head
//! (`BertForSequenceClassification` for `cls` pooling; `RobertaForSequenceClassification`'s
//! head is the same dense → tanh → linear on the first token, with one more dropout).

use super::adapters::{LowRank, LowRankSet};
use super::arch::{Arch, PoolerAct};
use super::config::EncoderConfig;
use super::post_norm::Getter;
use super::Encoder;
use crate::model::ops::layers::{activation, Act, LayerNorm, Linear, Mode};
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// How the head reads the encoder's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The pooler (dense + tanh) over `[CLS]`, as transformers' `BertForSequenceClassification`.
    Cls,
    /// Mean of the last hidden states over real (non-padding) tokens.
    Mean,
    /// No pooling: the head reads every token (token classification), giving `[batch, tokens,
    /// labels]`.
    Token,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::Token => "token",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cls" => Some(Pooling::Cls),
            "mean" => Some(Pooling::Mean),
            "token" => Some(Pooling::Token),
            _ => None,
        }
    }
}

/// Encoder + pooling + classification head.
pub struct Classifier {
    pub encoder: Encoder,
    pooler: Option<Linear>,
    head: Linear,
    pooling: Pooling,
    dropout: f64,
    /// Dropout on `[CLS]` before the pooler's dense layer too (RoBERTa's head).
    dropout_before_pooler: bool,
    /// After the pooler's dense layer: tanh, or GELU (ELECTRA's head).
    pooler_act: PoolerAct,
    /// ModernBERT's head: a LayerNorm after the activation, and the head over mean pooling too.
    pooler_norm: Option<LayerNorm>,
    /// An adapter every row takes (a LoRA job's, while it trains and evaluates).
    low_rank: Option<LowRankSet>,
}

/// An adapter's own pooler, served over a shared base: its dense layer and, for ModernBERT's
/// head, its norm.
pub struct OwnPooler {
    pub dense: Linear,
    pub norm: Option<LayerNorm>,
}

/// Parameter names of the pooler and head (after the encoder's).
pub const POOLER_NAMES: [&str; 2] = ["pooler.dense.weight", "pooler.dense.bias"];
pub const HEAD_NAMES: [&str; 2] = ["classifier.weight", "classifier.bias"];

impl Classifier {
    /// Builds the classifier from named tensors (our names, see `arch`).
    pub fn load(get: &Getter, cfg: &EncoderConfig, pooling: Pooling) -> Result<Self> {
        let encoder = Encoder::load(get, cfg)?;
        let modern = cfg.arch() == Arch::ModernBert;
        let [dense, second] = cfg.arch().pooler_names();
        // ModernBERT's head (dense, activation, norm) runs under every task's output layer,
        // on each token for token classification.
        let pooler = match (pooling, modern) {
            (Pooling::Token, false) | (Pooling::Mean, false) => None,
            (Pooling::Cls, false) => Some(Linear::new(get(dense)?, get(second)?)),
            // ModernBERT's head has no bias: a zero one, which is no parameter.
            (_, true) => {
                let w = get(dense)?;
                Some(Linear::new(w.clone(), Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?))
            }
        };
        let pooler_norm = match (&pooler, modern) {
            (Some(p), true) => {
                let weight = get(second)?;
                Some(LayerNorm { bias: Tensor::zeros(p.bias.dims(), weight.dtype(), weight.device())?, weight, eps: cfg.layer_norm_eps })
            }
            _ => None,
        };
        let head = Linear::new(get(HEAD_NAMES[0])?, get(HEAD_NAMES[1])?);
        let (dropout_before_pooler, pooler_act) = (cfg.arch().dropout_before_pooler(), cfg.arch().pooler_act());
        let dropout = cfg.classifier_dropout_prob();
        Ok(Self { encoder, pooler, head, pooling, dropout, dropout_before_pooler, pooler_act, pooler_norm, low_rank: None })
    }

    /// Readies the model for inference only (it can no longer be trained), with the
    /// encoder's dense layers in bf16 when `bf16`.
    pub fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        self.encoder.prepare_for_inference(bf16)?;
        if let Some(p) = &mut self.pooler {
            p.prepare_for_inference()?;
        }
        self.head.prepare_for_inference()
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.encoder.bytes() + self.pooler.as_ref().map_or(0, Linear::bytes) + self.head.bytes()
    }

    /// Logits `[batch, labels]` (`[batch, tokens, labels]` with [`Pooling::Token`]).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let lr = match &self.low_rank {
            Some(set) => LowRank::single(set, ids.dim(0)?),
            None => LowRank::default(),
        };
        let pooled = self.pooled(ids, type_ids, mask, mode, &lr)?;
        let pooled = mode.dropout(&pooled, self.dropout)?;
        self.head.forward(&pooled)
    }

    /// Whether [`Classifier::logits_packed`] runs here: a pooled head (not per token), no
    /// adapter, and an encoder that packs (see `PostNorm::packs`, `ModernBert::packs`).
    pub fn packs(&self) -> bool {
        let pooled = self.pooling != Pooling::Token && self.low_rank.is_none();
        pooled
            && match &self.encoder {
                Encoder::PostNorm(e) => e.packs(),
                Encoder::Modern(e) => e.packs(),
                Encoder::Deberta(_) => false,
            }
    }

    /// The packed encoder's hidden states `[tokens, hidden]`, or with `first_only` each text's
    /// first token's `[texts, hidden]`.
    fn hidden_packed(&self, ids: &[u32], type_ids: &[u32], lens: &[usize], first_only: bool) -> Result<Tensor> {
        match &self.encoder {
            Encoder::PostNorm(e) => e.forward_packed(ids, type_ids, lens, first_only),
            Encoder::Modern(e) if first_only => {
                let firsts: Vec<u32> = crate::model::ops::varlen::starts(lens).into_iter().map(|r| r as u32).collect();
                let hidden = e.forward_packed(ids, lens)?;
                hidden.index_select(&Tensor::from_vec(firsts, lens.len(), hidden.device())?, 0)
            }
            Encoder::Modern(e) => e.forward_packed(ids, lens),
            Encoder::Deberta(_) => candle_core::bail!("packed inference does not run on deberta-v2"),
        }
    }

    /// Inference logits `[texts, labels]` of texts packed without padding (`ids`, `type_ids`
    /// and `lens` as `PostNorm::forward_packed` takes them; ModernBERT reads no types): what
    /// [`Classifier::forward`] gives on the padded batch. Only where [`Classifier::packs`].
    pub fn logits_packed(&self, ids: &[u32], type_ids: &[u32], lens: &[usize]) -> Result<Tensor> {
        let pooled = match (&self.pooler, self.pooling) {
            (Some(pooler), Pooling::Cls) => self.pool(pooler, &self.hidden_packed(ids, type_ids, lens, true)?)?,
            (pooler, _) => {
                let hidden = self.hidden_packed(ids, type_ids, lens, false)?;
                // Each text's mean as one product: row b of `avg` holds 1/len over text b's rows.
                let t = ids.len();
                let mut avg = vec![0f32; lens.len() * t];
                let mut start = 0;
                for (b, &n) in lens.iter().enumerate() {
                    avg[b * t + start..b * t + start + n].fill(1.0 / n.max(1) as f32);
                    start += n;
                }
                let mean = Tensor::from_vec(avg, (lens.len(), t), hidden.device())?.matmul(&hidden)?;
                // As `pooled` does: a pooler over the mean where the model has one.
                match pooler {
                    Some(p) => self.pool(p, &mean)?,
                    None => mean,
                }
            }
        };
        self.head.forward(&pooled)
    }

    /// The model with `set`'s low-rank terms added for every row (see `model::encoder::adapters`).
    pub fn with_low_rank(mut self, set: LowRankSet) -> Self {
        self.low_rank = Some(set);
        self
    }

    /// The head alone on pooled features (no dropout: for inference).
    pub fn head_forward(&self, pooled: &Tensor) -> Result<Tensor> {
        self.head.forward(pooled)
    }

    /// What the head reads, `[batch, hidden]` (before the head's dropout), with each row's
    /// adapter terms added to the encoder's dense layers.
    pub fn pooled(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode, lr: &LowRank) -> Result<Tensor> {
        match (&self.pooler, self.pooling) {
            // Only `[CLS]` reaches the head: the last layer's output projection and feed-forward
            // run on that one row, in training too (the other rows' gradients would be zero).
            (Some(pooler), Pooling::Cls) => {
                let hidden = self.encoder.forward_low_rank(ids, type_ids, mask, mode, true, lr)?.narrow(1, 0, 1)?.squeeze(1)?;
                let hidden = if self.dropout_before_pooler { mode.dropout(&hidden, self.dropout)? } else { hidden };
                self.pool(pooler, &hidden)
            }
            (Some(pooler), Pooling::Token) => self.pool(pooler, &self.encoder.forward_low_rank(ids, type_ids, mask, mode, false, lr)?),
            (None, Pooling::Token) => self.encoder.forward_low_rank(ids, type_ids, mask, mode, false, lr),
            (Some(pooler), Pooling::Mean) => {
                self.pool(pooler, &mean_pool(&self.encoder.forward_low_rank(ids, type_ids, mask, mode, false, lr)?, mask)?)
            }
            _ => mean_pool(&self.encoder.forward_low_rank(ids, type_ids, mask, mode, false, lr)?, mask),
        }
    }

    /// The pooler's dense layer and its activation (then ModernBERT's norm) on pooled rows `[batch, hidden]`.
    fn pool(&self, pooler: &Linear, first: &Tensor) -> Result<Tensor> {
        self.pool_with(pooler, self.pooler_norm.as_ref(), first)
    }

    /// The head's first layer over `first`, with `norm` after the activation where there is one.
    fn pool_with(&self, pooler: &Linear, norm: Option<&LayerNorm>, first: &Tensor) -> Result<Tensor> {
        let y = pooler.forward(first)?;
        let y = match self.pooler_act {
            PoolerAct::Tanh => y.tanh()?,
            PoolerAct::Gelu => activation(&y, Act::Gelu)?,
            PoolerAct::Relu => y.relu()?,
        };
        match norm {
            Some(n) => crate::model::ops::kernels::layer_norm(&y, &n.weight, &n.bias, n.eps),
            None => Ok(y),
        }
    }

    /// How the head's input is pooled.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The pooled vectors of each group of a batch whose groups of rows (`lr`'s groups, in order) pool each
    /// their own way (`poolings`, one per group, with the group's own pooler where it brings
    /// one, as a RoBERTa adapter's `classifier.dense`): adapters of one base with different
    /// poolings share the encoder's pass. Inference only.
    pub fn pooled_groups(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        lr: &LowRank,
        poolings: &[(Pooling, Option<&OwnPooler>)],
    ) -> Result<Vec<Tensor>> {
        let first_only = poolings.iter().all(|(p, _)| *p == Pooling::Cls);
        let hidden = self.encoder.forward_low_rank(ids, type_ids, mask, &mut Mode::Eval, first_only, lr)?;
        let mut parts = Vec::with_capacity(poolings.len());
        for ((rows, _), (pooling, own)) in lr.groups.iter().zip(poolings) {
            let h = hidden.narrow(0, rows.start, rows.len())?;
            let (pooler, norm) = match own {
                Some(o) => (Some(&o.dense), o.norm.as_ref().or(self.pooler_norm.as_ref())),
                None => (self.pooler.as_ref(), self.pooler_norm.as_ref()),
            };
            parts.push(match (pooling, pooler) {
                (Pooling::Cls, Some(pooler)) => self.pool_with(pooler, norm, &h.narrow(1, 0, 1)?.squeeze(1)?)?,
                (Pooling::Cls, None) => candle_core::bail!("cls pooling over a base that has no pooler"),
                (Pooling::Mean, Some(pooler)) if norm.is_some() => {
                    self.pool_with(pooler, norm, &mean_pool(&h, &mask.narrow(0, rows.start, rows.len())?)?)?
                }
                (Pooling::Mean, _) => mean_pool(&h, &mask.narrow(0, rows.start, rows.len())?)?,
                // Every token: `[rows, tokens, hidden]`, beside other groups' `[rows, hidden]`.
                (Pooling::Token, Some(pooler)) if norm.is_some() => self.pool_with(pooler, norm, &h)?,
                (Pooling::Token, _) => h,
            });
        }
        Ok(parts)
    }
}

/// Mean of `hidden` `[b, s, h]` over positions where `mask` `[b, s]` is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}
