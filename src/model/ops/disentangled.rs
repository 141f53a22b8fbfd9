//! DeBERTa's disentangled self-attention for CPU f32 as one op with its own backward pass.
//!
//! Composed from candle ops, each layer's attention is a batched product for the content scores,
//! two more for the content-to-position and position-to-content products (`[batch, heads, seq,
//! rows]` each), two gathers into `[batch, heads, seq, seq]` (one of them then transposed and
//! copied), three additions and scalings over that tensor, a softmax and the weighted sum, and as
//! many passes again backwards. Here every (text, head) pair is one task on rayon: the three
//! products, the lookups of the position terms, the mask, softmax, dropout and the weighted sum
//! run on blocks that stay in cache. The backward pass recomputes the probabilities; the dropout
//! flags are kept, drawn as the fused BERT attention draws them.

use super::attention_tasks::{lanes, softmax_band};
use super::buffers::with_f32s;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// The relative-position lookups of one sequence length, counted from the first row of the
/// position projections passed to [`disentangled_attention`]: the content-to-position term of
/// query `i` and key `j` reads position-key row `c2p[i·seq + j]`, and its position-to-content
/// term reads position-query row `p2c[j·seq + i]` against key `j` (transformers' `c2p_pos` and
/// `p2c_pos`, the latter's gather transposed).
#[derive(Clone)]
pub struct RelTables {
    pub seq: usize,
    pub rows: usize,
    pub c2p: Arc<Vec<u32>>,
    pub p2c: Arc<Vec<u32>>,
}

/// Which position terms a layer adds (`pos_att_type`).
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    pub c2p: bool,
    pub p2c: bool,
}

struct Disentangled {
    heads: usize,
    /// `1 / sqrt(head_dim · (1 + terms))`, applied to every term.
    scale: f32,
    terms: Terms,
    tables: RelTables,
    /// Additive bias per key, `[batch, seq]`: 0 for tokens, a large negative on padding.
    key_bias: Vec<f32>,
    dropout: f32,
    keep_below: u32,
    seed: u64,
    keep: OnceLock<Vec<u8>>,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    s: usize,
    h: usize,
    nh: usize,
    hd: usize,
    /// Rows of the position projections.
    r: usize,
    /// Width of the position input: `h` per term it holds.
    pw: usize,
}

impl Dims {
    /// Column of head `hi`'s position keys and position queries in the position input.
    fn pos_cols(&self, terms: Terms, hi: usize) -> (usize, usize) {
        let pk = hi * self.hd;
        let pq = if terms.c2p { self.h } else { 0 } + hi * self.hd;
        (pk, pq)
    }
}

/// `dst (m×n, row stride n) = [dst +] scale · lhs·rhs` on this thread; `(slice, column stride,
/// row stride)` per input. Panics where the strides reach outside a slice.
#[allow(clippy::too_many_arguments)]
fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], read: bool, lhs: (&[f32], usize, usize), rhs: (&[f32], usize, usize), scale: f32) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, (_, cs, rs): (&[f32], usize, usize)| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() >= m * n);
    if k == 0 {
        if !read {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(last(m, k, lhs) < lhs.0.len() && last(k, n, rhs) < rhs.0.len(), "disentangled attention: product out of bounds");
    // SAFETY: the largest index each operand's strides reach was checked against its length above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            if read { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn f32s<'a>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("disentangled attention needs contiguous f32 input"),
    }
}

impl Disentangled {
    fn dims(&self, qkv: &Shape, pos: &Shape) -> Result<Dims> {
        let (b, s, w) = qkv.dims3()?;
        let (r, pw) = pos.dims2()?;
        let h = w / 3;
        let n_terms = usize::from(self.terms.c2p) + usize::from(self.terms.p2c);
        let t = &self.tables;
        if w % 3 != 0 || self.heads == 0 || h % self.heads != 0 || pw != n_terms * h || n_terms == 0 {
            candle_core::bail!("disentangled attention: width {w} over {} heads, position input {r}×{pw}", self.heads);
        }
        if t.seq != s || t.rows != r || t.c2p.len() != s * s || t.p2c.len() != s * s || self.key_bias.len() != b * s {
            candle_core::bail!("disentangled attention: tables for {} tokens and {} rows, input of {s} tokens and {r} rows", t.seq, t.rows);
        }
        if t.c2p.iter().chain(t.p2c.iter()).any(|&x| x as usize >= r) {
            candle_core::bail!("disentangled attention: a position index past the {r} rows");
        }
        Ok(Dims { b, s, h, nh: self.heads, hd: h / self.heads, r, pw })
    }

    fn keep(&self, d: Dims) -> Option<&[u8]> {
        (self.dropout > 0.0).then(|| {
            self.keep
                .get_or_init(|| {
                    let mut keep = vec![0u8; d.b * d.nh * d.s * d.s];
                    keep.par_chunks_mut(d.s * d.s).enumerate().for_each(|(task, out)| {
                        for (i, k) in out.iter_mut().enumerate() {
                            *k = super::rng::kept(self.seed, (task * d.s * d.s + i) as u64, self.keep_below) as u8;
                        }
                    });
                    keep
                })
                .as_slice()
        })
    }

