//! Low-rank terms added to the encoder's dense layers during one forward pass: one adapter
//! for the whole batch (LoRA training), or a different adapter per group of rows (serving many
//! adapters of one base in one batch). The base's dense layers run once for every row; each row
//! adds only its own adapter's `scale · (x·Aᵀ)·Bᵀ`.

use crate::model::ops::adapter_terms::{self, Pair};
use crate::model::ops::layers::{Linear, Mode};
use candle_core::{Result, Tensor};
use std::collections::HashMap;
use std::ops::Range;

/// A dense layer of an encoder layer that an adapter can change (peft's module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `query`; ModernBERT's fused `attn.Wqkv` (query, key and value in one module).
    Query,
    Key,
    Value,
    /// `attention.output.dense`; ModernBERT's `attn.Wo`.
    AttnOut,
    /// `intermediate.dense`; ModernBERT's `mlp.Wi`.
    Intermediate,
    /// `output.dense`; ModernBERT's `mlp.Wo`.
    Output,
}

/// How an encoder names its layers' dense weights: BERT's `encoder.layer.N.…` (every
/// architecture but ModernBERT, whose names are translated to BERT's on load) or ModernBERT's
/// `layers.N.…`, where one fused `Wqkv` holds the query, key and value projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Bert,
    Modern,
    /// DeBERTa's: BERT's layers with `query_proj`, `key_proj`, `value_proj`.
    Deberta,
}

impl Target {
    pub const ALL: [Target; 6] = [Target::Query, Target::Key, Target::Value, Target::AttnOut, Target::Intermediate, Target::Output];

    /// The target that stands for this one in `layout`: in ModernBERT's, the key and value
    /// projections are the fused `Wqkv`, adapted as [`Target::Query`].
    pub fn in_layout(self, layout: Layout) -> Target {
        match (layout, self) {
            (Layout::Modern, Target::Key | Target::Value) => Target::Query,
            _ => self,
        }
    }

    /// Our name of the weight in encoder layer `layer`.
    pub fn weight_name(self, layer: usize, layout: Layout) -> String {
        match layout {
            Layout::Bert | Layout::Deberta => {
                let deberta = layout == Layout::Deberta;
                let module = match self {
                    Target::Query if deberta => "attention.self.query_proj",
                    Target::Key if deberta => "attention.self.key_proj",
                    Target::Value if deberta => "attention.self.value_proj",
                    Target::Query => "attention.self.query",
                    Target::Key => "attention.self.key",
                    Target::Value => "attention.self.value",
                    Target::AttnOut => "attention.output.dense",
                    Target::Intermediate => "intermediate.dense",
                    Target::Output => "output.dense",
                };
                format!("encoder.layer.{layer}.{module}.weight")
            }
            Layout::Modern => {
                let module = match self {
                    Target::Query | Target::Key | Target::Value => "attn.Wqkv",
                    Target::AttnOut => "attn.Wo",
                    Target::Intermediate => "mlp.Wi",
                    Target::Output => "mlp.Wo",
                };
                format!("layers.{layer}.{module}.weight")
            }
        }
    }

    /// The target a weight name denotes (in either layout), with its layer; `None` for any
    /// other weight.
    pub fn of_weight(name: &str) -> Option<(usize, Target)> {
        let (rest, layouts) = match name.strip_prefix("encoder.layer.") {
            Some(rest) => (rest, &[Layout::Bert, Layout::Deberta][..]),
            None => (name.strip_prefix("layers.")?, &[Layout::Modern][..]),
        };
        let (layer, _) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let all = layouts.iter().flat_map(|&l| Target::ALL.into_iter().map(move |t| (t, l)));
        all.into_iter().find(|&(t, l)| t.weight_name(layer, l) == name).map(|(t, _)| (layer, t))
    }
}

/// One adapter's low-rank pairs: `(layer, target) → (A [r, in], B [out, r])`, and its scale
/// and dropout (applied to the pair's input in training only). A loaded peft adapter gives one
/// with `LowRankSet::from_adapter` (in `model::hf::lora`).
#[derive(Clone)]
pub struct LowRankSet {
    pub pairs: HashMap<(usize, Target), (Tensor, Tensor)>,
    pub scale: f64,
    pub dropout: f64,
}

impl LowRankSet {
    /// Whether the set changes `target` of `layer`.
    pub fn touches(&self, layer: usize, target: Target) -> bool {
        self.pairs.contains_key(&(layer, target))
    }
}

/// The adapters of one batch: each applies to a range of consecutive batch rows (ranges in
/// order, covering the batch; a row with no adapter is a range with `None`).
#[derive(Clone, Default)]
pub struct LowRank<'a> {
    pub groups: Vec<(Range<usize>, Option<&'a LowRankSet>)>,
}

