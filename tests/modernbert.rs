//! ModernBERT gives transformers' logits: the golden files' tiny ModernBertForSequenceClassification
//! (`tests/parity/make_models.py`: 4 layers, global, local over 16 tokens, local, global) on texts
//! of up to ~100 tokens run as one padded batch, so that several local windows, both rotary thetas
//! and padding are exercised; its token classifier's and masked LM's logits for every token; each
//! parameter's gradient; against golden files, and live where a Python has transformers.

#[path = "parity/golden.rs"]
mod golden;

use candle_core::Device;
use finetuned::model::encoder::modernbert::{ModernBertClassifier, ModernBertConfig, ModernBertMaskedLm};
use finetuned::model::hf::tokenize::{encode_all, load_tokenizer, pad_batch};
use finetuned::model::ops::layers::Mode;
use finetuned::model::ops::tape::backward;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    model_dir("classifier")
}

fn model_dir(which: &str) -> PathBuf {
    golden::dir().join("modernbert").join(which)
}

fn texts() -> Vec<String> {
    let long = "the film was a quiet and patient study of grief, and its actors carried every scene with grace; ".repeat(4);
    vec!["a great film".into(), long.clone(), "the plot was awful and the pacing dragged on and on".into(), long[..180].to_string()]
}

/// transformers' answer (`hf.py COMMAND`) for the model `which` on `texts`, live where a Python
/// has transformers (and rewritten as the golden file `GOLDEN` when asked), else the golden file.
fn theirs_for(command: &str, which: &str, golden_name: &str, texts: &[String]) -> (golden::Answer, &'static str) {
    let Some(py) = golden::python() else {
        eprintln!("modernbert {which}: no Python with transformers here; golden file only");
        return (golden::read(golden_name), "the golden file");
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(texts).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py");
    let out = Command::new(py).arg(script).arg(command).arg(model_dir(which)).arg(file.path()).output().unwrap();
    assert!(out.status.success(), "hf.py {command}: {}", String::from_utf8_lossy(&out.stderr));
    let answer: golden::Answer = serde_json::from_slice(&out.stdout).unwrap();
    if golden::writing() {
        golden::write(golden_name, &answer);
    }
    (answer, "transformers live")
}

fn theirs() -> (golden::Answer, &'static str) {
    theirs_for("logits", "classifier", "modernbert-batch", &texts())
}

fn config(which: &str) -> ModernBertConfig {
    serde_json::from_slice(&std::fs::read(model_dir(which).join("config.json")).unwrap()).unwrap()
}

fn weights(which: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    finetuned::model::hf::weights::read_f32(&model_dir(which).join("model.safetensors"), &Device::Cpu, |n| Some(n.to_string()), |_, _| true)
        .unwrap()
}

/// `texts` tokenized by the model's tokenizer and padded into one batch, with each text's ids.
fn batch(which: &str, texts: &[String]) -> (finetuned::model::hf::tokenize::Batch, Vec<Vec<u32>>) {
    let tok = load_tokenizer(&model_dir(which)).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = encode_all(&tok, &refs).unwrap();
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    (pad_batch(&seqs, 3, &Device::Cpu).unwrap(), ids)
}

#[test]
fn a_modernbert_token_classifier_and_masked_lm_give_transformers_logits_for_every_token() {
    for (which, command) in [("token-classifier", "token-logits"), ("mlm", "mlm")] {
        // The masked LM's answer is a row of the whole vocabulary per token: its texts are the
        // shorter two, to keep the golden file small.
        let texts = match which {
            "mlm" => vec![texts()[0].clone(), texts()[2].clone()],
            _ => texts(),
        };
        let (cfg, w) = (config(which), weights(which));
        let get = |n: &str| w.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing {n}")));
        let (batch, ids) = batch(which, &texts);
        let logits = match which {
            "mlm" => ModernBertMaskedLm::load(&get, &cfg).unwrap().forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap(),
            _ => ModernBertClassifier::load(&get, &cfg, true).unwrap().forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap(),
        };
        // Each text's real tokens: flattened per text (tags), or one row per token (vocabulary).
        let mut ours: Vec<Vec<f32>> = Vec::new();
        for (i, seq) in ids.iter().enumerate() {
            let rows: Vec<Vec<f32>> = logits.get(i).unwrap().narrow(0, 0, seq.len()).unwrap().to_vec2().unwrap();
            match which {
                "mlm" => ours.extend(rows.into_iter().map(|r| r[..r.len().min(1000)].to_vec())),
                _ => ours.push(rows.concat()),
            }
        }
        let (theirs, source) = theirs_for(command, which, &format!("modernbert-{which}"), &texts);
        assert_eq!(ids, theirs.ids, "{which}: tokenization differs from {source}'s");
        let diff = golden::max_diff(&ours, &theirs.logits);
        eprintln!("modernbert {which}: {} texts, max logit difference {diff:e} from {source}", texts.len());
        assert!(diff < 1e-4, "{which}: logits differ from {source}'s by {diff}");
    }
}

#[test]
fn a_modernbert_classifier_saved_by_transformers_gives_its_logits_in_a_padded_batch() {
    let cfg: ModernBertConfig = serde_json::from_slice(&std::fs::read(dir().join("config.json")).unwrap()).unwrap();
    let weights =
        finetuned::model::hf::weights::read_f32(&dir().join("model.safetensors"), &Device::Cpu, |n| Some(n.to_string()), |_, _| true)
            .unwrap();
    let get = |n: &str| weights.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(format!("missing {n}")));
    let model = ModernBertClassifier::load(&get, &cfg, false).unwrap();
    let tok = load_tokenizer(&dir()).unwrap();
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = encode_all(&tok, &refs).unwrap();
    let (theirs, source) = theirs();
    assert_eq!(ids, theirs.ids, "tokenization differs from {source}'s");
    let longest = ids.iter().map(Vec::len).max().unwrap();
    assert!(longest > 4 * cfg.local_attention, "the longest text ({longest} tokens) spans several windows");
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = pad_batch(&seqs, 3, &Device::Cpu).unwrap();
    let logits = model.forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap();
    let ours: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let diff = golden::max_diff(&ours, &theirs.logits);
    eprintln!("modernbert: {} texts up to {longest} tokens, max logit difference {diff:e} from {source}", texts.len());
    assert!(diff < 1e-4, "logits differ from {source}'s by {diff}");
    // The composed (device-generic) path gives the same.
    let previous = finetuned::model::ops::kernels::set_fused_cpu_kernels(false);
    let composed: Vec<Vec<f32>> = model.forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap().to_vec2().unwrap();
    finetuned::model::ops::kernels::set_fused_cpu_kernels(previous);
    assert!(golden::max_diff(&composed, &theirs.logits) < 1e-4, "the composed path differs");
}

