//! A LoRA-adapted dense layer on CPU f32 as one op: `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`, with
//! the base `W` and `b` frozen.
//!
//! Composed from candle ops, the adapter's term costs a dropout pass, two matmuls on transposed
//! views, a scale and an add over the whole output, each with its own backward pass, and in the
//! backward pass a second gradient into `x` that candle sums on one thread. Here the term is a
//! few small gemm calls beside the base layer's, the backward pass gives `x`'s gradient from both
//! paths at once, and the frozen weight gets no gradient. The dropout mask is drawn once from its
//! seed (see `model::ops::rng`), as the dropout kernel draws it, and kept with the dropped input for
//! the backward pass: the op and the composed path give the same values.

use super::buffers::{f32s, repeat_rows, rows_of, uninit, with_f32, with_f32s, with_last};
use super::kernels::CHUNK;
use super::linear::{check_weight, gemm, gemm_new, gemm_scaled, input_grad_new};
use super::simd::simd_kernel;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The adapter's input after dropout, and which elements were kept, drawn once in the forward
/// pass and kept for the backward pass.
struct Dropped {
    x: Vec<f32>,
    kept: Vec<u8>,
    factor: f32,
}

/// The op over `(x, A, B)`; the frozen base layer rides along.
struct LoraLinear {
    weight: Tensor,
    bias: Tensor,
    scale: f32,
    dropped: Option<Dropped>,
}

simd_kernel! {
    /// `y = x · factor` where element `base + i` is kept under `keep_below`, else 0; `kept`
    /// records which (the same mask as `kernels::dropout` draws from `seed`).
    fn drop_chunk(x: &[f32], y: &mut [f32], kept: &mut [u8], seed: u64, base: u64, keep_below: u32, factor: f32) {
        for (i, ((y, kept), &x)) in y.iter_mut().zip(kept.iter_mut()).zip(x).enumerate() {
            let keep = super::rng::kept(seed, base + i as u64, keep_below);
            *kept = keep as u8;
            *y = if keep { x * factor } else { 0.0 };
        }
    }
}

simd_kernel! {
    /// `d += t · factor` where kept.
    fn add_kept(d: &mut [f32], t: &[f32], kept: &[u8], factor: f32) {
        for ((d, &t), &k) in d.iter_mut().zip(t).zip(kept) {
            *d += if k != 0 { t * factor } else { 0.0 };
        }
    }
}

impl Dropped {
    fn draw(x: &[f32], p: f64, seed: u64) -> Self {
        let (keep_below, factor) = super::rng::keep_rule(p);
        // SAFETY: `drop_chunk` writes every element of `y` (the chunks cover it).
        let (mut y, mut kept) = (unsafe { uninit(x.len()) }, vec![0u8; x.len()]);
        y.par_chunks_mut(CHUNK)
            .zip(kept.par_chunks_mut(CHUNK))
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, ((y, kept), x))| drop_chunk(x, y, kept, seed, (c * CHUNK) as u64, keep_below, factor));
        Self { x: y, kept, factor }
    }
}

