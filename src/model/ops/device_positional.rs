//! The device-generic ops of ModernBERT and DeBERTa (what a GPU runs), one kernel each, forward
//! and backward: rotary embedding, GeGLU, and the relative-position lookups of disentangled
//! attention. As in [`super::device_ops`], each has a CUDA kernel (`kernels/finetuned.cu`, launched
//! from `model::ops::cuda_positional`) and a serial CPU reference with the same arithmetic, which
//! `cargo test` runs with the fused CPU kernels off. The sliding window is
//! [`super::device_ops::MaskedSoftmax`]'s `window`.

use super::device_ops::{f32s, gelu, gelu_grad, storage_like};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Rotary embedding of `[batch, seq, hidden]` projections (heads side by side) by a table
/// `[seq, 2·head_dim]` (f32: each position's cosines, then its sines, repeated over the two
/// halves of a head): `x·cos − x_other·sin` in a head's first half, `x·cos + x_other·sin` in its
/// second, `x_other` being the element half a head away; `inverse` flips the sines' sign, the
/// transposed rotation that is the backward pass.
#[derive(Clone, Copy)]
pub struct DeviceRotary {
    pub head_dim: usize,
    pub inverse: bool,
}

impl DeviceRotary {
    fn cpu(&self, x: &[f32], table: &[f32], seq: usize, hidden: usize) -> Vec<f32> {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        (0..x.len())
            .map(|i| {
                let (row, c) = (i / hidden, i % hidden);
                let (p, d) = (row % seq, c % hd);
                let (cos, sin) = (table[p * 2 * hd + d], table[p * 2 * hd + hd + d]);
                if d < half {
                    x[i] * cos - sign * x[i + half] * sin
                } else {
                    x[i] * cos + sign * x[i - half] * sin
                }
            })
            .collect()
    }
}

impl CustomOp2 for DeviceRotary {
    fn name(&self) -> &'static str {
        "device-rotary"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, seq, hidden) = l1.shape().dims3()?;
        check_rotary(self.head_dim, seq, hidden, l2)?;
        Ok((storage_like(self.cpu(&f32s(s1, l1)?, &f32s(s2, l2)?, seq, hidden), s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, seq, hidden) = l1.shape().dims3()?;
        check_rotary(self.head_dim, seq, hidden, l2)?;
        Ok((super::cuda_positional::rotary(s1, l1, s2, l2, self.head_dim, self.inverse)?, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = DeviceRotary { inverse: !self.inverse, ..*self };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(table, &op)?), None))
    }
}

fn check_rotary(hd: usize, seq: usize, hidden: usize, table: &Layout) -> Result<()> {
    if hd == 0 || !hd.is_multiple_of(2) || !hidden.is_multiple_of(hd) || table.shape().dims() != [seq, 2 * hd] {
        candle_core::bail!("device rotary: head_dim {hd}, hidden {hidden}, a table of {:?} for {seq} positions", table.shape());
    }
    Ok(())
}

/// GeGLU of `x` (last dimension `2n`): `gelu(x[.., :n]) · x[.., n:]`, exact (erf) GELU.
pub struct DeviceGeglu;

