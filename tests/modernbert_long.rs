//! ModernBERT at 1,024 tokens: the golden files' tiny classifier (`tests/parity/make_models.py`:
//! global, local over 16 tokens, local, global) with its length limit raised to 1,024 (rotary
//! positions have no table, so the weights are the same), on a text of 1,000 to 1,024 tokens
//! padded into one batch with a short one: dozens of local windows, both rotary thetas at every
//! position up to 1,024, and padding. Its logits and each parameter's gradient, on the fused CPU
//! ops and on the device-generic ops a GPU runs, against transformers (golden files, and live
//! where a Python has transformers).

#[path = "parity/golden.rs"]
mod golden;

use candle_core::{Device, Tensor, Var};
use finetuned::model::encoder::modernbert::{ModernBertClassifier, ModernBertConfig};
use finetuned::model::hf::tokenize::{encode_all, load_tokenizer, pad_batch};
use finetuned::model::ops::kernels::set_fused_cpu_kernels;
use finetuned::model::ops::layers::Mode;
use finetuned::model::ops::tape::backward;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const LONG: usize = 1024;

/// A copy of the tiny classifier in `tmp` whose config allows `LONG` positions.
fn long_model(tmp: &Path) -> PathBuf {
    let src = golden::dir().join("modernbert").join("classifier");
    let dst = tmp.join("modernbert-long");
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dst.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = LONG.into();
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

/// A text of 1,000 to `LONG` tokens under `dir`'s tokenizer, and a short one.
fn texts(dir: &Path) -> Vec<String> {
    let tok = load_tokenizer(dir).unwrap();
    let words =
        ["the", "film", "was", "a", "quiet", "and", "patient", "study", "of", "grief,", "its", "actors", "carried", "every", "scene"];
    let mut long = String::new();
    for w in words.iter().cycle() {
        let next = format!("{long} {w}");
        if encode_all(&tok, &[next.trim()]).unwrap()[0].len() > LONG {
            break;
        }
        long = next;
        if encode_all(&tok, &[long.trim()]).unwrap()[0].len() >= LONG - 8 {
            break;
        }
    }
    vec![long.trim().to_string(), "a great film".to_string()]
}

/// transformers' logits and gradients of the cross-entropy (`steps.py`, dropout off) for `texts`
/// with labels 1 and 0, with the padded ids it used: live, or the golden files.
fn theirs(dir: &Path, texts: &[String]) -> (golden::Answer, Vec<Vec<u32>>, HashMap<String, Tensor>, &'static str) {
    let (grads_file, steps_file) =
        (golden::dir().join("modernbert-1024-grads.safetensors"), golden::dir().join("modernbert-1024-steps.json"));
    let ids = |bytes: &[u8]| -> Vec<Vec<u32>> {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        serde_json::from_value(v["ids"][0].clone()).unwrap()
    };
    let Some(py) = golden::python() else {
        eprintln!("modernbert at {LONG} tokens: no Python with transformers here; golden files only");
        let grads = candle_core::safetensors::load(&grads_file, &Device::Cpu).unwrap();
        return (golden::read("modernbert-1024"), ids(&std::fs::read(&steps_file).unwrap()), grads, "the golden files");
    };
    let tmp = tempfile::tempdir().unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity");
    let texts_file = tmp.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_vec(texts).unwrap()).unwrap();
    let mut hf = Command::new(&py);
    hf.arg(here.join("hf.py")).arg("logits").arg(dir).arg(&texts_file).env("PARITY_MAX_LEN", (2 * LONG).to_string());
    let out = hf.output().unwrap();
    assert!(out.status.success(), "hf.py logits: {}", String::from_utf8_lossy(&out.stderr));
    let answer: golden::Answer = serde_json::from_slice(&out.stdout).unwrap();
    let data = tmp.path().join("data.json");
    let body = serde_json::json!({"batches": [texts], "labels": [[1, 0]], "lr": 1e-2, "weight_decay": 0.0, "max_len": 2 * LONG});
    std::fs::write(&data, body.to_string()).unwrap();
    let grads = tmp.path().join("grads.safetensors");
    let steps = Command::new(&py).arg(here.join("steps.py")).arg(dir).arg(&data).arg(&grads).output().unwrap();
    assert!(steps.status.success(), "steps.py: {}", String::from_utf8_lossy(&steps.stderr));
    if golden::writing() {
        golden::write("modernbert-1024", &answer);
        std::fs::write(&steps_file, &steps.stdout).unwrap();
        std::fs::copy(&grads, &grads_file).unwrap();
    }
    (answer, ids(&steps.stdout), candle_core::safetensors::load(&grads, &Device::Cpu).unwrap(), "transformers live")
}

#[test]
fn a_modernbert_classifier_gives_transformers_logits_and_gradients_at_1024_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = long_model(tmp.path());
    let texts = texts(&dir);
    let cfg: ModernBertConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let ids = encode_all(&load_tokenizer(&dir).unwrap(), &texts.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!((1000..=LONG).contains(&ids[0].len()), "the long text has {} tokens", ids[0].len());
    assert!(ids[0].len() > 40 * cfg.local_attention, "dozens of local windows");
    let (theirs, their_ids, their_grads, source) = theirs(&dir, &texts);
    assert_eq!(ids, theirs.ids, "tokenization differs from {source}'s");
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let batch = pad_batch(&seqs, 3, &Device::Cpu).unwrap(); // the tiny tokenizer's pad id, as transformers pads
    assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), their_ids, "the padded batch differs from {source}'s");

    let weights =
        finetuned::model::hf::weights::read_f32(&dir.join("model.safetensors"), &Device::Cpu, |n| Some(n.to_string()), |_, _| true)
            .unwrap();
    let vars: HashMap<String, Var> = weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let get = |n: &str| vars.get(n).map(|v| v.as_tensor().clone()).ok_or_else(|| candle_core::Error::Msg(format!("missing {n}")));
    let model = ModernBertClassifier::load(&get, &cfg, false).unwrap();
    let target = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    for fused in [true, false] {
        let before = set_fused_cpu_kernels(fused);
        let logits = model.forward(&batch.ids, &batch.mask, &mut Mode::Eval).unwrap();
        let grads = backward(&candle_nn::loss::cross_entropy(&logits, &target).unwrap()).unwrap();
        set_fused_cpu_kernels(before);
        let diff = golden::max_diff(&logits.to_vec2().unwrap(), &theirs.logits);
        assert!(diff < 1e-4, "fused {fused}: logits differ from {source}'s by {diff}");
        let mut worst = 0f64;
        for (name, var) in &vars {
            let theirs = their_grads.get(name).unwrap_or_else(|| panic!("{source} has no gradient for {name}"));
            let ours = grads.get(var.as_tensor()).unwrap().unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
            let rel = norm(&(ours - theirs).unwrap()) / norm(theirs).max(1e-12);
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{name} (fused {fused}): gradient differs from {source}'s by {rel:e} of its norm");
        }
        eprintln!(
            "modernbert at {} tokens, fused {fused}: logits within {diff:e}, gradients within {worst:e}, against {source}",
            ids[0].len()
        );
    }
}
