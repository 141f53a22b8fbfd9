//! Our rotary embedding rotates as transformers' ModernBERT does (`ModernBertRotaryEmbedding`
//! and `apply_rotary_pos_emb`) at 1,024 positions, with the global and the local theta: against
//! a golden file, and live where a Python has transformers.

#[path = "parity/golden.rs"]
mod golden;

use candle_core::{Device, Tensor};
use finetuned::model::ops::rotary::{rotary, RopeTable};
use std::path::Path;
use std::process::Command;

const SEQ: usize = 1024;
const HEAD_DIM: usize = 8;
const THETAS: [f64; 2] = [160_000.0, 10_000.0];

fn theirs() -> (golden::Answer, &'static str) {
    let Some(py) = golden::python() else {
        eprintln!("rope: no Python with transformers here; golden file only");
        return (golden::read("modernbert-rope"), "the golden file");
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py");
    let args = [SEQ.to_string(), HEAD_DIM.to_string(), THETAS[0].to_string(), THETAS[1].to_string()];
    let out = Command::new(py).arg(script).arg("rope").args(args).output().unwrap();
    assert!(out.status.success(), "hf.py rope: {}", String::from_utf8_lossy(&out.stderr));
    let answer: golden::Answer = serde_json::from_slice(&out.stdout).unwrap();
    if golden::writing() {
        golden::write("modernbert-rope", &answer);
    }
    (answer, "transformers live")
}

#[test]
fn rotary_embedding_matches_modernberts_at_1024_positions_with_both_thetas() {
    let x: Vec<f32> = (0..SEQ * HEAD_DIM)
        .map(|n| ((n / HEAD_DIM) as f32 * 0.37 + (n % HEAD_DIM) as f32 * 0.11).sin() + 0.01 * (n % HEAD_DIM) as f32)
        .collect();
    let x = Tensor::from_vec(x, (1, SEQ, HEAD_DIM), &Device::Cpu).unwrap();
    let ours: Vec<Vec<f32>> = THETAS
        .iter()
        .map(|&theta| rotary(&x, &RopeTable::new(SEQ, HEAD_DIM, theta)).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let (theirs, source) = theirs();
    let diff = golden::max_diff(&ours, &theirs.logits);
    eprintln!("rope: {SEQ} positions, thetas {THETAS:?}: max difference {diff:e} from {source}");
    assert!(diff < 1e-4, "our rotation differs from {source}'s by {diff}");
}
