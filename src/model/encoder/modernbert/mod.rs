//! ModernBERT (answerdotai, 2024; the Ettin and mmBERT families share it): token embeddings and a
//! LayerNorm (no position table), pre-norm layers (the first without its attention norm) with one
//! fused `Wqkv`, rotary positions with a global and a local theta, global attention every
//! `global_attn_every_n_layers` layers and sliding-window attention over `local_attention` tokens
//! in the others, a GeGLU feed-forward, and a final norm. LayerNorms and dense layers carry a bias
//! only where the config says so. Differentiable on every device: the fused CPU ops where they
//! apply (attention, rotary, GeGLU, LayerNorm), the device-generic ops (one CUDA kernel each way)
//! elsewhere.

pub mod config;
pub mod heads;

pub use config::ModernBertConfig;
pub use heads::{ModernBertClassifier, ModernBertMaskedLm};

use super::adapters::{LowRank, Target};
use super::post_norm::Getter;
use crate::model::ops::device_ops::{Dropout, MaskedSoftmax};
use crate::model::ops::embedding::embed;
use crate::model::ops::geglu::geglu;
use crate::model::ops::kernels::{layer_norm, use_fused_cpu_kernels};
use crate::model::ops::layers::{tensor_bytes, Linear, Mode};
use crate::model::ops::rng;
use crate::model::ops::rotary::{rotary, rotary_qk_packed, RopeTable};
use crate::model::ops::rotary_attention::{rotary_attention, rotary_attention_unpadded};
use crate::model::ops::unpad::Unpadding;
use crate::model::ops::varlen::attention_packed_windowed;
use candle_core::{DType, Result, Tensor, D};

/// A LayerNorm whose bias is zeros (and no parameter) when the config has none.
pub(super) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    pub(super) fn load(get: &Getter, prefix: &str, with_bias: bool, eps: f64) -> Result<Self> {
        let weight = get(&format!("{prefix}.weight"))?;
        let bias = if with_bias { get(&format!("{prefix}.bias"))? } else { weight.zeros_like()? };
        Ok(Self { weight, bias, eps })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A dense layer, `x·Wᵀ (+ b)`, with or without a bias: our [`Linear`] (the fused CPU op in
/// training, the packed kernel once prepared for inference), with a zero bias that is no
/// parameter where the checkpoint has none.
pub(super) struct Dense {
    linear: Linear,
    has_bias: bool,
}

impl Dense {
    pub(super) fn load(get: &Getter, prefix: &str, with_bias: bool) -> Result<Self> {
        let weight = get(&format!("{prefix}.weight"))?;
        let bias = match with_bias {
            true => get(&format!("{prefix}.bias"))?,
            false => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
        };
        Ok(Self { linear: Linear::new(weight, bias), has_bias: with_bias })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)
    }

    /// Transposes and packs the weight for CPU inference (see [`Linear::pack`]).
    fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        self.linear.prepare_for_inference()?;
        self.linear.pack(bf16)
    }

    fn bytes(&self) -> usize {
        let zero_bias = if self.has_bias { 0 } else { tensor_bytes(&self.linear.bias) };
        self.linear.bytes().saturating_sub(zero_bias)
    }
}

struct Layer {
    /// `None` in the first layer, whose input is the embeddings' norm already.
    attn_norm: Option<Norm>,
    wqkv: Dense,
    wo: Dense,
    mlp_norm: Norm,
    wi: Dense,
    mlp_out: Dense,
    global: bool,
}

impl ModernBertConfig {
    /// The ModernBERT fields of a config read through [`config::config_to_bert`].
    pub fn of(cfg: &crate::model::EncoderConfig) -> anyhow::Result<Self> {
        Ok(serde_json::from_value(serde_json::to_value(cfg)?)?)
    }
}

/// The ModernBERT encoder: embeddings through the final norm.
pub struct ModernBert {
    pub(super) embeddings: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    final_norm: Norm,
    global_rope: RopeTable,
    local_rope: RopeTable,
    pub(super) cfg: ModernBertConfig,
}

