//! A frozen feed-forward block on CPU f32 as one op: `y = gelu(x·W1ᵀ + b1)·W2ᵀ + b2`, with
//! both dense layers frozen (LoRA on the attention projections, the default).
//!
//! As three ops (dense, GELU, dense) the block leaves two `[rows, intermediate]` tensors in the
//! graph, and candle's backward pass zero-fills a gradient for each, adds into it, and GELU's
//! backward recomputes `erf` and `exp` over all of them. Here the forward pass works out GELU's
//! derivative beside GELU itself (they share one `exp`) and keeps only that; the backward
//! pass is two products and one multiply in place. Neither weight gets a gradient.

use super::buffers::{f32s, repeat_rows, rows_of, uninit, with_f32, with_f32s, with_last};
use super::fastmath::gelu_with_grad;
use super::kernels::CHUNK;
use super::linear::{check_weight, gemm, input_grad_new};
use super::simd::simd_kernel;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

simd_kernel! {
    fn mul_in_place(y: &mut [f32], d: &[f32]) {
        for (v, &d) in y.iter_mut().zip(d) {
            *v *= d;
        }
    }
}

/// The op over `x`; the frozen layers ride along.
struct FrozenFfn {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    /// GELU's derivative at each pre-activation, from the forward pass.
    slope: OnceLock<Vec<f32>>,
}

impl CustomOp1 for FrozenFfn {
    fn name(&self) -> &'static str {
        "frozen-ffn"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let (m, k) = rows_of(l.shape())?;
        let (inner, n) = (self.w1.dim(0)?, self.w2.dim(0)?);
        let (h, slope) = with_f32s([&self.w1, &self.b1], |[w1, b1]| {
            check_weight(w1, k, inner)?;
            let mut h = repeat_rows(m, b1);
            gemm(m, inner, k, &mut h, true, (x, 1, k as isize), (w1, k as isize, 1));
            // SAFETY: `gelu_with_grad` writes every element of each chunk.
            let mut slope = unsafe { uninit(h.len()) };
            h.par_chunks_mut(CHUNK).zip(slope.par_chunks_mut(CHUNK)).for_each(|(h, d)| gelu_with_grad(h, d));
            Ok::<_, candle_core::Error>((h, slope))
        })??;
        let y = with_f32s([&self.w2, &self.b2], |[w2, b2]| {
            check_weight(w2, inner, n)?;
            let mut y = repeat_rows(m, b2);
            gemm(m, n, inner, &mut y, true, (&h, 1, inner as isize), (w2, inner as isize, 1));
            Ok::<_, candle_core::Error>(y)
        })??;
        // A second forward pass of the same op (none in training) keeps the first slope.
        let _ = self.slope.set(slope);
        Ok((CpuStorage::F32(y), with_last(l.shape(), n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let Some(slope) = self.slope.get() else { candle_core::bail!("frozen FFN: backward before forward") };
        let m = rows_of(x.shape())?.0;
        let (inner, k, n) = (self.w1.dim(0)?, self.w1.dim(1)?, self.w2.dim(0)?);
        let dx = with_f32s([grad, &self.w2], |[g, w2]| {
            // dh = g·W2 (m×inner), then through GELU.
            let mut dh = input_grad_new(m, inner, n, g, w2);
            dh.par_chunks_mut(CHUNK).zip(slope.par_chunks(CHUNK)).for_each(|(dh, d)| mul_in_place(dh, d));
            with_f32(&self.w1, |w1| input_grad_new(m, k, inner, &dh, w1))
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `gelu(x·W1ᵀ + b1)·W2ᵀ + b2` over the last dimension of `x` on CPU f32 (exact GELU), for two
/// frozen dense layers: differentiable in `x` only.
pub fn frozen_ffn(x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, b2: &Tensor) -> Result<Tensor> {
    let op = FrozenFfn { w1: w1.contiguous()?, b1: b1.contiguous()?, w2: w2.contiguous()?, b2: b2.contiguous()?, slope: OnceLock::new() };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused block against dense, GELU, dense from our other ops: values and `x`'s gradient.
    #[test]
    fn frozen_ffn_matches_the_three_ops_in_values_and_input_gradient() {
        let dev = Device::Cpu;
        let rand = |shape: &[usize], seed: u64, scale: f32| -> Tensor {
            let len: usize = shape.iter().product();
            let v: Vec<f32> =
                (0..len).map(|i| ((super::super::rng::bits(seed, i as u64) as f32 / u32::MAX as f32) - 0.5) * scale).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (k, inner, n) = (24, 70, 24);
        let (w1, b1, w2, b2) = (rand(&[inner, k], 1, 1.0), rand(&[inner], 2, 1.0), rand(&[n, inner], 3, 0.5), rand(&[n], 4, 1.0));
        let x = Var::from_tensor(&rand(&[3, 5, k], 5, 2.0)).unwrap();
        let fused = frozen_ffn(&x, &w1, &b1, &w2, &b2).unwrap();
        let h = super::super::kernels::gelu_erf(&super::super::linear::linear(&x, &w1, &b1).unwrap()).unwrap();
        let composed = super::super::linear::linear(&h, &w2, &b2).unwrap();
        assert_eq!(fused.dims(), &[3, 5, n]);
        let diff = |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&fused, &composed) < 1e-4, "values differ by {}", diff(&fused, &composed));
        let weights = rand(&[3, 5, n], 6, 1.0);
        let gf = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(diff(a, c) < 1e-4, "input gradients differ by {}", diff(a, c));
        assert!(gf.get(&w1).is_none() && gf.get(&w2).is_none(), "the frozen weights get no gradient");
    }
}
