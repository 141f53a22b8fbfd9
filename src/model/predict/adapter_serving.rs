//! Many LoRA adapters served over one loaded base: an adapter is its low-rank pairs and its
//! head (kilobytes to a few MiB), and one forward pass of the base can hold rows for different
//! adapters (see `model::encoder::adapters`).

use super::predictor::{length_buckets, Head, LoadedClassifier};
use crate::model::encoder::adapters::{LowRank, LowRankSet, Target};
use crate::model::encoder::arch::Arch;
use crate::model::encoder::classifier::{OwnPooler, Pooling, HEAD_NAMES};
use crate::model::encoder::config::EncoderConfig;
use crate::model::hf::lora::{inspect_adapter, Adapter};
use crate::model::hf::tokenize::pad_batch_typed;
use crate::model::ops::layers::{LayerNorm, Linear};
use anyhow::Context;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An adapter loaded for serving over a shared base.
pub struct LoadedAdapter {
    pub set: LowRankSet,
    head: Linear,
    /// Its own pooler, where the head includes one (RoBERTa's `classifier.dense`, ModernBERT's
    /// `head`).
    pooler: Option<OwnPooler>,
    pub labels: Vec<String>,
    /// What its head's outputs are.
    pub head_kind: Head,
    /// Its decision threshold per label, when multi-label and tuned.
    pub thresholds: Option<Vec<f32>>,
    /// Divides its logits before the probabilities are taken (1 for none).
    pub temperature: f32,
    /// The base dir it runs over, and the pooling its head reads.
    pub base: PathBuf,
    pub pooling: Pooling,
    /// Bytes of its tensors.
    pub bytes: usize,
}

impl LoadedAdapter {
    /// Loads the adapter in `dir` for serving over a shared base, its tensors in `dtype` on
    /// `device`. `None` when it changes more than the encoder's dense layers and the head (an
    /// adapter of the pooler or the embeddings): such a one is served merged into its base.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Option<Self>> {
        let info = inspect_adapter(dir)?;
        let adapter = Adapter::load(dir, device)?;
        let only_dense = adapter.pairs.keys().all(|name| Target::of_weight(name).is_some());
        let cfg = &info.info.config;
        let pooler_names = cfg.arch().pooler_names();
        let only_head = adapter.replaced.keys().all(|name| HEAD_NAMES.contains(&name.as_str()) || pooler_names.contains(&name.as_str()));
        // DeBERTa's adapted query and key also project the relative embeddings, once per pass:
        // its adapters are served merged.
        if !(only_dense && only_head) || cfg.arch() == Arch::Deberta {
            return Ok(None);
        }
        check_shapes(&adapter, &info.info.config)?;
        let mut set = LowRankSet::from_adapter(&adapter);
        let mut bytes = 0;
        for (a, b) in set.pairs.values_mut() {
            *a = a.to_dtype(dtype)?;
            *b = b.to_dtype(dtype)?;
            bytes += (a.elem_count() + b.elem_count()) * dtype.size_in_bytes();
        }
        let get = |n: &str| adapter.replaced.get(n).cloned().with_context(|| format!("the adapter carries no {n}"));
        let mut head = Linear::new(get(HEAD_NAMES[0])?.to_dtype(dtype)?, get(HEAD_NAMES[1])?.to_dtype(dtype)?);
        head.prepare_for_inference()?;
        bytes += head.bytes();
        let pooler = match (adapter.replaced.get(pooler_names[0]), adapter.replaced.get(pooler_names[1])) {
            (Some(w), Some(second)) => {
                let (w, second) = (w.to_dtype(dtype)?, second.to_dtype(dtype)?);
                // ModernBERT's head: a dense layer without a bias, then a norm (without one).
                let modern = cfg.arch() == Arch::ModernBert;
                let zeros = second.zeros_like()?;
                let mut dense = Linear::new(w, if modern { zeros.clone() } else { second.clone() });
                dense.prepare_for_inference()?;
                bytes += dense.bytes() + if modern { second.elem_count() * dtype.size_in_bytes() } else { 0 };
                let norm = modern.then(|| LayerNorm { weight: second, bias: zeros, eps: cfg.layer_norm_eps });
                Some(OwnPooler { dense, norm })
            }
            _ => None,
        };
        let labels = info.info.labels.clone().unwrap_or_default();
        let pooling = match info.info.config.is_token_classifier() {
            true => Pooling::Token,
            false => info.info.config.pooling().and_then(|p| Pooling::parse(&p)).unwrap_or(Pooling::Cls),
        };
        let kind = Head::of(&info.info.config);
        let thresholds = info.info.config.thresholds(&labels).filter(|_| kind == Head::MultiLabel);
        let temperature = info.info.config.temperature();
        Ok(Some(Self { set, head, pooler, labels, head_kind: kind, thresholds, temperature, base: info.base, pooling, bytes }))
    }

    /// Scores from logits as its head says; at the adapter's temperature when `calibrated`.
    pub fn probabilities(&self, logits: &[f32], calibrated: bool) -> Vec<f32> {
        self.head_kind.scores(logits, if calibrated { self.temperature } else { 1.0 })
    }
}

