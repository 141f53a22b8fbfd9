//! Fused CPU kernels with their own backward pass, run over both cores with rayon.
//! candle's element-wise ops run on one thread and its fused LayerNorm has no backward;
//! these keep training differentiable and fast. Other devices and dtypes use composed ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers::{uninit, with_f32s};
use super::fastmath::{gelu_grad_chunk, gelu_in_place, row_stats};
use super::simd::simd_kernel;

pub(super) const CHUNK: usize = 4096;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("fused kernels need contiguous f32 input"),
    }
}

fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && use_fused_cpu_kernels()
}

thread_local! {
    static FUSED_CPU: std::cell::Cell<bool> =
        std::cell::Cell::new(std::env::var("FINETUNED_KERNELS").map_or(true, |v| v != "generic"));
}

/// Whether this thread's CPU work uses the fused CPU kernels (the default). Off, a CPU run takes
/// the device-generic path a GPU takes (`model::ops::device_ops`, cuBLAS-style matmuls, the
/// optimizer's device update), so tests check that path's maths without a GPU. The default
/// comes from `FINETUNED_KERNELS=generic`; [`set_fused_cpu_kernels`] changes it per thread.
pub fn use_fused_cpu_kernels() -> bool {
    FUSED_CPU.with(|f| f.get())
}

/// Sets [`use_fused_cpu_kernels`] for the calling thread; returns the previous setting.
pub fn set_fused_cpu_kernels(on: bool) -> bool {
    FUSED_CPU.with(|f| f.replace(on))
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        // SAFETY: every chunk is copied from `x` before it is read.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            y.copy_from_slice(x);
            gelu_in_place(y)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfGrad)?))
    }
}

/// d/dx of x·Φ(x) times the incoming gradient.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        // SAFETY: `gelu_grad_chunk` writes every element of each chunk.
        let mut out = unsafe { uninit(x.len()) };
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(o, (x, g))| gelu_grad_chunk(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact (erf) GELU, differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.contiguous()?.apply_op1(super::device_ops::BiasGelu)
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let h = w.len();
        // SAFETY: every row of `y` is written below.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| norm_row(y, x, w, b, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Frozen (LoRA, a frozen encoder): no weight or bias gradient is kept, so none is summed.
        let want_params = w.track_op() || b.track_op();
        let h = w.elem_count();
        // SAFETY: every row of `dx` is written below.
        let mut dx = unsafe { uninit(x.elem_count()) };
        let partial = with_f32s([x, w, grad], |[xv, wv, gv]| self.grad_rows(xv, wv, gv, &mut dx, want_params))?;
        let dev = x.device();
        let dx = Some(Tensor::from_vec(dx, x.shape(), dev)?);
        if !want_params {
            return Ok((dx, None, None));
        }
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in partial {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        Ok((dx, Some(Tensor::from_vec(dw, w.shape(), dev)?), Some(Tensor::from_vec(db, w.shape(), dev)?)))
    }
}

impl LayerNormOp {
    /// Writes `dx` for every row and returns per-block partial sums of the weight and bias
    /// gradients (empty when `params` is false).
    fn grad_rows(&self, xv: &[f32], wv: &[f32], gv: &[f32], dx: &mut [f32], params: bool) -> Vec<(Vec<f32>, Vec<f32>)> {
        let h = wv.len();
        // Per row: dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)); dw, db summed over rows.
        dx.par_chunks_mut(h * 64)
            .zip(xv.par_chunks(h * 64).zip(gv.par_chunks(h * 64)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db) = if params { (vec![0f32; h], vec![0f32; h]) } else { (vec![0f32; 0], vec![0f32; 0]) };
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    norm_grad_row(dx, x, g, wv, &mut dw, &mut db, self.eps);
                }
                (dw, db)
            })
            .collect()
    }
}

simd_kernel! {
    /// One row of LayerNorm: `y = (x − mean) · rstd · w + b`.
    fn norm_row(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let (mean, rstd) = row_stats(x, eps);
        for (((y, &x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
    }
}

simd_kernel! {
    /// One row of LayerNorm's backward pass: `dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂))`,
    /// and `g · x̂`, `g` added into `dw`, `db` unless those are empty.
    fn norm_grad_row(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], dw: &mut [f32], db: &mut [f32], eps: f32) {
        let (mean, rstd) = row_stats(x, eps);
        let h = x.len();
        // Both means summed in 16 lanes, as `row_stats` sums.
        let (mut s1, mut s2) = ([0f32; 16], [0f32; 16]);
        let whole = h / 16 * 16;
        for c in (0..whole).step_by(16) {
            let (x, g, w) = (&x[c..c + 16], &g[c..c + 16], &w[c..c + 16]);
            for l in 0..16 {
                let gw = g[l] * w[l];
                s1[l] += gw;
                s2[l] += gw * ((x[l] - mean) * rstd);
            }
        }
        let (mut t1, mut t2) = (0f32, 0f32);
        for i in whole..h {
            let gw = g[i] * w[i];
            t1 += gw;
            t2 += gw * ((x[i] - mean) * rstd);
        }
        let m1 = (s1.iter().sum::<f32>() + t1) / h as f32;
        let m2 = (s2.iter().sum::<f32>() + t2) / h as f32;
        if !dw.is_empty() {
            for (((dw, db), &x), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                *dw += g * ((x - mean) * rstd);
                *db += g;
            }
        }
        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
            *dx = rstd * (g * w - m1 - (x - mean) * rstd * m2);
        }
    }
}

/// LayerNorm over the last dimension, differentiable in all three inputs.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if on_cpu_f32(x) && on_cpu_f32(w) {
        return x.contiguous()?.apply_op3(w, b, LayerNormOp { eps: eps as f32 });
    }
    let op = super::device_ops::LayerNorm { eps: eps as f32 };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// Inverted dropout whose mask is drawn inside the kernel, in parallel, element `i` from
/// `rng::bits(seed, i)`: the same mask whatever the thread count, and the same as the
/// device-generic op and the CUDA kernel draw. The backward pass applies the same op to the
/// gradient (the mask is drawn again from the seed, not stored).
#[derive(Clone)]
struct DropoutOp {
    keep_below: u32,
    scale: f32,
    seed: u64,
}

simd_kernel! {
    /// `y = x · scale` where element `base + i` is kept under `keep_below`, else 0.
    fn dropout_chunk(x: &[f32], y: &mut [f32], seed: u64, base: u64, keep_below: u32, scale: f32) {
        for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            let keep = super::rng::kept(seed, base + i as u64, keep_below);
            *y = if keep { x * scale } else { 0.0 };
        }
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        // SAFETY: `dropout_chunk` writes every element of each chunk.
        let mut y = unsafe { uninit(x.len()) };
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| dropout_chunk(x, y, self.seed, (c * CHUNK) as u64, self.keep_below, self.scale));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Inverted dropout with probability `p` (elements kept are scaled by `1/(1-p)`), its mask
/// drawn from `seed` (see [`super::rng`]), on any device and dtype.
/// Elsewhere (another device or dtype, or the device-generic path) the device op draws the
/// same mask.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let (keep_below, scale) = super::rng::keep_rule(p);
    if on_cpu_f32(x) {
        return x.contiguous()?.apply_op1(DropoutOp { keep_below, scale, seed });
    }
    x.contiguous()?.apply_op1(super::device_ops::Dropout { keep_below, scale, seed })
}
