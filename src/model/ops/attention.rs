//! Fused multi-head self-attention for CPU f32, with its own backward pass.
//!
//! Composed from candle ops, attention runs one small matrix multiply per (text, head)
//! through gemm's thread pool, plus separate passes for scaling, masking, softmax, dropout
//! and the head transposes. Here every (text, head) pair is one task on rayon: scores,
//! softmax, dropout and the weighted sum happen on rows that stay in cache, reading the
//! heads straight out of the `[batch, seq, hidden]` projections. The backward pass
//! recomputes the probabilities instead of storing them; the dropout mask is kept.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

use super::attention_tasks::{bwd_task, fwd_task, Dims};
use super::simd::simd_kernel;

/// Attention over `[batch, seq, hidden]` query/key/value projections, or over `[tokens, hidden]`
/// ones with the texts packed one after another (see [`Attention::packed`]).
pub(super) struct Attention {
    heads: usize,
    /// Additive bias per key, `[batch, seq]`: 0 for tokens, a large negative on padding; empty
    /// for packed texts.
    key_bias: Vec<f32>,
    /// Packed texts' lengths, in order; empty for a padded batch.
    lens: Vec<usize>,
    /// Probability of dropping an attention weight (0 in inference).
    dropout: f32,
    /// Dropout's keep threshold, from `rng::keep_rule`.
    keep_below: u32,
    seed: u64,
    /// Dropout keep flags `[batch, heads, seq, seq]`, drawn in the forward pass.
    keep: OnceLock<Vec<u8>>,
    /// Sliding-window attention: query `i` sees keys `j` with `|i − j| ≤ window` only.
    window: Option<usize>,
}

fn f32s<'a>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("fused attention needs contiguous f32 input"),
    }
}

impl Attention {
    /// `mask` is `[batch, seq]` (1 = token); dropout `dropout` on the weights with flags from `seed`;
    /// with `window`, query `i` sees keys `j` with `|i − j| ≤ window` only.
    pub(super) fn new(mask: &[f32], heads: usize, dropout: f64, seed: u64, window: Option<usize>) -> Self {
        let key_bias = mask.iter().map(|&m| (m - 1.0) * 1e4).collect();
        let (keep_below, _) = super::rng::keep_rule(dropout);
        Attention { heads, key_bias, lens: Vec::new(), dropout: dropout as f32, keep_below, seed, keep: OnceLock::new(), window }
    }

    /// Attention over texts packed one after another without padding, `lens` tokens each, in
    /// `[tokens, hidden]` projections: each text's queries see its own keys only.
    pub(super) fn packed(lens: &[usize], heads: usize, dropout: f64, seed: u64, window: Option<usize>) -> Self {
        let mut a = Self::new(&[], heads, dropout, seed, window);
        a.lens = lens.to_vec();
        a
    }

    /// Each text's first row and length (for a padded batch, its padded length).
    fn spans(&self, d: Dims) -> Vec<(usize, usize)> {
        if self.lens.is_empty() {
            return (0..d.b).map(|b| (b * d.s, d.s)).collect();
        }
        let mut start = 0;
        self.lens
            .iter()
            .map(|&n| {
                start += n;
                (start - n, n)
            })
            .collect()
    }

