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

use super::fastmath::exp;
use super::simd::simd_kernel;

/// Attention over `[batch, seq, hidden]` query/key/value projections.
pub(super) struct Attention {
    heads: usize,
    /// Additive bias per key, `[batch, seq]`: 0 for tokens, a large negative on padding.
    key_bias: Vec<f32>,
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

#[derive(Clone, Copy)]
pub(super) struct Dims {
    b: usize,
    s: usize,
    h: usize,
    hd: usize,
    nh: usize,
    /// The sliding window, if any (see [`Attention::window`]).
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
        Attention { heads, key_bias, dropout: dropout as f32, keep_below, seed, keep: OnceLock::new(), window }
    }

    /// The shape of one of q, k, v (`[batch, seq, hidden]`), checked against the heads and mask.
    pub(super) fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (b, s, h) = shape.dims3()?;
        if h % self.heads != 0 || self.key_bias.len() != b * s {
            candle_core::bail!("attention: hidden {h} over {} heads, bias of {}", self.heads, self.key_bias.len());
        }
        Ok(Dims { b, s, h, hd: h / self.heads, nh: self.heads, window: self.window })
    }

    /// Draws the keep flags: flag `((text·heads + head)·seq + i)·seq + j` from
    /// `rng::bits(seed, that index)`, as the device-generic attention draws them.
    fn draw_keep(&self, d: Dims) -> Vec<u8> {
        let keep_below = self.keep_below;
        let mut keep = vec![0u8; d.b * d.nh * d.s * d.s];
        keep.par_chunks_mut(d.s * d.s)
            .enumerate()
            .for_each(|(task, out)| keep_flags(out, self.seed, (task * d.s * d.s) as u64, keep_below));
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

/// Folds `x` with `f` in 16 independent lanes (a serial fold over f32 does not vectorise).
#[inline(always)]
pub(super) fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    acc.iter().fold(tail, |a, &v| f(a, v))
}

/// Scatters per-(text, head) `[seq, head_dim]` blocks back into `[batch, seq, hidden]`.
fn scatter(blocks: &[Vec<f32>], d: Dims) -> Vec<f32> {
    // SAFETY: each text's rows get every head's `hd` columns, `nh·hd = h`: all written.
    let mut out = unsafe { super::buffers::uninit(d.b * d.s * d.h) };
    out.par_chunks_mut(d.s * d.h).enumerate().for_each(|(bi, text)| {
        for hi in 0..d.nh {
            let block = &blocks[bi * d.nh + hi];
            for i in 0..d.s {
                text[i * d.h + hi * d.hd..][..d.hd].copy_from_slice(&block[i * d.hd..][..d.hd]);
            }
        }
    });
    out
}

/// The keys `lo..hi` that query `i` of `s` sees: all, or those within `window` of it.
#[inline(always)]
pub(super) fn band(i: usize, s: usize, window: Option<usize>) -> (usize, usize) {
    match window {
        Some(w) => (i.saturating_sub(w), (i + w + 1).min(s)),
        None => (0, s),
    }
}

/// Softmax over keys `lo..hi` of `row` in place; the other keys get probability 0.
#[inline(always)]
pub(super) fn softmax_band(row: &mut [f32], (lo, hi): (usize, usize)) {
    let max = lanes(&row[lo..hi], f32::NEG_INFINITY, f32::max);
    row[lo..hi].iter_mut().for_each(|r| *r = exp(*r - max));
    let inv = 1.0 / lanes(&row[lo..hi], 0.0, |a, b| a + b);
    row[lo..hi].iter_mut().for_each(|r| *r *= inv);
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

/// Softmax of `scale·q_i·Kᵀ + bias` over the keys of `keys` into `row`, for one query row; `kt`
/// is `[hd, seq]`.
#[inline(always)]
fn probs_row(q: &[f32], kt: &[f32], bias: &[f32], scale: f32, keys: (usize, usize), row: &mut [f32]) {
    let s = row.len();
    row.copy_from_slice(bias);
    for (dd, &qd) in q.iter().enumerate() {
        let a = qd * scale;
        for (r, &k) in row.iter_mut().zip(&kt[dd * s..(dd + 1) * s]) {
            *r += a * k;
        }
    }
    softmax_band(row, keys);
}

/// `out[..hd] += Σ_j w[j] · rows[j·stride ..][..hd]`.
#[inline(always)]
fn weighted_rows(w: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    for (j, &wj) in w.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&rows[j * stride..j * stride + hd]) {
            *o += wj * x;
        }
    }
}