impl ModernBert {
    /// Builds the encoder from tensors under ModernBertModel's names (`embeddings.tok_embeddings.weight`,
    /// `layers.0.attn.Wqkv.weight`, …, `final_norm.weight`).
    pub fn load(get: &Getter, cfg: &ModernBertConfig) -> anyhow::Result<Self> {
        cfg.check()?;
        let (nb, eps) = (cfg.norm_bias, cfg.norm_eps);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("layers.{i}");
            layers.push(Layer {
                attn_norm: if i == 0 { None } else { Some(Norm::load(get, &format!("{p}.attn_norm"), nb, eps)?) },
                wqkv: Dense::load(get, &format!("{p}.attn.Wqkv"), cfg.attention_bias)?,
                wo: Dense::load(get, &format!("{p}.attn.Wo"), cfg.attention_bias)?,
                mlp_norm: Norm::load(get, &format!("{p}.mlp_norm"), nb, eps)?,
                wi: Dense::load(get, &format!("{p}.mlp.Wi"), cfg.mlp_bias)?,
                mlp_out: Dense::load(get, &format!("{p}.mlp.Wo"), cfg.mlp_bias)?,
                global: cfg.is_global(i),
            });
        }
        let hd = cfg.head_dim();
        Ok(Self {
            embeddings: get("embeddings.tok_embeddings.weight")?,
            embed_norm: Norm::load(get, "embeddings.norm", nb, eps)?,
            layers,
            final_norm: Norm::load(get, "final_norm", nb, eps)?,
            global_rope: RopeTable::new(cfg.max_position_embeddings, hd, cfg.rope_theta(true)),
            local_rope: RopeTable::new(cfg.max_position_embeddings, hd, cfg.rope_theta(false)),
            cfg: cfg.clone(),
        })
    }

    /// The device its weights are on.
    pub fn device(&self) -> candle_core::Device {
        self.embeddings.device().clone()
    }

    /// Packs the dense layers for CPU inference (bf16 weights when `bf16`); it can no longer train.
    pub fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        if !self.embeddings.device().is_cpu() {
            return Ok(());
        }
        for l in &mut self.layers {
            for d in [&mut l.wqkv, &mut l.wo, &mut l.wi, &mut l.mlp_out] {
                d.prepare_for_inference(bf16)?;
            }
        }
        Ok(())
    }

    /// Whether [`ModernBert::forward_packed`] runs here: prepared for inference, on the CPU in f32
    /// with the fused kernels.
    pub fn packs(&self) -> bool {
        let cpu_f32 = self.embeddings.device().is_cpu() && self.embeddings.dtype() == DType::F32 && use_fused_cpu_kernels();
        cpu_f32 && self.layers.iter().all(|l| l.wqkv.linear.is_packed())
    }

    /// Inference over texts packed one after another without padding (`lens` each text's length),
    /// as transformers' ModernBERT runs unpadded under flash-attention: the hidden states
    /// `[tokens, hidden]`, each text's rotary positions from 0 and its attention (windowed in the
    /// local layers) over its own tokens. The same numbers as [`ModernBert::forward`] on the padded
    /// batch, with no work spent on padding. Only where [`ModernBert::packs`].
    pub fn forward_packed(&self, ids: &[u32], lens: &[usize]) -> Result<Tensor> {
        if !self.packs() || lens.iter().sum::<usize>() != ids.len() {
            candle_core::bail!(
                "the packed forward pass needs an encoder prepared for CPU f32 inference and lengths that sum to the tokens"
            );
        }
        let dev = self.device();
        let x = self.embeddings.index_select(&Tensor::from_slice(ids, ids.len(), &dev)?, 0)?;
        let mut x = self.embed_norm.forward(&x)?;
        let positions: Vec<usize> = lens.iter().flat_map(|&n| 0..n).collect();
        let heads = self.cfg.num_attention_heads;
        for layer in &self.layers {
            let h = match &layer.attn_norm {
                Some(n) => n.forward(&x)?,
                None => x.clone(),
            };
            let (table, window) = if layer.global { (&self.global_rope, None) } else { (&self.local_rope, Some(self.cfg.window())) };
            let qkv = rotary_qk_packed(&layer.wqkv.forward(&h)?, table, &positions)?;
            let attn = attention_packed_windowed(&qkv, lens, heads, window)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let up = layer.wi.forward(&layer.mlp_norm.forward(&x)?)?;
            x = (x + layer.mlp_out.forward(&geglu(&up)?)?)?;
        }
        self.final_norm.forward(&x)
    }

    /// Bytes of its weights.
    pub fn bytes(&self) -> usize {
        let dense = |d: &Dense| d.bytes();
        let norm = |n: &Norm| tensor_bytes(&n.weight) + tensor_bytes(&n.bias);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.as_ref().map_or(0, norm) + dense(&l.wqkv) + dense(&l.wo) + norm(&l.mlp_norm) + dense(&l.wi) + dense(&l.mlp_out)
            })
            .sum();
        tensor_bytes(&self.embeddings) + norm(&self.embed_norm) + layers + norm(&self.final_norm)
    }

    /// Hidden states `[batch, seq, hidden]` of token ids `[batch, seq]` with `mask` (`[batch, seq]`,
    /// 1 for tokens, 0 for padding at the end).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.forward_low_rank(ids, mask, mode, &LowRank::default())
    }

    /// [`ModernBert::forward`] with each row's adapter terms added to the dense layers they
    /// change (`Wqkv` as [`Target::Query`], `attn.Wo`, `mlp.Wi`, `mlp.Wo`).
    pub fn forward_low_rank(&self, ids: &Tensor, mask: &Tensor, mode: &mut Mode, lr: &LowRank) -> Result<Tensor> {
        let x = embed(&self.embeddings, ids, None, None)?;
        let mut x = mode.dropout(&self.embed_norm.forward(&x)?, self.cfg.embedding_dropout)?;
        let keys = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // Training (and its evaluations) on the CPU: the dense layers over the real tokens only.
        let (b, s) = mask.dims2()?;
        let fused = x.device().is_cpu() && x.dtype() == DType::F32 && use_fused_cpu_kernels();
        let unpad =
            (fused && !self.packs()).then(|| Unpadding::of(&keys, b, s)).flatten().and_then(|u| Some((lr.over_tokens(b, u.tokens())?, u)));
        let lr = match &unpad {
            Some((lr_tokens, u)) => {
                x = u.unpad(&x)?;
                lr_tokens
            }
            None => lr,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = match &layer.attn_norm {
                Some(n) => n.forward(&x)?,
                None => x.clone(),
            };
            let qkv = lr.linear(i, Target::Query, &layer.wqkv.linear, &h, mode)?;
            let attn = match &unpad {
                Some((_, u)) => self.attention_unpadded(layer, &qkv, &u.lens(), mode)?,
                None => self.attention(layer, &qkv, mask, &keys, mode)?,
            };
            let out = lr.linear(i, Target::AttnOut, &layer.wo.linear, &attn, mode)?;
            x = (x + mode.dropout(&out, self.cfg.attention_dropout)?)?;
            let up = lr.linear(i, Target::Intermediate, &layer.wi.linear, &layer.mlp_norm.forward(&x)?, mode)?;
            let gated = mode.dropout(&geglu(&up)?, self.cfg.mlp_dropout)?;
            x = (x + lr.linear(i, Target::Output, &layer.mlp_out.linear, &gated, mode)?)?;
        }
        let x = self.final_norm.forward(&x)?;
        match &unpad {
            Some((_, u)) => u.pad(&x),
            None => Ok(x),
        }
    }

    /// Attention over the fused projections `qkv` of texts packed without padding (`[tokens,
    /// 3·hidden]`, `lens` tokens each), on the CPU in f32.
    fn attention_unpadded(&self, layer: &Layer, qkv: &Tensor, lens: &[usize], mode: &mut Mode) -> Result<Tensor> {
        let (table, window) = if layer.global { (&self.global_rope, None) } else { (&self.local_rope, Some(self.cfg.window())) };
        let p = if mode.is_train() { self.cfg.attention_dropout } else { 0.0 };
        rotary_attention_unpadded(qkv, table, lens, self.cfg.num_attention_heads, p, mode.seed(), window)
    }

    /// Attention over the fused projections `qkv` (`[batch, seq, 3·hidden]`).
    fn attention(&self, layer: &Layer, qkv: &Tensor, mask: &Tensor, keys: &[f32], mode: &mut Mode) -> Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        let (table, window) = if layer.global { (&self.global_rope, None) } else { (&self.local_rope, Some(self.cfg.window())) };
        let (p, heads) = (if mode.is_train() { self.cfg.attention_dropout } else { 0.0 }, self.cfg.num_attention_heads);
        if qkv.device().is_cpu() && qkv.dtype() == DType::F32 && use_fused_cpu_kernels() {
            // The rotary embedding inside the attention op, which reads `Wqkv`'s output whole.
            return rotary_attention(qkv, table, keys, heads, p, mode.seed(), window);
        }
        let q = rotary(&qkv.narrow(D::Minus1, 0, hidden)?, table)?;
        let k = rotary(&qkv.narrow(D::Minus1, hidden, hidden)?, table)?;
        let v = qkv.narrow(D::Minus1, 2 * hidden, hidden)?;
        composed_attention(&q, &k, &v, mask, heads, window, p, mode)
    }
}

