//! A dense layer on CPU f32 as one op with its own backward, calling gemm directly.
//!
//! Composed from candle ops, `x·Wᵀ + b` is a matmul on a transposed view, a broadcast add
//! (one more pass over the output), and in the backward pass transposed copies and a
//! separate reduction for the bias. Here the bias is written into the output first and the
//! product accumulated onto it; the backward pass is two gemm calls and a column sum.

use super::buffers::{f32s, repeat_rows, rows_of, uninit, with_f32, with_last, SharedOut};
use super::fastmath::gelu_in_place;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A new `m×n` matrix holding `lhs·rhs` (strides as in [`gemm`]), written without a zero-fill first.
pub(super) fn gemm_new(m: usize, n: usize, k: usize, lhs: (&[f32], isize, isize), rhs: (&[f32], isize, isize)) -> Vec<f32> {
    if k == 0 {
        return vec![0f32; m * n];
    }
    // SAFETY: gemm without `read_dst` writes all m×n elements and reads none of them.
    let mut dst = unsafe { uninit(m * n) };
    gemm(m, n, k, &mut dst, false, lhs, rhs);
    dst
}

/// `dst (m×n, row-major) = read·dst + lhs·rhs`, with strides (column, row) for each input.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], read: bool, lhs: (&[f32], isize, isize), rhs: (&[f32], isize, isize)) {
    gemm_scaled(m, n, k, dst, read, lhs, rhs, 1.0)
}

/// Below this many multiply-adds a product runs on the calling thread alone.
const SERIAL_BELOW: usize = 1 << 23;

