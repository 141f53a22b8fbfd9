//! LoRA adapters in peft's layout: one trained with peft serves here with peft's logits. The
//! adapter and peft's answer are golden files (`tests/parity/golden/peft*`, made by
//! `tests/parity/regenerate.sh`); where a Python with torch, transformers and peft is found, a
//! fresh adapter is trained and compared live too.

mod common;
#[path = "parity/golden.rs"]
mod golden;

use candle_core::Device;
use finetuned::model::predict::predictor::LoadedClassifier;
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
    for f in [finetuned::model::hf::lora::ADAPTER_CONFIG, finetuned::model::hf::lora::ADAPTER_WEIGHTS] {
        std::fs::copy(adapter.join(f), to.join(f)).unwrap();
    }
    dir
}

fn ours(adapter: &Path) -> Answer {
    let m = LoadedClassifier::load(adapter, &Device::Cpu).unwrap();
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
            for f in [finetuned::model::hf::lora::ADAPTER_CONFIG, finetuned::model::hf::lora::ADAPTER_WEIGHTS] {
                std::fs::copy(adapter.join(f), to.join(f)).unwrap();
            }
            golden::write("peft", &theirs);
        }
    } else {
        eprintln!("parity peft: no Python with torch, transformers and peft here; golden files only");
    }
    let models = models_dir(&golden::dir().join("peft-adapter"));
    golden::assert_matches("peft", "the golden file", &ours(&models.path().join("peft-tiny")), &golden::read("peft"));
    let m = LoadedClassifier::load(&models.path().join("peft-tiny"), &Device::Cpu).unwrap();
    assert_eq!(m.labels, ["LABEL_0", "LABEL_1"], "a peft adapter without config.json has transformers' label names");
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
    let adapter = finetuned::model::hf::lora::Adapter::load(&models.path().join("peft-tiny"), &Device::Cpu).unwrap();
    assert_eq!(adapter.pairs.len(), 18, "query, value and intermediate.dense in 6 layers");
    let name = "encoder.layer.0.attention.self.query.weight";
    let mut weights = finetuned::model::hf::artifacts::load_weights(&base(), &Device::Cpu).unwrap();
    let before = weights[name].clone();
    adapter.merge_into(&mut weights).unwrap();
    let (a, b) = &adapter.pairs[name];
    let expected = (before + (b.matmul(a).unwrap() * adapter.config.scale()).unwrap()).unwrap();
    let diff: f32 = (&weights[name] - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff < 1e-6, "{diff}");
    assert_eq!(adapter.config.scale(), 2.0, "alpha 8 over rank 4");
    let _: &Tensor = &weights["classifier.weight"];
}

/// A batch whose rows use different adapters (and one row none) gives each row what a model
/// with that adapter merged into its weights gives it alone.
#[test]
fn a_mixed_adapter_batch_gives_each_row_its_own_adapters_result() {
    use finetuned::model::encoder::adapters::{LowRank, LowRankSet};
    use finetuned::model::encoder::classifier::{Classifier, Pooling};
    use finetuned::model::ops::layers::Mode;
    use std::collections::HashMap;
    let models = models_dir(&golden::dir().join("peft-adapter"));
    let first = finetuned::model::hf::lora::Adapter::load(&models.path().join("peft-tiny"), &Device::Cpu).unwrap();
    // A second adapter: the same pairs turned around and scaled, so its terms differ from the first's.
    let mut second = finetuned::model::hf::lora::Adapter::load(&models.path().join("peft-tiny"), &Device::Cpu).unwrap();
    for (a, b) in second.pairs.values_mut() {
        *a = (a.clone() * -3.0).unwrap();
        *b = (b.clone() * 0.5).unwrap();
    }
    let base = finetuned::model::hf::artifacts::load_weights(&base(), &Device::Cpu).unwrap();
    let cfg = finetuned::model::hf::artifacts::inspect(&self::base()).unwrap().config;
    let build = |weights: &HashMap<String, candle_core::Tensor>| {
        let mut w = weights.clone();
        for (k, v) in &first.replaced {
            w.insert(k.clone(), v.clone());
        }
        let mut m = Classifier::load(&|n| w.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(n.into())), &cfg, Pooling::Cls).unwrap();
        m.prepare_for_inference(false).unwrap();
        m
    };
    let merged = |adapter: &finetuned::model::hf::lora::Adapter| {
        let mut w = base.clone();
        adapter.merge_into(&mut w).unwrap();
        build(&w)
    };
    let tok = finetuned::model::hf::tokenize::load_tokenizer(&self::base()).unwrap();
    let ids = finetuned::model::hf::tokenize::encode_all(&tok, TEXTS).unwrap();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = finetuned::model::hf::tokenize::pad_batch(&refs, 0, &Device::Cpu).unwrap();
    let pooled = |m: &Classifier, lr: &LowRank| -> Vec<Vec<f32>> {
        m.pooled(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Eval, lr).unwrap().to_vec2().unwrap()
    };
    let (s1, s2) = (LowRankSet::from_adapter(&first), LowRankSet::from_adapter(&second));
    let mixed = pooled(&build(&base), &LowRank { groups: vec![(0..2, Some(&s1)), (2..3, Some(&s2)), (3..4, None)] });
    let alone = [
        pooled(&merged(&first), &LowRank::default()),
        pooled(&merged(&second), &LowRank::default()),
        pooled(&build(&base), &LowRank::default()),
    ];
    for (row, which) in [(0, 0), (1, 0), (2, 1), (3, 2)] {
        let d = golden::max_diff(&mixed[row..row + 1], &alone[which][row..row + 1]);
        assert!(d <= 1e-4, "row {row}: {d}");
    }
    assert!(golden::max_diff(&alone[0][2..3], &alone[1][2..3]) > 1e-3, "the two adapters must differ for the test to mean anything");
}

