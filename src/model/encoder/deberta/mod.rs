//! DeBERTa-v2 and -v3 (`model_type` `deberta-v2`): BERT's post-norm layers with disentangled
//! attention. Each attention score adds to the content-to-content product a content-to-position
//! term (the query against the relative position's key, `c2p`) and a position-to-content term
//! (the key against the relative position's query, `p2c`), the positions bucketed on a log scale
//! beyond `position_buckets / 2`; the relative embeddings are shared by every layer (normalised
//! first where `norm_rel_ebd` says `layer_norm`), projected by each layer's own query and key
//! (`share_att_key`) or its `pos_query_proj`/`pos_key_proj`. DeBERTa-v3 has no absolute position
//! embeddings (`position_biased_input: false`) and no token types. On the CPU in f32 each layer's
//! attention is one fused op with its own backward pass (`ops::disentangled`); elsewhere (a GPU)
//! candle's products with the device ops' gathers and masked softmax. The dense layers are our
//! [`Linear`].

pub mod config;

pub use config::DebertaConfig;

use super::adapters::{LowRank, Target};
use super::post_norm::Getter;
use crate::model::ops::device_ops::{Dropout, MaskedSoftmax};
use crate::model::ops::device_positional::RelGather;
use crate::model::ops::disentangled::{disentangled_attention, RelTables, Terms};
use crate::model::ops::embedding::{embed, Positions, Types};
use crate::model::ops::kernels::use_fused_cpu_kernels;
use crate::model::ops::layers::{activation, tensor_bytes, Act, LayerNorm, Linear, Mode};
use crate::model::ops::rng;
use candle_core::{DType, Result, Tensor, D};
use std::sync::Arc;

/// The padding mask as the attention takes it: per key for the fused CPU op, an f32 key bias
/// `[batch, seq]` (0 on tokens, a large negative on padding) for the device op.
enum Keys {
    Fused(Vec<f32>),
    Device(Tensor),
}

/// The relative embeddings of a forward pass (normalised, after dropout; only the rows this
/// length reaches) and their lookups, also as u32 `[seq·seq]` tensors on the device for the
/// device-generic path.
struct Rel {
    r: Tensor,
    tables: RelTables,
    c2p_index: Option<Tensor>,
    p2c_index: Option<Tensor>,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    pos_query: Option<Linear>,
    pos_key: Option<Linear>,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// The DeBERTa-v2/v3 encoder: embeddings through the last layer.
pub struct Deberta {
    word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    embed_proj: Option<Linear>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    rel_embeddings: Option<Tensor>,
    rel_norm: Option<LayerNorm>,
    act: Act,
    cfg: DebertaConfig,
}

fn dense(get: &Getter, prefix: &str) -> Result<Linear> {
    Ok(Linear::new(get(&format!("{prefix}.weight"))?, get(&format!("{prefix}.bias"))?))
}

fn norm(get: &Getter, prefix: &str, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm { weight: get(&format!("{prefix}.weight"))?, bias: get(&format!("{prefix}.bias"))?, eps })
}

