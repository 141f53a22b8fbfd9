//! Parity with Hugging Face transformers, both ways, and for the masked-LM export. Every test
//! compares our logits with the ones transformers gave when the golden files were made
//! (`tests/parity/golden/`, by `tests/parity/regenerate.sh`), so it runs everywhere; where a Python
//! with torch and transformers is found (`FINETUNED_PYTHON`, else `~/refbench-venv/bin/python`,
//! else `python3`) it asks transformers live as well, and `FINETUNED_PARITY_WRITE=1` rewrites the
//! golden files from that live answer.

mod common;
#[path = "parity/golden.rs"]
mod golden;

use candle_core::Device;
use finetuned::model::predict::predictor::LoadedClassifier;
use finetuned::train::hyper::HyperparametersInput;
use finetuned::train::objective::Task;
use finetuned::train::trainer::{self, Event, Observer, TrainRequest};
use golden::Answer;
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

const MLM_TEXT: &str = "the movie was a [MASK] surprise.";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py")
}

fn base() -> PathBuf {
    common::shared().join("models/all-minilm-l6-v2")
}

/// Runs `hf.py` and parses what it prints; panics with its stderr when it fails.
fn hf(py: &Path, args: &[&std::ffi::OsStr]) -> Value {
    let out = Command::new(py).arg(script()).args(args).output().unwrap();
    assert!(out.status.success(), "hf.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// transformers' answer for `model` (sequence classification over TEXTS, or the masked LM over
/// MLM_TEXT), after checking that it loaded every tensor and found none it did not expect.
fn live(py: &Path, verb: &str, model: &Path) -> Answer {
    live_on(py, verb, model, if verb == "mlm" { &[MLM_TEXT][..] } else { TEXTS })
}

/// [`live`] on `texts`.
fn live_on(py: &Path, verb: &str, model: &Path, texts: &[&str]) -> Answer {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(texts).unwrap()).unwrap();
    let v = hf(py, &[verb.as_ref(), model.as_os_str(), file.path().as_os_str()]);
    for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
        // The base's pooler travels with a pre-trained encoder; a masked LM has no use for it.
        let keys = v["loading_info"][k].as_array().cloned().unwrap_or_default();
        let unused =
            keys.iter().filter(|n| !(verb == "mlm" && k == "unexpected_keys" && n.as_str().is_some_and(|n| n.contains(".pooler."))));
        assert_eq!(unused.count(), 0, "transformers' {k}: {}", v["loading_info"]);
    }
    serde_json::from_value(v).unwrap()
}

fn ours(model: &Path) -> Answer {
    let m = LoadedClassifier::load(model, &Device::Cpu).unwrap();
    let ids = m.tokenize(TEXTS, true).unwrap().unwrap();
    Answer { logits: m.logits(&ids, 8).unwrap(), ids, layout: Value::Null, versions: Value::Null }
}

/// Compares `ours` with the golden answer of `case` and, where Python is here, with transformers
/// live (rewriting the golden answer first when asked to).
fn check(case: &str, ours: &Answer, live_answer: impl FnOnce(&Path) -> Answer) {
    match golden::python() {
        Some(py) => {
            let theirs = live_answer(&py);
            golden::assert_matches(case, "transformers live", ours, &theirs);
            if golden::writing() {
                golden::write(case, &Answer { layout: ours.layout.clone(), ..theirs });
            }
        }
        None => eprintln!("parity {case}: no Python with torch and transformers here; golden files only"),
    }
    golden::assert_matches(case, "the golden file", ours, &golden::read(case));
}

struct Quiet;
impl Observer for Quiet {
    fn on_event(&mut self, _: Event) {}
    fn should_stop(&self) -> bool {
        false
    }
}

fn tiny_rows(split: &str) -> Vec<finetuned::dataset::Row> {
    let bytes = std::fs::read(common::shared().join(format!("datasets/tiny/{split}.jsonl"))).unwrap();
    finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows
}

