//! Parity of token classification with transformers: a tagger trained here (all-MiniLM on
//! CoNLL-2003's first sentences) loads as `BertForTokenClassification` with the same logits for
//! every token, and our entities are those of transformers' token-classification pipeline with
//! each aggregation strategy. Live where a Python with transformers is found, else against the
//! golden files (`tests/parity/regenerate.sh` writes them).

mod common;
#[path = "parity/golden.rs"]
mod golden;

use candle_core::Device;
use finetuned::model::predict::predictor::{Head, LoadedClassifier};
use finetuned::serve::entities::{aggregate, Aggregation, Entity, Piece};
use finetuned::train::hyper::HyperparametersInput;
use finetuned::train::objective::Task;
use finetuned::train::trainer::{self, Event, Observer, TrainRequest};
use golden::Answer;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TEXTS: &[&str] = &[
    "EU rejects German call to boycott British lamb.",
    "Peter Blackburn flew from Brussels to Washington on Monday.",
    "Japan's Nikkei index fell as Toyota Motor Corp shares dropped in Tokyo.",
];

struct Quiet;
impl Observer for Quiet {
    fn on_event(&mut self, _: Event) {}
    fn should_stop(&self) -> bool {
        false
    }
}

fn conll(split: &str, n: usize) -> Vec<finetuned::dataset::Row> {
    let bytes = std::fs::read(common::shared().join(format!("datasets/conll2003/{split}.jsonl"))).unwrap();
    let rows = finetuned::dataset::parse(&bytes, finetuned::dataset::Format::Jsonl, "text", "label").unwrap().rows;
    rows.into_iter().take(n).collect()
}

fn hf(py: &Path, verb: &str, model: &Path) -> Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(TEXTS).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py");
    let out = Command::new(py).arg(script).args([verb.as_ref(), model.as_os_str(), file.path().as_os_str()]).output().unwrap();
    assert!(out.status.success(), "hf.py {verb}: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // transformers loaded every tensor it expects, and found none it did not (a pooler, say).
    for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
        assert_eq!(v["loading_info"][k].as_array().map_or(0, Vec::len), 0, "{verb}: transformers' {k}: {}", v["loading_info"]);
    }
    v
}

/// Our entities of TEXTS with each strategy, from our model's scores.
fn our_entities(m: &LoadedClassifier, logits: &[Vec<f32>]) -> Value {
    let pieces = m.pieces(TEXTS).unwrap();
    let k = m.labels.len();
    let mut out = serde_json::Map::new();
    for (name, strategy) in [
        ("none", Aggregation::None),
        ("simple", Aggregation::Simple),
        ("first", Aggregation::First),
        ("average", Aggregation::Average),
        ("max", Aggregation::Max),
    ] {
        let per_text: Vec<Vec<Entity>> = TEXTS
            .iter()
            .zip(&pieces)
            .zip(logits)
            .map(|((text, p), flat)| {
                let scored: Vec<Piece> = p
                    .content()
                    .map(|pos| Piece {
                        index: pos,
                        start: p.offsets[pos].0,
                        end: p.offsets[pos].1,
                        is_subword: p.continues[pos],
                        scores: finetuned::model::predict::predictor::softmax(&flat[pos * k..(pos + 1) * k]),
                    })
                    .collect();
                aggregate(text, &scored, &m.labels, strategy)
            })
            .collect();
        out.insert(name.into(), serde_json::to_value(per_text).unwrap());
    }
    Value::Object(out)
}

/// Asserts that two sets of entities agree: the same entities with the same spans and tags,
/// scores within 1e-4, and words the same but for case and WordPiece's `##` (the pipeline's
/// `word` is the tokenizer's decoding, lower-cased by this one; ours is the text as written).
fn assert_same_entities(ours: &Value, theirs: &Value, source: &str) {
    let mut total = 0;
    for strategy in ["none", "simple", "first", "average", "max"] {
        let (a, b) = (ours[strategy].as_array().unwrap(), theirs[strategy].as_array().unwrap());
        assert_eq!(a.len(), b.len());
        for (text, (x, y)) in a.iter().zip(b).enumerate() {
            let (x, y) = (x.as_array().unwrap(), y.as_array().unwrap());
            assert_eq!(x.len(), y.len(), "{strategy}, text {text}: ours {x:?}\n{source}'s {y:?}");
            for (e, f) in x.iter().zip(y) {
                for key in ["entity", "entity_group", "start", "end", "index"] {
                    assert_eq!(e.get(key), f.get(key), "{strategy}, text {text}, {key}: ours {e}, {source}'s {f}");
                }
                let (s, t) = (e["score"].as_f64().unwrap(), f["score"].as_f64().unwrap());
                assert!((s - t).abs() < 1e-4, "{strategy}, text {text}: score {s} against {t}");
                let word = |v: &Value| v["word"].as_str().unwrap().trim_start_matches("##").to_lowercase();
                assert_eq!(word(e), word(f), "{strategy}, text {text}");
                total += 1;
            }
        }
    }
    eprintln!("parity minilm-ner-pipeline: {total} entities over 5 strategies agree with {source}");
    assert!(total > 10, "the tagger finds entities to compare: {ours}");
}

