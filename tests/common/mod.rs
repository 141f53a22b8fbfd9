//! Test fixtures: a tiny random BERT (config, word-level tokenizer, weights) written to a
//! directory, and a separable toy data set.
#![allow(dead_code)]

pub mod process;
pub mod servers;

use candle_core::{Device, Tensor};
use finetuned::dataset::{LabelValue, Row};
use finetuned::model::encoder::params::Params;
use finetuned::model::encoder::post_norm::encoder_params;
use finetuned::model::EncoderConfig;
use rand::SeedableRng;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const POSITIVE: &[&str] = &["good", "great", "fine", "lovely", "superb", "nice"];
pub const NEGATIVE: &[&str] = &["bad", "awful", "poor", "dull", "boring", "ugly"];
pub const NEUTRAL: &[&str] = &["the", "movie", "film", "was", "a", "plot", "it", "really"];

fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| s.to_string()).collect();
    v.extend(POSITIVE.iter().chain(NEGATIVE).chain(NEUTRAL).map(|s| s.to_string()));
    v
}

/// Config of the tiny BERT: 2 layers, hidden 32, 4 heads.
pub fn tiny_config() -> EncoderConfig {
    serde_json::from_value(json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab().len(),
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "initializer_range": 0.02
    }))
    .unwrap()
}

fn tokenizer_json() -> serde_json::Value {
    let v = vocab();
    let added: Vec<_> = v[..5]
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let vocab_map: serde_json::Map<String, serde_json::Value> = v.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "[UNK]"}
    })
}

/// Random encoder weights (N(0, 0.02); LayerNorm 1/0), with a pooler, names without `bert.`.
pub fn tiny_weights(cfg: &EncoderConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let h = cfg.hidden_size;
    let mut spec = encoder_params(cfg);
    spec.push(("pooler.dense.weight".into(), vec![h, h]));
    spec.push(("pooler.dense.bias".into(), vec![h]));
    let params = Params::build(cfg, &spec, &HashMap::new(), &[], &mut rng, &Device::Cpu).unwrap();
    params.names.iter().zip(&params.vars).map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
}

/// Writes the tiny BERT as a Hugging Face directory `dir/name` and returns its path.
pub fn write_tiny_model(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).unwrap();
    let cfg = tiny_config();
    std::fs::write(path.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    std::fs::write(path.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let w = tiny_weights(&cfg, 7);
    candle_core::safetensors::save(&w, path.join("model.safetensors")).unwrap();
    path
}

/// `n` toy texts: positive words → "pos", negative words → "neg", mixed with neutral words.
pub fn toy_rows(n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            let pos = i % 2 == 0;
            let words = if pos { POSITIVE } else { NEGATIVE };
            let text = format!(
                "{} {} {} {}",
                NEUTRAL[i % NEUTRAL.len()],
                words[i % words.len()],
                NEUTRAL[(i / 3) % NEUTRAL.len()],
                words[(i / 2) % words.len()]
            );
            Row { text, label: Some(LabelValue::One(if pos { "pos" } else { "neg" }.into())), ..Row::default() }
        })
        .collect()
}

/// The toy rows as JSONL.
pub fn toy_jsonl(n: usize) -> String {
    toy_rows(n).iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect()
}

/// The shared directory beside the repository.
pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("shared")
}

/// With `FINETUNED_TEST_DATABASE_URL` set (a Postgres server, as `.ci/run` starts one), the URL
/// of a database of its own for `data_dir` on that server, created on first use (a restart on the
/// same data dir finds the same database). Without it, `None`: SQLite in the data dir.
pub fn test_database_url(data_dir: &Path) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let admin = std::env::var("FINETUNED_TEST_DATABASE_URL").ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    let name = format!("t{:016x}", h.finish());
    let (server, db) = (admin.clone(), name.clone());
    // A thread of its own: callers may be inside a runtime already.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(&server).await.expect("the test Postgres server answers");
            let found: Option<i32> =
                sqlx::query_scalar("select 1 from pg_database where datname = $1").bind(&db).fetch_optional(&mut conn).await.unwrap();
            if found.is_none() {
                conn.execute(format!("create database {db}").as_str()).await.unwrap();
            }
        })
    })
    .join()
    .unwrap();
    let mut url = reqwest::Url::parse(&admin).unwrap();
    url.set_path(&name);
    Some(url.to_string())
}

/// With `FINETUNED_TEST_OBJECT_STORE` set (`s3://bucket/prefix`, with the `AWS_*` variables of
/// an S3-protocol server, as `.ci/run` starts one), a store prefix of its own for `data_dir`.
pub fn test_object_store(data_dir: &Path) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let base = std::env::var("FINETUNED_TEST_OBJECT_STORE").ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    Some(format!("{}/t{:016x}", base.trim_end_matches('/'), h.finish()))
}

/// Whether the tests run against a Postgres server (`FINETUNED_TEST_DATABASE_URL`).
pub fn on_postgres() -> bool {
    std::env::var_os("FINETUNED_TEST_DATABASE_URL").is_some()
}