#[test]
fn a_model_trained_here_gives_the_same_logits_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let hp = HyperparametersInput {
        epochs: Some(1.into()),
        batch_size: Some(16),
        max_seq_len: Some(64),
        pooling: Some("cls".into()),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let out = dir.path().join("trained");
    let mut req = TrainRequest::new(base(), tiny_rows("train"), Some(tiny_rows("validation")), hp, Device::Cpu);
    req.out_dir = Some(out.clone());
    trainer::run(req, &mut Quiet).unwrap();
    let ours = Answer { layout: golden::layout(&out), ..ours(&out) };
    check("export", &ours, |py| live(py, "logits", &out));
}

/// A tiny model of the golden files (`tests/parity/make_models.py`): `roberta` (a random
/// RobertaModel with a byte-level BPE tokenizer) or `electra` (a random ElectraModel whose
/// 16-wide embeddings are projected to its hidden size of 32, with a WordPiece tokenizer);
/// `which` is `base` or `classifier` (the ForSequenceClassification transformers made from it).
fn tiny(arch: &str, which: &str) -> PathBuf {
    golden::dir().join(arch).join(which)
}

fn roberta(which: &str) -> PathBuf {
    tiny("roberta", which)
}

/// A classifier transformers saved serves here with its token ids and logits.
fn imported(arch: &str) {
    let dir = tiny(arch, "classifier");
    let info = finetuned::model::hf::artifacts::inspect(&dir).unwrap();
    assert_eq!(info.labels.unwrap(), vec!["negative", "positive"], "listed as a classifier");
    check(&format!("{arch}-import"), &ours(&dir), |py| live(py, "logits", &dir));
}

/// A classifier trained here from the base loads in transformers as `class`, with no missing or
/// unexpected keys and the same logits.
fn exported(arch: &str, class: &str) {
    exported_pooling(arch, class, "cls", &format!("{arch}-export"));
}

/// [`exported`] with the classifier pooling as `pooling` says, compared as golden case `case`.
fn exported_pooling(arch: &str, class: &str, pooling: &str, case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let hp = HyperparametersInput {
        epochs: Some(1.into()),
        batch_size: Some(16),
        max_seq_len: Some(64),
        pooling: Some(pooling.into()),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let out = dir.path().join("trained");
    let mut req = TrainRequest::new(tiny(arch, "base"), tiny_rows("train"), Some(tiny_rows("validation")), hp, Device::Cpu);
    req.out_dir = Some(out.clone());
    trainer::run(req, &mut Quiet).unwrap();
    let ours = Answer { layout: golden::layout(&out), ..ours(&out) };
    assert_eq!(ours.layout["config"]["architectures"], serde_json::json!([class]));
    check(case, &ours, |py| live(py, "logits", &out));
}

#[test]
fn a_roberta_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("roberta");
}

#[test]
fn a_roberta_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("roberta", "RobertaForSequenceClassification");
}

#[test]
fn an_electra_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("electra");
}

#[test]
fn an_electra_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("electra", "ElectraForSequenceClassification");
}

#[test]
fn an_xlm_roberta_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("xlm-roberta");
}

#[test]
fn an_xlm_roberta_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("xlm-roberta", "XLMRobertaForSequenceClassification");
}

#[test]
fn an_xlm_roberta_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("xlm-roberta-mlm", &tiny("xlm-roberta", "base"), "the movie was a <mask> surprise.");
}

#[test]
fn a_camembert_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("camembert");
}

#[test]
fn a_camembert_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("camembert", "CamembertForSequenceClassification");
}

#[test]
fn a_camembert_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("camembert-mlm", &tiny("camembert", "base"), "the movie was a <mask> surprise.");
}

#[test]
fn a_modernbert_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("modernbert");
}

#[test]
fn a_modernbert_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("modernbert", "ModernBertForSequenceClassification");
}

#[test]
fn a_modernbert_trained_here_with_mean_pooling_pools_the_same_in_transformers() {
    exported_pooling("modernbert", "ModernBertForSequenceClassification", "mean", "modernbert-mean-export");
}

