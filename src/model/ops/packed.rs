//! Dense layers for CPU inference with their weights packed once, at load, in the order
//! our AVX-512 kernel reads them: f32 (the default, same sums as training up to rounding
//! order) or bf16 (opt-in, `--predict-dtype bf16`).
//!
//! A short text gives a matrix product of a few rows, where gemm spends much of its time
//! packing the weights again on every call and running tiles sized for large matrices.
//! Here each block of 32 output columns is computed for up to 12 rows at once, with the
//! weights read straight from their packed panels.
//!
//! bf16 takes half the bytes (a MiniLM-size encoder then fits in L3) and AVX512-BF16's
//! dot-product instruction does two multiply-adds per f32 lane; each layer rounds its input
//! to bf16 and sums in f32. Everything between the dense layers stays f32.

use super::buffers::SharedOut;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;
use std::sync::Arc;

/// f32 lanes in one AVX-512 register.
const LANES: usize = 16;
/// Output columns one kernel call computes: two registers per row.
const TILE: usize = 2 * LANES;
/// Rows one kernel call computes: two accumulators each, 24 of the 32 registers.
const MAX_ROWS: usize = 12;
/// Up to this many row blocks, each block of columns is finished before the next (its
/// weights stay in L1); past it, each block of rows is (its inputs stay in L1).
const FEW_BLOCKS: usize = 4;

/// Whether this CPU runs the f32 kernel (AVX-512F).
pub fn f32_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the bf16 kernel (AVX-512F and AVX512-BF16).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        f32_supported() && std::arch::is_x86_feature_detected!("avx512bf16")
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

/// A dense layer's weight `[in, out]` packed for the kernel, with its f32 bias. For each
/// block of 16 output columns and each step along the inputs, 16 lanes of 32 bits: in f32
/// one input `w[k][c]`; in bf16 a pair of inputs `(w[2p][c], w[2p+1][c])`, the operand
/// order of `vdpbf16ps`.
pub struct Packed {
    bf16: bool,
    inputs: usize,
    outputs: usize,
    /// Steps along the inputs: `inputs` in f32, `inputs / 2` rounded up in bf16.
    steps: usize,
    /// `[outputs padded to TILE / 16][steps][16]`.
    data: Vec<u32>,
    /// Padded to the same width with zeros.
    bias: Vec<f32>,
}