/// `rows[j·stride ..][..hd] += w[j] · x` for every j.
#[inline(always)]
fn add_scaled_rows(w: &[f32], x: &[f32], stride: usize, rows: &mut [f32]) {
    let hd = x.len();
    for (j, &wj) in w.iter().enumerate() {
        for (r, &xv) in rows[j * stride..j * stride + hd].iter_mut().zip(x) {
            *r += wj * xv;
        }
    }
}

/// `[seq, hd]` head slice of a `[seq, hidden]` text, transposed to `[hd, seq]`.
#[inline(always)]
fn transposed_head(x: &[f32], d: Dims, hi: usize) -> Vec<f32> {
    let mut t = vec![0f32; d.hd * d.s];
    for j in 0..d.s {
        for dd in 0..d.hd {
            t[dd * d.s + j] = x[j * d.h + hi * d.hd + dd];
        }
    }
    t
}

simd_kernel! {
    /// Row-wise softmax of `p + bias` in place (`p` is `[s, s]`) over each row's window, then dropout.
    fn softmax_rows(p: &mut [f32], bias: &[f32], keep: Option<&[u8]>, factor: f32, window: Option<usize>) {
        let s = bias.len();
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
            softmax_band(row, band(i, s, window));
            if let Some(keep) = keep {
                let flags = &keep[i * s..(i + 1) * s];
                row.iter_mut().zip(flags).for_each(|(x, &f)| *x *= f as f32 * factor);
            }
        }
    }
}

/// One (text, head) of the forward pass, as two small single-threaded gemm calls around
/// the softmax (the tasks themselves run in parallel); `q`, `k`, `v` start at the text.
#[allow(clippy::too_many_arguments)]
fn fwd_task(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], keep: Option<&[u8]>, factor: f32, d: Dims, hi: usize, out: &mut [f32]) {
    let (s, h, hd) = (d.s, d.h, d.hd);
    assert!(q.len() >= s * h && k.len() >= s * h && v.len() >= s * h && out.len() >= s * hd);
    let mut p = vec![0f32; s * s];
    let none = gemm::Parallelism::None;
    // SAFETY: the strides below stay inside q, k, v (`[s, h]` from the text start, head
    // columns hi·hd..(hi+1)·hd), p (`[s, s]`) and out (`[s, hd]`), checked above.
    unsafe {
        // p = scale · Q_h · K_hᵀ; Kᵀ element (dd, j) is k[j·h + hi·hd + dd].
        gemm::gemm(
            s,
            s,
            hd,
            p.as_mut_ptr(),
            1,
            s as isize,
            false,
            q.as_ptr().add(hi * hd),
            1,
            h as isize,
            k.as_ptr().add(hi * hd),
            h as isize,
            1,
            0.0,
            1.0 / (hd as f32).sqrt(),
            false,
            false,
            false,
            none,
        );
    }
    softmax_rows(&mut p, bias, keep, factor, d.window);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            s,
            hd,
            s,
            out.as_mut_ptr(),
            1,
            hd as isize,
            false,
            p.as_ptr(),
            1,
            s as isize,
            v.as_ptr().add(hi * hd),
            1,
            h as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            none,
        );
    }
}

