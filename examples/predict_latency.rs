//! In-process single-text latency and batch-32 throughput of a classifier, measured the way
//! `predict_ref.py` measures them (each timing includes tokenization):
//!
//! `cargo run --release --example predict_latency -- MODEL SHORT.jsonl [THREADS] [f32|bf16] [POOL.jsonl]`
//!
//! SHORT.jsonl holds the texts timed one at a time (`bench/short_texts.py` writes the ones
//! `predict_ref.py` uses); with POOL.jsonl, its texts also run in batches of 32.

use candle_core::Device;
use finetuned::model::predict::predictor::{LoadedClassifier, Weights};
use std::time::Instant;

fn texts(path: &str) -> anyhow::Result<Vec<String>> {
    let text = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok()?.get("text")?.as_str().map(String::from);
    Ok(std::fs::read_to_string(path)?.lines().filter_map(text).collect())
}

fn main() -> anyhow::Result<()> {
    // As `finetuned` itself starts: candle's own element-wise thread pool off.
    finetuned::compute::init_process();
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let weights = Weights::parse(args.get(4).map_or("f32", String::as_str)).ok_or_else(|| anyhow::anyhow!("f32 or bf16"))?;
    let model = LoadedClassifier::load_as(args[1].as_ref(), &Device::Cpu, weights)?;
    let short = texts(&args[2])?;
    let batches = args.get(5).map(|p| texts(p)).transpose()?;
    // Run on the pool's own thread, as the server's batcher does.
    pool.install(|| {
        single(&model, &short)?;
        if let Some(b) = &batches {
            batch32(&model, b)?;
        }
        Ok(())
    })
}

fn single(model: &LoadedClassifier, texts: &[String]) -> anyhow::Result<()> {
    let run = |t: &str| -> anyhow::Result<()> {
        let s = model.tokenize(&[t], true)?.map_err(|e| anyhow::anyhow!("{e}"))?;
        model.logits(&s, 1)?;
        Ok(())
    };
    for t in texts.iter().take(10) {
        run(t)?;
    }
    // ROUNDS in the environment times every text that many times (default once).
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let mut ms = Vec::new();
    for _ in 0..rounds {
        for t in texts {
            let t0 = Instant::now();
            run(t)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p) as usize];
    println!("single text: p50 {:.3} ms (p10 {:.3}, p90 {:.3}) over {} texts", q(0.5), q(0.1), q(0.9), ms.len());
    Ok(())
}

fn batch32(model: &LoadedClassifier, texts: &[String]) -> anyhow::Result<()> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let run = |b: &[&str]| -> anyhow::Result<()> {
        let s = model.tokenize(b, true)?.map_err(|e| anyhow::anyhow!("{e}"))?;
        model.logits(&s, 32)?;
        Ok(())
    };
    for b in refs.chunks(32).take(3) {
        run(b)?;
    }
    let t0 = Instant::now();
    for b in refs.chunks(32) {
        run(b)?;
    }
    println!("batch 32: {:.1} texts/s over {} texts", refs.len() as f64 / t0.elapsed().as_secs_f64(), refs.len());
    Ok(())
}
