//! The sentence-embedding anchor of masked-LM jobs: on by default over a sentence-embedding
//! base, it keeps the held-out texts' embeddings nearer the base's than token prediction alone.

use crate::helpers::*;
use crate::pretrain::{sentence_models_dir, unlabeled};
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Runs a masked-LM job and returns its job id and per-epoch validation metrics.
async fn pretrain(app: &TestApp, texts: &str, name: &str, extra: Value) -> (String, Vec<Value>) {
    let mut hp = json!({"epochs": 3, "batch_size": 8, "learning_rate": 5e-3, "mlm_head_warmup_steps": 0});
    hp.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "model_name": name, "hyperparameters": hp}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = app.wait_ended(&id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let metrics: Value = app.get(&format!("/v1/jobs/{id}/metrics")).await.json().await.unwrap();
    (id, metrics["validation"].as_array().unwrap().clone())
}

fn similarity(v: &Value) -> f64 {
    v["embedding_similarity"].as_f64().unwrap_or_else(|| panic!("no embedding_similarity in {v}"))
}

#[tokio::test]
async fn the_anchor_keeps_a_sentence_embedding_base_nearer_its_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), sentence_models_dir(tmp.path()))).await;
    let texts = app.upload_ok(unlabeled(96)).await;

    let (id, anchored) = pretrain(&app, &texts, "anchored", json!({})).await;
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events.to_string().contains("keeping sentence embeddings (mean pooling) near the base's: anchor weight 100"), "{events}");
    let (id, free) = pretrain(&app, &texts, "free", json!({"mlm_anchor_weight": 0})).await;
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events.to_string().contains("sentence embeddings (mean pooling) are free to move: anchor weight 0"), "{events}");

    assert!((similarity(&anchored[0]) - 1.0).abs() < 1e-5, "before training the embeddings are the base's: {:?}", anchored[0]);
    let (kept, moved) = (similarity(anchored.last().unwrap()), similarity(free.last().unwrap()));
    assert!(kept > moved, "anchored {kept} against free {moved}");
    assert!(moved < 0.999, "token prediction alone moves the embeddings: {moved}");
    let job: Value = app.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap();
    assert!(job["metrics"]["validation"]["embedding_similarity"].is_number(), "the job's summary shows it: {job}");
}

#[tokio::test]
async fn a_plain_base_is_not_anchored_unless_asked_and_the_weight_is_checked() {
    let app = spawn_app().await;
    let texts = app.upload_ok(unlabeled(48)).await;
    let (id, plain) = pretrain(&app, &texts, "plain", json!({"epochs": 1})).await;
    assert!(plain.iter().all(|v| v.get("embedding_similarity").is_none()), "{plain:?}");
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(!events.to_string().contains("anchor weight"), "{events}");
    // Asked for, it anchors the pooling `auto` gives the base ([CLS] here).
    let (_, asked) = pretrain(&app, &texts, "asked", json!({"epochs": 1, "mlm_anchor_weight": 5})).await;
    assert!(asked.iter().all(|v| v["embedding_similarity"].is_number()), "{asked:?}");

    let labeled = app.upload_ok(crate::common::toy_jsonl(16)).await;
    let bad = [
        (
            json!({"base_model": "tiny", "training_dataset": labeled, "hyperparameters": {"mlm_anchor_weight": 1}}),
            "applies only to masked-LM",
        ),
        (json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "hyperparameters": {"mlm_anchor_weight": -1}}), "from 0"),
        (
            json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "hyperparameters": {"mlm_anchor_weight": 1},
                   "config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2}}),
            "random weights",
        ),
    ];
    for (body, says) in bad {
        let e = assert_error(app.post_json("/v1/jobs", &body).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(e["param"], "hyperparameters.mlm_anchor_weight", "{e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{e}");
    }
}