/// From ModernBERT's masked-LM checkpoint: its `head` and `decoder.bias` train and are saved
/// under transformers' names, the decoder tied to the embeddings.
#[test]
fn a_modernbert_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("modernbert-mlm-export", &tiny("modernbert", "mlm"), MLM_TEXT);
}

/// DeBERTa-v3's layout on a tiny model: disentangled attention (both terms, keys shared, log
/// buckets), normalised relative embeddings, no absolute positions, no token types.
#[test]
fn a_deberta_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("deberta-v2");
}

#[test]
fn a_deberta_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("deberta-v2", "DebertaV2ForSequenceClassification");
}

/// Its masked LM is transformers' default (`legacy`) head, BERT's `cls.predictions` names.
#[test]
fn a_deberta_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("deberta-v2-mlm", &tiny("deberta-v2", "base"), MLM_TEXT);
}

#[test]
fn a_distilbert_classifier_saved_by_transformers_serves_with_the_same_logits() {
    imported("distilbert");
}

#[test]
fn a_distilbert_model_trained_here_gives_the_same_logits_in_transformers() {
    exported("distilbert", "DistilBertForSequenceClassification");
}

#[test]
fn a_distilbert_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("distilbert-mlm", &tiny("distilbert", "base"), MLM_TEXT);
}

const PAIRS: &[(&str, &str)] = &[
    (
        "Amrozi accused his brother of deliberately distorting his evidence.",
        "Referring to him as only the witness, Amrozi accused his brother.",
    ),
    ("the cat sat on the mat", "a cat was sitting on a mat"),
    ("x", "a much longer second text than the first one, with more words in it"),
];

/// Rows of a shared dataset's training split.
fn shared_train(dataset: &str) -> Vec<finetuned::dataset::Row> {
    let bytes = std::fs::read(common::shared().join(format!("datasets/{dataset}/train.jsonl"))).unwrap();
    finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows
}

