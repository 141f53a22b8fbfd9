//! Parity with Hugging Face transformers, both ways. Runs when a Python with torch and
//! transformers is found (`FINETUNED_PYTHON`, else `~/refbench-venv/bin/python`, else
//! `python3`); otherwise each test prints why it skipped.

mod common;

use candle_core::Device;
use finetuned::model::predictor::LoadedClassifier;
use finetuned::train::hyper::HyperparametersInput;
use finetuned::train::trainer::{self, Event, Observer, TrainRequest};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const TEXTS: &[&str] = &[
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish,",
    "it's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
    "x",
];

fn python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("FINETUNED_PYTHON").map(PathBuf::from).into_iter().collect();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join("refbench-venv/bin/python"));
    }
    candidates.push("python3".into());
    candidates.into_iter().find(|p| Command::new(p).args(["-c", "import torch, transformers"]).output().is_ok_and(|o| o.status.success()))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py")
}

fn hf_logits(py: &Path, model: &Path) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let texts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(texts.path(), serde_json::to_vec(TEXTS).unwrap()).unwrap();
    let out = Command::new(py).arg(script()).arg("logits").arg(model).arg(texts.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (serde_json::from_value(v["logits"].clone()).unwrap(), serde_json::from_value(v["ids"].clone()).unwrap())
}

fn our_logits(model: &Path) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let m = LoadedClassifier::load(model, &Device::Cpu).unwrap();
    let ids = m.tokenize(TEXTS, true).unwrap().unwrap();
    (m.logits(&ids, 8).unwrap(), ids)
}

fn assert_close(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f32 {
    let mut max = 0f32;
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            max = max.max((x - y).abs());
        }
    }
    assert!(max <= 1e-4, "max abs logit difference {max}");
    max
}

struct Quiet;
impl Observer for Quiet {
    fn on_event(&mut self, _: Event) {}
    fn should_stop(&self) -> bool {
        false
    }
}

#[test]
fn a_model_trained_here_gives_the_same_logits_in_transformers() {
    let Some(py) = python() else {
        eprintln!("skipped: no Python with torch and transformers (set FINETUNED_PYTHON)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = common::shared().join("models/all-minilm-l6-v2");
    let rows = |split: &str| {
        let bytes = std::fs::read(common::shared().join(format!("datasets/tiny/{split}.jsonl"))).unwrap();
        finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows
    };
    let hp = HyperparametersInput {
        epochs: Some(1),
        batch_size: Some(16),
        max_seq_len: Some(64),
        pooling: Some("cls".into()),
        ..Default::default()
    }
    .resolve("cls")
    .unwrap();
    let out = dir.path().join("trained");
    let mut req = TrainRequest::new(base, rows("train"), Some(rows("validation")), hp, Device::Cpu);
    req.out_dir = Some(out.clone());
    trainer::run(req, &mut Quiet).unwrap();
    let (ours, our_ids) = our_logits(&out);
    let (theirs, their_ids) = hf_logits(&py, &out);
    assert_eq!(our_ids, their_ids, "tokenisation differs");
    let max = assert_close(&ours, &theirs);
    eprintln!("export parity: max abs logit difference {max:e}");
}

#[test]
fn a_classifier_saved_by_transformers_serves_with_the_same_logits() {
    let Some(py) = python() else {
        eprintln!("skipped: no Python with torch and transformers (set FINETUNED_PYTHON)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf-classifier");
    let base = common::shared().join("models/all-minilm-l6-v2");
    let status = Command::new(&py).arg(script()).arg("make").arg(&base).arg("3").arg(&out).status().unwrap();
    assert!(status.success());
    let info = finetuned::model::artifacts::inspect(&out).unwrap();
    assert_eq!(info.labels.unwrap(), vec!["label_0", "label_1", "label_2"], "listed as a classifier");
    let (ours, _) = our_logits(&out);
    let (theirs, _) = hf_logits(&py, &out);
    let max = assert_close(&ours, &theirs);
    eprintln!("import parity: max abs logit difference {max:e}");
}

#[test]
fn a_model_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    use finetuned::model::layers::Mode;
    use finetuned::model::mlm::MaskedLm;
    use finetuned::train::mlm::{self, MlmRequest, Start};
    let Some(py) = python() else {
        eprintln!("skipped: no Python with torch and transformers (set FINETUNED_PYTHON)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = common::shared().join("models/all-minilm-l6-v2");
    let bytes = std::fs::read(common::shared().join("datasets/tiny/train.jsonl")).unwrap();
    let rows = finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows;
    let hp =
        HyperparametersInput { epochs: Some(1), batch_size: Some(32), max_seq_len: Some(64), ..Default::default() }.resolve("cls").unwrap();
    let out = dir.path().join("mlm");
    let req = MlmRequest {
        start: Start::Checkpoint(base),
        train_rows: rows,
        validation_rows: None,
        hp,
        device: Device::Cpu,
        out_dir: Some(out.clone()),
        mask_prob: 0.15,
        checkpoints: None,
        precision: finetuned::train::precision::Precision::F32,
    };
    mlm::run(req, &mut Quiet).unwrap();

    let text = "the movie was a [MASK] surprise.";
    let o = Command::new(&py).arg(script()).arg("mlm").arg(&out).arg(text).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    let theirs: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();

    let weights = finetuned::model::artifacts::load_weights(&out, &Device::Cpu).unwrap();
    let cfg = finetuned::model::artifacts::inspect(&out).unwrap().config;
    let model = MaskedLm::load(&|n| weights.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(n.into())), &cfg).unwrap();
    let batch = finetuned::model::tokenize::pad_batch(&[ids.as_slice()], 0, &Device::Cpu).unwrap();
    let rows = candle_core::Tensor::new((0..ids.len() as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let ours: Vec<Vec<f32>> = model
        .forward(&batch.ids, &batch.type_ids, &batch.mask, &rows, &mut Mode::Eval)
        .unwrap()
        .narrow(1, 0, 1000)
        .unwrap()
        .to_vec2()
        .unwrap();
    let max = assert_close(&ours, &theirs);
    eprintln!("masked-LM parity: max abs logit difference {max:e}");
}