#[test]
fn a_tagger_trained_here_gives_transformers_logits_and_its_pipelines_entities() {
    let dir = tempfile::tempdir().unwrap();
    let hp = HyperparametersInput {
        epochs: Some(2.into()),
        batch_size: Some(16),
        max_seq_len: Some(64),
        learning_rate: Some(1e-4),
        ..Default::default()
    }
    .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
    .unwrap();
    let out = dir.path().join("tagger");
    let mut req = TrainRequest::new(
        common::shared().join("models/all-minilm-l6-v2"),
        conll("train", 400),
        Some(conll("validation", 64)),
        hp,
        Device::Cpu,
    );
    req.out_dir = Some(out.clone());
    req.task = Task::Tokens;
    trainer::run(req, &mut Quiet).unwrap();
    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], json!(["BertForTokenClassification"]), "{config}");

    let m = LoadedClassifier::load(&out, &Device::Cpu).unwrap();
    assert_eq!(m.head, Head::Tokens);
    let ids = m.tokenize(TEXTS, true).unwrap().unwrap();
    let logits = m.logits(&ids, 8).unwrap();
    let ours = Answer { ids, logits: logits.clone(), layout: golden::layout(&out), versions: Value::Null };
    let entities = our_entities(&m, &logits);
    let pipeline_case = golden::dir().join("minilm-ner-pipeline.json");
    match golden::python() {
        Some(py) => {
            let theirs: Answer = serde_json::from_value(hf(&py, "token-logits", &out)).unwrap();
            golden::assert_matches("minilm-ner", "transformers live", &ours, &theirs);
            let pipe = hf(&py, "ner", &out);
            assert_same_entities(&entities, &pipe["entities"], "transformers' pipeline live");
            if golden::writing() {
                golden::write("minilm-ner", &Answer { layout: ours.layout.clone(), ..theirs });
                std::fs::write(&pipeline_case, serde_json::to_string_pretty(&pipe).unwrap() + "\n").unwrap();
            }
        }
        None => eprintln!("parity minilm-ner: no Python with torch and transformers here; golden files only"),
    }
    golden::assert_matches("minilm-ner", "the golden file", &ours, &golden::read("minilm-ner"));
    let pipe: Value = serde_json::from_slice(&std::fs::read(&pipeline_case).unwrap()).unwrap();
    assert_same_entities(&entities, &pipe["entities"], "the golden pipeline file");
}

/// The tiny models of the golden files, one per architecture.
const ARCHS: [&str; 8] = ["bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "modernbert", "deberta-v2"];

/// Words split into sub-words for training as transformers' `run_ner.py` splits them
/// (`is_split_into_words`, RoBERTa's BPE with `add_prefix_space`), and the word of each sub-word.
#[test]
fn every_architecture_splits_words_as_run_ner_does() {
    let sentences: Vec<Vec<String>> = conll("train", 40).into_iter().map(|r| r.tokens.unwrap()).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&sentences).unwrap()).unwrap();
    for arch in ARCHS {
        let base = golden::dir().join(arch).join("base");
        let tok = finetuned::model::hf::tokenize::load_tokenizer(&base).unwrap();
        let ours: Vec<(Vec<u32>, Vec<Option<u32>>)> =
            finetuned::model::hf::words::encode_words(&tok, &sentences).unwrap().into_iter().map(|p| (p.ids, p.words)).collect();
        let ours = json!({"ids": ours.iter().map(|o| &o.0).collect::<Vec<_>>(), "word_ids": ours.iter().map(|o| &o.1).collect::<Vec<_>>()});
        let path = golden::dir().join(format!("{arch}-words.json"));
        if let Some(py) = golden::python() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py");
            let out = Command::new(&py).arg(script).args(["words".as_ref(), base.as_os_str(), file.path().as_os_str()]).output().unwrap();
            assert!(out.status.success(), "hf.py words: {}", String::from_utf8_lossy(&out.stderr));
            let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(ours["ids"], theirs["ids"], "{arch}: sub-word ids against transformers live");
            assert_eq!(ours["word_ids"], theirs["word_ids"], "{arch}: word ids against transformers live");
            if golden::writing() {
                std::fs::write(&path, serde_json::to_string(&theirs).unwrap() + "\n").unwrap();
            }
        }
        let golden: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(ours["ids"], golden["ids"], "{arch}: sub-word ids against the golden file");
        assert_eq!(ours["word_ids"], golden["word_ids"], "{arch}: word ids against the golden file");
        eprintln!("parity {arch}-words: {} sentences split as run_ner.py splits them", sentences.len());
    }
}

/// A tagger trained here from each architecture's tiny model loads as its
/// `…ForTokenClassification` (a plain `classifier` head, no pooler) with the same logits.
#[test]
fn a_tagger_of_every_architecture_loads_in_transformers() {
    for arch in ARCHS {
        let dir = tempfile::tempdir().unwrap();
        let hp = HyperparametersInput { epochs: Some(1.into()), batch_size: Some(16), max_seq_len: Some(64), ..Default::default() }
            .resolve("cls", finetuned::train::hyper::JobKind::FineTune)
            .unwrap();
        let out = dir.path().join("tagger");
        let base = golden::dir().join(arch).join("base");
        let mut req = TrainRequest::new(base, conll("train", 96), Some(conll("validation", 32)), hp, Device::Cpu);
        req.out_dir = Some(out.clone());
        req.task = Task::Tokens;
        trainer::run(req, &mut Quiet).unwrap();
        let m = LoadedClassifier::load(&out, &Device::Cpu).unwrap();
        let ids = m.tokenize(TEXTS, true).unwrap().unwrap();
        let ours = Answer { logits: m.logits(&ids, 8).unwrap(), ids, layout: golden::layout(&out), versions: Value::Null };
        let case = format!("{arch}-ner");
        if let Some(py) = golden::python() {
            let theirs: Answer = serde_json::from_value(hf(&py, "token-logits", &out)).unwrap();
            golden::assert_matches(&case, "transformers live", &ours, &theirs);
            if golden::writing() {
                golden::write(&case, &Answer { layout: ours.layout.clone(), ..theirs });
            }
        }
        golden::assert_matches(&case, "the golden file", &ours, &golden::read(&case));
    }
}
