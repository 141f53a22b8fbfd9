//! The golden files' tiny RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT and ModernBERT (`tests/parity/make_models.py`) through the API:
//! listed with their length limits, fine-tuned with each method, served; a masked-LM job on the
//! ELECTRA discriminator fails saying what it lacks.

use crate::common::toy_jsonl;
use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;

const ARCHS: [&str; 7] = ["roberta", "xlm-roberta", "camembert", "electra", "distilbert", "modernbert", "deberta-v2"];

#[tokio::test]
async fn every_architectures_base_fine_tunes_with_each_method_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden");
    for arch in ARCHS {
        std::os::unix::fs::symlink(golden.join(arch).join("base"), models.join(format!("tiny-{arch}"))).unwrap();
    }
    std::os::unix::fs::symlink(golden.join("modernbert").join("mlm"), models.join("tiny-modernbert-mlm")).unwrap();
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;

    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    for t in ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "modernbert", "deberta-v2"] {
        assert!(info["architectures"].as_array().unwrap().contains(&json!(t)), "{info}");
    }
    // RoBERTa's 130 position rows count from pad_token_id + 1 = 2: 128 tokens; ELECTRA's from 0.
    for (arch, max) in [
        ("roberta", 128),
        ("xlm-roberta", 128),
        ("camembert", 128),
        ("electra", 128),
        ("distilbert", 128),
        ("modernbert", 512),
        ("deberta-v2", 128),
    ] {
        let listed: Value = app.get(&format!("/v1/models/tiny-{arch}")).await.json().await.unwrap();
        assert_eq!(listed["max_seq_len"], max, "{listed}");
        assert_eq!(listed["architecture"], arch, "{listed}");
    }

    let ds = app.upload_ok(toy_jsonl(48)).await;
    for arch in ARCHS {
        for (method, lr) in [("full", 2e-3), ("lora", 2e-2), ("head", 5e-2)] {
            let name = format!("{arch}-{method}");
            let hp = json!({"epochs": 10, "batch_size": 8, "learning_rate": lr, "warmup_ratio": 0.0, "seed": 1, "method": method});
            let body = json!({"base_model": format!("tiny-{arch}"), "training_dataset": ds, "model_name": name, "hyperparameters": hp});
            let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 300).await;
            assert_eq!(done["status"], "succeeded", "{done}");
            let model: Value = app.get(&format!("/v1/models/{name}")).await.json().await.unwrap();
            assert_eq!(model["architecture"], arch, "{model}");
            let r = app.predict(&name, &json!({"inputs": ["a great superb film", "the plot was really awful and boring"]})).await;
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.unwrap();
            if method == "full" {
                let best: Vec<&str> = (0..2).map(|i| v["predictions"][i][0]["label"].as_str().unwrap()).collect();
                assert_eq!(best, ["pos", "neg"], "{name}: {v}");
            }
        }
    }

    // A ModernBERT tagger: its head (dense, GELU, norm) runs on every token.
    let tagged = crate::ner::upload_as(&app, crate::ner::toy_tagged(32), "application/jsonl").await;
    let hp = json!({"epochs": 8, "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0, "seed": 1});
    let body = json!({"base_model": "tiny-modernbert", "training_dataset": tagged["id"], "task": "token_classification", "model_name": "modernbert-ner", "hyperparameters": hp});
    let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 300).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let text = "the great lovely film dull";
    let found: Value =
        app.predict("modernbert-ner", &json!({"inputs": [text], "aggregation_strategy": "first"})).await.json().await.unwrap();
    // Each entity word as the text has it (the tiny vocabulary keeps a word's space as a token
    // of its own, so a word can start with it).
    let groups: Vec<(&str, &str)> = found["predictions"][0]
        .as_array()
        .unwrap_or_else(|| panic!("{found}"))
        .iter()
        .map(|e| (e["entity_group"].as_str().unwrap(), e["word"].as_str().unwrap().trim()))
        .collect();
    let of = |group: &str| groups.iter().filter(|(g, _)| *g == group).map(|(_, w)| *w).collect::<Vec<_>>().join(" ");
    assert_eq!((of("POS").as_str(), of("NEG").as_str()), ("great lovely", "dull"), "{found}");

    // ModernBERT pre-trains (from its masked-LM checkpoint, whose head it keeps).
    let body = json!({"base_model": "tiny-modernbert-mlm", "training_dataset": ds, "task": "mlm", "model_name": "modernbert-mlm", "hyperparameters": {"epochs": 1}});
    let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // A masked-LM job on the ELECTRA discriminator is refused at creation, saying what it lacks.
    let body = json!({"base_model": "tiny-electra", "training_dataset": ds, "task": "mlm", "hyperparameters": {"epochs": 1}});
    let r = app.post_json("/v1/jobs", &body).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "base_model", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("needs its generator"), "{v}");
    // A DistilBERT pre-trains.
    let body = json!({"base_model": "tiny-distilbert", "training_dataset": ds, "task": "mlm", "hyperparameters": {"epochs": 1}});
    let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}
