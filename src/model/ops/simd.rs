//! Runtime CPU dispatch for our kernels. The crate builds for baseline x86-64 (so one
//! binary runs anywhere), which leaves loops on 4-wide SSE2; `simd_kernel!` compiles a
//! kernel body again for AVX-512 and for AVX2+FMA and picks the best the CPU has.

/// Defines `fn name(args)` whose body is compiled three times (AVX-512, AVX2+FMA,
/// baseline) and dispatched on the running CPU's features.
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($a: $t),*) { inner($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) { inner($($a),*) }
                // SAFETY: each version runs only on a CPU that has its features.
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return unsafe { v4($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return unsafe { v3($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}

pub(crate) use simd_kernel;
