//! Inference-only row ops of the packed forward pass (CPU f32, no backward): the embedding sum
//! and the residual sum, each with its LayerNorm, as one parallel pass over the rows on the
//! rayon pool that runs the rest of the pass. Composed from candle's element-wise ops they
//! were three passes each on one thread (candle's own pool is off in `finetuned`,
//! `compute::init_process`).

use super::buffers::{uninit, with_f32s, SharedOut};
use super::fastmath::row_stats;
use super::layers::LayerNorm;
use super::simd::simd_kernel;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Rows a task takes: a few tasks per thread.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// `LayerNorm(a + b)` over rows of width `h`, `b` optional: a new `[rows, h]` tensor.
pub fn add_norm(a: &Tensor, b: Option<&Tensor>, norm: &LayerNorm) -> Result<Tensor> {
    let (rows, h) = a.dims2()?;
    let eps = norm.eps as f32;
    let added = b.is_some();
    let b = b.unwrap_or(a);
    if b.dims2()? != (rows, h) || norm.weight.elem_count() != h || norm.bias.elem_count() != h {
        candle_core::bail!("add_norm: {:?} + {:?} under a norm of width {}", a.dims(), b.dims(), norm.weight.elem_count());
    }
    // SAFETY: every row is written by exactly one task below.
    let mut y = unsafe { uninit(rows * h) };
    let out = SharedOut(y.as_mut_ptr());
    with_f32s([a, b, &norm.weight, &norm.bias], |[a, b, w, bias]| {
        let per = rows_per_task(rows);
        (0..rows.div_ceil(per)).into_par_iter().for_each(|t| {
            for r in t * per..((t + 1) * per).min(rows) {
                // SAFETY: row r of `y` belongs to this task alone.
                let y = unsafe { std::slice::from_raw_parts_mut(out.at(r * h), h) };
                let b = if added { &b[r * h..(r + 1) * h] } else { &[][..] };
                sum_norm(y, [&a[r * h..(r + 1) * h], b, &[]], w, bias, eps);
            }
        });
    })?;
    Tensor::from_vec(y, (rows, h), a.device())
}

/// The embedding rows of packed texts, normalized: row `i` is `LayerNorm(word[ids[i]] +
/// types[type_ids[i]] + position[positions[i]])`, with `types` row 0 for every token where
/// `type_ids` is empty and no type term without a `types` table.
pub fn embed_norm(
    word: &Tensor,
    ids: &[u32],
    types: Option<(&Tensor, &[u32])>,
    position: &Tensor,
    positions: &[u32],
    norm: &LayerNorm,
) -> Result<Tensor> {
    let (vocab, h) = word.dims2()?;
    let rows = ids.len();
    if positions.len() != rows {
        candle_core::bail!("packed embeddings: {} positions for {rows} tokens", positions.len());
    }
    let (type_table, type_ids) = match types {
        Some((t, ids)) => (t, ids),
        None => (word, &[][..]),
    };
    if !type_ids.is_empty() && type_ids.len() != rows {
        candle_core::bail!("packed embeddings: {} token types for {rows} tokens", type_ids.len());
    }
    let eps = norm.eps as f32;
    let bad = |what: &str, i: usize, n: usize| candle_core::bail!("packed embeddings: {what} {i} out of the table's {n} rows");
    if let Some(&i) = ids.iter().find(|&&i| i as usize >= vocab) {
        return bad("token id", i as usize, vocab);
    }
    let ((npos, pw), (ntypes, tw)) = (position.dims2()?, type_table.dims2()?);
    if pw != h || tw != h || norm.weight.elem_count() != h {
        candle_core::bail!("packed embeddings: widths {h} (words), {pw} (positions), {tw} (types), {} (norm)", norm.weight.elem_count());
    }
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= npos) {
        return bad("position", p as usize, npos);
    }
    if let Some(&t) = type_ids.iter().find(|&&t| t as usize >= ntypes) {
        return bad("token type", t as usize, ntypes);
    }
    // SAFETY: every row is written by exactly one task below.
    let mut y = unsafe { uninit(rows * h) };
    let out = SharedOut(y.as_mut_ptr());
    with_f32s([word, type_table, position, &norm.weight, &norm.bias], |[word, tt, pos, w, bias]| {
        let per = rows_per_task(rows);
        (0..rows.div_ceil(per)).into_par_iter().for_each(|t| {
            for r in t * per..((t + 1) * per).min(rows) {
                // SAFETY: row r of `y` belongs to this task alone.
                let y = unsafe { std::slice::from_raw_parts_mut(out.at(r * h), h) };
                let ty = if types.is_some() { row(tt, if type_ids.is_empty() { 0 } else { type_ids[r] }, h) } else { &[] };
                sum_norm(y, [row(word, ids[r], h), row(pos, positions[r], h), ty], w, bias, eps);
            }
        });
    })?;
    Tensor::from_vec(y, (rows, h), word.device())
}

