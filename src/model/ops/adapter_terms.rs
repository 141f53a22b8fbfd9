//! Inference on CPU f32: every group's low-rank term added to a base layer's output in one
//! pass, the groups in parallel.
//!
//! With candle ops each group costs a narrow, two small matmuls, a scale, an add and a final
//! concatenation, per adapted layer: a batch of 32 texts for 32 adapters ran thousands of
//! small ops, and their overhead, not the arithmetic, set the speed. Here each group is two
//! small gemm calls writing straight into its own rows of the output.

use super::buffers::{with_f32, with_f32s};
use super::linear::{gemm_new, gemm_scaled};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::fmt::Debug;
use std::ops::Range;

/// One group's low-rank pair for the layer at hand, `(A [r, in], B [out, r], scale)`.
pub type Pair<'a> = (&'a Tensor, &'a Tensor, f64);

/// Whether [`add_terms`] takes `x`, `y` and the groups' pairs: all f32 on the CPU, with the
/// fused kernels on.
pub fn applies(groups: &[(Range<usize>, Option<Pair>)], x: &Tensor, y: &Tensor) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let pairs = groups.iter().filter_map(|(_, p)| p.map(|(a, b, _)| (a, b)));
    super::kernels::use_fused_cpu_kernels() && cpu_f32(x) && cpu_f32(y) && pairs.into_iter().all(|(a, b)| cpu_f32(a) && cpu_f32(b))
}

/// `y` plus, for each group of batch rows, `scale · (x·Aᵀ)·Bᵀ` of its pair; rows with no pair
/// (no adapter, or one that leaves this layer alone) keep `y`. `x` is `[batch, .., in]` and `y`
/// `[batch, .., out]`; no dropout (inference). `target` of `layer` names the pairs in an error.
pub fn add_terms(
    groups: &[(Range<usize>, Option<Pair>)],
    x: &Tensor,
    y: &Tensor,
    layer: usize,
    target: impl Debug + Sync,
) -> Result<Tensor> {
    let batch = x.dim(0)?;
    let (k, n) = (x.dim(candle_core::D::Minus1)?, y.dim(candle_core::D::Minus1)?);
    let per_row = |t: &Tensor| t.elem_count().checked_div(batch).unwrap_or(0);
    let (x_row, y_row) = (per_row(x), per_row(y));
    let tokens = x_row / k.max(1);
    let mut out = y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Each group's rows of `out`, with the group's pair where it has one.
    let mut work = Vec::with_capacity(groups.len());
    let mut rest = out.as_mut_slice();
    for (rows, pair) in groups {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows.len() * y_row);
        rest = tail;
        if let Some((a, b, scale)) = pair {
            work.push((rows.clone(), mine, ((*a, *b), *scale)));
        }
    }
    with_f32(&x.contiguous()?, |xv| {
        work.into_par_iter().try_for_each(|(rows, dst, ((a, b), scale))| {
            let r = a.dim(0)?;
            if a.dims() != [r, k] || b.dims() != [n, r] {
                candle_core::bail!(
                    "adapter pair for {target:?} of layer {layer}: A {:?} and B {:?} do not fit {k} inputs and {n} outputs",
                    a.dims(),
                    b.dims()
                );
            }
            let m = rows.len() * tokens;
            let xg = &xv[rows.start * x_row..rows.end * x_row];
            with_f32s([a, b], |[av, bv]| {
                // low = x·Aᵀ (m×r), then dst += scale·low·Bᵀ.
                let low = gemm_new(m, r, k, (xg, 1, k as isize), (av, k as isize, 1));
                gemm_scaled(m, n, r, dst, true, (&low, 1, r as isize), (bv, r as isize, 1), scale as f32);
            })
        })
    })??;
    Tensor::from_vec(out, y.shape(), y.device())
}