/// Multi-head attention on any device and dtype (what a GPU runs): the products by candle's
/// matmul, then scale, padding mask, the sliding window, softmax and dropout in one device op
/// with its own backward pass.
#[allow(clippy::too_many_arguments)]
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    nh: usize,
    window: Option<usize>,
    p: f64,
    mode: &mut Mode,
) -> Result<Tensor> {
    let (b, s, h) = q.dims3()?;
    let hd = h / nh;
    let heads = |t: &Tensor| t.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous();
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e4)?;
    let dropout = (p > 0.0).then(|| {
        let (keep_below, scale) = rng::keep_rule(p);
        Dropout { keep_below, scale, seed: mode.seed() }
    });
    let op = MaskedSoftmax { scale: 1.0 / (hd as f32).sqrt(), dropout, window };
    let probs = heads(q)?.matmul(&heads(k)?.t()?)?.contiguous()?.apply_op2(&bias, op)?;
    probs.matmul(&heads(v)?)?.transpose(1, 2)?.reshape((b, s, h))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_config_read_as_berts_is_written_back_as_transformers_wrote_it() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden/modernbert/classifier/config.json");
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = crate::model::EncoderConfig::from_json(&text).unwrap();
        assert_eq!((cfg.type_vocab_size, cfg.layer_norm_eps, cfg.hidden_act.as_str()), (0, 1e-5, "gelu"));
        let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ours: serde_json::Value = serde_json::from_slice(&cfg.to_json().unwrap()).unwrap();
        assert_eq!(ours, theirs);
        // Its pooling is transformers' `classifier_pooling`, and a classifier made here records
        // the pooling it was trained with there too.
        assert_eq!(cfg.pooling().as_deref(), Some("cls"));
        let mut mean = cfg.clone();
        mean.set_classifier(&["a".into(), "b".into()], None, "mean");
        let written: serde_json::Value = serde_json::from_slice(&mean.to_json().unwrap()).unwrap();
        assert_eq!((written["classifier_pooling"].as_str(), mean.pooling().as_deref()), (Some("mean"), Some("mean")));
    }
}
