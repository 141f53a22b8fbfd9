//! The post-norm transformer encoder the BERT family shares (BERT, RoBERTa, XLM-RoBERTa,
//! CamemBERT, ELECTRA, DistilBERT): embeddings, optional token types, an optional projection of
//! narrower embeddings, and post-norm layers; differentiable in training mode, packed for
//! inference. What differs between the architectures comes from `EncoderConfig::arch`.

use super::adapters::{LowRank, Target};
use super::config::EncoderConfig;
use crate::model::ops::attention::{attention, attention_unpadded};
use crate::model::ops::embedding::{embed, Positions, Types};
use crate::model::ops::frozen_ffn::frozen_ffn;
use crate::model::ops::infer;
use crate::model::ops::kernels::use_fused_cpu_kernels;
use crate::model::ops::layers::{activation, attention_bias, softmax_last, tensor_bytes, Act, LayerNorm, Linear, Mode};
use crate::model::ops::unpad::Unpadding;
use crate::model::ops::varlen::{attention_packed, starts};
use crate::model::ops::{device_ops, rng};
use candle_core::{DType, Result, Tensor};

/// Looks up a parameter by its name in our naming (see `arch`: BERT's names without the architecture's prefix).
pub type Getter<'a> = dyn Fn(&str) -> Result<Tensor> + 'a;

fn linear(get: &Getter, prefix: &str) -> Result<Linear> {
    Ok(Linear::new(get(&format!("{prefix}.weight"))?, get(&format!("{prefix}.bias"))?))
}

fn layer_norm(get: &Getter, prefix: &str, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm { weight: get(&format!("{prefix}.weight"))?, bias: get(&format!("{prefix}.bias"))?, eps })
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    /// `None` for a model without token types (DistilBERT: `type_vocab_size` 0).
    token_type: Option<Tensor>,
    norm: LayerNorm,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    /// Query, key and value as one `[in, 3·out]` layer, once prepared for inference: one
    /// matrix multiply and one fork-join over the threads instead of three.
    qkv: Option<Linear>,
}

/// How padding is kept out of attention: a key mask for the fused CPU kernel, an f32
/// `[batch, seq]` key bias for the device-generic masked softmax (training, or any GPU pass),
/// an additive `[batch, 1, 1, seq]` bias for composed ops (CPU inference in another dtype).
enum KeyMask {
    Fused(Vec<f32>),
    Device(Tensor),
    Bias(Tensor),
}

fn fused_attention(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && use_fused_cpu_kernels()
}

/// ELECTRA's projection of narrower embeddings to the hidden size.
const PROJECT: &str = "embeddings_project";

/// The BERT family's encoder (embeddings + post-norm transformer layers), without pooler or head.
pub struct PostNorm {
    embeddings: Embeddings,
    /// Embeddings of another width than the hidden size (ELECTRA) go through this first.
    project: Option<Linear>,
    layers: Vec<Layer>,
    cfg: EncoderConfig,
    /// `cfg.hidden_act`, read once.
    act: Act,
    /// Dropout on the attention's output projection (none in DistilBERT).
    attn_out_dropout: f64,
}

/// Every encoder parameter (our name, shape), in checkpoint order.
pub fn encoder_params(cfg: &EncoderConfig) -> Vec<(String, Vec<usize>)> {
    if cfg.arch() == super::arch::Arch::ModernBert {
        return super::modernbert::ModernBertConfig::of(cfg).map(|m| super::modernbert::config::encoder_params(&m)).unwrap_or_default();
    }
    if cfg.arch() == super::arch::Arch::Deberta {
        return super::deberta::DebertaConfig::of(cfg).map(|d| super::deberta::config::encoder_params(&d)).unwrap_or_default();
    }
    let (h, i, e) = (cfg.hidden_size, cfg.intermediate_size, cfg.embedding_size());
    let mut out: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![cfg.vocab_size, e]),
        ("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, e]),
        ("embeddings.LayerNorm.weight".into(), vec![e]),
        ("embeddings.LayerNorm.bias".into(), vec![e]),
    ];
    if cfg.type_vocab_size > 0 {
        out.insert(2, ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, e]));
    }
    if e != h {
        out.push((PROJECT.to_string() + ".weight", vec![h, e]));
        out.push((PROJECT.to_string() + ".bias", vec![h]));
    }
    for l in 0..cfg.num_hidden_layers {
        for (part, w, b) in [
            ("attention.self.query", vec![h, h], h),
            ("attention.self.key", vec![h, h], h),
            ("attention.self.value", vec![h, h], h),
            ("attention.output.dense", vec![h, h], h),
            ("attention.output.LayerNorm", vec![h], h),
            ("intermediate.dense", vec![i, h], i),
            ("output.dense", vec![h, i], h),
            ("output.LayerNorm", vec![h], h),
        ] {
            out.push((format!("encoder.layer.{l}.{part}.weight"), w));
            out.push((format!("encoder.layer.{l}.{part}.bias"), vec![b]));
        }
    }
    out
}