/// Trains a pair model of `task` on `rows` (96 to train, 32 to validate) from the tiny `arch`
/// base; returns its dir (in `dir`) and our logits and ids for [`PAIRS`].
fn train_pairs(dir: &Path, arch: &str, task: Task, rows: &[finetuned::dataset::Row]) -> (PathBuf, Answer) {
    // The real all-MiniLM where a tiny random BERT would score every pair alike.
    let from = if arch == "minilm" { base() } else { tiny(arch, "base") };
    assert!(rows[0].text_pair.is_some(), "the rows are pairs");
    // One-output heads train harder, so that the pairs' scores differ by more than the tolerance.
    let (epochs, learning_rate) = if task.one_output() && arch != "minilm" { (3, Some(2e-3)) } else { (1, None) };
    let hp = HyperparametersInput {
        epochs: Some(epochs.into()),
        batch_size: Some(16),
        max_seq_len: Some(64),
        learning_rate,
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let out = dir.join("trained");
    let mut req = TrainRequest::new(from, rows[..96].to_vec(), Some(rows[96..128].to_vec()), hp, Device::Cpu);
    req.out_dir = Some(out.clone());
    req.task = task;
    trainer::run(req, &mut Quiet).unwrap();

    let cfg = finetuned::model::hf::artifacts::inspect(&out).unwrap().config;
    let tok = finetuned::model::hf::tokenize::load_tokenizer(&out).unwrap();
    let m = LoadedClassifier::load(&out, &Device::Cpu).unwrap();
    let (mut ids, mut logits) = (Vec::new(), Vec::new());
    for (a, b) in PAIRS {
        let (seq, types) = finetuned::model::hf::tokenize::encode_pairs(&tok, &[(a, b)], 512).unwrap().remove(0);
        let types = if cfg.type_vocab_size > 1 { types } else { vec![] };
        if cfg.type_vocab_size > 1 {
            assert!(types.contains(&1), "the second text is type 1");
        }
        let batch =
            finetuned::model::hf::tokenize::pad_batch_typed(&[seq.as_slice()], &[types.as_slice()], cfg.pad_token_id as u32, &Device::Cpu)
                .unwrap();
        logits.push(m.forward(&batch.ids, &batch.type_ids, &batch.mask).unwrap().to_vec2::<f32>().unwrap().remove(0));
        ids.push(seq);
    }
    (out, Answer { ids, logits, layout: Value::Null, versions: Value::Null })
}

/// transformers' logits for [`PAIRS`] from the model in `out`.
fn live_pairs(py: &Path, verb: &str, out: &Path) -> Answer {
    let file = tempfile::NamedTempFile::new().unwrap();
    let items: Vec<[&str; 2]> = PAIRS.iter().map(|(a, b)| [*a, *b]).collect();
    std::fs::write(file.path(), serde_json::to_vec(&items).unwrap()).unwrap();
    serde_json::from_value(hf(py, &[verb.as_ref(), out.as_os_str(), file.path().as_os_str()])).unwrap()
}

/// A sentence-pair classifier trained here (MRPC's first rows, from the tiny BERT and the tiny
/// RoBERTa: token types 0/1 on one, none on the other) gives transformers' logits for pairs.
fn pair_classifier_matches(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (out, ours) = train_pairs(dir.path(), arch, Task::SingleLabel, &shared_train("mrpc"));
    check(&format!("{arch}-pairs"), &ours, |py| live_pairs(py, "logits", &out));
}

#[test]
fn a_bert_pair_classifier_trained_here_gives_transformers_logits_for_pairs() {
    pair_classifier_matches("bert");
}

#[test]
fn a_roberta_pair_classifier_trained_here_gives_transformers_logits_for_pairs() {
    pair_classifier_matches("roberta");
}

/// A regression trained here on STS-B's pairs is saved as transformers' regression (one output,
/// `problem_type` regression) and gives its logits.
#[test]
fn a_regression_trained_here_loads_in_transformers_as_a_regression() {
    let dir = tempfile::tempdir().unwrap();
    let (out, ours) = train_pairs(dir.path(), "minilm", Task::Regression, &shared_train("stsb"));
    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["problem_type"], "regression", "{config}");
    assert_eq!(config["id2label"], serde_json::json!({"0": "score"}), "one output: {config}");
    let spread =
        ours.logits.iter().map(|l| l[0]).fold(f32::NEG_INFINITY, f32::max) - ours.logits.iter().map(|l| l[0]).fold(f32::INFINITY, f32::min);
    assert!(spread > 1e-2, "the pairs get different numbers: {:?}", ours.logits);
    check("minilm-regression", &ours, |py| live_pairs(py, "logits", &out));
}