impl Packed {
    /// Packs `w` (`inputs × outputs`, row-major) and `bias` (`outputs`), in bf16 when `bf16`.
    pub fn new(w: &[f32], inputs: usize, outputs: usize, bias: &[f32], bf16: bool) -> Self {
        assert_eq!(w.len(), inputs * outputs);
        assert_eq!(bias.len(), outputs);
        let steps = if bf16 { inputs.div_ceil(2) } else { inputs };
        let padded = outputs.next_multiple_of(TILE);
        let mut data = vec![0u32; padded * steps];
        for s in 0..steps {
            for c in 0..outputs {
                let v = if bf16 {
                    let lo = bf16_bits(w[2 * s * outputs + c]) as u32;
                    let hi = if 2 * s + 1 < inputs { bf16_bits(w[(2 * s + 1) * outputs + c]) as u32 } else { 0 };
                    lo | hi << 16
                } else {
                    w[s * outputs + c].to_bits()
                };
                data[((c / LANES) * steps + s) * LANES + c % LANES] = v;
            }
        }
        let mut bias = bias.to_vec();
        bias.resize(padded, 0.0);
        Self { bf16, inputs, outputs, steps, data, bias }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.data.len() + self.bias.len()) * 4
    }

    /// `x·W + b` for `x` `rows × inputs` (row-major), then exact GELU when `gelu`. Output
    /// columns are split over the current rayon pool's threads. Call only where
    /// [`f32_supported`] (f32) or [`bf16_supported`] (bf16) is true.
    pub fn forward(&self, x: &[f32], rows: usize, gelu: bool) -> Vec<f32> {
        assert!(if self.bf16 { bf16_supported() } else { f32_supported() }, "packed layers need AVX-512");
        assert_eq!(x.len(), rows * self.inputs);
        // In bf16 the input is rounded once; rows are padded to whole pairs.
        let xb = self.bf16.then(|| {
            let stride = 2 * self.steps;
            let mut xb = vec![0u16; rows * stride];
            for (src, dst) in x.chunks(self.inputs.max(1)).zip(xb.chunks_mut(stride)) {
                // SAFETY: AVX512-BF16 is present (asserted above).
                unsafe { round_row(src, &mut dst[..self.inputs]) };
            }
            xb
        });
        let n = self.outputs;
        // SAFETY: every tile's store writes its columns of every row block, and the tiles
        // and row blocks cover all of `y`.
        let mut y = unsafe { super::buffers::uninit(rows * n) };
        let tiles = n.div_ceil(TILE);
        let tasks = rayon::current_num_threads().clamp(1, tiles.max(1));
        let per = tiles.div_ceil(tasks);
        let blocks = row_blocks(rows);
        let out = SharedOut(y.as_mut_ptr());
        let run = |tile: usize, (r0, r): (usize, usize), (pf, pf_stride): (*const u8, usize)| {
            let c0 = tile * TILE;
            let w = self.data[tile * 2 * self.steps * LANES..].as_ptr();
            let job = Tile {
                w,
                steps: self.steps,
                b: self.bias[c0..].as_ptr(),
                y: out.at(r0 * n + c0),
                ys: n,
                cols: (n - c0).min(TILE),
                pf,
                pf_stride,
            };
            // SAFETY: the CPU has the kernel's features (asserted above). The kernel reads
            // rows r0..r0+r of the input (each `stride` long), two 16-column panels of
            // `data` and 32 of `bias` (both padded to whole tiles), and writes `cols`
            // columns from c0 of rows r0..r0+r of y: all inside their buffers. Tasks
            // write disjoint columns.
            unsafe {
                match &xb {
                    Some(xb) => tile_dispatch_bf16(r, xb.as_ptr().add(r0 * 2 * self.steps), 2 * self.steps, job),
                    None => tile_dispatch_f32(r, x.as_ptr().add(r0 * self.inputs), self.inputs, job),
                }
            }
            if gelu {
                // While the tile is still in L1: a pass over the whole output afterwards
                // read it back from memory.
                for row in r0..r0 + r {
                    // SAFETY: the tile just written; its task alone writes these columns.
                    let y = unsafe { std::slice::from_raw_parts_mut(out.at(row * n + c0), job.cols) };
                    super::fastmath::gelu_in_place(y);
                }
            }
        };
        (0..tasks).into_par_iter().for_each(|t| {
            let (t0, t1) = (t * per, ((t + 1) * per).min(tiles));
            if blocks.len() <= FEW_BLOCKS {
                for tile in t0..t1 {
                    // A short input reads each weight once, from memory: the next tile's
                    // weights are fetched into L2 while this one computes, spread over
                    // its first two row blocks (64 bytes a step each, or 128 with one block).
                    let next = (tile + 1 < t1).then(|| self.data[(tile + 1) * 2 * self.steps * LANES..].as_ptr() as *const u8);
                    for (i, &b) in blocks.iter().enumerate() {
                        let pf = match (next, blocks.len(), i) {
                            (Some(p), 1, _) => (p, 128),
                            (Some(p), _, 0) => (p, 64),
                            (Some(p), _, 1) => (p.wrapping_add(self.steps * 64), 64),
                            _ => (std::ptr::null(), 0),
                        };
                        run(tile, b, pf);
                    }
                }
            } else {
                blocks.iter().for_each(|&b| (t0..t1).for_each(|tile| run(tile, b, (std::ptr::null(), 0))));
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

/// One kernel call's weights and output: two consecutive 16-column panels of `steps` rows
/// at `w`, 32 biases at `b`, and the first `cols` of 32 columns written at `y`, rows `ys`
/// floats apart; and the weights it fetches into L2 for the next call.
#[derive(Clone, Copy)]
struct Tile {
    w: *const u32,
    steps: usize,
    b: *const f32,
    y: *mut f32,
    ys: usize,
    cols: usize,
    /// Where to prefetch from (null: nowhere), `pf_stride` bytes further each step.
    pf: *const u8,
    pf_stride: usize,
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
    unreachable!("packed layers need AVX-512")
}

/// Picks the kernel instance for `$r` rows (1..=MAX_ROWS) and runs it.
macro_rules! dispatch {
    ($kernel:ident, $r:expr, $($arg:expr),*) => {
        match $r {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            _ => $kernel::<12>($($arg),*),
        }
    };
}

unsafe fn tile_dispatch_f32(r: usize, x: *const f32, xs: usize, t: Tile) {
    #[cfg(target_arch = "x86_64")]
    dispatch!(tile_f32, r, x, xs, t);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed layers need AVX-512")
}

unsafe fn tile_dispatch_bf16(r: usize, x: *const u16, xs: usize, t: Tile) {
    #[cfg(target_arch = "x86_64")]
    dispatch!(tile_bf16, r, x, xs, t);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed layers need AVX-512")
}

/// Fetches step `k`'s share of the next call's weights into L2 (a prefetch never faults,
/// so the address needs no bounds).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(t: Tile, k: usize) {
    use std::arch::x86_64::*;
    if !t.pf.is_null() {
        let at = t.pf.wrapping_add(k * t.pf_stride) as *const i8;
        _mm_prefetch::<_MM_HINT_T1>(at);
        if t.pf_stride > 64 {
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(64));
        }
    }
}

/// Adds the bias to `R` rows of two accumulators and stores their first `t.cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store<const R: usize>(acc: &[[std::arch::x86_64::__m512; 2]; R], t: Tile) {
    use std::arch::x86_64::*;
    let (b0, b1) = (_mm512_loadu_ps(t.b), _mm512_loadu_ps(t.b.add(LANES)));
    let mask = |n: usize| -> __mmask16 {
        if n >= LANES {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    };
    let (m0, m1) = (mask(t.cols), mask(t.cols.saturating_sub(LANES)));
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(t.y.add(r * t.ys), m0, _mm512_add_ps(acc[0], b0));
        _mm512_mask_storeu_ps(t.y.add(r * t.ys + LANES), m1, _mm512_add_ps(acc[1], b1));
    }
}

/// `R` rows × 32 columns in f32: `y[r][c] = b[c] + Σ_k x[r][k]·w[k][c]`; `x` rows are `xs`
/// floats apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const R: usize>(x: *const f32, xs: usize, t: Tile) {
    use std::arch::x86_64::*;
    let (w0, w1) = (t.w as *const f32, t.w.add(t.steps * LANES) as *const f32);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for k in 0..t.steps {
        prefetch(t, k);
        let (a0, a1) = (_mm512_loadu_ps(w0.add(k * LANES)), _mm512_loadu_ps(w1.add(k * LANES)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * xs + k));
            acc[0] = _mm512_fmadd_ps(a0, xv, acc[0]);
            acc[1] = _mm512_fmadd_ps(a1, xv, acc[1]);
        }
    }
    store(&acc, t)
}

