//! Rotary position embedding (RoPE) of the query and key projections, as transformers applies it
//! (`rotate_half` over each head: the first half of a head's dimensions pairs with the second),
//! with its backward pass: a rotation's gradient is the transposed rotation.
//!
//! Projections are `[batch, seq, hidden]` with the heads side by side, as our attention takes them;
//! position `i` of every text is `i` (ModernBERT counts positions from 0, pads last). On the CPU in
//! f32 one fused op rotates in place of a copy; elsewhere (a GPU) the device-generic op of
//! `device_positional` does, one kernel each way.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// The cosines and sines of `positions` positions for heads of `head_dim` dimensions at base
/// `theta`, each `[positions, head_dim]` with the frequencies repeated over the two halves.
/// Computed as transformers does in f32: the angle `position · theta^(-2k/head_dim)` is rounded
/// to f32 before its cosine is taken, which matters at thousands of positions.
#[derive(Clone)]
pub struct RopeTable {
    pub head_dim: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RopeTable {
    pub fn new(positions: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half).map(|k| 1.0 / (theta as f32).powf((2 * k) as f32 / head_dim as f32)).collect();
        let (mut cos, mut sin) = (vec![0f32; positions * head_dim], vec![0f32; positions * head_dim]);
        for p in 0..positions {
            for (k, &f) in inv_freq.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                for d in [k, k + half] {
                    cos[p * head_dim + d] = angle.cos() as f32;
                    sin[p * head_dim + d] = angle.sin() as f32;
                }
            }
        }
        Self { head_dim, cos: Arc::new(cos), sin: Arc::new(sin) }
    }

    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.head_dim.max(1)
    }

    /// `out` = the heads of `x` (one row of `head_dim`-wide heads side by side) rotated by
    /// position `p`'s angles, or with `inverse` by their transpose (the backward pass).
    pub(super) fn rotate(&self, out: &mut [f32], x: &[f32], p: usize, inverse: bool) {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        let (cos, sin) = (&self.cos[p * hd..][..hd], &self.sin[p * hd..][..hd]);
        // The transpose of [[c, -s], [s, c]] per pair is [[c, s], [-s, c]]: the sines change sign.
        let sign = if inverse { -1.0 } else { 1.0 };
        for (oh, xh) in out.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
            for k in 0..half {
                let (a, b) = (xh[k], xh[k + half]);
                oh[k] = a * cos[k] - sign * b * sin[k];
                oh[k + half] = b * cos[k + half] + sign * a * sin[k + half];
            }
        }
    }

    /// `(cos, sin)` of the first `seq` positions as `[seq, head_dim]` tensors on `device`.
    pub fn tensors(&self, seq: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = seq * self.head_dim;
        let t = |v: &[f32]| Tensor::from_slice(&v[..n], (seq, self.head_dim), device)?.to_dtype(dtype);
        Ok((t(&self.cos)?, t(&self.sin)?))
    }
}

/// `x` (`[batch, seq, hidden]`, `hidden / head_dim` heads) with each head rotated by its
/// position's angles: `x·cos + rotate_half(x)·sin`.
pub fn rotary(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    let (_, seq, hidden) = x.dims3()?;
    if !hidden.is_multiple_of(table.head_dim) || !table.head_dim.is_multiple_of(2) || seq > table.positions() {
        candle_core::bail!("rotary: hidden {hidden}, head_dim {}, {seq} of {} positions", table.head_dim, table.positions());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && super::kernels::use_fused_cpu_kernels() {
        return x.contiguous()?.apply_op1(Rotary { table: table.clone(), inverse: false });
    }
    let (cos, sin) = table.tensors(seq, DType::F32, x.device())?;
    let op = super::device_positional::DeviceRotary { head_dim: table.head_dim, inverse: false };
    x.contiguous()?.apply_op2(&Tensor::cat(&[cos, sin], 1)?, op)
}

/// [`rotary`] from candle ops, on any device and dtype: the reference the fused and device ops are
/// tested against.
pub fn rotary_composed(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    let (b, s, h) = x.dims3()?;
    let (hd, nh) = (table.head_dim, h / table.head_dim);
    let (cos, sin) = table.tensors(s, x.dtype(), x.device())?;
    let heads = x.reshape((b, s, nh, hd))?;
    let (x1, x2) = (heads.narrow(D::Minus1, 0, hd / 2)?, heads.narrow(D::Minus1, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.reshape((1, s, 1, hd))?, sin.reshape((1, s, 1, hd))?);
    heads.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)?.reshape((b, s, h))
}

/// The fused CPU op: the rotation, or (`inverse`) its transpose, which is the backward pass.
struct Rotary {
    table: RopeTable,
    inverse: bool,
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => candle_core::bail!("rotary needs contiguous f32 input"),
        };
        let (_, seq, hidden) = l.shape().dims3()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hidden).zip(x.par_chunks(hidden)).enumerate().for_each(|(row, (o, xr))| {
            self.table.rotate(o, xr, row % seq, self.inverse);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Rotary { table: self.table.clone(), inverse: !self.inverse };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// The query and key columns (`0..2·hidden`) of packed projections `qkv` (`[tokens, 3·hidden]`,
/// texts one after another) rotated by each row's own position in `positions`; the values are
/// copied as they are. Inference on the CPU in f32 (no backward pass).
pub fn rotary_qk_packed(qkv: &Tensor, table: &RopeTable, positions: &[usize]) -> Result<Tensor> {
    let (t, w) = qkv.dims2()?;
    let (h, hd) = (w / 3, table.head_dim);
    let fits = positions.len() == t && positions.iter().all(|&p| p < table.positions());
    if w % 3 != 0 || hd == 0 || !hd.is_multiple_of(2) || !h.is_multiple_of(hd) || !fits {
        candle_core::bail!("packed rotary: width {w}, head_dim {hd}, {} positions for {t} rows", positions.len());
    }
    let out = super::buffers::with_f32(qkv, |x| {
        let mut out = x.to_vec();
        out.par_chunks_mut(w).zip(x.par_chunks(w)).zip(positions.par_iter()).for_each(|((row, xr), &p)| {
            table.rotate(&mut row[..2 * h], &xr[..2 * h], p, false);
        });
        out
    })?;
    Tensor::from_vec(out, (t, w), qkv.device())
}