/// A LoRA model trained here loads in peft over the same base with the same logits; served
/// here over the shared base and merged into a whole model, it gives them too.
#[test]
fn an_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("peft-export", &base());
}

/// The same over the tiny RoBERTa of the golden files (`tests/parity/make_models.py`): peft's
/// names under `roberta.`, the head as `classifier.dense` and `classifier.out_proj`.
#[test]
fn a_roberta_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("roberta-peft-export", &golden::dir().join("roberta/base"));
}

/// And over the tiny ELECTRA: `electra.` names, the head's dense layer with GELU.
#[test]
fn an_electra_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("electra-peft-export", &golden::dir().join("electra/base"));
}

/// And over the tiny XLM-RoBERTa (a SentencePiece Unigram tokenizer): `roberta.` names.
#[test]
fn an_xlm_roberta_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("xlm-roberta-peft-export", &golden::dir().join("xlm-roberta/base"));
}

#[test]
fn a_camembert_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("camembert-peft-export", &golden::dir().join("camembert/base"));
}

/// And over the tiny DistilBERT: peft's `q_lin`/`v_lin`/`lin2` targets under `distilbert.`,
/// the head's `pre_classifier` saved with it.
#[test]
fn a_distilbert_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_trained_here_matches_peft("distilbert-peft-export", &golden::dir().join("distilbert/base"));
}

fn adapter_trained_here_matches_peft(case: &str, base: &Path) {
    adapter_with_targets_matches_peft(case, base, &["query", "value", "output.dense"]);
}

/// And over the tiny ModernBERT: peft's `Wqkv` (query, key and value in one module), `Wo` (both
/// output projections) and `Wi` under `model.`, the head's `head.dense` and `head.norm` with it.
#[test]
fn a_modernbert_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_with_targets_matches_peft("modernbert-peft-export", &golden::dir().join("modernbert/base"), &["Wqkv", "Wo", "Wi"]);
}

/// And over the tiny DeBERTa: peft's `query_proj` and `value_proj` (which also project the
/// relative embeddings) and `output.dense` under `deberta.`, the `ContextPooler` with the head.
#[test]
fn a_deberta_adapter_trained_here_gives_the_same_logits_in_peft() {
    adapter_with_targets_matches_peft(
        "deberta-v2-peft-export",
        &golden::dir().join("deberta-v2/base"),
        &["query", "value", "output.dense"],
    );
}

fn adapter_with_targets_matches_peft(case: &str, base: &Path, targets: &[&str]) {
    use finetuned::train::hyper::HyperparametersInput;
    use finetuned::train::trainer::{self, Event, Observer, TrainRequest};
    struct Quiet;
    impl Observer for Quiet {
        fn on_event(&mut self, _: Event) {}
        fn should_stop(&self) -> bool {
            false
        }
    }
    let rows = |split: &str| {
        let bytes = std::fs::read(common::shared().join(format!("datasets/tiny/{split}.jsonl"))).unwrap();
        finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows
    };
    let hp = HyperparametersInput {
        epochs: Some(1.into()),
        batch_size: Some(16),
        max_seq_len: Some(64),
        learning_rate: Some(2e-3),
        pooling: Some("cls".into()),
        method: Some("lora".into()),
        lora_r: Some(4),
        lora_target_modules: Some(targets.iter().map(|t| t.to_string()).collect()),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ours");
    let mut req = TrainRequest::new(base.to_path_buf(), rows("train"), Some(rows("validation")), hp, Device::Cpu);
    req.out_dir = Some(out.clone());
    trainer::run(req, &mut Quiet).unwrap();
    assert!(finetuned::model::hf::lora::is_adapter(&out), "saved as a peft adapter");

    let merged_in = ours(&out);
    let check = |theirs: &Answer, source: &str| golden::assert_matches(case, source, &merged_in, theirs);
    match peft_python() {
        Some(py) => {
            let texts = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(texts.path(), serde_json::to_vec(TEXTS).unwrap()).unwrap();
            let o = Command::new(&py).arg(script()).arg("peft-logits").arg(base).arg(&out).arg(texts.path()).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let theirs: Answer = serde_json::from_slice(&o.stdout).unwrap();
            check(&theirs, "peft live");
            if golden::writing() {
                golden::write(case, &theirs);
            }
        }
        None => eprintln!("parity {case}: no Python with torch, transformers and peft here; golden files only"),
    }
    check(&golden::read(case), "the golden file");

    // Over the shared base, as predict serves it (DeBERTa's adapters are served merged).
    let loaded = finetuned::model::predict::adapter_serving::LoadedAdapter::load(&out, &Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(loaded.is_none(), case.starts_with("deberta"), "{case}: served over the shared base");
    if let Some(adapter) = loaded {
        let adapter = std::sync::Arc::new(adapter);
        let encoder = LoadedClassifier::load_encoder(base, &Device::Cpu, finetuned::model::predict::predictor::Weights::F32).unwrap();
        let shared = encoder.logits_mixed(&merged_in.ids, &vec![Some(adapter); TEXTS.len()], 8).unwrap();
        assert!(golden::max_diff(&shared, &merged_in.logits) <= 1e-4, "shared base and merged weights agree");
    }

    // Merged into a whole model, as `?merged=true` downloads it.
    let whole = dir.path().join("merged");
    finetuned::model::hf::lora::write_merged(&out, &whole).unwrap();
    assert!(!finetuned::model::hf::lora::is_adapter(&whole));
    let m = LoadedClassifier::load(&whole, &Device::Cpu).unwrap();
    assert!(golden::max_diff(&m.logits(&merged_in.ids, 8).unwrap(), &merged_in.logits) <= 1e-4, "the merged model agrees");
}
