//! How far bf16 weights move a classifier's outputs: logits of every text in a JSONL file
//! (`{"text", "label"}` lines) with f32 and with bf16 weights, the largest difference, how
//! often the predicted label agrees, and the accuracy of each:
//! `cargo run --release --example bf16_agreement -- MODEL TEXTS.jsonl`.

use candle_core::Device;
use finetuned::model::predict::predictor::{LoadedClassifier, Weights};

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&args[2])?.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap_or("")).collect();
    let f32m = LoadedClassifier::load_as(args[1].as_ref(), &Device::Cpu, Weights::F32)?;
    let bf16m = LoadedClassifier::load_as(args[1].as_ref(), &Device::Cpu, Weights::Bf16)?;
    let seqs = f32m.tokenize(&texts, true)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (a, b) = (f32m.logits(&seqs, 32)?, bf16m.logits(&seqs, 32)?);
    let label = |r: &serde_json::Value| match &r["label"] {
        serde_json::Value::String(s) => f32m.labels.iter().position(|l| l == s),
        v => v.as_u64().map(|i| i as usize),
    };
    let (mut worst, mut agree, mut right_a, mut right_b) = (0f32, 0, 0, 0);
    for ((x, y), r) in a.iter().zip(&b).zip(&rows) {
        worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
        let (pa, pb) = (argmax(x), argmax(y));
        agree += usize::from(pa == pb);
        right_a += usize::from(label(r) == Some(pa));
        right_b += usize::from(label(r) == Some(pb));
    }
    let n = rows.len() as f64;
    println!(
        "{} texts: max |logit f32 − bf16| {worst:.4}; same label {:.2} %; accuracy f32 {:.4}, bf16 {:.4}",
        rows.len(),
        100.0 * agree as f64 / n,
        right_a as f64 / n,
        right_b as f64 / n
    );
    Ok(())
}
