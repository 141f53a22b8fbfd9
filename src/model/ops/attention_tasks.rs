//! The work of one (text, head) task of the fused CPU attention (`super::attention`): the
//! forward pass as two small gemm calls around the softmax, the backward pass row by row,
//! recomputing the probabilities.

use super::fastmath::exp;
use super::simd::simd_kernel;

/// The shape of an attention op's input, or of one text's task (`b`, `s`: texts, tokens).
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) s: usize,
    pub(super) h: usize,
    pub(super) hd: usize,
    pub(super) nh: usize,
    /// The sliding window, if any (see `Attention::window`).
    pub(super) window: Option<usize>,
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
pub(super) fn fwd_task(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    keep: Option<&[u8]>,
    factor: f32,
    d: Dims,
    hi: usize,
    out: &mut [f32],
) {
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
    pub(super) fn bwd_task(x: [&[f32]; 4], bias: &[f32], keep: Option<&[u8]>, factor: f32, d: Dims, hi: usize, out: [&mut [f32]; 3]) {
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