    /// The attention probabilities `[s, s]` of head `hi` of a text (`text` its `[s, 3h]` rows),
    /// before dropout.
    fn probs(&self, d: Dims, text: &[f32], pos: &[f32], bias: &[f32], hi: usize) -> Vec<f32> {
        let (s, r, w) = (d.s, d.r, 3 * d.h);
        let q = (&text[hi * d.hd..], 1, w);
        let k = &text[d.h + hi * d.hd..];
        let (pk, pq) = d.pos_cols(self.terms, hi);
        let mut p = vec![0f32; s * s];
        mm(s, s, d.hd, &mut p, false, q, (k, w, 1), self.scale);
        let mut rel = vec![0f32; s * r];
        if self.terms.c2p {
            mm(s, r, d.hd, &mut rel, false, q, (&pos[pk..], d.pw, 1), self.scale);
            let idx = &self.tables.c2p;
            for (i, row) in p.chunks_exact_mut(s).enumerate() {
                let (c, ix) = (&rel[i * r..][..r], &idx[i * s..][..s]);
                row.iter_mut().zip(ix).for_each(|(x, &n)| *x += c[n as usize]);
            }
        }
        if self.terms.p2c {
            mm(s, r, d.hd, &mut rel, false, (k, 1, w), (&pos[pq..], d.pw, 1), self.scale);
            let idx = &self.tables.p2c;
            for j in 0..s {
                let (c, ix) = (&rel[j * r..][..r], &idx[j * s..][..s]);
                for (i, &n) in ix.iter().enumerate() {
                    p[i * s + j] += c[n as usize];
                }
            }
        }
        for row in p.chunks_exact_mut(s) {
            row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
            softmax_band(row, (0, s));
        }
        p
    }

    fn factor(&self) -> f32 {
        1.0 / (1.0 - self.dropout)
    }
}

/// `p` with the dropout flags applied (kept ones scaled by `factor`).
fn dropped(p: &mut [f32], keep: Option<&[u8]>, factor: f32) {
    if let Some(flags) = keep {
        p.iter_mut().zip(flags).for_each(|(x, &f)| *x *= f as f32 * factor);
    }
}

