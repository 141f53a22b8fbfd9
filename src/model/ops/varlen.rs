//! Attention over texts packed one after another without padding (inference, CPU f32), as
//! transformers' unpadded ("varlen") attention: a batch of texts of different lengths costs the
//! dense layers only its real tokens, and each text's attention sees only its own keys. Padding
//! to the longest text of a batch of 32 short texts is typically half the rows of every dense
//! layer; here there is none.

use super::attention_tasks::{band, softmax_band};
use super::buffers::{uninit, with_f32, SharedOut};
use super::simd::simd_kernel;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

simd_kernel! {
    /// Softmax of every `s`-wide row of `p` in place, row `i` over the keys within `window` of it.
    fn softmax_rows(p: &mut [f32], s: usize, window: Option<usize>) {
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            softmax_band(row, band(i, s, window));
        }
    }
}

/// Start row of each text packed with lengths `lens`.
pub fn starts(lens: &[usize]) -> Vec<usize> {
    lens.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect()
}

/// Multi-head attention of texts packed as rows of `qkv` `[tokens, 3·hidden]` (each row its
/// query, key and value side by side; the texts one after another, `lens` their lengths in
/// order): the context `[tokens, hidden]`, heads concatenated. Inference only (no backward).
pub fn attention_packed(qkv: &Tensor, lens: &[usize], heads: usize) -> Result<Tensor> {
    attention_packed_windowed(qkv, lens, heads, None)
}

/// [`attention_packed`] where, with `window`, token `i` of a text attends only to the text's
/// tokens `j` with `|i − j| ≤ window` (ModernBERT's local layers).
pub fn attention_packed_windowed(qkv: &Tensor, lens: &[usize], heads: usize, window: Option<usize>) -> Result<Tensor> {
    let (t, w) = qkv.dims2()?;
    let h = w / 3;
    if w % 3 != 0 || heads == 0 || h % heads != 0 || lens.iter().sum::<usize>() != t {
        candle_core::bail!(
            "packed attention: width {w} over {heads} heads, {t} rows for lengths summing to {}",
            lens.iter().sum::<usize>()
        );
    }
    let hd = h / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let starts = starts(lens);
    // SAFETY: every text's rows get all of its heads' columns (`heads·hd = h`), and the texts
    // cover all `t` rows: each element is written below before the tensor is made.
    let mut out = unsafe { uninit(t * h) };
    let dst = SharedOut(out.as_mut_ptr());
    with_f32(qkv, |x| {
        assert!(x.len() == t * w);
        (0..lens.len() * heads).into_par_iter().for_each(|task| {
            let (ti, hi) = (task / heads, task % heads);
            let (start, s) = (starts[ti], lens[ti]);
            if s == 0 {
                return;
            }
            let q = start * w + hi * hd;
            // SAFETY: written in full by the first product (`read_dst` false) before it is read.
            let mut p = unsafe { uninit(s * s) };
            let none = gemm::Parallelism::None;
            // SAFETY: the text's rows `start..start + s` of width `w` lie inside `x` (asserted
            // above with `lens` summing to `t`); query, key and value columns of head `hi` are
            // `q`, `q + h`, `q + 2h` onwards, `hd` wide; `p` is `[s, s]`; the output block is
            // rows `start..start + s`, columns `hi·hd..(hi + 1)·hd` of `[t, h]`, which no other
            // task writes.
            unsafe {
                let x = x.as_ptr();
                // p = scale · Q·Kᵀ; Kᵀ element (dd, j) is x[q + h + j·w + dd].
                gemm::gemm(
                    s,
                    s,
                    hd,
                    p.as_mut_ptr(),
                    1,
                    s as isize,
                    false,
                    x.add(q),
                    1,
                    w as isize,
                    x.add(q + h),
                    w as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    none,
                );
                softmax_rows(&mut p, s, window);
                let o = dst.at(start * h + hi * hd);
                gemm::gemm(
                    s,
                    hd,
                    s,
                    o,
                    1,
                    h as isize,
                    false,
                    p.as_ptr(),
                    1,
                    s as isize,
                    x.add(q + 2 * h),
                    1,
                    w as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    none,
                );
            }
        });
    })?;
    Tensor::from_vec(out, (t, h), qkv.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The packed texts' context equals each text's own attention, computed with candle ops,
    /// for toy widths and for a real model's (32-wide heads, texts longer than a vector), with
    /// and without a local window.
    #[test]
    fn each_text_attends_to_its_own_tokens_only() -> Result<()> {
        for (heads, h, lens, window) in
            [(2usize, 8usize, vec![3usize, 5, 1], None), (12, 384, vec![17, 50, 1, 33], None), (4, 128, vec![40, 9, 23], Some(5usize))]
        {
            let t: usize = lens.iter().sum();
            let dev = Device::Cpu;
            let vals: Vec<f32> = (0..t * 3 * h).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let qkv = Tensor::from_vec(vals, (t, 3 * h), &dev)?;
            let got = attention_packed_windowed(&qkv, &lens, heads, window)?;
            let hd = h / heads;
            for (&start, &s) in starts(&lens).iter().zip(&lens) {
                let rows = qkv.narrow(0, start, s)?;
                let split = |c: usize| rows.narrow(1, c * h, h)?.reshape((s, heads, hd))?.transpose(0, 1)?.contiguous();
                let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
                if let Some(w) = window {
                    let far: Vec<f32> = (0..s * s).map(|e| if (e / s).abs_diff(e % s) > w { f32::NEG_INFINITY } else { 0.0 }).collect();
                    scores = scores.broadcast_add(&Tensor::from_vec(far, (s, s), &dev)?)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let want = probs.matmul(&v)?.transpose(0, 1)?.reshape((s, h))?;
                let diff = (got.narrow(0, start, s)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{heads} heads of {h}, window {window:?}, text at {start}: {diff}");
            }
        }
        Ok(())
    }
}
