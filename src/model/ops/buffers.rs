//! CPU f32 views of tensors and output buffers, shared by the fused CPU kernels.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(super) fn f32s<'a>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("fused linear needs contiguous f32 input"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor without copying it.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(f32s(cpu, layout)?)),
        _ => candle_core::bail!("fused linear runs on the CPU"),
    }
}

/// Runs `f` on the contiguous f32 data of several CPU tensors at once, without copying them.
pub(super) fn with_f32s<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &held {
        match &**storage {
            candle_core::Storage::Cpu(cpu) => slices.push(f32s(cpu, layout)?),
            _ => candle_core::bail!("fused linear runs on the CPU"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().unwrap_or_else(|_| unreachable!("one slice per tensor"));
    Ok(f(slices))
}

/// `(rows, width)` of a tensor read as rows of its last dimension: a `[batch, seq, hidden]`
/// activation goes into a dense layer as `batch·seq` rows without a reshape, which in training
/// would be one more graph node whose gradient candle zero-fills and adds.
pub(super) fn rows_of(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims().last() {
        Some(&w) if w > 0 => Ok((shape.elem_count() / w, w)),
        _ => candle_core::bail!("dense layer: input of shape {shape:?} has no rows"),
    }
}

/// `shape` with its last dimension replaced by `n`.
pub(super) fn with_last(shape: &Shape, n: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// A buffer of `len` f32 whose contents are not initialised: for outputs that the caller
/// writes in full before anything reads them (gemm without `read_dst`, row fills). The
/// zero-fill `vec![0.0; len]` costs a pass over memory that the writer makes anyway.
///
/// # Safety
/// Every element must be written before it is read.
// Every f32 bit pattern is a valid value and the callers overwrite the buffer before reading
// it; candle's own CPU backend allocates its uninitialised outputs the same way.
#[allow(clippy::uninit_vec)]
pub(super) unsafe fn uninit(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: capacity is `len`; the caller writes every element before reading (above).
    unsafe { v.set_len(len) };
    v
}

/// `m` rows, each a copy of `row`.
pub(super) fn repeat_rows(m: usize, row: &[f32]) -> Vec<f32> {
    let n = row.len();
    // SAFETY: the chunks below cover the whole buffer and each copies a full row into it.
    let mut y = unsafe { uninit(m * n) };
    if n > 0 {
        y.par_chunks_mut(n * 64).for_each(|rows| rows.chunks_mut(n).for_each(|r| r.copy_from_slice(row)));
    }
    y
}

/// The output buffer, shared by tasks that write disjoint columns of it.
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(super) fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}
