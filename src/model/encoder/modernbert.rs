//! ModernBERT (answerdotai, 2024; the Ettin and mmBERT families share it): token embeddings and a
//! LayerNorm (no position table), pre-norm layers (the first without its attention norm) with one
//! fused `Wqkv`, rotary positions with a global and a local theta, global attention every
//! `global_attn_every_n_layers` layers and sliding-window attention over `local_attention` tokens
//! in the others, a GeGLU feed-forward, and a final norm. LayerNorms and dense layers carry a bias
//! only where the config says so. Differentiable on every device: the fused CPU ops where they
//! apply (attention, rotary, GeGLU, LayerNorm), composed candle ops elsewhere.

use super::post_norm::Getter;
use crate::model::ops::attention::{attention_windowed, window_bias};
use crate::model::ops::geglu::geglu;
use crate::model::ops::kernels::{layer_norm, use_fused_cpu_kernels};
use crate::model::ops::layers::Mode;
use crate::model::ops::rotary::{rotary, RopeTable};
use candle_core::{DType, Result, Tensor, D};
use serde::Deserialize;

/// `config.json` of a ModernBERT checkpoint, as transformers writes it (older configs'
/// `global_rope_theta`/`local_rope_theta`, newer ones' `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "default_act")]
    pub classifier_activation: String,
    #[serde(default = "default_pooling")]
    pub classifier_pooling: String,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_local")]
    pub local_attention: usize,
    pub global_rope_theta: Option<f64>,
    pub local_rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub mlp_dropout: f64,
    #[serde(default)]
    pub classifier_dropout: f64,
    #[serde(default = "default_true")]
    pub decoder_bias: bool,
}

fn default_true() -> bool {
    true
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_pooling() -> String {
    "cls".into()
}
fn default_every() -> usize {
    3
}
fn default_local() -> usize {
    128
}

impl ModernBertConfig {
    /// Whether layer `i` attends globally (else over a sliding window): `layer_types` where the
    /// config has them, else every `global_attn_every_n_layers`-th layer from the first.
    pub fn is_global(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_none_or(|t| t == "full_attention"),
            None => i.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    /// The rotary base of global (`true`) or local layers.
    pub fn rope_theta(&self, global: bool) -> f64 {
        let key = if global { "full_attention" } else { "sliding_attention" };
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get(key)?.get("rope_theta")?.as_f64());
        let flat = if global { self.global_rope_theta } else { self.local_rope_theta };
        nested.or(flat).unwrap_or(if global { 160_000.0 } else { 10_000.0 })
    }

    /// How far a local layer sees to each side: half of `local_attention`.
    pub fn window(&self) -> usize {
        self.local_attention / 2
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim().is_multiple_of(2),
            "hidden_size {} does not split into {} heads of an even size",
            self.hidden_size,
            self.num_attention_heads
        );
        for act in [&self.hidden_activation, &self.classifier_activation] {
            anyhow::ensure!(act == "gelu", "activation {act:?} is not one we run (gelu)");
        }
        anyhow::ensure!(["cls", "mean"].contains(&self.classifier_pooling.as_str()), "classifier_pooling {:?}", self.classifier_pooling);
        Ok(())
    }
}

