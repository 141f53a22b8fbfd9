//! A batch of texts of different lengths runs packed without padding (see
//! `model::ops::varlen`): each text's logits are the ones it gets alone, for every architecture
//! of the BERT family and ModernBERT (rotary positions from 0 in each text, local windows), with
//! `[CLS]` and mean pooling, single texts and pairs with token types, in f32 and with bf16 weights.

use candle_core::Device;
use finetuned::model::hf::tokenize::pad_batch_typed;
use finetuned::model::predict::predictor::{LoadedClassifier, Weights};
use std::path::{Path, PathBuf};

const ARCHS: [&str; 7] = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "modernbert"];

const TEXTS: [&str; 6] = [
    "a",
    "the plot was awful and the acting worse",
    "a great superb film",
    "Ünïcödé, emoji 🎉 and 中文 side by side in a longer sentence than the others are",
    "ok",
    "the same length as another",
];

fn golden(arch: &str, part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden").join(arch).join(part)
}

/// Each sequence's logits from a forward pass of its own (one row: no padding, no packing).
fn alone(m: &LoadedClassifier, seqs: &[Vec<u32>], types: &[Vec<u32>]) -> Vec<Vec<f32>> {
    seqs.iter()
        .zip(types.iter().map(Vec::as_slice).chain(std::iter::repeat(&[][..])))
        .map(|(s, t)| {
            let b = pad_batch_typed(&[s.as_slice()], &[t], 0, &Device::Cpu).unwrap();
            m.forward(&b.ids, &b.type_ids, &b.mask).unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec2::<f32>().unwrap().remove(0)
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn check(m: &LoadedClassifier, what: &str, tol: f32) {
    assert!(m.unpadded(), "{what}: the batch runs packed");
    let seqs = m.tokenize(&TEXTS, true).unwrap().unwrap();
    assert!(seqs.iter().map(Vec::len).max() > seqs.iter().map(Vec::len).min(), "lengths differ");
    // Batches of 4: the last one is shorter, and the texts are reordered by length inside.
    let d = max_diff(&m.logits(&seqs, 4).unwrap(), &alone(m, &seqs, &[]));
    assert!(d <= tol, "{what}: packed batch against alone: {d}");
    let pairs: Vec<(&str, &str)> = TEXTS.iter().zip(TEXTS.iter().rev()).map(|(a, b)| (*a, *b)).collect();
    let typed = m.tokenize_pairs(&pairs, finetuned::model::predict::predictor::Overflow::Truncate).unwrap().unwrap();
    let (seqs, types): (Vec<_>, Vec<_>) = typed.into_iter().unzip();
    let d = max_diff(&m.logits_typed(&seqs, &types, 8).unwrap(), &alone(m, &seqs, &types));
    assert!(d <= tol, "{what}: packed pairs against alone: {d}");
}

#[test]
fn a_packed_batch_gives_each_text_the_logits_it_gets_alone() {
    for arch in ARCHS {
        let m = LoadedClassifier::load(&golden(arch, "classifier"), &Device::Cpu).unwrap();
        check(&m, &format!("{arch} classifier"), 1e-5);
        // The same classifier with its head over the mean of the last hidden states.
        let tmp = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(golden(arch, "classifier")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
        let cfg_path = tmp.path().join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["finetuned_pooling"] = "mean".into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let mean = LoadedClassifier::load(tmp.path(), &Device::Cpu).unwrap();
        check(&mean, &format!("{arch} mean"), 1e-5);
        let (a, b) = (
            mean.logits(&mean.tokenize(&TEXTS, true).unwrap().unwrap(), 8).unwrap(),
            m.logits(&m.tokenize(&TEXTS, true).unwrap().unwrap(), 8).unwrap(),
        );
        assert!(max_diff(&a, &b) > 1e-3, "{arch}: mean pooling is not [CLS] pooling");
    }
}

#[test]
fn with_bf16_weights_the_packed_batch_matches_too() {
    for arch in ["bert", "roberta"] {
        let m = LoadedClassifier::load_as(&golden(arch, "classifier"), &Device::Cpu, Weights::Bf16).unwrap();
        check(&m, &format!("{arch} bf16"), 1e-4);
    }
}
