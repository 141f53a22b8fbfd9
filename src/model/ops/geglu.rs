//! GeGLU, the gated feed-forward of ModernBERT: the first half of the up-projection's outputs
//! through exact GELU, times the second half (`input, gate = Wi(x).chunk(2)`; `gelu(input) · gate`),
//! with its backward pass: `d input = g · gate · gelu'(input)`, `d gate = g · gelu(input)`.
//!
//! On the CPU in f32 one fused op reads the up-projection once and writes the half-width result;
//! elsewhere (a GPU) the device-generic op of `device_positional` does, one kernel each way.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `gelu(x[.., :n]) · x[.., n:]` for `x` of last dimension `2n`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if !x.dim(D::Minus1)?.is_multiple_of(2) {
        candle_core::bail!("geglu: an even last dimension is needed, got {:?}", x.dims());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && super::kernels::use_fused_cpu_kernels() {
        return x.contiguous()?.apply_op1(Geglu);
    }
    x.contiguous()?.apply_op1(super::device_positional::DeviceGeglu)
}

/// [`geglu`] from candle ops, on any device and dtype: the reference the fused and device ops are
/// tested against.
pub fn geglu_composed(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? / 2;
    x.narrow(D::Minus1, 0, n)?.gelu_erf()?.mul(&x.narrow(D::Minus1, n, n)?)
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("geglu needs contiguous f32 input"),
    }
}

/// Rows of at least this many elements go to the pool one by one; shorter ones in runs.
const ROWS_PER_TASK: usize = 16;

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let two_n = l.shape().dims().last().copied().unwrap_or(0);
        let n = two_n / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(n * ROWS_PER_TASK).zip(x.par_chunks(two_n * ROWS_PER_TASK)).for_each(|(o, xr)| {
            for (o, xr) in o.chunks_exact_mut(n).zip(xr.chunks_exact(two_n)) {
                o.copy_from_slice(&xr[..n]);
                super::fastmath::gelu_in_place(o);
                o.iter_mut().zip(&xr[n..]).for_each(|(v, &g)| *v *= g);
            }
        });
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)?))
    }
}

/// The gradient of [`Geglu`] with respect to its input, from the input and the gradient of
/// the output.
struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let two_n = l1.shape().dims().last().copied().unwrap_or(0);
        let n = two_n / 2;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(two_n * ROWS_PER_TASK).zip(x.par_chunks(two_n * ROWS_PER_TASK)).zip(g.par_chunks(n * ROWS_PER_TASK)).for_each(
            |((d, xr), gr)| {
                for ((d, xr), gr) in d.chunks_exact_mut(two_n).zip(xr.chunks_exact(two_n)).zip(gr.chunks_exact(n)) {
                    let (d_in, d_gate) = d.split_at_mut(n);
                    let (input, gate) = xr.split_at(n);
                    // d_gate = g · gelu(input); d_in = g · gate · gelu'(input).
                    d_gate.copy_from_slice(input);
                    super::fastmath::gelu_with_grad(d_gate, d_in);
                    for k in 0..n {
                        d_in[k] *= gr[k] * gate[k];
                        d_gate[k] *= gr[k];
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