/// A LayerNorm whose bias is zeros (and no parameter) when the config has none.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(get: &Getter, prefix: &str, with_bias: bool, eps: f64) -> Result<Self> {
        let weight = get(&format!("{prefix}.weight"))?;
        let bias = if with_bias { get(&format!("{prefix}.bias"))? } else { weight.zeros_like()? };
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A dense layer, `x·Wᵀ (+ b)`, with or without a bias.
struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    fn load(get: &Getter, prefix: &str, with_bias: bool) -> Result<Self> {
        let bias = if with_bias { Some(get(&format!("{prefix}.bias"))?) } else { None };
        Ok(Self { weight: get(&format!("{prefix}.weight"))?, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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

/// The ModernBERT encoder: embeddings through the final norm.
pub struct ModernBert {
    embeddings: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    final_norm: Norm,
    global_rope: RopeTable,
    local_rope: RopeTable,
    cfg: ModernBertConfig,
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

    /// Hidden states `[batch, seq, hidden]` of token ids `[batch, seq]` with `mask` (`[batch, seq]`,
    /// 1 for tokens, 0 for padding at the end).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let x = self.embeddings.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, self.cfg.hidden_size))?;
        let mut x = mode.dropout(&self.embed_norm.forward(&x)?, self.cfg.embedding_dropout)?;
        let keys = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for layer in &self.layers {
            let h = match &layer.attn_norm {
                Some(n) => n.forward(&x)?,
                None => x.clone(),
            };
            let attn = self.attention(layer, &h, mask, &keys, mode)?;
            x = (x + mode.dropout(&layer.wo.forward(&attn)?, self.cfg.attention_dropout)?)?;
            let up = layer.wi.forward(&layer.mlp_norm.forward(&x)?)?;
            let gated = mode.dropout(&geglu(&up)?, self.cfg.mlp_dropout)?;
            x = (x + layer.mlp_out.forward(&gated)?)?;
        }
        self.final_norm.forward(&x)
    }

    fn attention(&self, layer: &Layer, h: &Tensor, mask: &Tensor, keys: &[f32], mode: &mut Mode) -> Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        let qkv = layer.wqkv.forward(h)?;
        let (table, window) = if layer.global { (&self.global_rope, None) } else { (&self.local_rope, Some(self.cfg.window())) };
        let q = rotary(&qkv.narrow(D::Minus1, 0, hidden)?, table)?;
        let k = rotary(&qkv.narrow(D::Minus1, hidden, hidden)?, table)?;
        let v = qkv.narrow(D::Minus1, 2 * hidden, hidden)?;
        let (p, heads) = (if mode.is_train() { self.cfg.attention_dropout } else { 0.0 }, self.cfg.num_attention_heads);
        if q.device().is_cpu() && q.dtype() == DType::F32 && use_fused_cpu_kernels() {
            return attention_windowed(&q, &k, &v, keys, heads, p, mode.seed(), window);
        }
        composed_attention(&q, &k, &v, mask, heads, window, p, mode)
    }
}

/// Multi-head attention from candle ops (any device, any dtype): padding and the window as
/// additive biases, softmax in f32.
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
    let mut bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e4)?.reshape((b, 1, 1, s))?;
    if let Some(w) = window {
        bias = bias.broadcast_add(&window_bias(s, w, DType::F32, q.device())?.reshape((1, 1, s, s))?)?;
    }
    let scores = (heads(q)?.matmul(&heads(k)?.t()?)? * (1.0 / (hd as f64).sqrt()))?.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&bias)?, D::Minus1)?.to_dtype(q.dtype())?;
    let probs = mode.dropout(&probs, p)?;
    probs.matmul(&heads(v)?)?.transpose(1, 2)?.reshape((b, s, h))
}

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

#[cfg(test)]
mod tests {
    use super::ModernBertConfig;

    fn config(extra: &str) -> ModernBertConfig {
        let base = r#""vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 6, "num_attention_heads": 4"#;
        serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap()
    }

    #[test]
    fn older_configs_name_the_thetas_and_the_global_layers_directly() {
        let c =
            config(r#", "global_rope_theta": 80000.0, "local_rope_theta": 5000.0, "global_attn_every_n_layers": 3, "local_attention": 64"#);
        assert_eq!((c.rope_theta(true), c.rope_theta(false), c.window()), (80_000.0, 5_000.0, 32));
        assert_eq!((0..6).map(|i| c.is_global(i)).collect::<Vec<_>>(), [true, false, false, true, false, false]);
    }

    #[test]
    fn newer_configs_give_rope_parameters_and_layer_types() {
        let c = config(
            r#", "rope_parameters": {"full_attention": {"rope_theta": 1.6e5}, "sliding_attention": {"rope_theta": 1e4}},
               "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]"#,
        );
        assert_eq!((c.rope_theta(true), c.rope_theta(false)), (160_000.0, 10_000.0));
        assert_eq!((0..6).map(|i| c.is_global(i)).collect::<Vec<_>>(), [true, false, true, false, false, true]);
        // Defaults as transformers' ModernBertConfig: 128-token local windows, thetas 160k and 10k.
        let d = config("");
        assert_eq!((d.window(), d.rope_theta(true), d.rope_theta(false), d.norm_eps), (64, 160_000.0, 10_000.0, 1e-5));
    }
}
