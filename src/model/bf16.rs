//! bf16 dense layers for CPU inference, opt-in (`--predict-dtype bf16`).
//!
//! A short text's forward pass does little arithmetic per weight it reads, so much of its
//! time goes to moving weights: in bf16 they take half the bytes (a MiniLM-size encoder then
//! fits in L3), and AVX512-BF16's dot-product instruction does two multiply-adds per f32
//! lane. Each layer rounds its input to bf16 and accumulates in f32; everything between the
//! dense layers (attention, LayerNorm, GELU, residuals) stays f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;
use std::sync::Arc;

/// f32 lanes in one AVX-512 register.
const LANES: usize = 16;
/// Output columns one kernel call computes: two registers per row.
const TILE: usize = 2 * LANES;
/// Rows one kernel call computes: two accumulators each, 24 of the 32 registers.
const MAX_ROWS: usize = 12;

/// Whether this CPU has the instructions the bf16 layers need (AVX-512F and AVX512-BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bits of `x` rounded to the nearest bf16 (ties to even).
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// A dense layer's weight `[in, out]` rounded to bf16 and laid out for the kernel, with its
/// f32 bias. For each block of 16 output columns and each pair of inputs `(2p, 2p+1)`, 16
/// lanes hold `(w[2p][c], w[2p+1][c])`: the operand order of `vdpbf16ps`.
pub struct PackedBf16 {
    inputs: usize,
    outputs: usize,
    pairs: usize,
    /// `[outputs padded to TILE / 16][pairs][16]`, each u32 two bf16 (low: even input).
    data: Vec<u32>,
    /// Padded to the same width with zeros.
    bias: Vec<f32>,
}

impl PackedBf16 {
    /// Packs `w` (`inputs × outputs`, row-major) and `bias` (`outputs`).
    pub fn new(w: &[f32], inputs: usize, outputs: usize, bias: &[f32]) -> Self {
        assert_eq!(w.len(), inputs * outputs);
        assert_eq!(bias.len(), outputs);
        let pairs = inputs.div_ceil(2);
        let padded = outputs.next_multiple_of(TILE);
        let mut data = vec![0u32; padded * pairs];
        for p in 0..pairs {
            for c in 0..outputs {
                let lo = bf16_bits(w[2 * p * outputs + c]) as u32;
                let hi = if 2 * p + 1 < inputs {
                    bf16_bits(w[(2 * p + 1) * outputs + c]) as u32
                } else {
                    0
                };
                data[((c / LANES) * pairs + p) * LANES + c % LANES] = lo | hi << 16;
            }
        }
        let mut bias = bias.to_vec();
        bias.resize(padded, 0.0);
        Self {
            inputs,
            outputs,
            pairs,
            data,
            bias,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.data.len() + self.bias.len()) * 4
    }

    /// `x·W + b` for `x` `rows × inputs` (row-major), then exact GELU when `gelu`. Output
    /// columns are split over the current rayon pool's threads. Call only where
    /// [`supported`] is true.
    pub fn forward(&self, x: &[f32], rows: usize, gelu: bool) -> Vec<f32> {
        assert!(supported(), "bf16 layers need AVX512-BF16");
        assert_eq!(x.len(), rows * self.inputs);
        let stride = 2 * self.pairs;
        let mut xb = vec![0u16; rows * stride];
        for (src, dst) in x.chunks(self.inputs.max(1)).zip(xb.chunks_mut(stride)) {
            // SAFETY: `supported()` was checked above.
            unsafe { round_row(src, &mut dst[..self.inputs]) };
        }
        let n = self.outputs;
        let mut y = vec![0f32; rows * n];
        let tiles = n.div_ceil(TILE);
        let tasks = rayon::current_num_threads().clamp(1, tiles.max(1));
        let per = tiles.div_ceil(tasks);
        let blocks = row_blocks(rows);
        let out = SharedOut(y.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|t| {
            let (t0, t1) = (t * per, ((t + 1) * per).min(tiles));
            for tile in t0..t1 {
                let c0 = tile * TILE;
                let cols = (n - c0).min(TILE);
                for &(r0, r) in &blocks {
                    // SAFETY: AVX512-BF16 is present (checked above); the kernel reads rows
                    // r0..r0+r of xb (each `stride` long), two 16-column panels of `data`
                    // and `bias` (padded to whole tiles), and writes `cols` columns from c0
                    // of rows r0..r0+r of y: all inside their buffers. Tasks write disjoint
                    // columns.
                    unsafe {
                        let xs = xb.as_ptr().add(r0 * stride);
                        let w = self.data.as_ptr().add(tile * 2 * self.pairs * LANES);
                        let b = self.bias.as_ptr().add(c0);
                        let ys = out.at(r0 * n + c0);
                        tile_dispatch(r, xs, stride, w, self.pairs, b, ys, n, cols);
                    }
                }
            }
            if gelu && t0 < t1 {
                let (c0, c1) = (t0 * TILE, (t1 * TILE).min(n));
                for r in 0..rows {
                    // SAFETY: row r's columns c0..c1 belong to this task alone.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(out.at(r * n + c0), c1 - c0) };
                    super::kernels::gelu_in_place(row);
                }
            }
        });
        y
    }
}