fn row(table: &[f32], i: u32, h: usize) -> &[f32] {
    &table[i as usize * h..(i as usize + 1) * h]
}

simd_kernel! {
    /// `y = LayerNorm(parts[0] + parts[1] + parts[2])` with weight `w` and bias `b`; an empty
    /// part adds nothing. One pass to sum, the statistics vectorised, one pass to normalize.
    fn sum_norm(y: &mut [f32], parts: [&[f32]; 3], w: &[f32], b: &[f32], eps: f32) {
        y.copy_from_slice(parts[0]);
        for p in &parts[1..] {
            if !p.is_empty() {
                y.iter_mut().zip(*p).for_each(|(y, p)| *y += p);
            }
        }
        let (mean, rstd) = row_stats(y, eps);
        for ((y, w), b) in y.iter_mut().zip(w).zip(b) {
            *y = (*y - mean) * rstd * w + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn norm(h: usize) -> LayerNorm {
        let dev = Device::Cpu;
        let weight = Tensor::arange(0f32, h as f32, &dev).unwrap().affine(0.01, 0.5).unwrap();
        let bias = Tensor::arange(0f32, h as f32, &dev).unwrap().affine(-0.02, 0.1).unwrap();
        LayerNorm { weight, bias, eps: 1e-12 }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn add_norm_is_candles_layer_norm_of_the_sum() {
        let dev = Device::Cpu;
        let (a, b) = (Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap(), Tensor::randn(0f32, 2.0, (37, 24), &dev).unwrap());
        let n = norm(24);
        let want = candle_nn::ops::layer_norm(&(&a + &b).unwrap(), &n.weight, &n.bias, 1e-12).unwrap();
        assert!(max_diff(&add_norm(&a, Some(&b), &n).unwrap(), &want) < 1e-5);
        let alone = candle_nn::ops::layer_norm(&a, &n.weight, &n.bias, 1e-12).unwrap();
        assert!(max_diff(&add_norm(&a, None, &n).unwrap(), &alone) < 1e-5);
    }

    #[test]
    fn embed_norm_sums_the_three_tables_rows_then_normalizes() {
        let dev = Device::Cpu;
        let (word, types, pos) = (
            Tensor::randn(0f32, 1.0, (50, 16), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (20, 16), &dev).unwrap(),
        );
        let (ids, type_ids, positions) = ([3u32, 49, 0, 7, 7], [0u32, 1, 1, 0, 1], [0u32, 1, 2, 0, 1]);
        let n = norm(16);
        let rows: Vec<Tensor> = (0..5)
            .map(|r| {
                let s = (word.i(ids[r] as usize).unwrap() + types.i(type_ids[r] as usize).unwrap()).unwrap();
                (s + pos.i(positions[r] as usize).unwrap()).unwrap()
            })
            .collect();
        let want = candle_nn::ops::layer_norm(&Tensor::stack(&rows, 0).unwrap(), &n.weight, &n.bias, 1e-12).unwrap();
        let got = embed_norm(&word, &ids, Some((&types, &type_ids)), &pos, &positions, &n).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        // No type ids: type row 0 for every token.
        let zero = embed_norm(&word, &ids, Some((&types, &[])), &pos, &positions, &n).unwrap();
        let zeros = embed_norm(&word, &ids, Some((&types, &[0; 5])), &pos, &positions, &n).unwrap();
        assert_eq!(max_diff(&zero, &zeros), 0.0);
    }

    #[test]
    fn an_index_outside_a_table_is_an_error_not_a_panic() {
        let dev = Device::Cpu;
        let (word, pos) =
            (Tensor::zeros((10, 8), candle_core::DType::F32, &dev).unwrap(), Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap());
        let n = norm(8);
        let err = embed_norm(&word, &[1, 10], None, &pos, &[0, 1], &n).unwrap_err().to_string();
        assert!(err.contains("token id 10"), "{err}");
        let err = embed_norm(&word, &[1, 2], None, &pos, &[0, 4], &n).unwrap_err().to_string();
        assert!(err.contains("position 4"), "{err}");
        assert!(embed_norm(&word, &[1, 2], None, &pos, &[0], &n).is_err());
        let types = Tensor::zeros((2, 8), candle_core::DType::F32, &dev).unwrap();
        let err = embed_norm(&word, &[1, 2], Some((&types, &[1])), &pos, &[0, 1], &n).unwrap_err().to_string();
        assert!(err.contains("1 token types for 2 tokens"), "{err}");
        let wide = Tensor::zeros((2, 9), candle_core::DType::F32, &dev).unwrap();
        assert!(add_norm(&pos.narrow(0, 0, 2).unwrap(), Some(&wide), &n).is_err());
    }
}