/// Names of every encoder parameter, in checkpoint order, in our naming (see `arch`: BERT's names without the architecture's prefix).
pub fn encoder_param_names(cfg: &EncoderConfig) -> Vec<String> {
    encoder_params(cfg).into_iter().map(|(n, _)| n).collect()
}

impl PostNorm {
    /// Builds the encoder from named tensors.
    pub fn load(get: &Getter, cfg: &EncoderConfig) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let embeddings = Embeddings {
            word: get("embeddings.word_embeddings.weight")?,
            position: get("embeddings.position_embeddings.weight")?,
            token_type: if cfg.type_vocab_size > 0 { Some(get("embeddings.token_type_embeddings.weight")?) } else { None },
            norm: layer_norm(get, "embeddings.LayerNorm", eps)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: linear(get, &format!("{p}.attention.self.query"))?,
                    key: linear(get, &format!("{p}.attention.self.key"))?,
                    value: linear(get, &format!("{p}.attention.self.value"))?,
                    attn_out: linear(get, &format!("{p}.attention.output.dense"))?,
                    attn_norm: layer_norm(get, &format!("{p}.attention.output.LayerNorm"), eps)?,
                    intermediate: linear(get, &format!("{p}.intermediate.dense"))?,
                    output: linear(get, &format!("{p}.output.dense"))?,
                    out_norm: layer_norm(get, &format!("{p}.output.LayerNorm"), eps)?,
                    qkv: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let project = if cfg.embedding_size() != cfg.hidden_size { Some(linear(get, PROJECT)?) } else { None };
        let attn_out_dropout = if cfg.arch().attention_output_dropout() { cfg.hidden_dropout_prob } else { 0.0 };
        Ok(Self { embeddings, project, layers, cfg: cfg.clone(), act: cfg.act(), attn_out_dropout })
    }

