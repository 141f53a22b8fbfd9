//! A RoBERTa checkpoint (the golden files' tiny one: `tests/parity/make_roberta.py`) through the
//! API: listed with its length limit, fine-tuned with each method, and served.

use crate::common::toy_jsonl;
use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;

#[tokio::test]
async fn a_roberta_base_fine_tunes_with_each_method_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden/roberta/base");
    std::os::unix::fs::symlink(base, models.join("tiny-roberta")).unwrap();
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;

    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    for t in ["bert", "roberta", "xlm-roberta", "camembert"] {
        assert!(info["architectures"].as_array().unwrap().contains(&json!(t)), "{info}");
    }
    let listed: Value = app.get("/v1/models/tiny-roberta").await.json().await.unwrap();
    // 130 position rows, counted from pad_token_id + 1 = 2: 128 tokens.
    assert_eq!(listed["max_seq_len"], 128, "{listed}");

    let ds = app.upload_ok(toy_jsonl(48)).await;
    for (method, lr) in [("full", 2e-3), ("lora", 2e-2), ("head", 5e-2)] {
        let name = format!("roberta-{method}");
        let hp = json!({"epochs": 10, "batch_size": 8, "learning_rate": lr, "warmup_ratio": 0.0, "seed": 1, "method": method});
        let job =
            app.create_job(&json!({"base_model": "tiny-roberta", "training_dataset": ds, "model_name": name, "hyperparameters": hp})).await;
        let done = app.wait_ended(job["id"].as_str().unwrap(), 300).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let r = app.predict(&name, &json!({"inputs": ["a great superb film", "the plot was really awful and boring"]})).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        if method == "full" {
            let best: Vec<&str> = (0..2).map(|i| v["predictions"][i][0]["label"].as_str().unwrap()).collect();
            assert_eq!(best, ["pos", "neg"], "{v}");
        }
    }
}
