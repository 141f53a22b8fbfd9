//! Branch-free `exp` and `erf` for f32 that the compiler vectorises. libm's `erff` and
//! `expf` are scalar calls; in GELU and softmax they took more time than the matrix
//! multiplies around them. Both stay within 1e-6 of the exact values. Also the element-wise
//! GELU (and its derivative) and LayerNorm's row statistics that the fused kernels, the dense
//! layers and the device-generic ops share.

use super::simd::simd_kernel;

/// e^x for f32, relative error below 2e-7 over the whole range (inputs below -87 give 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // e^x = 2^n · e^r with n = round(x·log2 e) and |r| ≤ ln2/2; e^r from its Taylor series
    // (degree 7: the remainder (ln2/2)^8/8! is about 5e-9). ln 2 is split in two parts so
    // that x − n·ln2 keeps its low bits (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    //
    // n is rounded by adding 1.5·2²³: the sum's last mantissa bits then hold n (rounded to
    // nearest, ties to even, as `round_ties_even`), and 2^n is built from those bits with integer
    // adds and a shift. Rust's `n as i32` saturates and maps NaN to 0, which the compiler does
    // lane by lane in scalar code: with it, the exponent cost more than everything else here.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = k - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n lies in [-126, 127] after the clamp, so n + 127 is a normal exponent.
    let scale = f32::from_bits(k.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// erf(x) for f32, absolute error below 1e-6 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_given_exp(x, exp(-x * x))
}

/// erf(x) given `e = exp(-x²)`, for callers that need that exponential themselves (GELU's
/// derivative): one `exp` instead of two.
#[inline(always)]
pub fn erf_given_exp(x: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * e).copysign(x)
}

const SQRT_2_INV: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

simd_kernel! {
    /// Exact GELU in place.
    pub(super) fn gelu_in_place(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * SQRT_2_INV));
        }
    }
}

simd_kernel! {
    /// GELU's derivative at `x` times the incoming gradient `g`, into `out`.
    pub(super) fn gelu_grad_chunk(x: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            // exp(-x²/2) is both erf(x/√2)'s exponential and the density's.
            let e = exp(-0.5 * x * x);
            let cdf = 0.5 * (1.0 + erf_given_exp(x * SQRT_2_INV, e));
            *o = g * (cdf + x * INV_SQRT_2PI * e);
        }
    }
}

simd_kernel! {
    /// Exact GELU of `y` in place, and its derivative at the same points into `d`.
    pub(super) fn gelu_with_grad(y: &mut [f32], d: &mut [f32]) {
        for (v, d) in y.iter_mut().zip(d.iter_mut()) {
            let x = *v;
            let a = x * SQRT_2_INV;
            let e = exp(-a * a);
            let erf = erf_given_exp(a, e);
            // The same rounding as `gelu_in_place`.
            *v = 0.5 * x * (1.0 + erf);
            *d = 0.5 * (1.0 + erf) + x * INV_SQRT_2PI * e;
        }
    }
}

/// Σ g(v) over `x`, summed in 16 independent lanes: a serial f32 sum is a chain of dependent
/// scalar adds that the compiler may not reorder, so it neither vectorises nor pipelines.
#[inline(always)]
pub(super) fn sum_by(x: &[f32], g: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| g(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += g(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A row's mean and 1/sqrt(variance + eps), for LayerNorm. Inlined, so that a caller
/// compiled for AVX-512 (a [`simd_kernel`]) gets it vectorised for AVX-512 too.
#[inline(always)]
pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum_by(x, |v| v) / n;
    let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn row_stats_match_a_sum_in_f64() {
        for n in [1, 15, 16, 17, 384, 769] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + 3.0).collect();
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let (m, r) = row_stats(&x, 1e-5);
            assert!((m as f64 - mean).abs() < 1e-5, "n {n}: mean {m} against {mean}");
            let want = 1.0 / (var + 1e-5).sqrt();
            assert!((r as f64 - want).abs() < 1e-5 * want, "n {n}: rstd {r} against {want}");
        }
    }

    #[test]
    fn erf_matches_libm() {
        for i in -1000..=1000 {
            let x = i as f32 / 100.0;
            let (got, want) = (erf(x), libm::erf(x as f64) as f32);
            assert!((got - want).abs() < 1e-6, "erf({x}) = {got}, want {want}");
        }
    }
}