impl CustomOp1 for DeviceGeglu {
    fn name(&self) -> &'static str {
        "device-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = half_width(l)?;
        let x = f32s(s, l)?;
        let out = x.chunks_exact(2 * n).flat_map(|r| (0..n).map(move |c| gelu(r[c]) * r[n + c])).collect();
        Ok((storage_like(out, s), super::buffers::with_last(l.shape(), n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = half_width(l)?;
        Ok((super::cuda_positional::geglu_fwd(s, l, n)?, super::buffers::with_last(l.shape(), n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &DeviceGegluGrad)?))
    }
}

fn half_width(l: &Layout) -> Result<usize> {
    match l.shape().dims().last() {
        Some(&w) if w > 0 && w.is_multiple_of(2) => Ok(w / 2),
        _ => candle_core::bail!("device geglu: an even last dimension is needed, got {:?}", l.shape()),
    }
}

/// [`DeviceGeglu`]'s backward pass: from `x` (`[.., 2n]`) and the output's gradient `g`
/// (`[.., n]`), `dx = [g · gate · gelu'(input), g · gelu(input)]`.
pub struct DeviceGegluGrad;

impl CustomOp2 for DeviceGegluGrad {
    fn name(&self) -> &'static str {
        "device-geglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = half_width(l1)?;
        let (x, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        if g.len() * 2 != x.len() {
            candle_core::bail!("device geglu grad: input {:?}, gradient {:?}", l1.shape(), l2.shape());
        }
        let mut dx = vec![0f32; x.len()];
        for ((d, r), gr) in dx.chunks_exact_mut(2 * n).zip(x.chunks_exact(2 * n)).zip(g.chunks_exact(n)) {
            for c in 0..n {
                d[c] = gr[c] * r[n + c] * gelu_grad(r[c]);
                d[n + c] = gr[c] * gelu(r[c]);
            }
        }
        Ok((storage_like(dx, s1), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = half_width(l1)?;
        Ok((super::cuda_positional::geglu_bwd(s1, l1, s2, l2, n)?, l1.shape().clone()))
    }
}

/// A relative-position term of disentangled attention: from the products of each token with
/// every position row, `c` (`[batch, heads, seq, rows]`), the `[batch, heads, seq, seq]` scores
/// `out[i][j] = c[i][index[i·seq + j]]`, or with `transpose` (position-to-content)
/// `out[i][j] = c[j][index[j·seq + i]]`. `index` is u32 `[seq·seq]` on the op's device.
pub struct RelGather {
    pub index: Tensor,
    pub transpose: bool,
}

impl RelGather {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (b, h, s, r) = l.shape().dims4()?;
        if self.index.elem_count() != s * s {
            candle_core::bail!("relative gather: an index of {} for {s} tokens", self.index.elem_count());
        }
        Ok((b * h, s, r))
    }

    fn cpu_index(&self) -> Result<Vec<u32>> {
        self.index.flatten_all()?.to_vec1::<u32>()
    }
}

impl CustomOp1 for RelGather {
    fn name(&self) -> &'static str {
        "device-relative-gather"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bh, s, r) = self.dims(l)?;
        let (c, idx) = (f32s(st, l)?, self.cpu_index()?);
        if idx.iter().any(|&x| x as usize >= r) {
            candle_core::bail!("relative gather: an index past the {r} position rows");
        }
        let mut out = vec![0f32; bh * s * s];
        for (m, o) in out.iter_mut().enumerate() {
            let (t, i, j) = (m / (s * s), m / s % s, m % s);
            let (a, col) = if self.transpose { (j, idx[j * s + i]) } else { (i, idx[i * s + j]) };
            *o = c[(t * s + a) * r + col as usize];
        }
        let (b, h, ..) = l.shape().dims4()?;
        Ok((storage_like(out, st), Shape::from((b, h, s, s))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bh, s, r) = self.dims(l)?;
        let (b, h, ..) = l.shape().dims4()?;
        let out = super::cuda_positional::rel_gather(st, l, &self.index, bh, s, r, self.transpose)?;
        Ok((out, Shape::from((b, h, s, s))))
    }

    fn bwd(&self, c: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RelScatter { index: self.index.clone(), transpose: self.transpose, rows: c.dim(3)? };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// [`RelGather`]'s backward pass: the `[batch, heads, seq, rows]` gradient of `c` from the
/// scores' `g`: each row `a` of `c` sums, in order of `t`, `g[a][t]` (or `g[t][a]` with
/// `transpose`) into column `index[a·seq + t]`, in f32.
pub struct RelScatter {
    pub index: Tensor,
    pub transpose: bool,
    pub rows: usize,
}

impl CustomOp1 for RelScatter {
    fn name(&self) -> &'static str {
        "device-relative-scatter"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, s, _) = l.shape().dims4()?;
        let (g, idx, r) = (f32s(st, l)?, self.index.flatten_all()?.to_vec1::<u32>()?, self.rows);
        let mut dc = vec![0f32; b * h * s * r];
        for (row, d) in dc.chunks_exact_mut(r).enumerate() {
            let (t, a) = (row / s, row % s);
            for u in 0..s {
                let v = if self.transpose { g[(t * s + u) * s + a] } else { g[(t * s + a) * s + u] };
                d[idx[a * s + u] as usize] += v;
            }
        }
        Ok((storage_like(dc, st), Shape::from((b, h, s, r))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, st: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, h, s, _) = l.shape().dims4()?;
        let out = super::cuda_positional::rel_scatter(st, l, &self.index, b * h, s, self.rows, self.transpose)?;
        Ok((out, Shape::from((b, h, s, self.rows))))
    }
}
