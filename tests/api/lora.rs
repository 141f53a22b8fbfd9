//! A peft LoRA adapter in the models dir: listed with its method, rank and base, served by
//! predict, and refused as a job's base.

use crate::helpers::{assert_error, models_dir, spawn_with};
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn add_golden_adapter(models: &std::path::Path) {
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden/peft-adapter");
    let to = models.join("peft-tiny");
    std::fs::create_dir_all(&to).unwrap();
    for f in [finetuned::model::lora::ADAPTER_CONFIG, finetuned::model::lora::ADAPTER_WEIGHTS] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[tokio::test]
async fn a_peft_adapter_in_the_models_dir_is_listed_and_served_over_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    add_golden_adapter(&models);
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;

    let m: Value = app.get("/v1/models/peft-tiny").await.json().await.unwrap();
    assert_eq!(m["kind"], "classifier");
    assert_eq!(m["method"], "lora");
    assert_eq!(m["rank"], 4);
    assert_eq!(m["base_model"], "all-minilm-l6-v2", "the adapter names the hub id; the models dir's entry of that name is its base");
    assert_eq!(m["labels"], json!(["LABEL_0", "LABEL_1"]));
    let full: Value = app.get("/v1/models/all-minilm-l6-v2").await.json().await.unwrap();
    assert_eq!(full["method"], Value::Null, "a base model has no method");

    let r = app.predict("peft-tiny", &json!({"inputs": ["a gorgeous, witty, seductive movie.", "x"]})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let preds = body["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    let golden: Value = serde_json::from_slice(&std::fs::read("tests/parity/golden/peft.json").unwrap()).unwrap();
    let logits: Vec<f64> = serde_json::from_value(golden["logits"][0].clone()).unwrap();
    let expected = if logits[1] > logits[0] { "LABEL_1" } else { "LABEL_0" };
    assert_eq!(preds[0][0]["label"], expected, "the top label is peft's for the first text");

    let r = app.post_json("/v1/jobs", &json!({"base_model": "peft-tiny", "training_dataset": "ds-none"})).await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "base_model");
    assert!(err["message"].as_str().unwrap().contains("all-minilm-l6-v2"), "{err}");
    app.stop().await;
}
