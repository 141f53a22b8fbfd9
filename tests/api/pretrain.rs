use crate::common::{toy_jsonl, toy_rows};
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn unlabeled(n: usize) -> String {
    toy_rows(n).iter().map(|r| json!({"text": r.text}).to_string() + "\n").collect()
}

#[tokio::test]
async fn pretrain_on_unlabeled_text_then_fine_tune_the_new_base_model() {
    let app = spawn_app().await;
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
