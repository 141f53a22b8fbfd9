//! Training parity with PyTorch for every architecture, on the golden files' tiny models
//! (`tests/parity/make_models.py`): with dropout off, each parameter's gradient for one batch
//! within 1e-4 of PyTorch's (relative to that gradient's norm), and 20 AdamW steps from the same
//! weights on the same batches giving losses within 1e-3 of transformers + `torch.optim.AdamW`.
//! The PyTorch side is `tests/parity/steps.py`: asked live where a Python with torch and
//! transformers is found, and kept in `tests/parity/golden/<arch>-steps.json` and
//! `<arch>-grads.safetensors` (rewritten with `FINETUNED_PARITY_WRITE=1`).

mod common;
#[path = "parity/golden.rs"]
mod golden;

use candle_core::{Device, Tensor};
use finetuned::model::encoder::encoder_params;
use finetuned::model::encoder::params::Params;
use finetuned::model::hf::artifacts::{inspect, load_weights};
use finetuned::model::hf::tokenize::{encode_all, load_tokenizer, pad_batch, truncate};
use finetuned::model::ops::layers::Mode;
use finetuned::model::ops::tape::backward;
use finetuned::model::{Classifier, Pooling};
use finetuned::train::optim::AdamW;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

const STEPS: usize = 20;
const BATCH: usize = 8;
const LR: f64 = 1e-2;
const WEIGHT_DECAY: f64 = 0.01;

/// PyTorch's answer: the loss before each step, the token ids of each batch, and the first
/// batch's gradient norms by transformers' parameter name.
#[derive(Deserialize)]
struct Theirs {
    losses: Vec<f64>,
    ids: Vec<Vec<Vec<u32>>>,
    grad_norms: HashMap<String, f64>,
}

/// The 20 batches: the tiny set's training texts in order, 8 at a time, cycled.
fn batches() -> (Vec<Vec<String>>, Vec<Vec<u32>>) {
    let bytes = std::fs::read(common::shared().join("datasets/tiny/train.jsonl")).unwrap();
    let rows = finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows;
    let (mut texts, mut labels) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let picked: Vec<_> = (0..BATCH).map(|i| &rows[(step * BATCH + i) % rows.len()]).collect();
        texts.push(picked.iter().map(|r| r.text.clone()).collect());
        labels.push(picked.iter().map(|r| u32::from(r.labels()[0] == "positive")).collect());
    }
    (texts, labels)
}

