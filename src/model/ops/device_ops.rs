//! The device-generic training ops: what a GPU runs, one kernel each, forward and backward.
//!
//! Each op has a CUDA kernel (`kernels/finetuned.cu`, launched from `model::ops::cuda`, built by
//! the `cuda` feature) and a CPU reference with the same arithmetic (f32 accumulation, the same
//! dropout bits from [`super::rng`]). The CPU references are slow and serial on purpose: they
//! exist so that `cargo test`, with no GPU, checks the maths of the path a GPU runs (see
//! [`super::kernels::use_fused_cpu_kernels`]). Inputs must be contiguous; outputs are in the
//! input's dtype (f32, bf16 or f16), except the optimizer's, which is f32 throughout.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::rng::kept;

/// The contiguous elements of `s` as f32.
pub(super) fn f32s(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("device op: input must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("device op: f32, bf16 or f16 input expected, got {:?}", s.dtype()),
    })
}

/// `v` in the dtype of `like`.
pub(super) fn storage_like(v: Vec<f32>, like: &CpuStorage) -> CpuStorage {
    match like {
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        CpuStorage::F16(_) => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// Inverted dropout: element `i` is kept when `rng::kept(seed, i, keep_below)` and then scaled
/// by `scale`. Its backward pass is the same op on the gradient.
#[derive(Clone, Copy)]
pub struct Dropout {
    pub keep_below: u32,
    pub scale: f32,
    pub seed: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "device-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut x = f32s(s, l)?;
        for (i, v) in x.iter_mut().enumerate() {
            *v = if kept(self.seed, i as u64, self.keep_below) { *v * self.scale } else { 0.0 };
        }
        Ok((storage_like(x, s), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::dropout(s, l, self.keep_below, self.scale, self.seed)?, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

use super::fastmath::row_stats as layer_norm_row;

/// LayerNorm over the last dimension of `x` with weight `w` and bias `b` (`[hidden]`).
#[derive(Clone, Copy)]
pub struct LayerNorm {
    pub eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "device-layer-norm"
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
        let mut y = vec![0f32; x.len()];
        for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
            let (mean, rstd) = layer_norm_row(x, self.eps);
            for i in 0..h {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok((storage_like(y, s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h;
        let grad = grad.contiguous()?;
        // One kernel gives dx and g·x̂ per element; dw and db are sums over the rows.
        let both = x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &grad, &LayerNormGrad { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, rows)?.sum(0)?;
        let db = grad.reshape((rows, h))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm's backward pass: from `x`, `w` and the output's gradient `g`, a `[2·rows, hidden]`
/// tensor whose first `rows` rows are the input's gradient and the next `rows` hold `g·x̂`.
pub struct LayerNormGrad {
    pub eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "device-layer-norm-grad"
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
        let (x, w, g) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; 2 * x.len()];
        let (dx, gx) = out.split_at_mut(x.len());
        for r in 0..rows {
            let (x, g) = (&x[r * h..][..h], &g[r * h..][..h]);
            let (mean, rstd) = layer_norm_row(x, self.eps);
            let (mut sum_gw, mut sum_gwx) = (0f32, 0f32);
            for i in 0..h {
                let xhat = (x[i] - mean) * rstd;
                sum_gw += g[i] * w[i];
                sum_gwx += g[i] * w[i] * xhat;
                gx[r * h + i] = g[i] * xhat;
            }
            let (m1, m2) = (sum_gw / h as f32, sum_gwx / h as f32);
            for i in 0..h {
                let xhat = (x[i] - mean) * rstd;
                dx[r * h + i] = rstd * (g[i] * w[i] - m1 - xhat * m2);
            }
        }
        Ok((storage_like(out, s1), Shape::from((2 * rows, h))))
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let h = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / h;
        Ok((super::cuda::layer_norm_bwd(s1, l1, s2, l2, s3, l3, self.eps)?, Shape::from((2 * rows, h))))
    }
}

const SQRT_2_INV: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

pub(super) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * SQRT_2_INV))
}

pub(super) fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * SQRT_2_INV)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

/// Exact (erf) GELU of `x + bias`, `bias` broadcast over the last dimension; with no bias
/// (a unary op) plain GELU.
pub struct BiasGelu;

impl BiasGelu {
    fn cpu(x: Vec<f32>, b: Option<Vec<f32>>) -> Vec<f32> {
        let n = b.as_ref().map_or(1, |b| b.len());
        x.iter().enumerate().map(|(i, &v)| gelu(v + b.as_ref().map_or(0.0, |b| b[i % n]))).collect()
    }
}

impl CustomOp1 for BiasGelu {
    fn name(&self) -> &'static str {
        "device-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((storage_like(Self::cpu(f32s(s, l)?, None), s), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::bias_gelu_fwd(s, l, None)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &BiasGeluGrad { bias: None })?))
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "device-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((storage_like(Self::cpu(f32s(s1, l1)?, Some(f32s(s2, l2)?)), s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::bias_gelu_fwd(s1, l1, Some((s2, l2)))?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let op = BiasGeluGrad { bias: Some(b.contiguous()?) };
        let dx = x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?;
        let db = dx.reshape((dx.elem_count() / n, n))?.sum(0)?;
        Ok((Some(dx), Some(db)))
    }
}

/// The gradient of [`BiasGelu`] with respect to its input (the same as to the bias, per
/// element): `g · gelu'(x + bias)`.
pub struct BiasGeluGrad {
    pub bias: Option<Tensor>,
}

impl CustomOp2 for BiasGeluGrad {
    fn name(&self) -> &'static str {
        "device-bias-gelu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let b = match &self.bias {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0],
        };
        let n = b.len();
        let out = x.iter().zip(&g).enumerate().map(|(i, (&x, &g))| g * gelu_grad(x + b[i % n])).collect();
        Ok((storage_like(out, s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = match &self.bias {
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let candle_core::Storage::Cuda(bs) = &*bs else { candle_core::bail!("bias-gelu grad: bias not on the GPU") };
                super::cuda::bias_gelu_bwd(s1, l1, Some((bs, bl)), s2, l2)?
            }
            None => super::cuda::bias_gelu_bwd(s1, l1, None, s2, l2)?,
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Attention probabilities from raw scores `[batch, heads, seq, seq]` and a key bias
/// `[batch, seq]` (f32: 0 on tokens, a large negative on padding):
/// `softmax_j(scale·s_ij + bias_j)`, then, when `dropout`, inverted dropout with the bits of
/// element `((b·heads + h)·seq + i)·seq + j`, as the fused CPU attention draws them. With
/// `window`, query `i` sees only keys `j` with `|i − j| ≤ window` (the others get 0).
#[derive(Clone, Copy)]
pub struct MaskedSoftmax {
    pub scale: f32,
    pub dropout: Option<Dropout>,
    pub window: Option<usize>,
}

impl MaskedSoftmax {
    fn probs(&self, s: &[f32], bias: &[f32], seq: usize, heads: usize) -> Vec<f32> {
        let mut out = vec![0f32; s.len()];
        for (r, (o, row)) in out.chunks_mut(seq).zip(s.chunks(seq)).enumerate() {
            let b = r / (heads * seq);
            let bias = &bias[b * seq..][..seq];
            let i = r % seq;
            let seen = |j: usize| self.window.is_none_or(|w| i.abs_diff(j) <= w);
            let mut max = f32::NEG_INFINITY;
            for j in (0..seq).filter(|&j| seen(j)) {
                o[j] = row[j] * self.scale + bias[j];
                max = max.max(o[j]);
            }
            let mut sum = 0f32;
            for (_, v) in o.iter_mut().enumerate().filter(|&(j, _)| seen(j)) {
                *v = (*v - max).exp();
                sum += *v;
            }
            for (j, v) in o.iter_mut().enumerate() {
                *v /= sum;
                if let Some(d) = &self.dropout {
                    *v = if kept(d.seed, (r * seq + j) as u64, d.keep_below) { *v * d.scale } else { 0.0 };
                }
            }
        }
        out
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "device-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, heads, seq, _) = l1.shape().dims4()?;
        let (s, bias) = (f32s(s1, l1)?, f32s(s2, l2)?);
        Ok((storage_like(self.probs(&s, &bias, seq, heads), s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dropout.map(|d| (d.keep_below, d.scale, d.seed));
        Ok((super::cuda::masked_softmax_fwd(s1, l1, s2, l2, self.scale, d, self.window)?, l1.shape().clone()))
    }

    fn bwd(&self, scores: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The probabilities before dropout, recomputed rather than kept through the step.
        let probs = scores.apply_op2_no_bwd(bias, &MaskedSoftmax { dropout: None, ..*self })?;
        let ds = probs.apply_op2_no_bwd(&grad.contiguous()?, &MaskedSoftmaxGrad { scale: self.scale, dropout: self.dropout })?;
        Ok((Some(ds), None))
    }
}

/// [`MaskedSoftmax`]'s backward pass: from the probabilities `p` (before dropout) and the
/// output's gradient `g`, the scores' gradient `scale · p ⊙ (g' − Σ_k p_k g'_k)` with
/// `g' = g ⊙ mask · 1/(1-p)`.
pub struct MaskedSoftmaxGrad {
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

impl CustomOp2 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "device-masked-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let seq = l1.shape().dims().last().copied().unwrap_or(1);
        let (p, mut g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        if let Some(d) = &self.dropout {
            for (i, v) in g.iter_mut().enumerate() {
                *v = if kept(d.seed, i as u64, d.keep_below) { *v * d.scale } else { 0.0 };
            }
        }
        let mut out = vec![0f32; p.len()];
        for ((o, p), g) in out.chunks_mut(seq).zip(p.chunks(seq)).zip(g.chunks(seq)) {
            let dot: f32 = p.iter().zip(g).map(|(a, b)| a * b).sum();
            for j in 0..seq {
                o[j] = self.scale * p[j] * (g[j] - dot);
            }
        }
        Ok((storage_like(out, s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.dropout.map(|d| (d.keep_below, d.scale, d.seed));
        Ok((super::cuda::masked_softmax_bwd(s1, l1, s2, l2, self.scale, d)?, l1.shape().clone()))
    }
}
