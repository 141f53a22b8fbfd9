use crate::common::{toy_jsonl, toy_rows};
use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A models dir whose "tiny" is described as a sentence-transformers model pooling by mean,
/// as all-minilm-l6-v2.
pub fn sentence_models_dir(root: &std::path::Path) -> std::path::PathBuf {
    let models = models_dir(root);
    std::fs::write(
        models.join("tiny/modules.json"),
        r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#,
    )
    .unwrap();
    std::fs::create_dir_all(models.join("tiny/1_Pooling")).unwrap();
    std::fs::write(models.join("tiny/1_Pooling/config.json"), r#"{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}"#)
        .unwrap();
    models
}

pub fn unlabeled(n: usize) -> String {
    toy_rows(n).iter().map(|r| json!({"text": r.text}).to_string() + "\n").collect()
}

#[tokio::test]
async fn pretrain_on_unlabeled_text_then_fine_tune_the_new_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let models = sentence_models_dir(tmp.path());
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;
    let texts = app.upload_ok(unlabeled(80)).await;
    let d: Value = app.get(&format!("/v1/datasets/{texts}")).await.json().await.unwrap();
    assert_eq!(d["labels"], json!({}));
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": texts})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "training_dataset");
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "model_name": "tiny-domain",
                            "hyperparameters": {"epochs": 3, "batch_size": 16, "learning_rate": 2e-3}}))
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let metrics: Value = app.get(&format!("/v1/jobs/{}/metrics", job["id"].as_str().unwrap())).await.json().await.unwrap();
    let val = metrics["validation"].as_array().unwrap();
    assert_eq!(val.len(), 4, "before training and after each epoch: {metrics}");
    assert!(val[0]["perplexity"].as_f64().unwrap() > val[3]["perplexity"].as_f64().unwrap());
    let model: Value = app.get("/v1/models/tiny-domain").await.json().await.unwrap();
    assert_eq!(model["kind"], "base");
    assert_eq!(model["task"], "mlm");
    // The adapted base keeps its parent's pooling, and the files that say so.
    assert_eq!((&model["pooling"], &model["lineage"]), (&json!("mean"), &json!(["tiny"])), "{model}");
    let dir = app.data_dir.join("models/tiny-domain");
    assert!(dir.join("modules.json").is_file() && dir.join("1_Pooling/config.json").is_file(), "sentence-transformers files carried over");
    let r = app.predict("tiny-domain", &json!({"inputs": "x"})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;

    let labeled = app.upload_ok(toy_jsonl(48)).await;
    let ft = app
        .create_job(
            &json!({"base_model": "tiny-domain", "training_dataset": labeled, "model_name": "from-domain", "hyperparameters": tiny_hp(4)}),
        )
        .await;
    let done = app.wait_ended(ft["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(app.predict("from-domain", &json!({"inputs": "good"})).await.status(), StatusCode::OK);
    let model: Value = app.get("/v1/models/from-domain").await.json().await.unwrap();
    assert_eq!(model["pooling"], "mean", "auto resolved through the adapted base as through its parent: {model}");
    assert_eq!(model["lineage"], json!(["tiny-domain", "tiny"]), "{model}");
    let listed: Value = app.get("/v1/models").await.json().await.unwrap();
    let entry = listed["data"].as_array().unwrap().iter().find(|m| m["id"] == "from-domain").cloned().unwrap();
    assert_eq!(entry["lineage"], json!(["tiny-domain", "tiny"]), "the list shows lineage too: {entry}");
}

#[tokio::test]
async fn pretrain_from_scratch_with_a_config() {
    let app = spawn_app().await;
    let texts = app.upload_ok(unlabeled(40)).await;
    let r = app
        .post_json(
            "/v1/jobs",
            &json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm",
                                       "config": {"num_hidden_layers": 1, "hidden_size": 30, "num_attention_heads": 4}}),
        )
        .await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "config.hidden_size");
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "model_name": "scratch",
                            "config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2},
                            "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3}}))
        .await;
    assert_eq!(job["config"]["hidden_size"], 16);
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model: Value = app.get("/v1/models/scratch").await.json().await.unwrap();
    assert_eq!(model["kind"], "base");
}

#[tokio::test]
async fn a_new_masked_lm_head_trains_alone_first_and_the_encoder_is_held_meanwhile() {
    let app = spawn_app().await;
    let texts = app.upload_ok(unlabeled(64)).await;
    let labeled = app.upload_ok(toy_jsonl(16)).await;
    let r = app
        .post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": labeled, "hyperparameters": {"mlm_head_warmup_steps": 3}}))
        .await;
    assert_eq!(
        assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"],
        "hyperparameters.mlm_head_warmup_steps"
    );

    // "tiny" ships no masked-LM head. Held for every step, the encoder must come out as it went in.
    let hp = json!({"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "mlm_head_warmup_steps": 1000});
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "model_name": "held", "hyperparameters": hp}))
        .await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.wait_ended(id, 120).await["status"], "succeeded");
    let load = |p: std::path::PathBuf| candle_core::safetensors::load(p.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let models = app.data_dir.parent().unwrap().join("models");
    let (parent, child) = (load(models.join("tiny")), load(app.data_dir.join("models/held")));
    let same = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let encoder: Vec<&String> = parent.keys().filter(|k| k.contains("encoder.") || k.contains("embeddings.")).collect();
    assert!(!encoder.is_empty());
    for name in encoder {
        let theirs = child.get(name.as_str()).or_else(|| child.get(&format!("bert.{name}"))).unwrap_or_else(|| panic!("{name} saved"));
        assert!(same(&parent[name], theirs), "{name} changed while the encoder was held");
    }
    let head = "cls.predictions.transform.dense.weight";
    assert!(child.contains_key(head) && !parent.contains_key(head), "the new head is saved");

    // By default the job picks the warm-up itself and says so.
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": texts, "task": "mlm", "model_name": "auto-warm",
                                     "hyperparameters": {"epochs": 2, "batch_size": 8, "learning_rate": 2e-3}}))
        .await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.wait_ended(id, 120).await["status"], "succeeded");
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events.to_string().contains("training the new prediction head alone for the first 8 of 16 steps"), "{events}");
    let (parent, child) = (load(models.join("tiny")), load(app.data_dir.join("models/auto-warm")));
    let query = |m: &std::collections::HashMap<String, candle_core::Tensor>| {
        let name = "encoder.layer.0.attention.self.query.weight";
        m.get(name).or_else(|| m.get(&format!("bert.{name}"))).unwrap().clone()
    };
    assert!(!same(&query(&parent), &query(&child)), "after the warm-up the encoder trains");
}