/// PyTorch's answer for `arch`: live (and written to the golden files when asked) where a
/// Python with torch is here, else the golden files'. Returns it with its gradients.
fn theirs(arch: &str, model: &Path, texts: &[Vec<String>], labels: &[Vec<u32>]) -> (Theirs, HashMap<String, Tensor>, &'static str) {
    let golden_json = golden::dir().join(format!("{arch}-steps.json"));
    let golden_grads = golden::dir().join(format!("{arch}-grads.safetensors"));
    let Some(py) = golden::python() else {
        eprintln!("training parity {arch}: no Python with torch and transformers here; golden files only");
        let answer = serde_json::from_slice(&std::fs::read(&golden_json).unwrap()).unwrap();
        return (answer, candle_core::safetensors::load(&golden_grads, &Device::Cpu).unwrap(), "the golden file");
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.json");
    let body = json!({"batches": texts, "labels": labels, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_len": 64});
    std::fs::write(&data, body.to_string()).unwrap();
    let grads = dir.path().join("grads.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/steps.py");
    let out = Command::new(py).arg(script).arg(model).arg(&data).arg(&grads).output().unwrap();
    assert!(out.status.success(), "steps.py: {}", String::from_utf8_lossy(&out.stderr));
    if golden::writing() {
        std::fs::write(&golden_json, &out.stdout).unwrap();
        std::fs::copy(&grads, &golden_grads).unwrap();
    }
    let answer = serde_json::from_slice(&out.stdout).unwrap();
    (answer, candle_core::safetensors::load(&grads, &Device::Cpu).unwrap(), "PyTorch live")
}

fn check(arch: &str) {
    let model = golden::dir().join(arch).join("classifier");
    let (texts, labels) = batches();
    let (theirs, their_grads, source) = theirs(arch, &model, &texts, &labels);

    let mut cfg = inspect(&model).unwrap().config;
    (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob, cfg.classifier_dropout) = (0.0, 0.0, Some(0.0));
    let weights = load_weights(&model, &Device::Cpu).unwrap();
    let n = weights["classifier.weight"].dim(0).unwrap();
    let h = cfg.hidden_size;
    let mut spec = encoder_params(&cfg);
    spec.extend([
        ("pooler.dense.weight".to_string(), vec![h, h]),
        ("pooler.dense.bias".to_string(), vec![h]),
        ("classifier.weight".to_string(), vec![n, h]),
        ("classifier.bias".to_string(), vec![n]),
    ]);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let params = Params::build(&cfg, &spec, &weights, &[], &mut rng, &Device::Cpu).unwrap();
    assert!(spec.iter().all(|(name, _)| weights.contains_key(name)), "every parameter comes from the checkpoint");
    let tok = load_tokenizer(&model).unwrap();
    let decay: Vec<bool> = params.names.iter().map(|n| Params::decays(n)).collect();
    let mut opt = AdamW::new(decay, WEIGHT_DECAY);
    let arch_of = cfg.arch();

    let (mut losses, mut worst_grad) = (Vec::new(), 0f64);
    for (step, (texts, labels)) in texts.iter().zip(&labels).enumerate() {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut ids = encode_all(&tok, &refs).unwrap();
        ids.iter_mut().for_each(|s| truncate(s, 64));
        let padded: Vec<Vec<u32>> = {
            let longest = ids.iter().map(Vec::len).max().unwrap();
            ids.iter().map(|s| s.iter().copied().chain(std::iter::repeat(cfg.pad_token_id as u32)).take(longest).collect()).collect()
        };
        for (i, (a, b)) in padded.iter().zip(&theirs.ids[step]).enumerate() {
            assert_eq!(a, b, "{arch}: batch {step}'s token ids differ from {source}'s for {:?}", texts[i]);
        }
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        if step == 0 {
            // Padded, so that the gradients below check the dense layers run over the real
            // tokens only (`model::ops::unpad`).
            assert!(padded[0].len() > seqs.iter().map(|s| s.len()).min().unwrap(), "{arch}: the first batch has no padding");
        }
        let batch = pad_batch(&seqs, cfg.pad_token_id as u32, &Device::Cpu).unwrap();
        let model = Classifier::load(&|n| params.tracked(n), &cfg, Pooling::Cls).unwrap();
        let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(&mut rng)).unwrap();
        let targets = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap() as f64);
        let grads = backward(&loss).unwrap();
        if step == 0 {
            // A gradient that is zero in exact arithmetic (the key bias: softmax ignores a
            // constant added to every score) is compared against a millionth of the whole.
            let floor = 1e-6 * theirs.grad_norms.values().map(|n| n * n).sum::<f64>().sqrt();
            let mut compared = 0;
            for (name, var) in params.names.iter().zip(&params.vars) {
                let hf = arch_of.to_hf(name);
                let theirs_g = their_grads.get(&hf).unwrap_or_else(|| panic!("{arch}: {source} has no gradient for {hf}"));
                let ours_g = grads.get(var.as_tensor()).unwrap().unwrap_or_else(|| panic!("{arch}: no gradient reached {name}"));
                let norm = theirs.grad_norms[&hf].max(floor);
                let diff = (ours_g - theirs_g).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                assert!(diff / norm <= 1e-4, "{arch}: {hf}'s gradient differs from {source}'s by {diff:e} (norm {norm:e})");
                worst_grad = worst_grad.max(diff / norm);
                compared += 1;
            }
            assert_eq!(compared, their_grads.len(), "{arch}: {source} has gradients for parameters we do not train");
        }
        opt.step(&params.vars, &grads, LR, f64::INFINITY).unwrap();
    }
    let worst = losses.iter().zip(&theirs.losses).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!(
        "training parity {arch} against {source}: gradients within {worst_grad:.1e} of their norms; losses {losses:.3?}, largest difference {worst:.2e}"
    );
    assert!(worst <= 1e-3, "{arch}: losses {losses:?} differ from {source}'s {:?}", theirs.losses);
    // Batch 8 holds batch 0's texts again (the 64 rows cycle every 8 batches): the steps between
    // must have changed the model for the comparison to mean anything.
    assert!((losses[8] - losses[0]).abs() > 0.1, "{arch}: the steps did not move the model: {losses:?}");
}

#[test]
fn bert_gradients_and_adamw_steps_match_pytorch() {
    check("bert");
}

#[test]
fn roberta_gradients_and_adamw_steps_match_pytorch() {
    check("roberta");
}

#[test]
fn xlm_roberta_gradients_and_adamw_steps_match_pytorch() {
    check("xlm-roberta");
}

#[test]
fn camembert_gradients_and_adamw_steps_match_pytorch() {
    check("camembert");
}

#[test]
fn electra_gradients_and_adamw_steps_match_pytorch() {
    check("electra");
}

#[test]
fn distilbert_gradients_and_adamw_steps_match_pytorch() {
    check("distilbert");
}

#[test]
fn deberta_gradients_and_adamw_steps_match_pytorch() {
    check("deberta-v2");
}

/// DeBERTa's attention composed from candle ops (what a GPU runs) instead of the fused CPU op.
#[test]
fn deberta_composed_gradients_and_adamw_steps_match_pytorch() {
    let before = finetuned::model::ops::kernels::set_fused_cpu_kernels(false);
    check("deberta-v2");
    finetuned::model::ops::kernels::set_fused_cpu_kernels(before);
}