    /// Where each (text, head) task's dropout flags start, and their total: task after task,
    /// `len²` flags each.
    fn flag_offsets(&self, d: Dims) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(d.b * d.nh + 1);
        let mut at = 0;
        for (_, n) in self.spans(d) {
            for _ in 0..d.nh {
                offsets.push(at);
                at += n * n;
            }
        }
        offsets.push(at);
        offsets
    }

    /// The key bias of the text at `(row, n)`: its mask's, or `zeros` for a packed text.
    fn bias_of<'a>(&'a self, (row, n): (usize, usize), zeros: &'a [f32]) -> &'a [f32] {
        if self.lens.is_empty() {
            &self.key_bias[row..row + n]
        } else {
            &zeros[..n]
        }
    }

    /// The shape of one of q, k, v (`[batch, seq, hidden]`, or `[tokens, hidden]` packed),
    /// checked against the heads and mask (or lengths); a packed batch's `s` is its longest text.
    pub(super) fn dims(&self, shape: &Shape) -> Result<Dims> {
        if !self.lens.is_empty() {
            let (t, h) = shape.dims2()?;
            if h % self.heads != 0 || self.lens.iter().sum::<usize>() != t {
                candle_core::bail!("packed attention: hidden {h} over {} heads, {t} rows for lengths {:?}", self.heads, self.lens);
            }
            let s = self.lens.iter().copied().max().unwrap_or(0);
            return Ok(Dims { b: self.lens.len(), s, h, hd: h / self.heads, nh: self.heads, window: self.window });
        }
        let (b, s, h) = shape.dims3()?;
        if h % self.heads != 0 || self.key_bias.len() != b * s {
            candle_core::bail!("attention: hidden {h} over {} heads, bias of {}", self.heads, self.key_bias.len());
        }
        Ok(Dims { b, s, h, hd: h / self.heads, nh: self.heads, window: self.window })
    }

    /// Draws the keep flags: flag `i·len + j` of task `text·heads + head` from
    /// `rng::bits(seed, its offset + that)`, the tasks' flags one after another (for a padded
    /// batch `((text·heads + head)·seq + i)·seq + j`, as the device-generic attention draws them).
    fn draw_keep(&self, d: Dims) -> Vec<u8> {
        let keep_below = self.keep_below;
        let at = self.flag_offsets(d);
        let mut keep = vec![0u8; at[at.len() - 1]];
        let mut tasks: Vec<(usize, &mut [u8])> = Vec::with_capacity(d.b * d.nh);
        let mut rest = &mut keep[..];
        for w in at.windows(2) {
            let (task, tail) = rest.split_at_mut(w[1] - w[0]);
            tasks.push((w[0], task));
            rest = tail;
        }
        tasks.into_par_iter().for_each(|(base, out)| keep_flags(out, self.seed, base as u64, keep_below));
        keep
    }

    fn keep_factor(&self) -> f32 {
        1.0 / (1.0 - self.dropout)
    }
}

simd_kernel! {
    /// Dropout keep flags of elements `base..base + out.len()`.
    fn keep_flags(out: &mut [u8], seed: u64, base: u64, keep_below: u32) {
        for (i, k) in out.iter_mut().enumerate() {
            *k = super::rng::kept(seed, base + i as u64, keep_below) as u8;
        }
    }
}

