//! Sentence pairs through the API: a dataset of pairs uploaded (MRPC's first rows), a `full`
//! and a `lora` job on it, each served with pairs on our route and TEI's.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn a_pair_dataset_trains_with_each_method_and_serves_pairs() {
    let app = spawn_app().await;
    let text = std::fs::read_to_string(crate::common::shared().join("datasets/mrpc/train.jsonl")).unwrap();
    let rows: String = text.lines().take(64).map(|l| format!("{l}\n")).collect();
    let ds = app.upload_ok(rows).await;
    let one = json!({"text": "The cat sat on the mat.", "text_pair": "A cat was sitting on the mat."});
    for method in ["full", "lora"] {
        let name = format!("pairs-{method}");
        let mut hp = tiny_hp(2);
        hp["method"] = json!(method);
        hp["pooling"] = json!("mean");
        let body = json!({"base_model": "tiny", "training_dataset": ds, "model_name": name, "hyperparameters": hp});
        let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        // The job asked for 128 tokens; the tiny base's positions hold 64.
        assert_eq!(done["hyperparameters"]["max_seq_len"], 128);
        let listed: Value = app.get(&format!("/v1/models/{name}")).await.json().await.unwrap();
        assert_eq!(listed["max_seq_len"], 64, "{listed}");

        let ours: Value = app.predict(&name, &json!({"inputs": [one.clone(), one.clone()]})).await.json().await.unwrap();
        let preds = ours["predictions"].as_array().unwrap_or_else(|| panic!("{ours}"));
        assert_eq!(preds.len(), 2, "{ours}");
        assert_eq!(preds[0], preds[1]);
        let labels: Vec<&str> = preds[0].as_array().unwrap().iter().map(|p| p["label"].as_str().unwrap()).collect();
        assert!(labels.contains(&"equivalent") && labels.contains(&"not_equivalent"), "{ours}");
        let tei = app
            .client
            .post(app.url("/predict"))
            .header("X-Model", &name)
            .json(&json!({"inputs": [one["text"], one["text_pair"]]}))
            .send()
            .await
            .unwrap();
        assert_eq!(tei.status(), StatusCode::OK);
        assert_eq!(tei.json::<Value>().await.unwrap(), preds[0], "{method}: TEI's pair form scores the same");
        let single: Value = app.predict(&name, &json!({"inputs": one["text"]})).await.json().await.unwrap();
        assert_ne!(single["predictions"][0], preds[0], "{method}: the second text counts");
        // Too long with truncate false: refused, naming the input.
        let long = vec!["word"; 200].join(" ");
        let r = app.predict(&name, &json!({"inputs": [one.clone(), {"text": long, "text_pair": "x"}], "truncate": false})).await;
        assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "inputs[1]");
        let bad = json!({"inputs": [{"text": "a", "second": "b"}]});
        assert_error(app.predict(&name, &bad).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    }
}
