//! Arithmetic rate of the packed inference kernel on MiniLM's dense layers, with the weights
//! hot (one layer's four matrices, used over and over: they stay in cache) or cold (six
//! layers' distinct matrices in turn, as a forward pass reads them):
//!
//! `cargo run --release --example packed_rate -- [THREADS]`
//!
//! For each row count it prints the milliseconds of one six-layer pass and its GFLOP/s, in
//! f32 and (where the CPU has AVX512-BF16) bf16. If cold is much slower than hot, the pass is
//! bound by reading the weights from memory, not by arithmetic.

use finetuned::model::ops::packed::{bf16_supported, f32_supported, Packed};
use std::time::Instant;

/// (inputs, outputs, GELU) of one MiniLM layer's dense products.
const LAYER: [(usize, usize, bool); 4] = [(384, 1152, false), (384, 384, false), (384, 1536, true), (1536, 384, false)];
const LAYERS: usize = 6;

fn weights(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Milliseconds of one pass (median of `reps`) over `layers`, each a list of the four products.
fn pass_ms(layers: &[Vec<(Packed, bool)>], rows: usize, reps: usize) -> f64 {
    let x: Vec<f32> = weights(1, rows * 1536);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for l in 0..LAYERS {
                for (p, (k, _, _)) in layers[l % layers.len()].iter().zip(LAYER) {
                    std::hint::black_box(p.0.forward(&x[..rows * k], rows, p.1));
                }
            }
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let threads: usize = std::env::args().nth(1).map(|t| t.parse().expect("THREADS")).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let flop_per_row: f64 = LAYER.iter().map(|&(k, n, _)| 2.0 * (k * n) as f64).sum::<f64>() * LAYERS as f64;
    for (bf16, ok) in [(false, f32_supported()), (true, bf16_supported())] {
        if !ok {
            println!("{}: this CPU lacks the instructions", if bf16 { "bf16" } else { "f32" });
            continue;
        }
        let build = |layer: usize| -> Vec<(Packed, bool)> {
            LAYER
                .iter()
                .enumerate()
                .map(|(i, &(k, n, gelu))| (Packed::new(&weights((layer * 4 + i) as u64 + 7, k * n), k, n, &vec![0.0; n], bf16), gelu))
                .collect()
        };
        let hot = vec![build(0)];
        let cold: Vec<_> = (0..LAYERS).map(build).collect();
        let mib = cold.iter().flatten().map(|p| p.0.bytes()).sum::<usize>() as f64 / (1 << 20) as f64;
        println!("{}: six layers' weights {mib:.1} MiB, {threads} threads", if bf16 { "bf16" } else { "f32" });
        println!("{:>5} {:>10} {:>10} {:>10} {:>10}", "rows", "hot ms", "GFLOP/s", "cold ms", "GFLOP/s");
        pool.install(|| {
            for rows in [1, 8, 20, 64, 256] {
                let reps = if rows >= 64 { 15 } else { 41 };
                let (h, c) = (pass_ms(&hot, rows, reps), pass_ms(&cold, rows, reps));
                let rate = |ms: f64| flop_per_row * rows as f64 / ms / 1e6;
                println!("{rows:>5} {h:>10.3} {:>10.1} {c:>10.3} {:>10.1}", rate(h), rate(c));
            }
        });
    }
}
