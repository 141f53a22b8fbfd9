//! The device-generic optimizer ops: AdamW's two in-place updates per parameter, one kernel each
//! on a GPU (`kernels/finetuned.cu`), with serial CPU twins of the same arithmetic, as the ops of
//! [`super::device_ops`].

use super::device_ops::f32s;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result};

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("optimizer op: contiguous f32 expected"),
    }
}

/// AdamW's moment update, in place on `[2, n]` f32 moments (m then v), from the gradient
/// times `grad_scale`: `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`.
pub struct AdamWMoments {
    pub grad_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
}

impl InplaceOp2 for AdamWMoments {
    fn name(&self) -> &'static str {
        "device-adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = f32s(s2, l2)?;
        let mv = f32_mut(s1, l1)?;
        let (m, v) = mv.split_at_mut(g.len());
        for i in 0..g.len() {
            let g = g[i] * self.grad_scale;
            m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g;
            v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g * g;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<()> {
        super::cuda::adamw_moments(s1, l1, s2, l2, self.grad_scale, self.beta1, self.beta2)
    }
}

/// AdamW's parameter update, in place on an f32 parameter, from its `[2, n]` moments:
/// `p = p·(1 − lr·decay) − lr/bc1 · m / (sqrt(v/bc2) + eps)`.
pub struct AdamWApply {
    pub lr: f32,
    pub decay: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
}

impl InplaceOp2 for AdamWApply {
    fn name(&self) -> &'static str {
        "device-adamw-apply"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let mv = f32s(s2, l2)?;
        let p = f32_mut(s1, l1)?;
        let (m, v) = mv.split_at(p.len());
        let shrink = 1.0 - self.lr * self.decay;
        let step = self.lr / self.bc1;
        for i in 0..p.len() {
            p[i] = p[i] * shrink - step * m[i] / ((v[i] / self.bc2).sqrt() + self.eps);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<()> {
        super::cuda::adamw_apply(s1, l1, s2, l2, self.lr, self.decay, self.bc1, self.bc2, self.eps)
    }
}
