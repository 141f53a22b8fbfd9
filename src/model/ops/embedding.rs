//! The embedding lookup as one CPU op: word rows, position rows and token-type rows summed in
//! one parallel pass (candle's `index_select`, `broadcast_add` and `add` are three serial
//! passes). Its backward pass hands the word table's gradient over as the rows the batch used
//! (see [`super::tape`]); the small position and type tables get dense gradients.

use super::buffers::{f32s, uninit, with_f32};
use super::kernels::use_fused_cpu_kernels;
use super::tape::{deposit, RowGrad};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Position rows `offset + i` for token `i` of each text, from a `[rows, width]` table.
pub struct Positions<'a> {
    pub table: &'a Tensor,
    pub offset: usize,
}

/// Token-type rows by each token's type id, from a `[types, width]` table.
pub struct Types<'a> {
    pub table: &'a Tensor,
    pub ids: &'a Tensor,
}

/// `word[ids] + types[type_ids] + position[offset + j]` (added in that order, as BERT's
/// embeddings add them) as `[batch, seq, width]`; either extra table may be absent. One fused op on the CPU in f32 with the fused kernels on; candle's
/// composition elsewhere (the same values).
pub fn embed(word: &Tensor, ids: &Tensor, pos: Option<Positions>, types: Option<Types>) -> Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let w = word.dim(1)?;
    let fused = word.device().is_cpu() && word.dtype() == DType::F32 && use_fused_cpu_kernels();
    let tables_f32 = pos.iter().all(|p| p.table.dtype() == DType::F32) && types.iter().all(|t| t.table.dtype() == DType::F32);
    if !fused || !tables_f32 {
        let mut x = word.index_select(&ids.flatten_all()?, 0)?.reshape((b, s, w))?;
        if let Some(t) = &types {
            x = (x + t.table.index_select(&t.ids.flatten_all()?, 0)?.reshape((b, s, w))?)?;
        }
        if let Some(p) = &pos {
            x = x.broadcast_add(&p.table.narrow(0, p.offset, s)?)?;
        }
        return Ok(x);
    }
    let op = EmbedSum {
        word: word.clone(),
        ids: ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
        type_ids: match &types {
            Some(t) => t.ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
            None => vec![],
        },
        seq: s,
        offset: pos.as_ref().map_or(0, |p| p.offset),
        has_pos: pos.is_some(),
        has_types: types.is_some(),
    };
    // An absent table's place is held by the word table, which the op does not read there.
    let p = pos.as_ref().map_or(word, |p| p.table);
    let t = types.as_ref().map_or(word, |t| t.table);
    word.apply_op3_arc(p, t, std::sync::Arc::new(Box::new(op)))?.reshape((b, s, w))
}

struct EmbedSum {
    word: Tensor,
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    seq: usize,
    offset: usize,
    has_pos: bool,
    has_types: bool,
}

/// Row `r` of a `[rows, w]` table, or an error naming the table when it has no such row.
fn row<'a>(table: &'a [f32], w: usize, r: usize, what: &str) -> Result<&'a [f32]> {
    match table.get(r * w..(r + 1) * w) {
        Some(row) => Ok(row),
        None => candle_core::bail!("embedding: {what} {r} is outside the table of {} rows", table.len() / w.max(1)),
    }
}

impl CustomOp3 for EmbedSum {
    fn name(&self) -> &'static str {
        "embed-sum"
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
        let (word, pos, types) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let w = l1.shape().dims2()?.1;
        let n = self.ids.len();
        // Every lookup is checked before any is made: the op fails whole, as index_select does.
        for (t, &id) in self.ids.iter().enumerate() {
            row(word, w, id as usize, "token id")?;
            if self.has_pos {
                row(pos, w, self.offset + t % self.seq, "position")?;
            }
            if self.has_types {
                row(types, w, self.type_ids[t] as usize, "token type")?;
            }
        }
        // SAFETY: each row of the buffer is written in full below before anything reads it.
        let mut out = unsafe { uninit(n * w) };
        out.par_chunks_mut(w * 16).enumerate().for_each(|(c, rows)| {
            for (k, dst) in rows.chunks_mut(w).enumerate() {
                let t = c * 16 + k;
                let id = self.ids[t] as usize;
                dst.copy_from_slice(&word[id * w..(id + 1) * w]);
                if self.has_types {
                    let r = self.type_ids[t] as usize;
                    dst.iter_mut().zip(&types[r * w..(r + 1) * w]).for_each(|(d, p)| *d += p);
                }
                if self.has_pos {
                    let r = self.offset + t % self.seq;
                    dst.iter_mut().zip(&pos[r * w..(r + 1) * w]).for_each(|(d, p)| *d += p);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, w))))
    }

    fn bwd(
        &self,
        word: &Tensor,
        pos: &Tensor,
        types: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let w = word.dim(1)?;
        let want_pos = self.has_pos && pos.track_op();
        let want_types = self.has_types && types.track_op();
        let (dpos, dtypes) = with_f32(grad, |g| {
            if self.word.track_op() {
                deposit(&self.word, word_rows(&self.ids, g, w)?);
            }
            let dpos = want_pos.then(|| sum_rows(g, w, pos.dim(0)?, |t| self.offset + t % self.seq)).transpose()?;
            let dtypes = want_types.then(|| sum_rows(g, w, types.dim(0)?, |t| self.type_ids[t] as usize)).transpose()?;
            Ok::<_, candle_core::Error>((dpos, dtypes))
        })??;
        let dev = word.device();
        let dpos = dpos.map(|v| Tensor::from_vec(v, pos.shape(), dev)).transpose()?;
        let dtypes = dtypes.map(|v| Tensor::from_vec(v, types.shape(), dev)).transpose()?;
        Ok((None, dpos, dtypes))
    }
}

/// The word table's gradient: for each distinct id, the sum of its tokens' gradient rows in
/// token order (the same sums whatever the thread count).
fn word_rows(ids: &[u32], g: &[f32], w: usize) -> Result<RowGrad> {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&t| (ids[t as usize], t));
    let mut starts = Vec::new();
    for (i, &t) in order.iter().enumerate() {
        if i == 0 || ids[order[i - 1] as usize] != ids[t as usize] {
            starts.push(i);
        }
    }
    let rows: Vec<u32> = starts.iter().map(|&i| ids[order[i] as usize]).collect();
    starts.push(order.len());
    let mut values = vec![0f32; rows.len() * w];
    values.par_chunks_mut(w).enumerate().for_each(|(u, acc)| {
        for &t in &order[starts[u]..starts[u + 1]] {
            let t = t as usize;
            acc.iter_mut().zip(&g[t * w..(t + 1) * w]).for_each(|(a, x)| *a += x);
        }
    });
    RowGrad::new(rows, values, w)
}

/// A dense `[rows, w]` gradient: token `t`'s gradient row added to row `row_of(t)`, in token order.
fn sum_rows(g: &[f32], w: usize, rows: usize, row_of: impl Fn(usize) -> usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; rows * w];
    for (t, gr) in g.chunks(w).enumerate() {
        let r = row_of(t);
        let Some(dst) = out.get_mut(r * w..(r + 1) * w) else { candle_core::bail!("embedding: row {r} outside a table of {rows}") };
        dst.iter_mut().zip(gr).for_each(|(d, x)| *d += x);
    }
    Ok(out)
}
