//! Masked-LM pre-training: masking statistics and a falling loss on a tiny corpus.

mod common;

use candle_core::Device;
use common::*;
use finetuned::model::encoder::mlm::mask_tokens;
use finetuned::train::hyper::HyperparametersInput;
use finetuned::train::mlm::{self, MlmRequest, ScratchSpec, Start};
use finetuned::train::trainer::{Event, Observer, Outcome};
use rand::SeedableRng;
use std::collections::HashSet;

#[test]
fn masking_picks_15_percent_of_ordinary_tokens_split_80_10_10() {
    let special: HashSet<u32> = [0, 2, 3].into_iter().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut ordinary, mut chosen, mut masked, mut random, mut kept) = (0usize, 0usize, 0usize, 0usize, 0usize);
    for n in 0..4000u32 {
        let ids: Vec<u32> = std::iter::once(2).chain((0..30).map(|i| 10 + (n * 31 + i) % 500)).chain([3, 0, 0]).collect();
        let m = mask_tokens(&ids, &special, 4, 1000, 0.15, &mut rng);
        ordinary += 30;
        for (&p, &label) in m.positions.iter().zip(&m.labels) {
            assert!(!special.contains(&ids[p]), "a special token was chosen");
            assert_eq!(label, ids[p]);
            chosen += 1;
            match m.input[p] {
                4 => masked += 1,
                t if t == ids[p] => kept += 1,
                _ => random += 1,
            }
        }
        for p in (0..ids.len()).filter(|p| !m.positions.contains(p)) {
            assert_eq!(m.input[p], ids[p], "an unchosen token changed");
        }
    }
    let share = chosen as f64 / ordinary as f64;
    assert!((share - 0.15).abs() < 0.01, "chosen share {share}");
    let (m, r, k) = (masked as f64 / chosen as f64, random as f64 / chosen as f64, kept as f64 / chosen as f64);
    assert!((m - 0.8).abs() < 0.02 && (r - 0.1).abs() < 0.02 && (k - 0.1).abs() < 0.02, "{m} {r} {k}");
}

struct Losses(Vec<f64>);

impl Observer for Losses {
    fn on_event(&mut self, e: Event) {
        if let Event::Pretrain(r) = e {
            self.0.push(r.loss);
        }
    }
    fn should_stop(&self) -> bool {
        false
    }
}

fn run(start: Start, dir: &std::path::Path) -> Vec<f64> {
    let hp = HyperparametersInput {
        epochs: Some(8.into()),
        batch_size: Some(16),
        learning_rate: Some(3e-3),
        warmup_ratio: Some(0.0),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::Pretrain { from_config: false })
    .unwrap();
    let req = MlmRequest {
        start,
        train_rows: toy_rows(160),
        validation_rows: Some(toy_rows(40)),
        hp,
        device: Device::Cpu,
        out_dir: Some(dir.join("pretrained")),
        mask_prob: 0.15,
        checkpoints: None,
        precision: finetuned::train::precision::Precision::F32,
    };
    let mut obs = Losses(vec![]);
    assert!(matches!(mlm::run(req, &mut obs).unwrap(), Outcome::Pretrained { .. }));
    obs.0
}

#[test]
fn mlm_loss_falls_on_a_tiny_corpus_and_the_result_fine_tunes_as_a_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_tiny_model(dir.path(), "tiny");
    let losses = run(Start::Checkpoint(base), dir.path());
    assert_eq!(losses.len(), 9, "before training and after each of 8 epochs");
    assert!(losses[8] < losses[0] * 0.85 && losses[8] < losses[1], "held-out MLM loss did not fall: {losses:?}");
    let out = dir.path().join("pretrained");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    let names: Vec<String> = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap().into_keys().collect();
    assert!(names.contains(&"cls.predictions.transform.dense.weight".to_string()));
    assert!(names.contains(&"bert.embeddings.word_embeddings.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("decoder.weight")), "the decoder is tied to the word embeddings");
    let info = finetuned::model::hf::artifacts::inspect(&out).unwrap();
    assert!(info.labels.is_none(), "a pre-trained model is a base model");
}

#[test]
fn from_scratch_pretraining_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_tiny_model(dir.path(), "tiny");
    let spec = ScratchSpec {
        num_hidden_layers: 1,
        hidden_size: 16,
        num_attention_heads: 2,
        intermediate_size: None,
        max_position_embeddings: Some(64),
    };
    let losses = run(Start::Scratch { spec, tokenizer_dir: base }, dir.path());
    assert!(losses[8] < losses[0] * 0.85 && losses[8] < losses[1], "{losses:?}");
}

#[test]
fn the_anchor_embeds_texts_of_mixed_lengths_in_their_own_order() {
    use finetuned::model::encoder::classifier::Pooling;
    use finetuned::model::encoder::Encoder;
    use finetuned::train::anchor::embed;
    let cfg = tiny_config();
    let weights = tiny_weights(&cfg, 3);
    let bert = Encoder::load(&|n: &str| Ok(weights[n].clone()), &cfg).unwrap();
    // 70 texts: more than one chunk, lengths out of order.
    let seqs: Vec<Vec<u32>> =
        (0..70u32).map(|i| std::iter::once(2).chain((0..(i * 7) % 13 + 1).map(|j| 5 + (i + j) % 20)).chain([3]).collect()).collect();
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let all = embed(&bert, &seqs, pooling, 0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        for (i, s) in seqs.iter().enumerate().step_by(9) {
            let alone = embed(&bert, std::slice::from_ref(s), pooling, 0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let norm: f32 = alone[0].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "unit length: {norm}");
            let gap = all[i].iter().zip(&alone[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(gap < 1e-4, "{pooling:?} text {i}: batched and alone differ by {gap}");
        }
    }
}
