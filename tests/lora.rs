//! LoRA adapters in peft's layout: one trained with peft serves here with peft's logits. The
//! adapter and peft's answer are golden files (`tests/parity/golden/peft*`, made by
//! `tests/parity/regenerate.sh`); where a Python with torch, transformers and peft is found, a
//! fresh adapter is trained and compared live too.

mod common;
#[path = "parity/golden.rs"]
#[allow(dead_code)]
mod golden;

use candle_core::Device;
use finetuned::model::predictor::LoadedClassifier;
use golden::Answer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const TEXTS: &[&str] =
    &["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés,", "unflinchingly bleak and desperate", "x"];

fn base() -> PathBuf {
    common::shared().join("models/all-minilm-l6-v2")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py")
}

/// A models dir as a user lays it out: the base under its own name, the adapter beside it.
fn models_dir(adapter: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(base(), dir.path().join("all-minilm-l6-v2")).unwrap();
    let to = dir.path().join("peft-tiny");
    std::fs::create_dir(&to).unwrap();
    for f in [finetuned::model::lora::ADAPTER_CONFIG, finetuned::model::lora::ADAPTER_WEIGHTS] {
        std::fs::copy(adapter.join(f), to.join(f)).unwrap();
    }
    dir
}

fn ours(adapter: &Path) -> Answer {
    let m = LoadedClassifier::load(adapter, &Device::Cpu).unwrap();
    assert_eq!(m.labels, ["LABEL_0", "LABEL_1"], "a peft adapter without config.json has transformers' label names");
    let ids = m.tokenize(TEXTS, true).unwrap().unwrap();
    Answer { logits: m.logits(&ids, 8).unwrap(), ids, layout: Value::Null, versions: Value::Null }
}

fn peft_python() -> Option<PathBuf> {
    golden::python().filter(|py| Command::new(py).args(["-c", "import peft"]).output().is_ok_and(|o| o.status.success()))
}

#[test]
fn an_adapter_trained_with_peft_serves_with_peft_logits() {
    if let Some(py) = peft_python() {
        let made = tempfile::tempdir().unwrap();
        let adapter = made.path().join("adapter");
        let data = common::shared().join("datasets/tiny/train.jsonl");
        let status = Command::new(&py).arg(script()).arg("peft-make").arg(base()).arg(&data).arg(&adapter).status().unwrap();
        assert!(status.success());
        let texts = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(texts.path(), serde_json::to_vec(TEXTS).unwrap()).unwrap();
        let out = Command::new(&py).arg(script()).arg("peft-logits").arg(base()).arg(&adapter).arg(texts.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let theirs: Answer = serde_json::from_slice(&out.stdout).unwrap();
        let models = models_dir(&adapter);
        golden::assert_matches("peft", "peft live", &ours(&models.path().join("peft-tiny")), &theirs);
        if golden::writing() {
            let to = golden::dir().join("peft-adapter");
            std::fs::create_dir_all(&to).unwrap();
            for f in [finetuned::model::lora::ADAPTER_CONFIG, finetuned::model::lora::ADAPTER_WEIGHTS] {
                std::fs::copy(adapter.join(f), to.join(f)).unwrap();
            }
            golden::write("peft", &theirs);
        }
    } else {
        eprintln!("parity peft: no Python with torch, transformers and peft here; golden files only");
    }
    let models = models_dir(&golden::dir().join("peft-adapter"));
    golden::assert_matches("peft", "the golden file", &ours(&models.path().join("peft-tiny")), &golden::read("peft"));
}

#[test]
fn an_adapter_whose_base_is_missing_is_refused_with_its_name() {
    let models = models_dir(&golden::dir().join("peft-adapter"));
    std::fs::remove_file(models.path().join("all-minilm-l6-v2")).unwrap();
    let err = LoadedClassifier::load(&models.path().join("peft-tiny"), &Device::Cpu).err().expect("no base, no model");
    assert!(format!("{err:#}").contains("sentence-transformers/all-MiniLM-L6-v2"), "{err:#}");
}

#[test]
fn merging_adds_the_scaled_low_rank_product() {
    use candle_core::Tensor;
    let models = models_dir(&golden::dir().join("peft-adapter"));
    let adapter = finetuned::model::lora::Adapter::load(&models.path().join("peft-tiny"), &Device::Cpu).unwrap();
    assert_eq!(adapter.pairs.len(), 18, "query, value and intermediate.dense in 6 layers");
    let name = "encoder.layer.0.attention.self.query.weight";
    let mut weights = finetuned::model::artifacts::load_weights(&base(), &Device::Cpu).unwrap();
    let before = weights[name].clone();
    adapter.merge_into(&mut weights).unwrap();
    let (a, b) = &adapter.pairs[name];
    let expected = (before + (b.matmul(a).unwrap() * adapter.config.scale()).unwrap()).unwrap();
    let diff: f32 = (&weights[name] - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff < 1e-6, "{diff}");
    assert_eq!(adapter.config.scale(), 2.0, "alpha 8 over rank 4");
    let _: &Tensor = &weights["classifier.weight"];
}