/// PyTorch's gradients of the cross-entropy of one batch (`tests/parity/steps.py`, dropout off),
/// with the padded ids it used.
fn their_grads(texts: &[String], labels: &[u32]) -> (Vec<Vec<u32>>, std::collections::HashMap<String, candle_core::Tensor>, &'static str) {
    let golden_json = golden::dir().join("modernbert-steps.json");
    let golden_grads = golden::dir().join("modernbert-grads.safetensors");
    let ids = |bytes: &[u8]| -> Vec<Vec<u32>> {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        serde_json::from_value(v["ids"][0].clone()).unwrap()
    };
    let Some(py) = golden::python() else {
        eprintln!("modernbert gradients: no Python with torch here; golden files only");
        let grads = candle_core::safetensors::load(&golden_grads, &Device::Cpu).unwrap();
        return (ids(&std::fs::read(&golden_json).unwrap()), grads, "the golden file");
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.json");
    let body = serde_json::json!({"batches": [texts], "labels": [labels], "lr": 1e-2, "weight_decay": 0.0, "max_len": 512});
    std::fs::write(&data, body.to_string()).unwrap();
    let grads = tmp.path().join("grads.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/steps.py");
    let out = Command::new(py).arg(script).arg(dir()).arg(&data).arg(&grads).output().unwrap();
    assert!(out.status.success(), "steps.py: {}", String::from_utf8_lossy(&out.stderr));
    if golden::writing() {
        std::fs::write(&golden_json, &out.stdout).unwrap();
        std::fs::copy(&grads, &golden_grads).unwrap();
    }
    (ids(&out.stdout), candle_core::safetensors::load(&grads, &Device::Cpu).unwrap(), "PyTorch live")
}

#[test]
fn each_modernbert_parameters_gradient_for_one_batch_matches_pytorchs() {
    let cfg: ModernBertConfig = serde_json::from_slice(&std::fs::read(dir().join("config.json")).unwrap()).unwrap();
    let weights =
        finetuned::model::hf::weights::read_f32(&dir().join("model.safetensors"), &Device::Cpu, |n| Some(n.to_string()), |_, _| true)
            .unwrap();
    let vars: std::collections::HashMap<String, candle_core::Var> =
        weights.iter().map(|(n, t)| (n.clone(), candle_core::Var::from_tensor(t).unwrap())).collect();
    let get = |n: &str| vars.get(n).map(|v| v.as_tensor().clone()).ok_or_else(|| candle_core::Error::Msg(format!("missing {n}")));
    let model = ModernBertClassifier::load(&get, &cfg, false).unwrap();
    let (texts, labels) = (texts(), vec![0u32, 1, 1, 0]);
    let (their_ids, theirs, source) = their_grads(&texts, &labels);
    let (batch, _) = batch("classifier", &texts);
    assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), their_ids, "the padded batch differs from {source}'s");
    let target = candle_core::Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    // The fused CPU ops, then the composed ones a GPU runs.
    for fused in [true, false] {
        let previous = finetuned::model::ops::kernels::set_fused_cpu_kernels(fused);
        let logits = model.forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap();
        let grads = backward(&candle_nn::loss::cross_entropy(&logits, &target).unwrap()).unwrap();
        finetuned::model::ops::kernels::set_fused_cpu_kernels(previous);
        let mut worst = 0f64;
        for (name, var) in &vars {
            let theirs = theirs.get(name).unwrap_or_else(|| panic!("{source} has no gradient for {name}"));
            let ours = grads.get(var.as_tensor()).unwrap().unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = |t: &candle_core::Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let rel = norm(&(ours - theirs).unwrap()) / norm(theirs).max(1e-12);
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{name} (fused {fused}): gradient differs from {source}'s by {rel:e} of its norm");
        }
        eprintln!("modernbert gradients, fused {fused}: {} parameters, worst relative difference {worst:e} from {source}", vars.len());
    }
}