/// `R` rows × 32 columns in bf16: `y[r][c] = b[c] + Σ_p x[r][2p..2p+2]·w[2p..2p+2][c]`;
/// `x` rows are `xs` bf16 apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16<const R: usize>(x: *const u16, xs: usize, t: Tile) {
    use std::arch::x86_64::*;
    let (w0, w1) = (t.w, t.w.add(t.steps * LANES));
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..t.steps {
        prefetch(t, p);
        let a0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w0.add(p * LANES) as *const _));
        let a1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(p * LANES) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = (x.add(r * xs + 2 * p) as *const i32).read_unaligned();
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], a0, xv);
            acc[1] = _mm512_dpbf16_ps(acc[1], a1, xv);
        }
    }
    store(&acc, t)
}

/// `x·W + b` (then GELU) on a 2-D CPU f32 tensor with a packed weight, as a candle op; not
/// differentiable.
pub struct PackedLinear {
    pub weight: Arc<Packed>,
    pub gelu: bool,
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, z))) => &v[a..z],
            _ => candle_core::bail!("packed linear needs contiguous f32 input"),
        };
        if k != self.weight.inputs {
            candle_core::bail!("packed linear: {k} inputs, the weight has {}", self.weight.inputs);
        }
        let y = self.weight.forward(x, rows, self.gelu);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.weight.outputs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's sum in f64, with inputs and weights rounded to bf16 when `bf16`.
    fn reference(x: &[f32], w: &[f32], b: &[f32], (rows, k, n): (usize, usize, usize), bf16: bool) -> Vec<f64> {
        let round = |v: f32| if bf16 { half::bf16::from_f32(v).to_f64() } else { v as f64 };
        let mut y = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                y[r * n + c] = b[c] as f64 + (0..k).map(|i| round(x[r * k + i]) * round(w[i * n + c])).sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn both_formats_match_a_reference_for_odd_shapes() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let formats =
            [(false, f32_supported(), "packed-f32-avx512f", "AVX-512F"), (true, bf16_supported(), "packed-bf16-avx512bf16", "AVX512-BF16")];
        for (bf16, ok, id, needs) in formats {
            if !ok {
                crate::testing::skip(id, format!("this CPU has no {needs}"));
                continue;
            }
            for (rows, k, n) in [(1, 384, 1152), (20, 384, 384), (13, 37, 50), (25, 1536, 384), (3, 5, 2), (70, 64, 96)] {
                let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
                let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
                let b: Vec<f32> = (0..n).map(|_| next()).collect();
                let packed = Packed::new(&w, k, n, &b, bf16);
                let want = reference(&x, &w, &b, (rows, k, n), bf16);
                let got = packed.forward(&x, rows, false);
                let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
                let tolerance = if bf16 { 1e-3 } else { 1e-5 } * (k as f64).sqrt();
                assert!(worst < tolerance, "bf16 {bf16}, {rows}×{k}×{n}: off by {worst}");
                let with_gelu = packed.forward(&x, rows, true);
                let mut expect = got.clone();
                super::super::fastmath::gelu_in_place(&mut expect);
                assert_eq!(with_gelu, expect, "bf16 {bf16}, {rows}×{k}×{n}: GELU");
            }
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