/// Rows, inputs, rank and outputs of `x [.., k]` (as `m` rows), `A [r, k]`, `B [n, r]`, checked
/// against each other.
fn dims(x: &Layout, a: &Layout, b: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (m, k) = rows_of(x.shape())?;
    let (r, ka) = a.shape().dims2()?;
    let (n, rb) = b.shape().dims2()?;
    if ka != k || rb != r {
        candle_core::bail!("LoRA layer: input width {k}, A is {r}×{ka}, B is {n}×{rb}");
    }
    Ok((m, k, r, n))
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let (x, a, bm) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let (m, k, r, n) = dims(l1, l2, l3)?;
        let xd = self.dropped.as_ref().map_or(x, |d| &d.x);
        let mut y = with_f32(&self.bias, |b| repeat_rows(m, b))?;
        // The adapter's small product runs on one thread (see `linear::gemm_scaled`), beside the
        // base layer's product on the others rather than after it.
        // low = drop(x)·Aᵀ, m×r; Aᵀ as a k×r matrix: element (kk, j) is a[j·k + kk].
        let (low, base) = rayon::join(
            || gemm_new(m, r, k, (xd, 1, k as isize), (a, k as isize, 1)),
            || {
                with_f32(&self.weight, |w| {
                    check_weight(w, k, n)?;
                    gemm(m, n, k, &mut y, true, (x, 1, k as isize), (w, k as isize, 1));
                    Ok::<_, candle_core::Error>(())
                })
            },
        );
        base??;
        // y += s·low·Bᵀ; Bᵀ as an r×n matrix: element (j, o) is bm[o·r + j].
        gemm_scaled(m, n, r, &mut y, true, (&low, 1, r as isize), (bm, r as isize, 1), self.scale);
        Ok((CpuStorage::F32(y), with_last(l1.shape(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_of(x.shape())?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale;
        let (mut da, mut db) = (vec![0f32; r * k], vec![0f32; n * r]);
        let dx = with_f32s([grad, x, a, b, &self.weight], |[g, xv, av, bv, w]| {
            let xd = self.dropped.as_ref().map_or(xv, |d| &d.x);
            // The first layer's input comes from the frozen embeddings: no gradient is wanted there.
            let want_dx = x.track_op();
            // The adapter's small products, one after another on one thread, run beside the base
            // layer's input gradient on the other threads.
            let adapter = || {
                let low = gemm_new(m, r, k, (xd, 1, k as isize), (av, k as isize, 1));
                // gl = s·g·B (m×r), the gradient of low.
                let mut gl = vec![0f32; m * r];
                gemm_scaled(m, r, n, &mut gl, false, (g, 1, n as isize), (bv, 1, r as isize), s);
                // dB = s·gᵀ·low (n×r); gᵀ as n×m: element (o, i) is g[i·n + o].
                gemm_scaled(n, r, m, &mut db, false, (g, n as isize, 1), (&low, 1, r as isize), s);
                // dA = glᵀ·drop(x) (r×k).
                gemm(r, k, m, &mut da, false, (&gl, r as isize, 1), (xd, 1, k as isize));
                // drop(x)'s gradient gl·A, to go through the mask into x's.
                let t = (want_dx && self.dropped.is_some()).then(|| gemm_new(m, k, r, (&gl, 1, r as isize), (av, 1, k as isize)));
                (gl, t)
            };
            let ((gl, t), dx) = rayon::join(adapter, || want_dx.then(|| input_grad_new(m, k, n, g, w)));
            // dx = g·W + drop'(gl·A): the base path and the adapter's path.
            let mut dx = dx?;
            match (&self.dropped, t) {
                (Some(d), Some(t)) => {
                    dx.par_chunks_mut(CHUNK)
                        .zip(t.par_chunks(CHUNK))
                        .zip(d.kept.par_chunks(CHUNK))
                        .for_each(|((dx, t), kept)| add_kept(dx, t, kept, d.factor));
                }
                _ => gemm(m, k, r, &mut dx, true, (&gl, 1, r as isize), (av, 1, k as isize)),
            }
            Some(dx)
        })?;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?,
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// `x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ` over the last dimension of `x` `[.., in]` on CPU f32, `W` `[out, in]`,
/// `A` `[r, in]`, `B` `[out, r]`. Differentiable in `x`, `A` and `B`; `W` and `b` are the frozen
/// base (no gradient). `dropout` is `(p, seed)` in training, the mask drawn as
/// `kernels::dropout` draws it.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(x: &Tensor, w: &Tensor, b: &Tensor, a: &Tensor, bm: &Tensor, scale: f64, dropout: Option<(f64, u64)>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let dropped = match dropout.filter(|&(p, _)| p > 0.0) {
        Some((p, seed)) => Some(with_f32(&x, |xv| Dropped::draw(xv, p, seed))?),
        None => None,
    };
    let op = LoraLinear { weight: w.contiguous()?, bias: b.contiguous()?, scale: scale as f32, dropped };
    x.apply_op3(&a.contiguous()?, &bm.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op against the same maths from candle ops: values, and the gradients of `x`,
    /// `A` and `B`, with and without dropout (4×5×300 inputs, read as 20 rows, span more than
    /// one dropout chunk).
    #[test]
    fn fused_lora_layer_matches_composed_ops_in_values_and_gradients() {
        let dev = Device::Cpu;
        let (m, k, r, n) = (20, 300, 4, 24);
        let rand = |shape: &[usize], seed: u64| -> Tensor {
            let len: usize = shape.iter().product();
            let v: Vec<f32> = (0..len).map(|i| (super::super::rng::bits(seed, i as u64) as f32 / u32::MAX as f32) - 0.5).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (w, b) = (rand(&[n, k], 1), rand(&[n], 2));
        for dropout in [None, Some((0.3, 99))] {
            let x = Var::from_tensor(&rand(&[4, m / 4, k], 3)).unwrap();
            let a = Var::from_tensor(&rand(&[r, k], 4)).unwrap();
            let bm = Var::from_tensor(&rand(&[n, r], 5)).unwrap();
            let fused = lora_linear(&x, &w, &b, &a, &bm, 2.0, dropout).unwrap();
            let xd = match dropout {
                Some((p, seed)) => super::super::kernels::dropout(&x, p, seed).unwrap(),
                None => x.as_tensor().clone(),
            };
            let base = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let term = (xd.broadcast_matmul(&a.t().unwrap()).unwrap().broadcast_matmul(&bm.t().unwrap()).unwrap() * 2.0).unwrap();
            let composed = (base + term).unwrap();
            assert_eq!(fused.dims(), &[4, m / 4, n]);
            let weights = rand(&[4, m / 4, n], 6);
            let fused_grads = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let composed_grads = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let diff = |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff(&fused, &composed) < 1e-4, "values, dropout {dropout:?}: {}", diff(&fused, &composed));
            for (name, t) in [("x", x.as_tensor()), ("A", a.as_tensor()), ("B", bm.as_tensor())] {
                let (f, c) = (fused_grads.get(t).unwrap(), composed_grads.get(t).unwrap());
                assert!(diff(f, c) < 1e-4, "gradient of {name}, dropout {dropout:?}: {}", diff(f, c));
            }
            assert!(fused_grads.get(&w).is_none(), "the frozen weight gets no gradient");
        }
    }
}
