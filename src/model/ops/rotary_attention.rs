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
    /// Each row's position in its text, for texts packed without padding; empty for a padded
    /// batch (row `r` of a text of `seq` rows is at `r % seq`).
    positions: Vec<usize>,
}

impl RotaryAttention {
    /// The shape of the queries (`[batch, seq, hidden]`, or `[tokens, hidden]` packed), the
    /// padded length (0 packed) and the hidden size, of projections `[…, 3·hidden]`.
    fn dims(&self, shape: &Shape) -> Result<(Shape, usize, usize)> {
        let w = shape.dims().last().copied().unwrap_or(0);
        let h = w / 3;
        let (q, s, longest) = if self.positions.is_empty() {
            let (b, s, _) = shape.dims3()?;
            (Shape::from((b, s, h)), s, s)
        } else {
            let (t, _) = shape.dims2()?;
            if t != self.positions.len() {
                candle_core::bail!("rotary attention: {t} rows for {} positions", self.positions.len());
            }
            (Shape::from((t, h)), 0, self.positions.iter().map(|&p| p + 1).max().unwrap_or(0))
        };
        if w % 3 != 0 || !h.is_multiple_of(self.table.head_dim) || longest > self.table.positions() {
            candle_core::bail!(
                "rotary attention: width {w}, head_dim {}, {longest} of {} positions",
                self.table.head_dim,
                self.table.positions()
            );
        }
        Ok((q, s, h))
    }

    /// Row `row`'s position in its text.
    fn position(&self, row: usize, s: usize) -> usize {
        if self.positions.is_empty() {
            row % s
        } else {
            self.positions[row]
        }
    }

    /// The rotated queries and keys and the values, each in the queries' layout.
    fn split(&self, qkv: &[f32], s: usize, h: usize) -> [Vec<f32>; 3] {
        let rows = qkv.len() / (3 * h);
        let [mut q, mut k, mut v] = [0; 3].map(|_| vec![0f32; rows * h]);
        q.par_chunks_mut(h).zip(k.par_chunks_mut(h)).zip(v.par_chunks_mut(h)).zip(qkv.par_chunks(3 * h)).enumerate().for_each(
            |(row, (((q, k), v), x))| {
                let p = self.position(row, s);
                self.table.rotate(q, &x[..h], p, false);
                self.table.rotate(k, &x[h..2 * h], p, false);
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
        let (shape, s, h) = self.dims(l.shape())?;
        let d = self.attn.dims(&shape)?;
        let [q, k, v] = self.split(qkv, s, h);
        Ok((CpuStorage::F32(self.attn.forward_slices(&q, &k, &v, d)), shape))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (shape, s, h) = self.dims(qkv.shape())?;
        let d = self.attn.dims(&shape)?;
        let dqkv = with_f32s([qkv, grad], |[qkv, g]| {
            let [q, k, v] = self.split(qkv, s, h);
            let [dq, dk, dv] = self.attn.backward_slices(&q, &k, &v, g, d);
            let mut out = vec![0f32; qkv.len()];
            out.par_chunks_mut(3 * h).enumerate().for_each(|(row, o)| {
                let p = self.position(row, s);
                self.table.rotate(&mut o[..h], &dq[row * h..][..h], p, true);
                self.table.rotate(&mut o[h..2 * h], &dk[row * h..][..h], p, true);
                o[2 * h..].copy_from_slice(&dv[row * h..][..h]);
            });
            out
        })?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), grad.device())?))
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
    let op = RotaryAttention { attn: Attention::new(mask, heads, dropout, seed, window), table: table.clone(), positions: Vec::new() };
    qkv.contiguous()?.apply_op1(op)
}

/// [`rotary_attention`] over texts packed one after another without padding, `lens` tokens
/// each: `qkv` is `[tokens, 3·hidden]`, each text's positions from 0; the context `[tokens,
/// hidden]` (see `model::ops::unpad`).
pub fn rotary_attention_unpadded(
    qkv: &Tensor,
    table: &RopeTable,
    lens: &[usize],
    heads: usize,
    dropout: f64,
    seed: u64,
    window: Option<usize>,
) -> Result<Tensor> {
    let positions = lens.iter().flat_map(|&n| 0..n).collect();
    let op = RotaryAttention { attn: Attention::packed(lens, heads, dropout, seed, window), table: table.clone(), positions };
    qkv.contiguous()?.apply_op1(op)
}