/// Splits `rows` into blocks of at most `MAX_ROWS`, as even as possible: `(first, count)`.
fn row_blocks(rows: usize) -> Vec<(usize, usize)> {
    let blocks = rows.div_ceil(MAX_ROWS).max(1);
    let (base, extra) = (rows / blocks, rows % blocks);
    let mut out = Vec::with_capacity(blocks);
    let mut r0 = 0;
    for i in 0..blocks {
        let r = base + usize::from(i < extra);
        if r > 0 {
            out.push((r0, r));
        }
        r0 += r;
    }
    out
}

/// The output buffer, shared by tasks that write disjoint columns of it.
struct SharedOut(*mut f32);
// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Rounds `src` to bf16 bits in `dst` (same length).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let whole = src.len() / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
    }
    for i in whole..src.len() {
        dst[i] = bf16_bits(src[i]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn round_row(_src: &[f32], _dst: &mut [u16]) {
    unreachable!("bf16 layers need AVX512-BF16")
}

/// Runs the kernel for `r` (1..=MAX_ROWS) rows.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(
    r: usize,
    x: *const u16,
    xs: usize,
    w: *const u32,
    pairs: usize,
    b: *const f32,
    y: *mut f32,
    ys: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let k = match r {
            1 => tile::<1>,
            2 => tile::<2>,
            3 => tile::<3>,
            4 => tile::<4>,
            5 => tile::<5>,
            6 => tile::<6>,
            7 => tile::<7>,
            8 => tile::<8>,
            9 => tile::<9>,
            10 => tile::<10>,
            11 => tile::<11>,
            _ => tile::<12>,
        };
        k(x, xs, w, pairs, b, y, ys, cols)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 layers need AVX512-BF16")
}

/// `R` rows × 32 columns: `y[r][c] = b[c] + Σ_p x[r][2p..2p+2]·w[2p..2p+2][c]`, storing the
/// first `cols` columns. `x` rows are `xs` bf16 apart, `y` rows `ys` floats apart; `w` is two
/// consecutive 16-column panels of `pairs` rows each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    x: *const u16,
    xs: usize,
    w: *const u32,
    pairs: usize,
    b: *const f32,
    y: *mut f32,
    ys: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let (w0, w1) = (w, w.add(pairs * LANES));
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..pairs {
        let a0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w0.add(p * LANES) as *const _));
        let a1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(p * LANES) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (x.add(r * xs + 2 * p) as *const i32).read_unaligned();
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], a0, xv);
            acc[1] = _mm512_dpbf16_ps(acc[1], a1, xv);
        }
    }
    let (b0, b1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(LANES)));
    let mask = |n: usize| -> __mmask16 {
        if n >= LANES {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    };
    let (m0, m1) = (mask(cols), mask(cols.saturating_sub(LANES)));
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(y.add(r * ys), m0, _mm512_add_ps(acc[0], b0));
        _mm512_mask_storeu_ps(y.add(r * ys + LANES), m1, _mm512_add_ps(acc[1], b1));
    }
}

/// `x·W + b` (then GELU) on a 2-D CPU f32 tensor, as a candle op; not differentiable.
pub struct Bf16Linear {
    pub weight: Arc<PackedBf16>,
    pub gelu: bool,
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => candle_core::bail!("bf16 linear needs contiguous f32 input"),
        };
        if k != self.weight.inputs {
            candle_core::bail!(
                "bf16 linear: {k} inputs, the weight has {}",
                self.weight.inputs
            );
        }
        let y = self.weight.forward(x, rows, self.gelu);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.weight.outputs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// Same as the kernel with inputs rounded the same way, in f64.
    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                y[r * n + c] = b[c] as f64
                    + (0..k)
                        .map(|i| round(x[r * k + i]) * round(w[i * n + c]))
                        .sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn matches_a_rounded_reference_for_odd_shapes() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (rows, k, n) in [
            (1, 384, 1152),
            (20, 384, 384),
            (13, 37, 50),
            (25, 1536, 384),
            (3, 5, 2),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let packed = PackedBf16::new(&w, k, n, &b);
            let want = reference(&x, &w, &b, rows, k, n);
            let got = packed.forward(&x, rows, false);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-3 * (k as f64).sqrt(),
                "{rows}×{k}×{n}: off by {worst}"
            );
            let with_gelu = packed.forward(&x, rows, true);
            let mut expect = got.clone();
            super::super::kernels::gelu_in_place(&mut expect);
            assert_eq!(with_gelu, expect, "{rows}×{k}×{n}: GELU");
        }
    }

    #[test]
    fn row_blocks_cover_every_row_once() {
        for rows in 0..60 {
            let b = row_blocks(rows);
            assert_eq!(b.iter().map(|&(_, r)| r).sum::<usize>(), rows);
            assert!(b.iter().all(|&(_, r)| (1..=MAX_ROWS).contains(&r)));
            assert!(b.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
    }
}