/// As [`gemm`], with the product multiplied by `scale`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_scaled(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    read: bool,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
    scale: f32,
) {
    assert!(dst.len() >= m * n);
    let threads = rayon::current_num_threads();
    // A LoRA factor's product (rank 8: a few million multiply-adds) takes less time than
    // handing it to the other threads and waiting for them.
    let small = m * n * k < SERIAL_BELOW;
    let par = if threads > 1 && !small { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: every index the strides reach is inside the slices: lhs is m×k and rhs k×n
    // in the layouts the callers below pass, dst is m×n.
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
            lhs.1,
            lhs.2,
            rhs.0.as_ptr(),
            rhs.1,
            rhs.2,
            if read { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Refuses a weight that does not hold `inputs × outputs` values: gemm would read past it.
pub(super) fn check_weight(w: &[f32], inputs: usize, outputs: usize) -> Result<()> {
    if w.len() != inputs * outputs {
        candle_core::bail!("dense layer: {inputs} inputs and {outputs} outputs, but the weight holds {} values", w.len());
    }
    Ok(())
}

/// `y = x·Wᵀ + b` for `x` `[rows, in]`, `W` `[out, in]`, `b` `[out]`.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (x, w, b) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let (m, k) = rows_of(l1.shape())?;
        let n = b.len();
        check_weight(w, k, n)?;
        let mut y = repeat_rows(m, b);
        // Wᵀ as a k×n matrix: element (kk, j) is w[j·k + kk].
        gemm(m, n, k, &mut y, true, (x, 1, k as isize), (w, k as isize, 1));
        Ok((CpuStorage::F32(y), with_last(l1.shape(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_of(x.shape())?;
        let n = w.dim(0)?;
        let dev = x.device();
        // A frozen weight (LoRA's base, a frozen encoder) is a plain tensor that tracks no op:
        // its gradient, a third of the layer's backward work, is not computed at all.
        let (want_dw, want_db) = (w.track_op(), b.track_op());
        let (mut dx, mut dw) = (None, None);
        let db = with_f32(grad, |g| {
            if x.track_op() {
                dx = Some(with_f32(w, |wv| input_grad_new(m, k, n, g, wv))?);
            }
            if want_dw {
                // gᵀ as an n×m matrix: element (j, i) is g[i·n + j].
                dw = Some(with_f32(x, |xv| gemm_new(n, k, m, (g, n as isize, 1), (xv, 1, k as isize)))?);
            }
            Ok::<_, candle_core::Error>(want_db.then(|| column_sums(g, n)))
        })??;
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        let dw = dw.map(|v| Tensor::from_vec(v, (n, k), dev)).transpose()?;
        Ok((dx, dw, db.map(|v| Tensor::from_vec(v, n, dev)).transpose()?))
    }
}

/// A new `m×k` matrix holding `g (m×n) · W (n×k)`, as [`input_grad`] computes it.
pub(super) fn input_grad_new(m: usize, k: usize, n: usize, g: &[f32], w: &[f32]) -> Vec<f32> {
    if m * k > 256 * 1024 || n < 2 * SUM_PART {
        return gemm_new(m, k, n, (g, 1, n as isize), (w, 1, k as isize));
    }
    let mut dx = vec![0f32; m * k];
    input_grad(m, k, n, &mut dx, g, w);
    dx
}

/// Output columns per part when [`input_grad`] splits a long sum.
const SUM_PART: usize = 4096;

/// `dx (m×k) = g (m×n) · W (n×k)`. gemm does not split the sum over threads, so when the
/// output is small and the sum long (the masked-LM decoder: a few dozen rows, a vocabulary
/// of outputs) it runs on one core; then parts of the sum run in parallel and are added in
/// a fixed order, so the result does not depend on the thread count.
pub(super) fn input_grad(m: usize, k: usize, n: usize, dx: &mut [f32], g: &[f32], w: &[f32]) {
    if m * k > 256 * 1024 || n < 2 * SUM_PART {
        return gemm(m, k, n, dx, false, (g, 1, n as isize), (w, 1, k as isize));
    }
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(SUM_PART))
        .into_par_iter()
        .map(|p| {
            let (c0, c1) = (p * SUM_PART, ((p + 1) * SUM_PART).min(n));
            let mut part = vec![0f32; m * k];
            // SAFETY: reads columns c0..c1 of g (m×n, row stride n) and rows c0..c1 of w
            // (n×k, row stride k), writes part (m×k): all in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    k,
                    c1 - c0,
                    part.as_mut_ptr(),
                    1,
                    k as isize,
                    false,
                    g.as_ptr().add(c0),
                    1,
                    n as isize,
                    w.as_ptr().add(c0 * k),
                    1,
                    k as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
            part
        })
        .collect();
    for part in parts {
        dx.iter_mut().zip(part).for_each(|(d, v)| *d += v);
    }
}

/// Below this many rows, inference splits the output columns over threads itself.
const FEW_ROWS: usize = 128;

/// `y = x·W + b` for `x` `[rows, in]`, `W` `[in, out]` (inference only), then exact GELU
/// when `gelu` is set, applied to each block of the output while it is still in cache.
struct LinearInOut {
    gelu: bool,
}

impl CustomOp3 for LinearInOut {
    fn name(&self) -> &'static str {
        "linear-in-out"
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
        let (x, w, b) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let (m, k) = l1.shape().dims2()?;
        let n = b.len();
        check_weight(w, k, n)?;
        let mut y = vec![0f32; m * n];
        y.chunks_mut(n).for_each(|r| r.copy_from_slice(b));
        let threads = rayon::current_num_threads();
        if m >= FEW_ROWS || threads == 1 {
            gemm(m, n, k, &mut y, true, (x, 1, k as isize), (w, 1, n as isize));
            if self.gelu {
                y.par_chunks_mut(n * 16).for_each(gelu_in_place);
            }
        } else {
            // gemm splits a short matrix badly over threads (two threads were slower than
            // one at 27 rows); one single-threaded gemm per block of output columns is not.
            let width = n.div_ceil(threads).next_multiple_of(16);
            let out = SharedOut(y.as_mut_ptr());
            (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
                let (c0, c1) = (t * width, ((t + 1) * width).min(n));
                // SAFETY: each task writes only columns c0..c1 of y (m×n, row stride n) and
                // reads rows of x (m×k) and columns c0..c1 of w (k×n): all in bounds.
                unsafe {
                    gemm::gemm(
                        m,
                        c1 - c0,
                        k,
                        out.at(c0),
                        1,
                        n as isize,
                        true,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr().add(c0),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
                if self.gelu {
                    for r in 0..m {
                        // SAFETY: row r's columns c0..c1 belong to this task alone.
                        let row = unsafe { std::slice::from_raw_parts_mut(out.at(r * n + c0), c1 - c0) };
                        gelu_in_place(row);
                    }
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// Sum over the rows of a row-major `[rows, n]` matrix. Partial sums are added in a fixed
/// order, so the result does not depend on how rayon split the work.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = g
        .par_chunks(n * 256)
        .map(|block| {
            let mut acc = vec![0f32; n];
            for row in block.chunks(n) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; n];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// `x·W + b` for 2-D `x` and a weight stored `[in, out]`, CPU f32, not differentiable.
pub fn linear_in_out(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(w, b, &LinearInOut { gelu: false })
}

/// `gelu(x·W + b)` (exact GELU) for 2-D `x` and a weight stored `[in, out]`, CPU f32, not
/// differentiable.
pub fn linear_in_out_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(w, b, &LinearInOut { gelu: true })
}

/// `x·Wᵀ + b` over the last dimension of `x` (any rank) on CPU f32, differentiable in all three.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}