    /// Readies every dense layer for inference (see `Linear::prepare_for_inference`) and
    /// packs the encoder's for our kernel, in bf16 when `bf16` (see `Linear::pack`).
    pub fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        if let Some(p) = &mut self.project {
            p.prepare_for_inference()?;
        }
        for l in &mut self.layers {
            for lin in [&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.intermediate, &mut l.output] {
                lin.prepare_for_inference()?;
            }
            l.qkv = Linear::concat_outputs(&[&l.query, &l.key, &l.value])?;
            if let Some(qkv) = &l.qkv {
                // The separate layers become views of the fused one, so the weights are
                // held once.
                let h = l.query.bias.dim(0)?;
                for (i, lin) in [&mut l.query, &mut l.key, &mut l.value].into_iter().enumerate() {
                    lin.weight = qkv.weight.narrow(1, i * h, h)?;
                    lin.bias = qkv.bias.narrow(0, i * h, h)?;
                }
            }
            if let Some(qkv) = &mut l.qkv {
                qkv.pack(bf16)?;
                if qkv.is_packed() {
                    for lin in [&mut l.query, &mut l.key, &mut l.value] {
                        lin.release_weight()?;
                    }
                }
            }
            for lin in [&mut l.attn_out, &mut l.intermediate, &mut l.output] {
                lin.pack(bf16)?;
            }
        }
        Ok(())
    }

    /// The device its weights are on.
    pub fn device(&self) -> candle_core::Device {
        self.embeddings.word.device().clone()
    }

    /// Bytes of the encoder's weights as held now.
    pub fn bytes(&self) -> usize {
        let e = &self.embeddings;
        let mut n = [&e.word, &e.position, &e.norm.weight, &e.norm.bias].into_iter().map(tensor_bytes).sum::<usize>();
        n += e.token_type.as_ref().map_or(0, tensor_bytes);
        n += self.project.as_ref().map_or(0, Linear::bytes);
        for l in &self.layers {
            let dense = match &l.qkv {
                Some(qkv) => qkv.bytes(),
                None => l.query.bytes() + l.key.bytes() + l.value.bytes(),
            };
            let norms: usize = [&l.attn_norm, &l.out_norm].iter().map(|n| tensor_bytes(&n.weight) + tensor_bytes(&n.bias)).sum();
            n += dense + l.attn_out.bytes() + l.intermediate.bytes() + l.output.bytes() + norms;
        }
        n
    }

    /// Last hidden states `[batch, seq, hidden]` for `input_ids`/`type_ids`/`mask` (all `[batch, seq]`, u32).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.encode(ids, type_ids, mask, mode, false, &LowRank::default())
    }

    /// [`PostNorm::forward`] (or [`PostNorm::forward_first_token`] when `first_only`) with each row's
    /// adapter terms added to the dense layers they change.
    pub fn forward_low_rank(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        mode: &mut Mode,
        first_only: bool,
        low_rank: &LowRank,
    ) -> Result<Tensor> {
        self.encode(ids, type_ids, mask, mode, first_only, low_rank)
    }

    /// The last hidden state of the first token only, `[batch, 1, hidden]`: what the `[CLS]`
    /// pooler reads. The last layer's attention still looks at every token, but its output
    /// projection and feed-forward run on one row per text: an eighth less work for a
    /// 6-layer model, with the same result.
    pub fn forward_first_token(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.encode(ids, type_ids, mask, mode, true, &LowRank::default())
    }

    fn encode(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode, first_only: bool, lr: &LowRank) -> Result<Tensor> {
        let e = &self.embeddings;
        let pos = Positions { table: &e.position, offset: self.cfg.position_offset() };
        let types = e.token_type.as_ref().map(|table| Types { table, ids: type_ids });
        let x = embed(&e.word, ids, Some(pos), types)?;
        let x = e.norm.forward(&x, mode)?;
        let mut x = mode.dropout(&x, self.cfg.hidden_dropout_prob)?;
        let keys = if fused_attention(&x) {
            KeyMask::Fused(mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        } else if mode.is_train() || !x.device().is_cpu() || !use_fused_cpu_kernels() {
            KeyMask::Device(((mask.to_dtype(DType::F32)? - 1.0)? * 1e4)?)
        } else {
            KeyMask::Bias(attention_bias(mask, x.dtype())?)
        };
        if let KeyMask::Fused(mask) = &keys {
            if let Some((u, lr_tokens)) = self.unpadding(&x, mask, lr)? {
                return self.encode_unpadded(&x, &u, mode, first_only, lr, &lr_tokens);
            }
        }
        if let Some(p) = &self.project {
            x = p.forward(&x)?;
        }
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(i, layer, &x, &keys, mode, first_only && i == last, lr)?;
        }
        Ok(x)
    }

    /// The unpadded layout of a batch with padding, where the model is not prepared for
    /// inference (training, and its evaluations) and the batch's adapters, if any, are one for
    /// all rows; with those adapters over the unpadded rows.
    fn unpadding<'l>(&self, x: &Tensor, mask: &[f32], lr: &LowRank<'l>) -> Result<Option<(Unpadding, LowRank<'l>)>> {
        let (b, s, _) = x.dims3()?;
        if self.layers.iter().any(|l| l.qkv.is_some()) {
            return Ok(None);
        }
        let Some(u) = Unpadding::of(mask, b, s) else { return Ok(None) };
        Ok(lr.over_tokens(b, u.tokens()).map(|lr_tokens| (u, lr_tokens)))
    }

    /// [`PostNorm::encode`] from the embeddings `x` on with the dense layers over the real
    /// tokens only (see `model::ops::unpad`): the same hidden states, padded back at the end
    /// (zeros at the padding). `lr` holds the batch's adapters by text, `lr_tokens` by token.
    #[allow(clippy::too_many_arguments)]
    fn encode_unpadded(
        &self,
        x: &Tensor,
        u: &Unpadding,
        mode: &mut Mode,
        first_only: bool,
        lr: &LowRank,
        lr_tokens: &LowRank,
    ) -> Result<Tensor> {
        let mut x = u.unpad(x)?;
        if let Some(p) = &self.project {
            x = p.forward(&x)?;
        }
        let (nh, lens) = (self.cfg.num_attention_heads, u.lens());
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            let q = lr_tokens.linear(i, Target::Query, &l.query, &x, mode)?;
            let k = lr_tokens.linear(i, Target::Key, &l.key, &x, mode)?;
            let v = lr_tokens.linear(i, Target::Value, &l.value, &x, mode)?;
            let p = self.cfg.attention_probs_dropout_prob;
            let (p, seed) = if mode.is_train() && p > 0.0 { (p, mode.seed()) } else { (0.0, 0) };
            let ctx = attention_unpadded(&q, &k, &v, &lens, nh, p, seed)?;
            if first_only && i == last {
                return self.after_attention(i, l, &u.firsts(&ctx)?, &u.firsts(&x)?, mode, lr)?.unsqueeze(1);
            }
            x = self.after_attention(i, l, &ctx, &x, mode, lr_tokens)?;
        }
        u.pad(&x)
    }

    /// Whether [`PostNorm::forward_packed`] runs here: prepared for inference, on the CPU in f32
    /// with the fused kernels.
    pub fn packs(&self) -> bool {
        let e = &self.embeddings;
        e.word.device().is_cpu() && e.word.dtype() == DType::F32 && use_fused_cpu_kernels() && self.layers.iter().all(|l| l.qkv.is_some())
    }

    /// Inference over texts packed one after another without padding (`ids` and `type_ids`
    /// concatenated, `type_ids` empty for all 0; `lens` each text's length): the last hidden
    /// states `[tokens, hidden]`, or with `first_only` each text's first token's `[texts,
    /// hidden]`. The same numbers as [`PostNorm::forward`] on the padded batch, with no work
    /// spent on padding. Only where [`PostNorm::packs`].
    pub fn forward_packed(&self, ids: &[u32], type_ids: &[u32], lens: &[usize], first_only: bool) -> Result<Tensor> {
        if !self.packs() {
            candle_core::bail!("the packed forward pass needs an encoder prepared for CPU f32 inference");
        }
        let dev = self.device();
        let e = &self.embeddings;
        let off = self.cfg.position_offset();
        let positions: Vec<u32> = lens.iter().flat_map(|&n| (off..off + n).map(|p| p as u32)).collect();
        let types = e.token_type.as_ref().map(|table| (table, type_ids));
        let mut x = infer::embed_norm(&e.word, ids, types, &e.position, &positions, &e.norm)?;
        if let Some(p) = &self.project {
            x = p.forward(&x)?;
        }
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            let qkv = l.qkv.as_ref().expect("checked by packs").forward(&x)?;
            let ctx = attention_packed(&qkv, lens, self.cfg.num_attention_heads)?;
            x = if first_only && i == last {
                // The first token of each text: its output projection and feed-forward only.
                let firsts: Vec<u32> = starts(lens).into_iter().map(|r| r as u32).collect();
                let firsts = Tensor::from_vec(firsts, lens.len(), &dev)?;
                self.packed_after_attention(l, &ctx.index_select(&firsts, 0)?, &x.index_select(&firsts, 0)?)?
            } else {
                self.packed_after_attention(l, &ctx, &x)?
            };
        }
        Ok(x)
    }

    /// [`PostNorm::after_attention`] in inference on packed rows, its sums and norms fused.
    fn packed_after_attention(&self, l: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = infer::add_norm(&l.attn_out.forward(ctx)?, Some(x), &l.attn_norm)?;
        let inter = l.intermediate.forward_activated(&x, self.act)?;
        infer::add_norm(&l.output.forward(&inter)?, Some(&x), &l.out_norm)
    }

    fn self_attention(&self, i: usize, l: &Layer, x: &Tensor, keys: &KeyMask, mode: &mut Mode, lr: &LowRank) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let p = self.cfg.attention_probs_dropout_prob;
        let (q, k, v) = match &l.qkv {
            Some(qkv) => {
                let y = qkv.forward(x)?;
                let (q, k, v) = (y.narrow(2, 0, h)?, y.narrow(2, h, h)?, y.narrow(2, 2 * h, h)?);
                (lr.add(i, Target::Query, x, q, mode)?, lr.add(i, Target::Key, x, k, mode)?, lr.add(i, Target::Value, x, v, mode)?)
            }
            None => (
                lr.linear(i, Target::Query, &l.query, x, mode)?,
                lr.linear(i, Target::Key, &l.key, x, mode)?,
                lr.linear(i, Target::Value, &l.value, x, mode)?,
            ),
        };
        let (p, seed) = if mode.is_train() && p > 0.0 { (p, mode.seed()) } else { (0.0, 0) };
        if let KeyMask::Fused(mask) = keys {
            return attention(&q, &k, &v, mask, nh, p, seed);
        }
        let hd = self.cfg.head_dim();
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = |t: Tensor| t.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let probs = match keys {
            KeyMask::Device(bias) => {
                // Scale, padding mask, softmax and dropout in one kernel, with its own backward.
                let dropout = (p > 0.0).then(|| {
                    let (keep_below, scale) = rng::keep_rule(p);
                    device_ops::Dropout { keep_below, scale, seed }
                });
                let op = device_ops::MaskedSoftmax { scale: scale as f32, dropout, window: None };
                q.matmul(&k.t()?)?.contiguous()?.apply_op2(bias, op)?
            }
            KeyMask::Bias(bias) => softmax_last(&(q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?, mode)?,
            KeyMask::Fused(_) => unreachable!("handled above"),
        };
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        keys: &KeyMask,
        mode: &mut Mode,
        first_only: bool,
        lr: &LowRank,
    ) -> Result<Tensor> {
        let ctx = self.self_attention(i, l, x, keys, mode, lr)?;
        if first_only {
            let first = x.narrow(1, 0, 1)?.contiguous()?;
            return self.after_attention(i, l, &ctx.narrow(1, 0, 1)?, &first, mode, lr);
        }
        self.after_attention(i, l, &ctx, x, mode, lr)
    }

    /// A layer's output projection, its norm and the feed-forward block, on the attention's
    /// context `ctx` and the layer's input `x` (the same rows).
    fn after_attention(&self, i: usize, l: &Layer, ctx: &Tensor, x: &Tensor, mode: &mut Mode, lr: &LowRank) -> Result<Tensor> {
        let attn = lr.linear(i, Target::AttnOut, &l.attn_out, ctx, mode)?;
        let attn = mode.dropout(&attn, self.attn_out_dropout)?;
        let x = l.attn_norm.forward(&(attn + x)?, mode)?;
        let ffn_frozen = !lr.touches(i, Target::Intermediate) && !lr.touches(i, Target::Output);
        if ffn_frozen
            && mode.is_train()
            && x.track_op()
            && self.act == Act::Gelu
            && l.intermediate.frozen_on_cpu(&x)
            && l.output.frozen_on_cpu(&x)
        {
            // LoRA on the attention only: the whole feed-forward block is one op (`model::ops::frozen_ffn`).
            let out = frozen_ffn(&x, &l.intermediate.weight, &l.intermediate.bias, &l.output.weight, &l.output.bias)?;
            let out = mode.dropout(&out, self.cfg.hidden_dropout_prob)?;
            return l.out_norm.forward(&(out + x)?, mode);
        }
        let inter = if lr.touches(i, Target::Intermediate) {
            // The adapter's term goes in before the activation, so the fused GELU cannot be used.
            let pre = lr.linear(i, Target::Intermediate, &l.intermediate, &x, mode)?;
            activation(&pre, self.act)?
        } else {
            l.intermediate.forward_activated(&x, self.act)?
        };
        let out = lr.linear(i, Target::Output, &l.output, &inter, mode)?;
        let out = mode.dropout(&out, self.cfg.hidden_dropout_prob)?;
        l.out_norm.forward(&(out + x)?, mode)
    }
}