impl CustomOp2 for Disentangled {
    fn name(&self) -> &'static str {
        "disentangled-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qkv, pos) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let d = self.dims(l1.shape(), l2.shape())?;
        let keep = self.keep(d);
        let (s, h, w) = (d.s, d.h, 3 * d.h);
        let blocks: Vec<Vec<f32>> = (0..d.b * d.nh)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / d.nh, task % d.nh);
                let text = &qkv[bi * s * w..][..s * w];
                let mut p = self.probs(d, text, pos, &self.key_bias[bi * s..][..s], hi);
                dropped(&mut p, keep.map(|k| &k[task * s * s..][..s * s]), self.factor());
                let mut out = vec![0f32; s * d.hd];
                mm(s, d.hd, s, &mut out, false, (&p, 1, s), (&text[2 * h + hi * d.hd..], 1, w), 1.0);
                out
            })
            .collect();
        let mut out = vec![0f32; d.b * s * h];
        for (task, block) in blocks.iter().enumerate() {
            let (bi, hi) = (task / d.nh, task % d.nh);
            for i in 0..s {
                out[(bi * s + i) * h + hi * d.hd..][..d.hd].copy_from_slice(&block[i * d.hd..][..d.hd]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((d.b, s, h))))
    }

    fn bwd(&self, qkv: &Tensor, pos: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(qkv.shape(), pos.shape())?;
        let keep = self.keep(d);
        let (s, h, w, r, hd) = (d.s, d.h, 3 * d.h, d.r, d.hd);
        let (c2p, p2c) = (&self.tables.c2p, &self.tables.p2c);
        // Per task: dq, dk, dv `[s, hd]` and the head's position-key and position-query
        // gradients `[r, hd]` (empty where the term is off).
        let blocks: Vec<[Vec<f32>; 5]> = with_f32s([qkv, pos, grad], |[qkv, pos, g]| {
            (0..d.b * d.nh)
                .into_par_iter()
                .map(|task| {
                    let (bi, hi) = (task / d.nh, task % d.nh);
                    let text = &qkv[bi * s * w..][..s * w];
                    let g = (&g[bi * s * h + hi * hd..], 1, h);
                    let (q, k, v) = (&text[hi * hd..], &text[h + hi * hd..], &text[2 * h + hi * hd..]);
                    let (pk, pq) = d.pos_cols(self.terms, hi);
                    let p = self.probs(d, text, pos, &self.key_bias[bi * s..][..s], hi);
                    let flags = keep.map(|k| &k[task * s * s..][..s * s]);
                    let mut pd = p.clone();
                    dropped(&mut pd, flags, self.factor());
                    let mut dv = vec![0f32; s * hd];
                    mm(s, hd, s, &mut dv, false, (&pd, s, 1), g, 1.0);
                    // dP' = dO·Vᵀ, through dropout, then the softmax's backward: the gradient of
                    // the scaled scores; times the scale, that of each unscaled term.
                    let mut ds = pd;
                    mm(s, s, hd, &mut ds, false, g, (v, w, 1), 1.0);
                    dropped(&mut ds, flags, self.factor());
                    let mut prod = vec![0f32; s];
                    for (row, prow) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                        prod.iter_mut().zip(row.iter()).zip(prow).for_each(|((t, &a), &b)| *t = a * b);
                        let c = lanes(&prod, 0.0, |a, b| a + b);
                        row.iter_mut().zip(prow).for_each(|(x, &pj)| *x = pj * (*x - c) * self.scale);
                    }
                    let (mut dq, mut dk) = (vec![0f32; s * hd], vec![0f32; s * hd]);
                    mm(s, hd, s, &mut dq, false, (&ds, 1, s), (k, 1, w), 1.0);
                    mm(s, hd, s, &mut dk, false, (&ds, s, 1), (q, 1, w), 1.0);
                    let (mut dpk, mut dpq) = (Vec::new(), Vec::new());
                    let mut drel = vec![0f32; s * r];
                    if self.terms.c2p {
                        for (i, row) in ds.chunks_exact(s).enumerate() {
                            let (dc, ix) = (&mut drel[i * r..][..r], &c2p[i * s..][..s]);
                            row.iter().zip(ix).for_each(|(&x, &n)| dc[n as usize] += x);
                        }
                        mm(s, hd, r, &mut dq, true, (&drel, 1, r), (&pos[pk..], 1, d.pw), 1.0);
                        dpk = vec![0f32; r * hd];
                        mm(r, hd, s, &mut dpk, false, (&drel, r, 1), (q, 1, w), 1.0);
                    }
                    if self.terms.p2c {
                        drel.fill(0.0);
                        for j in 0..s {
                            let (dc, ix) = (&mut drel[j * r..][..r], &p2c[j * s..][..s]);
                            for (i, &n) in ix.iter().enumerate() {
                                dc[n as usize] += ds[i * s + j];
                            }
                        }
                        mm(s, hd, r, &mut dk, true, (&drel, 1, r), (&pos[pq..], 1, d.pw), 1.0);
                        dpq = vec![0f32; r * hd];
                        mm(r, hd, s, &mut dpq, false, (&drel, r, 1), (k, 1, w), 1.0);
                    }
                    [dq, dk, dv, dpk, dpq]
                })
                .collect()
        })?;
        let mut dqkv = vec![0f32; d.b * s * w];
        let mut dpos = vec![0f32; r * d.pw];
        for (task, [dq, dk, dv, dpk, dpq]) in blocks.iter().enumerate() {
            let (bi, hi) = (task / d.nh, task % d.nh);
            for i in 0..s {
                let row = &mut dqkv[(bi * s + i) * w..][..w];
                for (part, block) in [dq, dk, dv].into_iter().enumerate() {
                    row[part * h + hi * hd..][..hd].copy_from_slice(&block[i * hd..][..hd]);
                }
            }
            let (pk, pq) = d.pos_cols(self.terms, hi);
            for (col, block) in [(pk, dpk), (pq, dpq)] {
                for (row, src) in block.chunks_exact(hd).enumerate() {
                    dpos[row * d.pw + col..][..hd].iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                }
            }
        }
        let dev = grad.device();
        Ok((Some(Tensor::from_vec(dqkv, (d.b, s, w), dev)?), Some(Tensor::from_vec(dpos, (r, d.pw), dev)?)))
    }
}

/// Disentangled multi-head attention on CPU f32: `qkv` `[batch, seq, 3·hidden]` (each token's
/// query, key and value side by side), `pos` `[rows, terms·hidden]` (the position keys where
/// `terms.c2p`, then the position queries where `terms.p2c`), `mask` `[batch, seq]` (1 = token);
/// each score is `scale · (q·k + q·pos_k[c2p] + k·pos_q[p2c])`, softmax over the keys, dropout
/// `dropout` with flags drawn from `seed`. Returns the context `[batch, seq, hidden]`.
#[allow(clippy::too_many_arguments)]
pub fn disentangled_attention(
    qkv: &Tensor,
    pos: &Tensor,
    tables: &RelTables,
    terms: Terms,
    mask: &[f32],
    heads: usize,
    scale: f64,
    dropout: f64,
    seed: u64,
) -> Result<Tensor> {
    let key_bias = mask.iter().map(|&m| (m - 1.0) * 1e4).collect();
    let (keep_below, _) = super::rng::keep_rule(dropout);
    let op = Disentangled {
        heads,
        scale: scale as f32,
        terms,
        tables: tables.clone(),
        key_bias,
        dropout: dropout as f32,
        keep_below,
        seed,
        keep: OnceLock::new(),
    };
    qkv.contiguous()?.apply_op2(&pos.contiguous()?, op)
}
