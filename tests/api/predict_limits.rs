//! Predict's own limits and its defences against bad models: a body limit of its own, a cap on
//! each text's characters, classifiers whose labels do not match their head, an inference
//! thread that panics, and job names that would shadow a models-dir model.

use crate::helpers::*;
use candle_core::{DType, Device, Tensor};
use finetuned::config::ServeConfig;
use finetuned::model::encoder::encoder_params;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// Turns the tiny BERT at `models/name` into a sequence classifier whose `id2label` names
/// `labels` and whose head has `outputs` outputs (equal for a sound checkpoint).
fn write_classifier(models: &Path, name: &str, labels: &[&str], outputs: usize) {
    let dir = crate::common::write_tiny_model(models, name);
    let mut cfg = crate::common::tiny_config();
    let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    cfg.set_classifier(&labels, Some("single_label_classification"), "cls");
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let file = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    w.insert("classifier.weight".into(), Tensor::randn(0f32, 0.5, (outputs, cfg.hidden_size), &Device::Cpu).unwrap());
    w.insert("classifier.bias".into(), Tensor::zeros(outputs, DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&w, &file).unwrap();
}

/// Replaces the head of the classifier at `models/name` by one reading `width` inputs.
fn narrow_head(models: &Path, name: &str, width: usize) {
    let file = models.join(name).join("model.safetensors");
    let mut w = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    w.insert("classifier.weight".into(), Tensor::zeros((2, width), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&w, &file).unwrap();
}

/// A classifier that loads but whose forward pass panics: with `hidden_size` 0 every tensor
/// is empty, and candle's CPU LayerNorm splits its input into rows of `hidden_size` elements
/// (rayon panics on a chunk size of 0).
fn write_crashing_classifier(models: &Path, name: &str) {
    let dir = crate::common::write_tiny_model(models, name);
    let mut cfg = crate::common::tiny_config();
    cfg.hidden_size = 0;
    cfg.set_classifier(&["neg".into(), "pos".into()], Some("single_label_classification"), "cls");
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut shapes = encoder_params(&cfg);
    shapes.extend([("pooler.dense.weight".into(), vec![0, 0]), ("pooler.dense.bias".into(), vec![0])]);
    shapes.extend([("classifier.weight".into(), vec![2, 0]), ("classifier.bias".into(), vec![2])]);
    let w: std::collections::HashMap<String, Tensor> =
        shapes.into_iter().map(|(n, s)| (n, Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap())).collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
}

/// A server whose models dir holds the usual models and the classifier `clf`.
async fn spawn_with_classifier(tune: impl FnOnce(&mut ServeConfig)) -> (TestApp, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    write_classifier(&models, "clf", &["neg", "pos"], 2);
    let mut cfg = ServeConfig::for_test(tmp.path().join("data"), models);
    tune(&mut cfg);
    (spawn_with(cfg).await, tmp)
}

#[tokio::test]
async fn a_predict_body_over_its_own_limit_gets_413_while_uploads_keep_theirs() {
    let (app, _tmp) = spawn_with_classifier(|c| c.max_predict_body_bytes = 16 * 1024).await;
    let big = json!({"inputs": ["good ".repeat(4000)]});
    let e = assert_error(app.predict("clf", &big).await, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(e["param"], "body", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("16384 bytes") && message.contains("--max-predict-body-bytes"), "{e}");
    // Under the limit it is served.
    let r = app.predict("clf", &json!({"inputs": ["good ".repeat(1600)]})).await;
    assert_eq!(r.status(), StatusCode::OK);
    // A dataset of the same size is still within the upload limit.
    let body = crate::common::toy_jsonl(800);
    assert!(body.len() > 20 * 1024);
    assert_eq!(app.upload(body, "application/x-ndjson").await.status(), StatusCode::CREATED);
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["limits"]["max_predict_body_bytes"], 16 * 1024, "{info}");
}

#[tokio::test]
async fn an_input_over_the_character_limit_gets_422_naming_its_index() {
    let (app, _tmp) = spawn_with_classifier(|c| c.max_input_chars = 100).await;
    // Characters, not bytes: "é" is two bytes.
    let (at_limit, over) = ("é".repeat(100), "é".repeat(101));
    let r = app.predict("clf", &json!({"inputs": ["good", at_limit, over]})).await;
    let e = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(e["param"], "inputs[2]", "{e}");
    assert!(e["message"].as_str().unwrap().contains("101 characters"), "{e}");
    let r = app.predict("clf", &json!({"inputs": over, "overflow": "chunk"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "inputs[0]");
    assert_eq!(app.predict("clf", &json!({"inputs": ["good", at_limit]})).await.status(), StatusCode::OK);
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["limits"]["max_input_chars"], 100, "{info}");
}

#[tokio::test]
async fn a_models_dir_classifier_whose_labels_or_width_do_not_match_its_head_is_skipped_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    write_classifier(&models, "clf", &["neg", "pos"], 2);
    write_classifier(&models, "fewer-labels", &["only"], 2);
    write_classifier(&models, "more-labels", &["a", "b", "c"], 2);
    write_classifier(&models, "narrow-head", &["neg", "pos"], 2);
    narrow_head(&models, "narrow-head", 16);
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;
    let listed: Value = app.get("/v1/models").await.json().await.unwrap();
    let ids: std::collections::BTreeSet<&str> = listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["all-minilm-l6-v2", "clf", "tiny"].into_iter().collect(), "{listed}");
    for bad in ["fewer-labels", "more-labels", "narrow-head"] {
        assert_error(app.predict(bad, &json!({"inputs": "good"})).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    assert_eq!(app.predict("clf", &json!({"inputs": "good"})).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_trained_model_whose_labels_no_longer_match_its_head_is_refused_at_load() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "relabeled", "hyperparameters": tiny_hp(1)}))
        .await;
    assert_eq!(app.wait_ended(job["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    let config = app.data_dir.join("models/relabeled/config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    cfg["id2label"] = json!({"0": "neg"});
    std::fs::write(&config, cfg.to_string()).unwrap();
    let e = assert_error(app.predict("relabeled", &json!({"inputs": "good"})).await, StatusCode::CONFLICT, "model_unavailable").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("id2label names 1 labels") && message.contains("2 outputs"), "{e}");
}

#[tokio::test]
async fn a_panicking_inference_thread_unloads_its_model_and_the_next_request_reloads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    write_crashing_classifier(&models, "crash");
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models.clone())).await;
    // A client timeout instead of a hang: every request, queued ones included, is answered.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let send = |text: &str| client.post(app.url("/v1/models/crash/predict")).json(&json!({"inputs": text})).send();
    let answers = futures::future::join_all(["good", "bad film", "nice", "dull plot"].map(&send)).await;
    for r in answers {
        let e = assert_error(r.expect("answered, not hung"), StatusCode::INTERNAL_SERVER_ERROR, "internal_error").await;
        assert!(e["message"].as_str().unwrap().contains("loads again on the next request"), "{e}");
    }
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert!(!info["models_loaded"].as_array().unwrap().contains(&json!("crash")), "{info}");
    // The operator replaces the files: the next request loads the model afresh and is served.
    std::fs::remove_dir_all(models.join("crash")).unwrap();
    write_classifier(&models, "crash", &["neg", "pos"], 2);
    let r = send("good").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["predictions"][0].as_array().unwrap().len(), 2, "{v}");
}

#[tokio::test]
async fn a_job_named_like_a_models_dir_model_gets_409() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    for name in ["tiny", "all-minilm-l6-v2"] {
        let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "model_name": name})).await;
        let e = assert_error(r, StatusCode::CONFLICT, "conflict").await;
        assert_eq!(e["param"], "model_name", "{e}");
        assert!(e["message"].as_str().unwrap().contains(&format!("{name:?}")), "{e}");
    }
    // The one-call form is checked alike, and stores nothing.
    let form = reqwest::multipart::Form::new()
        .part("training_file", reqwest::multipart::Part::text(crate::common::toy_jsonl(16)).file_name("train.jsonl"))
        .part("job", reqwest::multipart::Part::text(json!({"base_model": "tiny", "model_name": "tiny"}).to_string()));
    let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
    assert_eq!(assert_error(r, StatusCode::CONFLICT, "conflict").await["param"], "model_name");
    let listed: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    let jobs: Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert!(jobs["data"].as_array().unwrap().is_empty(), "{jobs}");
}