/// Refuses an adapter whose pairs or head do not fit its base: served over a shared base, a
/// mismatch would fail (or panic in) the passes it shares with other adapters' rows.
fn check_shapes(adapter: &Adapter, cfg: &EncoderConfig) -> anyhow::Result<()> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    for (name, (a, b)) in &adapter.pairs {
        let (layer, target) = Target::of_weight(name).with_context(|| format!("the adapter changes {name}"))?;
        anyhow::ensure!(layer < cfg.num_hidden_layers, "the adapter changes layer {layer}; the base has {}", cfg.num_hidden_layers);
        let modern = cfg.arch() == Arch::ModernBert;
        let (inp, out) = match target {
            // ModernBERT's fused `Wqkv`, and its GeGLU `Wi` (gate and value).
            Target::Query if modern => (h, 3 * h),
            Target::Intermediate if modern => (h, 2 * i),
            Target::Intermediate => (h, i),
            Target::Output => (i, h),
            _ => (h, h),
        };
        let r = adapter.config.r;
        anyhow::ensure!(
            a.dims() == [r, inp] && b.dims() == [out, r],
            "the adapter's {name} pair is {:?} and {:?}; its base needs [{r}, {inp}] and [{out}, {r}]",
            a.dims(),
            b.dims()
        );
    }
    let head = adapter.replaced.get(HEAD_NAMES[0]).context("the adapter carries no classifier head")?;
    anyhow::ensure!(head.dim(1)? == h, "the adapter's head reads {} inputs; its base gives {h}", head.dim(1)?);
    if let Some(p) = adapter.replaced.get(cfg.arch().pooler_names()[0]) {
        anyhow::ensure!(p.dims() == [h, h], "the adapter's pooler is {:?}; its base needs [{h}, {h}]", p.dims());
    }
    Ok(())
}

impl LoadedClassifier {
    /// Raw logits for each sequence, in input order, each through its own adapter (`None`: this
    /// model's own head). Sequences are batched by length as in [`LoadedClassifier::logits`];
    /// within a pass, the rows of one adapter are put side by side so that each adds its
    /// low-rank terms once.
    pub fn logits_mixed(
        &self,
        seqs: &[Vec<u32>],
        adapters: &[Option<Arc<LoadedAdapter>>],
        batch_size: usize,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        self.logits_mixed_typed(seqs, &[], adapters, batch_size)
    }

    /// [`Self::logits_mixed`] with each sequence's token types (`types` empty, or an empty
    /// entry, for all 0).
    pub fn logits_mixed_typed(
        &self,
        seqs: &[Vec<u32>],
        types: &[Vec<u32>],
        adapters: &[Option<Arc<LoadedAdapter>>],
        batch_size: usize,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::ensure!(seqs.len() == adapters.len(), "one adapter (or none) per sequence");
        let key = |i: usize| adapters[i].as_ref().map_or(0, |a| Arc::as_ptr(a) as usize);
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![Vec::new(); seqs.len()];
        for chunk in length_buckets(&order, seqs, batch_size.max(1)) {
            let mut chunk = chunk.to_vec();
            chunk.sort_by_key(|&i| key(i));
            let mut groups: Vec<(std::ops::Range<usize>, Option<&LowRankSet>)> = Vec::new();
            for (row, &i) in chunk.iter().enumerate() {
                match groups.last_mut() {
                    Some((rows, _)) if key(chunk[rows.start]) == key(i) => rows.end = row + 1,
                    _ => groups.push((row..row + 1, adapters[i].as_ref().map(|a| &a.set))),
                }
            }
            let refs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            let type_refs: Vec<&[u32]> = chunk.iter().map(|&i| types.get(i).map_or(&[][..], Vec::as_slice)).collect();
            let batch = pad_batch_typed(&refs, &type_refs, self.pad_id, &self.device)?;
            let poolings: Vec<(Pooling, Option<&OwnPooler>)> = groups
                .iter()
                .map(|(rows, _)| {
                    adapters[chunk[rows.start]].as_ref().map_or((self.model.pooling(), None), |a| (a.pooling, a.pooler.as_ref()))
                })
                .collect();
            let pooled =
                self.model.pooled_groups(&batch.ids, &batch.type_ids, &batch.mask, &LowRank { groups: groups.clone() }, &poolings)?;
            for ((rows, _), part) in groups.iter().zip(pooled) {
                let logits = match &adapters[chunk[rows.start]] {
                    Some(a) => a.head.forward(&part)?,
                    None => self.model.head_forward(&part)?,
                };
                let logits = super::predictor::rows_of(&logits, &refs[rows.clone()])?;
                for (&i, row) in chunk[rows.clone()].iter().zip(logits) {
                    out[i] = row;
                }
            }
        }
        Ok(out)
    }
}