impl<'a> LowRank<'a> {
    /// One adapter for all `rows`.
    pub fn single(set: &'a LowRankSet, rows: usize) -> Self {
        Self { groups: vec![(0..rows, Some(set))] }
    }

    /// These adapters over a batch's real tokens (`tokens` rows) instead of its `texts` rows,
    /// where that is one map: no adapter, or one for every text.
    pub fn over_tokens(&self, texts: usize, tokens: usize) -> Option<Self> {
        match self.groups.as_slice() {
            [] => Some(Self::default()),
            [(rows, set)] if *rows == (0..texts) => Some(Self { groups: vec![(0..tokens, *set)] }),
            _ => None,
        }
    }

    /// Whether any group changes `target` of `layer`.
    pub fn touches(&self, layer: usize, target: Target) -> bool {
        self.groups.iter().any(|(_, s)| s.is_some_and(|s| s.touches(layer, target)))
    }

    /// Each group's pair for `target` of `layer` with its scale; `None` where the group leaves
    /// that layer alone.
    fn pairs(&self, layer: usize, target: Target) -> Vec<(Range<usize>, Option<Pair<'a>>)> {
        let pair = |s: &'a LowRankSet| s.pairs.get(&(layer, target)).map(|(a, b)| (a, b, s.scale));
        self.groups.iter().map(|(rows, set)| (rows.clone(), set.and_then(pair))).collect()
    }

    /// `base`'s output for `x` plus each row's adapter term for `target` of `layer`. One adapter
    /// for the whole batch over a frozen CPU f32 layer (LoRA training) runs as one fused op.
    pub fn linear(&self, layer: usize, target: Target, base: &Linear, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        if let [(rows, Some(set))] = self.groups.as_slice() {
            if let Some((a, b)) = set.pairs.get(&(layer, target)).filter(|_| rows.start == 0 && rows.end == x.dim(0).unwrap_or(0)) {
                // One seed, taken where the composed path's dropout takes it: both draw the same mask.
                let dropout = (mode.is_train() && set.dropout > 0.0).then(|| (set.dropout, mode.seed()));
                if let Some(y) = base.forward_lora(x, a, b, set.scale, dropout)? {
                    return Ok(y);
                }
                if mode.is_train() {
                    let y = base.forward(x)?;
                    let d = lora_term(&dropout_or_none(x, dropout)?, a, b, set.scale)?;
                    return y + d;
                }
            }
        }
        self.add(layer, target, x, base.forward(x)?, mode)
    }

    /// `y` (the base layer's output for input `x`, both `[batch, seq, ·]`) plus each row's
    /// adapter term for `target` of `layer`.
    pub fn add(&self, layer: usize, target: Target, x: &Tensor, y: Tensor, mode: &mut Mode) -> Result<Tensor> {
        if !self.touches(layer, target) {
            return Ok(y);
        }
        if !mode.is_train() {
            let pairs = self.pairs(layer, target);
            if adapter_terms::applies(&pairs, x, &y) {
                return adapter_terms::add_terms(&pairs, x, &y, layer, target);
            }
        }
        let delta = |set: &LowRankSet, x: &Tensor, mode: &mut Mode| -> Result<Option<Tensor>> {
            let Some((a, b)) = set.pairs.get(&(layer, target)) else { return Ok(None) };
            Ok(Some(lora_term(&mode.dropout(x, set.dropout)?, a, b, set.scale)?))
        };
        if let [(rows, Some(set))] = self.groups.as_slice() {
            if rows.start == 0 && rows.end == y.dim(0)? {
                return match delta(set, x, mode)? {
                    Some(d) => y + d,
                    None => Ok(y),
                };
            }
        }
        let mut parts = Vec::with_capacity(self.groups.len());
        for (rows, set) in &self.groups {
            let yg = y.narrow(0, rows.start, rows.len())?;
            let d = match set {
                Some(set) => delta(set, &x.narrow(0, rows.start, rows.len())?, mode)?,
                None => None,
            };
            parts.push(match d {
                Some(d) => (yg + d)?,
                None => yg,
            });
        }
        Tensor::cat(&parts, 0)
    }
}

/// `scale·(x·Aᵀ)·Bᵀ` for `x` of any rank ≥ 2.
fn lora_term(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale
}

/// `x` with dropout `(p, seed)` applied, or `x` itself.
fn dropout_or_none(x: &Tensor, dropout: Option<(f64, u64)>) -> Result<Tensor> {
    match dropout {
        Some((p, seed)) => crate::model::ops::kernels::dropout(x, p, seed),
        None => Ok(x.clone()),
    }
}
