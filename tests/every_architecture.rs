//! What BERT does, every architecture does: on the golden files' tiny RoBERTa, XLM-RoBERTa, CamemBERT,
//! ELECTRA and DistilBERT (`tests/parity/make_models.py`), a run stopped mid-epoch and resumed
//! from its checkpoint saves the same model, bit for bit, as one run straight through (with each
//! method); multi-label classification trains and saves its thresholds; bf16 mixed precision
//! trains and saves f32 weights.

mod common;

use candle_core::{DType, Device};
use finetuned::dataset::{LabelValue, Row};
use finetuned::model::predict::predictor::LoadedClassifier;
use finetuned::train::checkpoint::CheckpointPlan;
use finetuned::train::hyper::{HyperparametersInput, JobKind};
use finetuned::train::objective::Task;
use finetuned::train::precision::Precision;
use finetuned::train::trainer::{self, Event, Observer, Outcome, TrainRequest};
use std::path::{Path, PathBuf};

const ARCHS: [&str; 7] = ["roberta", "xlm-roberta", "camembert", "electra", "distilbert", "modernbert", "deberta-v2"];

fn base(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden").join(arch).join("base")
}

/// Stops the run, as a server shutting down does, once `stop_after` steps are done.
struct StopAfter {
    steps: usize,
    stop_after: Option<usize>,
}

impl Observer for StopAfter {
    fn on_event(&mut self, e: Event) {
        if let Event::Step(_) = e {
            self.steps += 1;
        }
    }
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.steps >= n)
    }
    fn shutting_down(&self) -> bool {
        true
    }
}

fn request(arch: &str, method: &str, rows: Vec<Row>, out: &Path) -> TrainRequest {
    let hp = HyperparametersInput {
        epochs: Some(2.into()),
        batch_size: Some(8),
        max_seq_len: Some(32),
        method: Some(method.into()),
        lora_r: (method == "lora").then_some(4),
        pooling: Some("cls".into()),
        ..Default::default()
    }
    .resolve("cls", JobKind::FineTune)
    .unwrap();
    let validation = rows[..16].to_vec();
    let mut req = TrainRequest::new(base(arch), rows, Some(validation), hp, Device::Cpu);
    req.out_dir = Some(out.to_path_buf());
    req
}

/// The saved model's logits on a few texts.
fn logits(dir: &Path) -> Vec<Vec<f32>> {
    let m = LoadedClassifier::load(dir, &Device::Cpu).unwrap();
    let ids = m.tokenize(&["a great superb film", "the plot was awful", "x"], true).unwrap().unwrap();
    m.logits(&ids, 8).unwrap()
}

#[test]
fn a_run_stopped_and_resumed_saves_what_a_straight_run_saves() {
    for (arch, method) in ARCHS.iter().zip(["full", "lora", "head", "full", "head", "lora", "lora"]) {
        let tmp = tempfile::tempdir().unwrap();
        let plan = |dir: &str| Some(CheckpointPlan { dir: tmp.path().join(dir), every: 3, keep: 2, mirror: None });
        let mut straight = request(arch, method, common::toy_rows(48), &tmp.path().join("straight"));
        straight.checkpoints = plan("ckpt-straight");
        assert!(matches!(trainer::run(straight, &mut StopAfter { steps: 0, stop_after: None }).unwrap(), Outcome::Finished(_)));

        // 6 steps an epoch: stopped at step 8, in the second epoch, between two checkpoints.
        let mut first = request(arch, method, common::toy_rows(48), &tmp.path().join("resumed"));
        first.checkpoints = plan("ckpt-stopped");
        let stopped = trainer::run(first, &mut StopAfter { steps: 0, stop_after: Some(8) }).unwrap();
        assert!(matches!(stopped, Outcome::Cancelled), "{arch}: the run stopped");
        let mut again = request(arch, method, common::toy_rows(48), &tmp.path().join("resumed"));
        again.checkpoints = plan("ckpt-stopped");
        let mut obs = StopAfter { steps: 0, stop_after: None };
        assert!(matches!(trainer::run(again, &mut obs).unwrap(), Outcome::Finished(_)));
        assert_eq!(obs.steps, 12 - 8, "{arch}: the resumed run took only the steps left");
        assert_eq!(logits(&tmp.path().join("resumed")), logits(&tmp.path().join("straight")), "{arch} {method}: resumed ≠ straight");
    }
}

#[test]
fn multi_label_classification_trains_on_every_architecture() {
    let rows: Vec<Row> = common::toy_rows(48)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut labels = vec![match &r.label {
                Some(LabelValue::One(l)) => l.clone(),
                _ => unreachable!(),
            }];
            if i % 3 == 0 {
                labels.push("third".into());
            }
            Row { text: r.text, label: Some(LabelValue::Many(labels)), ..Row::default() }
        })
        .collect();
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        let mut req = request(arch, "full", rows.clone(), &tmp.path().join("model"));
        req.task = Task::MultiLabel;
        let Outcome::Finished(done) = trainer::run(req, &mut StopAfter { steps: 0, stop_after: None }).unwrap() else { panic!("{arch}") };
        assert_eq!(done.labels, ["neg", "pos", "third"], "{arch}");
        assert!(done.tuned.is_some(), "{arch}: thresholds tuned on validation");
        let cfg = finetuned::model::hf::artifacts::inspect(&tmp.path().join("model")).unwrap().config;
        assert_eq!(cfg.problem_type().as_deref(), Some("multi_label_classification"), "{arch}");
        assert!(cfg.thresholds(&done.labels).is_some(), "{arch}: thresholds saved with the model");
    }
}

#[test]
fn bf16_mixed_precision_trains_every_architecture_and_saves_f32_weights() {
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        let mut req = request(arch, "full", common::toy_rows(48), &out);
        req.precision = Precision::Bf16;
        let Outcome::Finished(done) = trainer::run(req, &mut StopAfter { steps: 0, stop_after: None }).unwrap() else { panic!("{arch}") };
        assert!(done.best.train_loss.is_finite(), "{arch}");
        let saved = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(saved.values().all(|t| t.dtype() == DType::F32), "{arch}: the saved weights are f32");
        assert!(logits(&out).iter().flatten().all(|x| x.is_finite()), "{arch}");
    }
}