/// Scatters per-(text, head) `[len, head_dim]` blocks back into the texts' rows of
/// `[rows, hidden]` (`spans`: each text's first row and length, covering the rows in order).
fn scatter(blocks: &[Vec<f32>], spans: &[(usize, usize)], d: Dims) -> Vec<f32> {
    let rows = spans.last().map_or(0, |&(r, n)| r + n);
    // SAFETY: each text's rows get every head's `hd` columns, `nh·hd = h`, and the spans
    // cover every row: all written.
    let mut out = unsafe { super::buffers::uninit(rows * d.h) };
    let mut texts: Vec<&mut [f32]> = Vec::with_capacity(spans.len());
    let mut rest = &mut out[..];
    for &(_, n) in spans {
        let (text, tail) = rest.split_at_mut(n * d.h);
        texts.push(text);
        rest = tail;
    }
    texts.into_par_iter().enumerate().for_each(|(bi, text)| {
        for hi in 0..d.nh {
            let block = &blocks[bi * d.nh + hi];
            for i in 0..spans[bi].1 {
                text[i * d.h + hi * d.hd..][..d.hd].copy_from_slice(&block[i * d.hd..][..d.hd]);
            }
        }
    });
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let d = self.dims(l1.shape())?;
        Ok((CpuStorage::F32(self.forward_slices(q, k, v, d)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape())?;
        // The inputs are read where they lie, not copied out of their tensors.
        let [dq, dk, dv] = super::buffers::with_f32s([q, k, v, grad], |[q, k, v, g]| self.backward_slices(q, k, v, g, d))?;
        let dev = grad.device();
        let part = |x: Vec<f32>| Tensor::from_vec(x, q.shape(), dev).map(Some);
        Ok((part(dq)?, part(dk)?, part(dv)?))
    }
}

impl Attention {
    /// The context of `q`, `k`, `v` in their layout (`[batch, seq, hidden]`, or packed
    /// `[tokens, hidden]`; `d` from [`Attention::dims`]).
    pub(super) fn forward_slices(&self, q: &[f32], k: &[f32], v: &[f32], d: Dims) -> Vec<f32> {
        let keep = (self.dropout > 0.0).then(|| self.keep.get_or_init(|| self.draw_keep(d)));
        let factor = self.keep_factor();
        let (spans, at, zeros) = (self.spans(d), self.flag_offsets(d), vec![0f32; d.s]);
        let blocks: Vec<Vec<f32>> = (0..d.b * d.nh)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / d.nh, task % d.nh);
                let (row, n) = spans[bi];
                let text = row * d.h;
                let flags = keep.map(|k| &k[at[task]..at[task + 1]]);
                let mut out = vec![0f32; n * d.hd];
                let bias = self.bias_of(spans[bi], &zeros);
                fwd_task(&q[text..], &k[text..], &v[text..], bias, flags, factor, Dims { s: n, ..d }, hi, &mut out);
                out
            })
            .collect();
        scatter(&blocks, &spans, d)
    }

    /// The gradients `[dq, dk, dv]` (each in the layout of `q`) from the output's gradient `g`.
    pub(super) fn backward_slices(&self, q: &[f32], k: &[f32], v: &[f32], g: &[f32], d: Dims) -> [Vec<f32>; 3] {
        let keep = (self.dropout > 0.0).then(|| self.keep.get_or_init(|| self.draw_keep(d)));
        let factor = self.keep_factor();
        let (spans, at, zeros) = (self.spans(d), self.flag_offsets(d), vec![0f32; d.s]);
        let blocks: Vec<[Vec<f32>; 3]> = (0..d.b * d.nh)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / d.nh, task % d.nh);
                let (row, n) = spans[bi];
                let text = row * d.h;
                let flags = keep.map(|k| &k[at[task]..at[task + 1]]);
                let bias = self.bias_of(spans[bi], &zeros);
                let (mut dq, mut dk, mut dv) = (vec![0f32; n * d.hd], vec![0f32; n * d.hd], vec![0f32; n * d.hd]);
                let text_in = [&q[text..], &k[text..], &v[text..], &g[text..]];
                let dt = Dims { s: n, ..d };
                bwd_task(text_in, bias, flags, factor, dt, hi, [&mut dq[..], &mut dk[..], &mut dv[..]]);
                [dq, dk, dv]
            })
            .collect();
        let (mut bq, mut bk, mut bv) =
            (Vec::with_capacity(blocks.len()), Vec::with_capacity(blocks.len()), Vec::with_capacity(blocks.len()));
        for [dq, dk, dv] in blocks {
            bq.push(dq);
            bk.push(dk);
            bv.push(dv);
        }
        [scatter(&bq, &spans, d), scatter(&bk, &spans, d), scatter(&bv, &spans, d)]
    }
}

/// Multi-head attention of `[batch, seq, hidden]` projections on CPU f32, returning the
/// context in the same layout (heads concatenated). `mask` is `[batch, seq]` (1 = token);
/// `dropout` applies to the attention weights with a mask drawn from `seed`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &[f32], heads: usize, dropout: f64, seed: u64) -> Result<Tensor> {
    attention_windowed(q, k, v, mask, heads, dropout, seed, None)
}

/// [`attention`] where, with `window`, query `i` attends only to keys `j` with `|i − j| ≤ window`
/// (ModernBERT's local layers: `window` is half of `local_attention`), as transformers'
/// bidirectional sliding-window mask.
#[allow(clippy::too_many_arguments)]
pub fn attention_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    heads: usize,
    dropout: f64,
    seed: u64,
    window: Option<usize>,
) -> Result<Tensor> {
    let op = Attention::new(mask, heads, dropout, seed, window);
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] over texts packed one after another without padding, `lens` tokens each:
/// `[tokens, hidden]` projections in, the context `[tokens, hidden]` out, with the backward
/// pass (training's dense layers over the real tokens only, see `model::ops::unpad`).
pub fn attention_unpadded(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize], heads: usize, dropout: f64, seed: u64) -> Result<Tensor> {
    let op = Attention::packed(lens, heads, dropout, seed, None);
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The additive `[seq, seq]` bias of a sliding window for composed attention (any device):
/// 0 where `|i − j| ≤ window`, −1e4 elsewhere, as the padding bias.
pub fn window_bias(seq: usize, window: usize, dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..seq * seq).map(|n| if (n / seq).abs_diff(n % seq) <= window { 0.0 } else { -1e4 }).collect();
    Tensor::from_vec(v, (seq, seq), device)?.to_dtype(dtype)
}
