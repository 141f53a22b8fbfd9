//! ModernBERT's self-attention on CPU f32 as one op over the fused `Wqkv` projections: the rotary
//! embedding of the queries and keys, (windowed) attention, and their backward passes.
//!
//! Composed, each layer takes three slices of `[batch, seq, 3·hidden]`, rotates two of them in
//! ops of their own and copies the third; in the backward pass each slice's gradient is a
//! zero-filled `[batch, seq, 3·hidden]` tensor that candle then adds up, serially, three times a
//! layer. Here the op reads the projections once, rotates while it splits them, runs the fused
//! attention of [`super::attention`], and writes one gradient `[batch, seq, 3·hidden]`, its query
//! and key parts rotated back.

use super::attention::Attention;
use super::buffers::with_f32s;
use super::rotary::RopeTable;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct RotaryAttention {
    attn: Attention,
    table: RopeTable,
}

impl RotaryAttention {
    /// `(batch, seq, hidden)` of projections `[batch, seq, 3·hidden]`.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let (b, s, w) = shape.dims3()?;
        let h = w / 3;
        if w % 3 != 0 || !h.is_multiple_of(self.table.head_dim) || s > self.table.positions() {
            candle_core::bail!(
                "rotary attention: width {w}, head_dim {}, {s} of {} positions",
                self.table.head_dim,
                self.table.positions()
            );
        }
        Ok((b, s, h))
    }

    /// The rotated queries and keys and the values, each `[batch, seq, hidden]`.
    fn split(&self, qkv: &[f32], s: usize, h: usize) -> [Vec<f32>; 3] {
        let rows = qkv.len() / (3 * h);
        let [mut q, mut k, mut v] = [0; 3].map(|_| vec![0f32; rows * h]);
        q.par_chunks_mut(h).zip(k.par_chunks_mut(h)).zip(v.par_chunks_mut(h)).zip(qkv.par_chunks(3 * h)).enumerate().for_each(
            |(row, (((q, k), v), x))| {
                self.table.rotate(q, &x[..h], row % s, false);
                self.table.rotate(k, &x[h..2 * h], row % s, false);
                v.copy_from_slice(&x[2 * h..]);
            },
        );
        [q, k, v]
    }
}

impl CustomOp1 for RotaryAttention {
    fn name(&self) -> &'static str {
        "rotary-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = match (st, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => candle_core::bail!("rotary attention needs contiguous f32 input"),
        };
        let (b, s, h) = self.dims(l.shape())?;
        let d = self.attn.dims(&Shape::from((b, s, h)))?;
        let [q, k, v] = self.split(qkv, s, h);
        Ok((CpuStorage::F32(self.attn.forward_slices(&q, &k, &v, d)), Shape::from((b, s, h))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, s, h) = self.dims(qkv.shape())?;
        let d = self.attn.dims(&Shape::from((b, s, h)))?;
        let dqkv = with_f32s([qkv, grad], |[qkv, g]| {
            let [q, k, v] = self.split(qkv, s, h);
            let [dq, dk, dv] = self.attn.backward_slices(&q, &k, &v, g, d);
            let mut out = vec![0f32; b * s * 3 * h];
            out.par_chunks_mut(3 * h).enumerate().for_each(|(row, o)| {
                let p = row % s;
                self.table.rotate(&mut o[..h], &dq[row * h..][..h], p, true);
                self.table.rotate(&mut o[h..2 * h], &dk[row * h..][..h], p, true);
                o[2 * h..].copy_from_slice(&dv[row * h..][..h]);
            });
            out
        })?;
        Ok(Some(Tensor::from_vec(dqkv, (b, s, 3 * h), grad.device())?))
    }
}

/// Multi-head attention over fused projections `qkv` (`[batch, seq, 3·hidden]`: each token's
/// query, key and value side by side), the queries and keys rotated by `table` at positions
/// `0..seq`, on CPU f32: the context `[batch, seq, hidden]`. `mask` is `[batch, seq]` (1 = token);
/// `dropout` applies to the attention weights with flags drawn from `seed`; with `window`, query
/// `i` attends only to keys `j` with `|i − j| ≤ window`.
#[allow(clippy::too_many_arguments)]
pub fn rotary_attention(
    qkv: &Tensor,
    table: &RopeTable,
    mask: &[f32],
    heads: usize,
    dropout: f64,
    seed: u64,
    window: Option<usize>,
) -> Result<Tensor> {
    let op = RotaryAttention { attn: Attention::new(mask, heads, dropout, seed, window), table: table.clone() };
    qkv.contiguous()?.apply_op1(op)
}