/// A reranker trained here (all-MiniLM on MRPC's pairs, relevance 1 for a paraphrase) scores in
/// sentence-transformers' `CrossEncoder` as it does here: the sigmoid of its one logit.
fn reranker_matches(arch: &str) {
    let rows: Vec<_> = shared_train("mrpc")
        .into_iter()
        .map(|mut r| {
            let relevant = r.labels() == ["equivalent"];
            r.label = Some(finetuned::dataset::LabelValue::One(if relevant { "1" } else { "0" }.into()));
            r
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (out, ours) = train_pairs(dir.path(), arch, Task::Rerank, &rows);
    let m = LoadedClassifier::load(&out, &Device::Cpu).unwrap();
    assert_eq!(m.head, finetuned::model::predict::predictor::Head::Rerank);
    // Our served scores: the sigmoid of each logit.
    let scores: Vec<Vec<f32>> = ours.logits.iter().map(|l| m.probabilities(l, true)).collect();
    let spread = scores.iter().map(|l| l[0]).fold(f32::NEG_INFINITY, f32::max) - scores.iter().map(|l| l[0]).fold(f32::INFINITY, f32::min);
    assert!(spread > 1e-3, "the pairs get different scores: {scores:?}");
    let ours = Answer { logits: scores, ..ours };
    let case = format!("{arch}-rerank-crossencoder");
    let has_st = golden::python()
        .is_some_and(|py| Command::new(py).args(["-c", "import sentence_transformers"]).output().is_ok_and(|o| o.status.success()));
    if has_st {
        check(&case, &ours, |py| live_pairs(py, "crossencoder", &out));
    } else {
        eprintln!("parity {case}: no sentence-transformers here; the golden file only");
        golden::assert_matches(&case, "the golden file", &ours, &golden::read(&case));
    }
}

#[test]
fn a_reranker_trained_here_scores_the_same_in_sentence_transformers() {
    reranker_matches("minilm");
}

#[test]
fn a_classifier_saved_by_transformers_serves_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf-classifier");
    let py = golden::python();
    match &py {
        Some(py) => {
            let status = Command::new(py).arg(script()).arg("make").arg(base()).arg("3").arg(&out).status().unwrap();
            assert!(status.success());
            if golden::writing() {
                let status = Command::new(py)
                    .arg(script())
                    .arg("pack-import")
                    .arg(&out)
                    .arg(base())
                    .arg(golden::dir().join("import"))
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        }
        None => golden::rebuild_import(&base(), &out),
    }
    let info = finetuned::model::hf::artifacts::inspect(&out).unwrap();
    assert_eq!(info.labels.unwrap(), vec!["label_0", "label_1", "label_2"], "listed as a classifier");
    check("import", &ours(&out), |py| live(py, "logits", &out));
}

#[test]
fn a_model_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("mlm", &base(), MLM_TEXT);
}

#[test]
fn a_roberta_pretrained_here_loads_in_transformers_as_a_masked_lm() {
    pretrain_and_compare("roberta-mlm", &roberta("base"), "the movie was a <mask> surprise.");
}

/// Masked-LM pre-training from `base` on the tiny texts; the saved model's logits on `text` (the
/// first 1,000 vocabulary entries per token) against transformers' `AutoModelForMaskedLM`.
fn pretrain_and_compare(case: &str, base: &Path, text: &str) {
    use finetuned::model::encoder::mlm::MaskedLm;
    use finetuned::model::ops::layers::Mode;
    use finetuned::train::mlm::{self, MlmRequest, Start};
    let dir = tempfile::tempdir().unwrap();
    let hp = HyperparametersInput { epochs: Some(1.into()), batch_size: Some(32), max_seq_len: Some(64), ..Default::default() }
        .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
        .unwrap();
    let out = dir.path().join("mlm");
    let req = MlmRequest {
        start: Start::Checkpoint(base.to_path_buf()),
        train_rows: tiny_rows("train"),
        validation_rows: None,
        hp,
        device: Device::Cpu,
        out_dir: Some(out.clone()),
        mask_prob: 0.15,
        checkpoints: None,
        precision: finetuned::train::precision::Precision::F32,
    };
    mlm::run(req, &mut Quiet).unwrap();

    let tok = finetuned::model::hf::tokenize::load_tokenizer(&out).unwrap();
    let ids = finetuned::model::hf::tokenize::encode_all(&tok, &[text]).unwrap().remove(0);
    let weights = finetuned::model::hf::artifacts::load_weights(&out, &Device::Cpu).unwrap();
    let cfg = finetuned::model::hf::artifacts::inspect(&out).unwrap().config;
    let model = MaskedLm::load(&|n| weights.get(n).cloned().ok_or_else(|| candle_core::Error::Msg(n.into())), &cfg).unwrap();
    let batch = finetuned::model::hf::tokenize::pad_batch(&[ids.as_slice()], 0, &Device::Cpu).unwrap();
    let rows = candle_core::Tensor::new((0..ids.len() as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(&batch.ids, &batch.type_ids, &batch.mask, &rows, &mut Mode::Eval)
        .unwrap()
        .narrow(1, 0, cfg.vocab_size.min(1000))
        .unwrap()
        .to_vec2()
        .unwrap();
    let ours = Answer { ids: vec![ids], logits, layout: golden::layout(&out), versions: Value::Null };
    check(case, &ours, |py| live_on(py, "mlm", &out, &[text]));
}
