//! In-process single-text latency and batch-32 throughput of a classifier, the way
//! `predict_ref.py` measures them: `cargo run --release --example predict_latency -- MODEL TEXTS.jsonl [THREADS] [f32|bf16]`.

use candle_core::Device;
use finetuned::model::predictor::{LoadedClassifier, Weights};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let weights = Weights::parse(args.get(4).map_or("f32", String::as_str))
        .ok_or_else(|| anyhow::anyhow!("f32 or bf16"))?;
    let model = LoadedClassifier::load_as(args[1].as_ref(), &Device::Cpu, weights)?;
    let texts: Vec<String> = std::fs::read_to_string(&args[2])?
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("text")?
                .as_str()
                .map(String::from)
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let seqs = model
        .tokenize(&refs, true)?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Run on the pool's own thread, as the server's batcher does.
    pool.install(|| run(&model, &refs, &seqs))
}

fn run(model: &LoadedClassifier, refs: &[&str], seqs: &[Vec<u32>]) -> anyhow::Result<()> {
    for s in seqs.iter().take(10) {
        model.logits(std::slice::from_ref(s), 1)?;
    }
    let mut ms = Vec::new();
    for t in refs {
        let t0 = Instant::now();
        let s = model
            .tokenize(&[t], true)?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        model.logits(&s, 1)?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!(
        "single text: p50 {:.3} ms (min {:.3}, p10 {:.3}, p90 {:.3}), mean tokens {:.1}",
        q(0.5),
        ms[0],
        q(0.1),
        q(0.9),
        tokens as f64 / seqs.len() as f64
    );
    Ok(())
}
