//! Golden files for the parity tests: what transformers answered, kept in `tests/parity/golden/`
//! so the tests compare against it on machines without torch. `tests/parity/regenerate.sh` writes
//! them (it runs these tests live with `FINETUNED_PARITY_WRITE=1`).

#![allow(dead_code)] // each test crate uses a part of it

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What one side (ours, transformers live, or the golden file) answers for one parity case.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    /// Token ids per text.
    pub ids: Vec<Vec<u32>>,
    /// Logits per text (or per token for the masked LM).
    pub logits: Vec<Vec<f32>>,
    /// For golden files: the model's layout transformers loaded with no missing or unexpected
    /// keys (config fields and tensor shapes); `null` where the case has none.
    #[serde(default)]
    pub layout: Value,
    /// For golden and live answers: the versions of torch and transformers that gave them.
    #[serde(default)]
    pub versions: Value,
}

/// The folder of the golden files.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden")
}

/// The golden answer of case `name`; panics with how to make it when it is missing.
pub fn read(name: &str) -> Answer {
    let path = dir().join(format!("{name}.json"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; make it with tests/parity/regenerate.sh", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Writes `answer` as the golden answer of case `name`.
pub fn write(name: &str, answer: &Answer) {
    std::fs::create_dir_all(dir()).unwrap();
    std::fs::write(dir().join(format!("{name}.json")), serde_json::to_string_pretty(answer).unwrap() + "\n").unwrap();
}

/// The Python to ask live: `FINETUNED_PYTHON`, else `~/refbench-venv/bin/python`, else
/// `python3`, the first that imports torch and transformers.
pub fn python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("FINETUNED_PYTHON").map(PathBuf::from).into_iter().collect();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join("refbench-venv/bin/python"));
    }
    candidates.push("python3".into());
    candidates.into_iter().find(|p| Command::new(p).args(["-c", "import torch, transformers"]).output().is_ok_and(|o| o.status.success()))
}

/// Whether this run rewrites the golden files (`FINETUNED_PARITY_WRITE=1`; needs Python).
pub fn writing() -> bool {
    std::env::var("FINETUNED_PARITY_WRITE").is_ok_and(|v| v == "1")
}

/// The largest absolute difference between two sets of logits; panics if their shapes differ.
pub fn max_diff(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "number of rows");
    let mut max = 0f32;
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.len(), b.len(), "row length");
        for (x, y) in a.iter().zip(b) {
            max = max.max((x - y).abs());
        }
    }
    max
}

/// Asserts that `ours` matches `theirs` (same ids, logits within 1e-4, same layout where `theirs`
/// has one) and prints the comparison, so that a CI log shows it ran.
pub fn assert_matches(case: &str, source: &str, ours: &Answer, theirs: &Answer) {
    assert_eq!(ours.ids, theirs.ids, "{case}: token ids differ from {source}'s");
    if !theirs.layout.is_null() {
        assert_eq!(ours.layout, theirs.layout, "{case}: the exported layout differs from the one {source} loaded");
    }
    let max = max_diff(&ours.logits, &theirs.logits);
    eprintln!(
        "parity {case}: {} rows against {source} (transformers {}), max abs logit difference {max:e}",
        ours.logits.len(),
        theirs.versions["transformers"].as_str().unwrap_or("?")
    );
    assert!(max <= 1e-4, "{case}: max abs logit difference {max} against {source}");
}

/// A model dir's layout as transformers reads it: the config fields that decide the class and
/// head, and every tensor's name and shape.
pub fn layout(model: &Path) -> Value {
    let config: Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    let fields: BTreeMap<&str, Value> =
        ["architectures", "model_type", "id2label", "label2id", "hidden_size", "num_hidden_layers", "vocab_size"]
            .into_iter()
            .map(|k| (k, config.get(k).cloned().unwrap_or(Value::Null)))
            .collect();
    let tensors = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = tensors.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
    serde_json::json!({"config": fields, "tensors": shapes})
}

/// Rebuilds, in `out`, the classifier that transformers saved when the golden files were made:
/// its small files and the tensors that differ from the base are in `golden/import/`, every other
/// tensor is the base's own (transformers saved it unchanged, under the `bert.` prefix).
pub fn rebuild_import(base: &Path, out: &Path) {
    let src = dir().join("import");
    std::fs::create_dir_all(out).unwrap();
    let files: Vec<String> = serde_json::from_slice(&std::fs::read(src.join("files.json")).unwrap()).unwrap();
    for f in files {
        let from = if src.join(&f).exists() { src.join(&f) } else { base.join(&f) };
        std::fs::copy(&from, out.join(&f)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    let names: BTreeMap<String, Vec<usize>> = serde_json::from_slice(&std::fs::read(src.join("names.json")).unwrap()).unwrap();
    let extra = candle_core::safetensors::load(src.join("extra.safetensors"), &Device::Cpu).unwrap();
    let base_tensors = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in names {
        let t = extra.get(&name).or_else(|| base_tensors.get(name.strip_prefix("bert.").unwrap_or(&name))).cloned();
        let t = t.unwrap_or_else(|| panic!("{name}: neither in the golden extras nor in the base"));
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
}