simd_kernel! {
    /// One (text, head) of the backward pass: `[q, k, v, dO]` in, `[dq, dk, dv]` out.
    fn bwd_task(x: [&[f32]; 4], bias: &[f32], keep: Option<&[u8]>, factor: f32, d: Dims, hi: usize, out: [&mut [f32]; 3]) {
        let [q, k, v, g] = x;
        let [dq, dk, dv] = out;
        let scale = 1.0 / (d.hd as f32).sqrt();
        let off = hi * d.hd;
        let kt = transposed_head(k, d, hi);
        let vt = transposed_head(v, d, hi);
        let (mut p, mut pd, mut dp) = (vec![0f32; d.s], vec![0f32; d.s], vec![0f32; d.s]);
        for i in 0..d.s {
            let qi = &q[off + i * d.h..][..d.hd];
            let gi = &g[off + i * d.h..][..d.hd];
            probs_row(qi, &kt, bias, scale, band(i, d.s, d.window), &mut p);
            pd.copy_from_slice(&p);
            let flags = keep.map(|k| &k[i * d.s..][..d.s]);
            if let Some(flags) = flags {
                pd.iter_mut().zip(flags).for_each(|(x, &f)| *x *= f as f32 * factor);
            }
            // dV_j += P'_ij · dO_i
            add_scaled_rows(&pd, gi, d.hd, dv);
            // dP'_ij = dO_i · V_j: a row of dO·Vᵀ, built like a score row.
            dp.iter_mut().for_each(|x| *x = 0.0);
            for (dd, &gd) in gi.iter().enumerate() {
                dp.iter_mut().zip(&vt[dd * d.s..(dd + 1) * d.s]).for_each(|(x, &vj)| *x += gd * vj);
            }
            if let Some(flags) = flags {
                dp.iter_mut().zip(flags).for_each(|(x, &f)| *x *= f as f32 * factor);
            }
            // Softmax backward, then the score scale: dS = P ⊙ (dP − Σ P·dP) · scale.
            pd.iter_mut().zip(&p).zip(&dp).for_each(|((t, &a), &b)| *t = a * b);
            let c = lanes(&pd, 0.0, |a, b| a + b);
            dp.iter_mut().zip(&p).for_each(|(x, &pj)| *x = pj * (*x - c) * scale);
            weighted_rows(&dp, &k[off..], d.h, &mut dq[i * d.hd..(i + 1) * d.hd]);
            add_scaled_rows(&dp, qi, d.hd, dk);
        }
    }
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
        let part = |x: Vec<f32>| Tensor::from_vec(x, (d.b, d.s, d.h), dev).map(Some);
        Ok((part(dq)?, part(dk)?, part(dv)?))
    }
}

impl Attention {
    /// The context `[batch, seq, hidden]` of `q`, `k`, `v` (each `[batch, seq, hidden]` of `d`).
    pub(super) fn forward_slices(&self, q: &[f32], k: &[f32], v: &[f32], d: Dims) -> Vec<f32> {
        let keep = (self.dropout > 0.0).then(|| self.keep.get_or_init(|| self.draw_keep(d)));
        let factor = self.keep_factor();
        let blocks: Vec<Vec<f32>> = (0..d.b * d.nh)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / d.nh, task % d.nh);
                let text = bi * d.s * d.h;
                let flags = keep.map(|k| &k[task * d.s * d.s..][..d.s * d.s]);
                let mut out = vec![0f32; d.s * d.hd];
                let bias = &self.key_bias[bi * d.s..(bi + 1) * d.s];
                fwd_task(&q[text..], &k[text..], &v[text..], bias, flags, factor, d, hi, &mut out);
                out
            })
            .collect();
        scatter(&blocks, d)
    }

    /// The gradients `[dq, dk, dv]` (each `[batch, seq, hidden]`) from the output's gradient `g`.
    pub(super) fn backward_slices(&self, q: &[f32], k: &[f32], v: &[f32], g: &[f32], d: Dims) -> [Vec<f32>; 3] {
        let keep = (self.dropout > 0.0).then(|| self.keep.get_or_init(|| self.draw_keep(d)));
        let factor = self.keep_factor();
        let blocks: Vec<[Vec<f32>; 3]> = (0..d.b * d.nh)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / d.nh, task % d.nh);
                let text = bi * d.s * d.h;
                let flags = keep.map(|k| &k[task * d.s * d.s..][..d.s * d.s]);
                let bias = &self.key_bias[bi * d.s..(bi + 1) * d.s];
                let (mut dq, mut dk, mut dv) = (vec![0f32; d.s * d.hd], vec![0f32; d.s * d.hd], vec![0f32; d.s * d.hd]);
                let text_in = [&q[text..], &k[text..], &v[text..], &g[text..]];
                bwd_task(text_in, bias, flags, factor, d, hi, [&mut dq[..], &mut dk[..], &mut dv[..]]);
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
        [scatter(&bq, d), scatter(&bk, d), scatter(&bv, d)]
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

/// The additive `[seq, seq]` bias of a sliding window for composed attention (any device):
/// 0 where `|i − j| ≤ window`, −1e4 elsewhere, as the padding bias.
pub fn window_bias(seq: usize, window: usize, dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..seq * seq).map(|n| if (n / seq).abs_diff(n % seq) <= window { 0.0 } else { -1e4 }).collect();
    Tensor::from_vec(v, (seq, seq), device)?.to_dtype(dtype)
}
