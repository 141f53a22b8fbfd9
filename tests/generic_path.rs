//! The device-generic path (what a GPU runs: `model::ops::device_ops`, matmuls, the optimizer's
//! device update) run on the CPU, against the fused CPU kernels. CI has no GPU: this is how it
//! checks the maths of the code a GPU runs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use finetuned::model::encoder::params::Params;
use finetuned::model::hf::tokenize::pad_batch;
use finetuned::model::ops::kernels::set_fused_cpu_kernels;
use finetuned::model::ops::layers::Mode;
use finetuned::model::ops::tape::backward;
use finetuned::model::{Classifier, Pooling};
use finetuned::train::hyper::HyperparametersInput;
use finetuned::train::optim::AdamW;
use finetuned::train::trainer::{self, Event, Observer, Outcome, TrainRequest};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Runs `f` with the fused CPU kernels on or off on this thread, then restores the setting.
fn with_kernels<T>(fused: bool, f: impl FnOnce() -> T) -> T {
    let before = set_fused_cpu_kernels(fused);
    let out = f();
    set_fused_cpu_kernels(before);
    out
}

struct StepResult {
    loss: f32,
    grads: HashMap<String, Vec<f32>>,
    /// Every parameter after two AdamW steps.
    params: HashMap<String, Vec<f32>>,
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Texts of different lengths: a padded batch, which the CPU trains without its padding and the
/// device-generic path padded.
fn ragged() -> Vec<Vec<u32>> {
    vec![vec![2, 5, 6, 3], vec![2, 11, 12, 13, 9, 8, 3], vec![2, 7, 3], vec![2, 14, 15, 3]]
}

/// Texts of one length: the same layout on both paths, so the same dropout masks.
fn even() -> Vec<Vec<u32>> {
    vec![vec![2, 5, 6, 3], vec![2, 11, 12, 3], vec![2, 7, 9, 3], vec![2, 14, 15, 3]]
}

/// Two training steps on `seqs` (mean pooling so every encoder parameter gets a gradient) with
/// dropout drawn from `dropout_seed`, or with dropout off; the first step's loss and gradients,
/// and the parameters after both steps.
fn two_steps(dropout_seed: u64, seqs: Vec<Vec<u32>>, dropout: bool) -> StepResult {
    let mut cfg = tiny_config();
    assert!(cfg.hidden_dropout_prob > 0.0 && cfg.attention_probs_dropout_prob > 0.0);
    let weights = tiny_weights(&cfg, 1);
    if !dropout {
        (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) = (0.0, 0.0);
    }
    let params = Params::for_classifier(&cfg, &weights, 3, &mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let model = Classifier::load(&|n| params.tracked(n), &cfg, Pooling::Mean).unwrap();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let batch = pad_batch(&refs, 0, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 0, 2, 0], &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(dropout_seed);
    let mut opt = AdamW::new(vec![true; params.vars.len()], 0.01);
    let mut first = None;
    for _ in 0..2 {
        let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Train(&mut rng)).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let grads = backward(&loss).unwrap();
        if first.is_none() {
            let g = params
                .names
                .iter()
                .zip(&params.vars)
                .filter_map(|(n, v)| Some((n.clone(), flat(&grads.get(v.as_tensor()).unwrap()?))))
                .collect();
            first = Some((loss.to_scalar::<f32>().unwrap(), g));
        }
        opt.step(&params.vars, &grads, 1e-3, 1.0).unwrap();
    }
    let (loss, grads) = first.unwrap();
    let params = params.names.iter().zip(&params.vars).map(|(n, v)| (n.clone(), flat(v.as_tensor()))).collect();
    StepResult { loss, grads, params }
}

fn max_diff(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

fn same_steps(fused: &StepResult, generic: &StepResult) {
    // Every parameter but the (unused) pooler's gets a gradient on both paths.
    assert_eq!(fused.grads.len(), 5 + 16 * tiny_config().num_hidden_layers + 2);
    assert_eq!(generic.grads.len(), fused.grads.len());
    assert!((fused.loss - generic.loss).abs() < 1e-5, "loss {} against {}", fused.loss, generic.loss);
    let (d, name) = max_diff(&fused.grads, &generic.grads);
    assert!(d <= 1e-4, "gradient of {name} differs by {d}");
    let (d, name) = max_diff(&fused.params, &generic.params);
    assert!(d <= 1e-5, "{name} after two AdamW steps differs by {d}");
}

#[test]
fn on_a_padded_batch_the_device_generic_path_gives_the_unpadded_cpu_gradients_and_updates() {
    let fused = with_kernels(true, || two_steps(9, ragged(), false));
    let generic = with_kernels(false, || two_steps(9, ragged(), false));
    same_steps(&fused, &generic);
}

#[test]
fn the_device_generic_path_gives_the_fused_cpu_gradients_and_updates_with_dropout_on() {
    let fused = with_kernels(true, || two_steps(9, even(), true));
    let generic = with_kernels(false, || two_steps(9, even(), true));
    same_steps(&fused, &generic);
    // The comparison sees the dropout masks: another seed moves the gradients well past 1e-4.
    let other = with_kernels(false, || two_steps(10, even(), true));
    let (d, _) = max_diff(&fused.grads, &other.grads);
    assert!(d > 1e-3, "a different dropout seed changed the gradients by only {d}");
}

struct Losses(Vec<f64>, Vec<f64>);

impl Observer for Losses {
    fn on_event(&mut self, e: Event) {
        match e {
            Event::Epoch(r) => self.1.push(r.report.accuracy),
            Event::Step(s) => self.0.push(s.loss),
            _ => {}
        }
    }
    fn should_stop(&self) -> bool {
        false
    }
}

#[test]
fn a_short_training_run_on_the_device_generic_path_learns() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_tiny_model(dir.path(), "tiny");
    let hp = HyperparametersInput {
        epochs: Some(10.into()),
        batch_size: Some(8),
        learning_rate: Some(2e-3),
        warmup_ratio: Some(0.0),
        seed: Some(42),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let req = TrainRequest::new(base, toy_rows(48), Some(toy_rows(16)), hp, Device::Cpu);
    let mut obs = Losses(vec![], vec![]);
    let outcome = with_kernels(false, || trainer::run(req, &mut obs).unwrap());
    assert!(matches!(outcome, Outcome::Finished(_)));
    let (first, last) = (&obs.0[..6], &obs.0[obs.0.len() - 6..]);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    assert!(mean(last) < 0.5 * mean(first), "training loss went from {:.3} to {:.3}", mean(first), mean(last));
    assert_eq!(obs.1.last().copied(), Some(1.0), "validation accuracy per epoch: {:?}", obs.1);
}
