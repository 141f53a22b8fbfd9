//! The dropout masks' random bits: a counter-based generator, so any element's bit can be drawn
//! on its own from `(seed, index)`. The CPU kernels, the device-generic ops and the CUDA kernels
//! all draw the same mask from the same seed, whatever the thread or block layout: a run
//! resumes exactly on any device, and the CPU and GPU paths can be compared element by element.

/// The `index`-th output of SplitMix64 started at `seed`, upper 32 bits. The CUDA kernels in
/// `kernels/finetuned.cu` compute the same function.
#[inline(always)]
pub fn bits(seed: u64, index: u64) -> u32 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// Dropout with probability `p`: an element is kept when its [`bits`] are below the returned
/// threshold, and a kept element is scaled by the returned factor `1/(1-p)`.
pub fn keep_rule(p: f64) -> (u32, f32) {
    let keep = 1.0 - p;
    ((keep * u32::MAX as f64) as u32, (1.0 / keep) as f32)
}

/// Whether element `index` survives dropout drawn from `seed` under threshold `keep_below`.
#[inline(always)]
pub fn kept(seed: u64, index: u64, keep_below: u32) -> bool {
    bits(seed, index) < keep_below
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_uniform_enough_for_dropout_and_depend_on_seed_and_index() {
        let (keep_below, scale) = keep_rule(0.1);
        let n = 200_000u64;
        let kept_count = (0..n).filter(|&i| kept(7, i, keep_below)).count() as f64;
        assert!((kept_count / n as f64 - 0.9).abs() < 0.005, "kept fraction {}", kept_count / n as f64);
        assert!((scale - 1.0 / 0.9).abs() < 1e-6);
        assert_ne!(bits(7, 0), bits(8, 0));
        assert_ne!(bits(7, 0), bits(7, 1));
        // Neighbouring seeds (one per dropout site) must not give shifted copies of one stream.
        let same = (0..1000u64).filter(|&i| bits(7, i + 1) == bits(8, i)).count();
        assert_eq!(same, 0);
        // Known values pin the function: the CUDA kernel computes the same ones.
        assert_eq!(bits(0, 0), 0xE220_A839);
    }
}