impl Deberta {
    /// Builds the encoder from tensors under our names (transformers' without `deberta.`).
    pub fn load(get: &Getter, cfg: &DebertaConfig, hidden_act: &str) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let own = cfg.relative_attention && !cfg.share_att_key;
            layers.push(Layer {
                query: dense(get, &format!("{p}.attention.self.query_proj"))?,
                key: dense(get, &format!("{p}.attention.self.key_proj"))?,
                value: dense(get, &format!("{p}.attention.self.value_proj"))?,
                pos_query: if own && cfg.has("p2c") { Some(dense(get, &format!("{p}.attention.self.pos_query_proj"))?) } else { None },
                pos_key: if own && cfg.has("c2p") { Some(dense(get, &format!("{p}.attention.self.pos_key_proj"))?) } else { None },
                attn_out: dense(get, &format!("{p}.attention.output.dense"))?,
                attn_norm: norm(get, &format!("{p}.attention.output.LayerNorm"), eps)?,
                intermediate: dense(get, &format!("{p}.intermediate.dense"))?,
                output: dense(get, &format!("{p}.output.dense"))?,
                out_norm: norm(get, &format!("{p}.output.LayerNorm"), eps)?,
            });
        }
        let word = get("embeddings.word_embeddings.weight")?;
        let embed_proj = match cfg.embedding_width() != cfg.hidden_size {
            true => {
                let w = get("embeddings.embed_proj.weight")?;
                let zeros = Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?;
                Some(Linear::new(w, zeros))
            }
            false => None,
        };
        Ok(Self {
            position: if cfg.position_biased_input { Some(get("embeddings.position_embeddings.weight")?) } else { None },
            token_type: if cfg.type_vocab_size > 0 { Some(get("embeddings.token_type_embeddings.weight")?) } else { None },
            word,
            embed_proj,
            embed_norm: norm(get, "embeddings.LayerNorm", eps)?,
            layers,
            rel_embeddings: if cfg.relative_attention { Some(get("encoder.rel_embeddings.weight")?) } else { None },
            rel_norm: if cfg.relative_attention && cfg.norm_rel() { Some(norm(get, "encoder.LayerNorm", eps)?) } else { None },
            act: Act::parse(hidden_act).ok_or_else(|| candle_core::Error::Msg(format!("unsupported hidden_act {hidden_act:?}")))?,
            cfg: cfg.clone(),
        })
    }

    pub fn device(&self) -> candle_core::Device {
        self.word.device().clone()
    }

    /// Transposes and packs the dense layers for CPU inference; it can no longer train.
    pub fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        if !self.word.device().is_cpu() {
            return Ok(());
        }
        for l in &mut self.layers {
            // The query and key also project the relative embeddings: packed like the others.
            for d in [&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.intermediate, &mut l.output] {
                d.prepare_for_inference()?;
                d.pack(bf16)?;
            }
        }
        Ok(())
    }

    /// Bytes of its weights.
    pub fn bytes(&self) -> usize {
        let n = |x: &LayerNorm| tensor_bytes(&x.weight) + tensor_bytes(&x.bias);
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(0, tensor_bytes);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.query, &l.key, &l.value, &l.attn_out, &l.intermediate, &l.output].iter().map(|d| d.bytes()).sum::<usize>()
                    + l.pos_query.as_ref().map_or(0, Linear::bytes)
                    + l.pos_key.as_ref().map_or(0, Linear::bytes)
                    + n(&l.attn_norm)
                    + n(&l.out_norm)
            })
            .sum();
        tensor_bytes(&self.word)
            + opt(&self.position)
            + opt(&self.token_type)
            + self.embed_proj.as_ref().map_or(0, Linear::bytes)
            + n(&self.embed_norm)
            + layers
            + opt(&self.rel_embeddings)
            + self.rel_norm.as_ref().map_or(0, n)
    }

    /// Last hidden states `[batch, seq, hidden]` of token ids `[batch, seq]` (types read where
    /// the model has them) with `mask` (`[batch, seq]`, 1 for tokens, 0 for padding).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.forward_low_rank(ids, type_ids, mask, mode, &LowRank::default())
    }

    /// [`Deberta::forward`] with an adapter's terms added to the dense layers it changes (the
    /// query and key projections of the relative embeddings too, as peft's wrapped modules do).
    /// One adapter for every row: adapters of different rows in one batch are not run here (a
    /// DeBERTa adapter is served merged into its base).
    pub fn forward_low_rank(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode, lr: &LowRank) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let rel_lr = match lr.groups.as_slice() {
            [(rows, Some(set))] if rows.start == 0 && rows.end == b => Some(LowRank::single(set, 1)),
            groups if groups.iter().all(|(_, set)| set.is_none()) => None,
            _ => candle_core::bail!("adapters of different rows in one batch are not run on deberta-v2"),
        };
        let dev = ids.device();
        let pos = self.position.as_ref().map(|table| Positions { table, offset: 0 });
        let types = self.token_type.as_ref().map(|table| Types { table, ids: type_ids });
        let mut x = embed(&self.word, ids, pos, types)?;
        if let Some(p) = &self.embed_proj {
            x = p.forward(&x)?;
        }
        let x = self.embed_norm.forward(&x, mode)?;
        let m = mask.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
        let mut x = mode.dropout(&x.broadcast_mul(&m)?, self.cfg.hidden_dropout_prob)?;

        let terms = Terms { c2p: self.cfg.has("c2p"), p2c: self.cfg.has("p2c") };
        let fused = x.device().is_cpu()
            && x.dtype() == DType::F32
            && use_fused_cpu_kernels()
            && (terms.c2p || terms.p2c)
            && self.rel_embeddings.is_some();
        let keys = match fused {
            true => Keys::Fused(mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            false => Keys::Device(((mask.to_dtype(DType::F32)? - 1.0)? * 1e4)?),
        };
        let rel = match &self.rel_embeddings {
            Some(r) => {
                let span = self.cfg.span();
                let pos = config::relative_positions(s, self.cfg.position_buckets, self.cfg.max_relative());
                let clamp = |v: i64| v.clamp(0, 2 * span as i64 - 1) as u32;
                let mut c2p: Vec<u32> = pos.iter().map(|&p| clamp(p + span as i64)).collect();
                let mut p2c: Vec<u32> = pos.iter().map(|&p| clamp(span as i64 - p)).collect();
                // Only the rows of the relative embeddings that this length reaches (2·len − 1 at
                // most, of 2·span): the position terms are computed for those alone, and the
                // indices count from the first of them. The same scores, far fewer products.
                let lo = *c2p.iter().chain(&p2c).min().unwrap_or(&0);
                let hi = *c2p.iter().chain(&p2c).max().unwrap_or(&0);
                c2p.iter_mut().chain(p2c.iter_mut()).for_each(|i| *i -= lo);
                let rows = (hi - lo + 1) as usize;
                let r = r.narrow(0, lo as usize, rows)?;
                let r = match &self.rel_norm {
                    Some(n) => n.forward(&r, mode)?,
                    None => r,
                };
                let tables = RelTables { seq: s, rows, c2p: Arc::new(c2p), p2c: Arc::new(p2c) };
                let index = |v: &[u32]| -> Result<Option<Tensor>> {
                    if fused {
                        return Ok(None);
                    }
                    Ok(Some(Tensor::from_slice(v, s * s, dev)?))
                };
                let (c2p_index, p2c_index) = (index(&tables.c2p)?, index(&tables.p2c)?);
                Some(Rel { r: mode.dropout(&r, self.cfg.hidden_dropout_prob)?, tables, c2p_index, p2c_index })
            }
            None => None,
        };
        let adapted = Adapted { lr, rel: rel_lr.as_ref() };
        for (i, layer) in self.layers.iter().enumerate() {
            let ctx = self.attention(i, layer, &x, &keys, rel.as_ref(), &adapted, mode)?;
            let out = lr.linear(i, Target::AttnOut, &layer.attn_out, &ctx, mode)?;
            let out = mode.dropout(&out, self.cfg.hidden_dropout_prob)?;
            let attended = layer.attn_norm.forward(&(out + &x)?, mode)?;
            let up = activation(&lr.linear(i, Target::Intermediate, &layer.intermediate, &attended, mode)?, self.act)?;
            let down = lr.linear(i, Target::Output, &layer.output, &up, mode)?;
            let down = mode.dropout(&down, self.cfg.hidden_dropout_prob)?;
            x = layer.out_norm.forward(&(down + attended)?, mode)?;
        }
        Ok(x)
    }

    /// Disentangled self-attention of layer `i`: `[batch, seq, hidden]` contexts.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        keys: &Keys,
        rel: Option<&Rel>,
        adapted: &Adapted,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let hd = h / nh;
        let terms = Terms { c2p: self.cfg.has("c2p"), p2c: self.cfg.has("p2c") };
        let factor = 1 + usize::from(terms.c2p) + usize::from(terms.p2c);
        let scale = 1.0 / ((hd * factor) as f64).sqrt();
        let q = adapted.lr.linear(i, Target::Query, &l.query, x, mode)?;
        let k = adapted.lr.linear(i, Target::Key, &l.key, x, mode)?;
        let v = adapted.lr.linear(i, Target::Value, &l.value, x, mode)?;
        // The position keys and queries `[1, rows reached, hidden]`.
        let (mut pos_k, mut pos_q) = (None, None);
        if let Some(rel) = rel {
            let r = rel.r.unsqueeze(0)?;
            if terms.c2p {
                pos_k = Some(match &l.pos_key {
                    Some(own) => own.forward(&r)?,
                    None => adapted.relative(i, Target::Key, &l.key, &r, mode)?,
                });
            }
            if terms.p2c {
                pos_q = Some(match &l.pos_query {
                    Some(own) => own.forward(&r)?,
                    None => adapted.relative(i, Target::Query, &l.query, &r, mode)?,
                });
            }
        }
        let p = self.cfg.attention_probs_dropout_prob;
        let (p, seed) = if mode.is_train() && p > 0.0 { (p, mode.seed()) } else { (0.0, 0) };
        let (mask, rel) = match (keys, rel) {
            (Keys::Fused(mask), Some(rel)) => {
                let pos: Vec<Tensor> = pos_k.into_iter().chain(pos_q).collect();
                let pos = Tensor::cat(&pos, 2)?.squeeze(0)?;
                let qkv = Tensor::cat(&[&q, &k, &v], 2)?;
                return disentangled_attention(&qkv, &pos, &rel.tables, terms, mask, nh, scale, p, seed);
            }
            (Keys::Device(bias), rel) => (bias, rel),
            (Keys::Fused(_), None) => candle_core::bail!("deberta-v2: fused attention without relative positions"),
        };
        // The device-generic path (what a GPU runs): candle's products, one gather kernel per
        // position term, then scale, padding mask, softmax and dropout in one op.
        let heads = |t: Tensor| -> Result<Tensor> {
            let rows = t.dim(D::Minus2)?;
            t.reshape(((), rows, nh, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(rel) = rel {
            for (pos, against, index, transpose) in [(pos_k, &q, &rel.c2p_index, false), (pos_q, &k, &rel.p2c_index, true)] {
                let (Some(pos), Some(index)) = (pos, index) else { continue };
                let products = against.broadcast_matmul(&heads(pos)?.t()?)?.contiguous()?;
                scores = (scores + products.apply_op1(RelGather { index: index.clone(), transpose })?)?;
            }
        }
        let dropout = (p > 0.0).then(|| {
            let (keep_below, scale) = rng::keep_rule(p);
            Dropout { keep_below, scale, seed }
        });
        let op = MaskedSoftmax { scale: scale as f32, dropout, window: None };
        let probs = scores.contiguous()?.apply_op2(mask, op)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
    }
}

/// The adapter of a forward pass: per row for the tokens, and (the same one, when every row has
/// it) for the relative embeddings, one row of their own.
struct Adapted<'a> {
    lr: &'a LowRank<'a>,
    rel: Option<&'a LowRank<'a>>,
}

impl Adapted<'_> {
    /// The layer's query or key projection of the relative embeddings `r` (`[1, 2·span, hidden]`).
    fn relative(&self, i: usize, target: Target, base: &Linear, r: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        match self.rel {
            Some(lr) => lr.linear(i, target, base, r, mode),
            None => base.forward(r),
        }
    }
}
