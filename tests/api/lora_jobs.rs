//! Fine-tuning methods through the API: `lora` trains adapters and saves them in peft's layout,
//! served over the base; `head` trains the pooler and head only; bad settings get 422.

use crate::common::toy_jsonl;
use crate::helpers::{assert_error, spawn_app, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn train(app: &TestApp, ds: &str, hp: Value) -> Value {
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": hp})).await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 300).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    done
}

/// The share of the toy rows whose label the model predicts first.
async fn accuracy(app: &TestApp, model: &str, jsonl: &str) -> f64 {
    let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let r: Value = app.predict(model, &json!({"inputs": texts})).await.json().await.unwrap();
    let right = rows.iter().zip(r["predictions"].as_array().unwrap()).filter(|(row, p)| p[0]["label"] == row["label"]).count();
    right as f64 / rows.len() as f64
}

#[tokio::test]
async fn a_lora_job_trains_an_adapter_in_peft_layout_that_predict_serves_over_its_base() {
    let app = spawn_app().await;
    let data = toy_jsonl(48);
    let ds = app.upload_ok(data.clone()).await;
    let hp = json!({"epochs": 8, "batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0, "seed": 1,
                    "method": "lora", "lora_r": 4, "lora_target_modules": ["query", "value", "intermediate.dense"]});
    let done = train(&app, &ds, hp).await;
    assert_eq!(done["hyperparameters"]["method"], "lora");
    assert_eq!(
        done["hyperparameters"]["lora"],
        json!({"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["query", "value", "intermediate.dense"]})
    );
    let id = done["model"].as_str().unwrap();

    let model: Value = app.get(&format!("/v1/models/{id}")).await.json().await.unwrap();
    assert_eq!(
        (model["method"].as_str(), model["rank"].as_u64(), model["base_model"].as_str()),
        (Some("lora"), Some(4), Some("tiny")),
        "{model}"
    );
    let dir = app.data_dir.join("models").join(id);
    assert!(dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file(), "peft's files");
    assert!(!dir.join("model.safetensors").exists(), "no copy of the base");
    let cfg: Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["task_type"].as_str(), cfg["r"].as_u64()), (Some("LORA"), Some("SEQ_CLS"), Some(4)));
    // The base is named by its catalog id, not by a path on this machine: the adapter still
    // finds it (predict below) from the trained-models folder, where no "tiny" is.
    assert_eq!(cfg["base_model_name_or_path"], json!("tiny"), "{cfg}");
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(tensors.contains_key("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"), "{:?}", tensors.keys());
    assert!(tensors.contains_key("base_model.model.classifier.weight"));
    assert_eq!(tensors.len(), 2 * 3 * 2 + 2, "A and B for 3 modules in 2 layers, and the head: nothing of the frozen base");

    let acc = accuracy(&app, id, &data).await;
    // The toy rows are half positive, half negative: a model that learned nothing scores 0.5.
    assert!(acc >= 0.8, "the adapter learned the toy task: accuracy {acc}");
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["adapters_loaded"], json!([id]), "served over the shared base: {info}");

    // The download is the adapter as peft saves it; `?merged=true` is a whole model.
    let names = |bytes: &[u8]| -> Vec<String> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect()
    };
    let plain = names(&app.get(&format!("/v1/models/{id}/download")).await.bytes().await.unwrap());
    assert!(plain.contains(&format!("{id}/adapter_model.safetensors")) && !plain.contains(&format!("{id}/model.safetensors")), "{plain:?}");
    let merged = names(&app.get(&format!("/v1/models/{id}/download?merged=true")).await.bytes().await.unwrap());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.contains(&format!("{id}/{f}")), "{f} missing from {merged:?}");
    }
    assert!(!merged.contains(&format!("{id}/adapter_config.json")), "{merged:?}");

    // The base cannot be deleted while the adapter runs over it; a job cannot start from the adapter.
    let r = app.post_json("/v1/jobs", &json!({"base_model": id, "training_dataset": ds})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    app.stop().await;
}

#[tokio::test]
async fn a_head_job_trains_only_the_pooler_and_head() {
    let app = spawn_app().await;
    let data = toy_jsonl(48);
    let ds = app.upload_ok(data.clone()).await;
    let hp =
        json!({"epochs": 20, "batch_size": 8, "learning_rate": 5e-2, "warmup_ratio": 0.0, "seed": 1, "method": "head", "pooling": "mean"});
    let done = train(&app, &ds, hp).await;
    let id = done["model"].as_str().unwrap();
    let model: Value = app.get(&format!("/v1/models/{id}")).await.json().await.unwrap();
    assert_eq!(model["method"], "head");
    // The encoder is the base's, bit for bit.
    let ours =
        candle_core::safetensors::load(app.data_dir.join("models").join(id).join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let base_dir = app.data_dir.parent().unwrap().join("models/tiny");
    let base = candle_core::safetensors::load(base_dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let name = "encoder.layer.0.attention.self.query.weight";
    let theirs = base.get(name).or_else(|| base.get(&format!("bert.{name}"))).unwrap();
    let diff: f32 = (&ours[&format!("bert.{name}")] - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert_eq!(diff, 0.0, "the encoder did not train");
    let acc = accuracy(&app, id, &data).await;
    assert!(acc >= 0.8, "the head learned the toy task over the frozen encoder: accuracy {acc}");
    app.stop().await;
}

#[tokio::test]
async fn bad_method_settings_get_422_naming_the_field() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(10)).await;
    for (hp, param) in [
        (json!({"method": "prefix"}), "hyperparameters.method"),
        (json!({"method": "lora", "lora_r": 0}), "hyperparameters.lora_r"),
        (json!({"method": "lora", "lora_target_modules": ["pooler"]}), "hyperparameters.lora_target_modules"),
        (json!({"method": "lora", "lora_target_modules": []}), "hyperparameters.lora_target_modules"),
        (json!({"lora_r": 8}), "hyperparameters.lora_r"),
    ] {
        let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": hp})).await;
        let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(err["param"], param, "{hp}: {err}");
    }
    let r = app
        .post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "task": "mlm", "hyperparameters": {"method": "lora"}}))
        .await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "hyperparameters.method");
    // The same words as `finetuned train` and the hyperparameters' own check (tests/cli.rs).
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": {"lora_r": 4}})).await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["message"], "applies only with \"method\": \"lora\"", "{err}");
    app.stop().await;
}

/// With no `learning_rate`, a job gets its method's default, and shows the rate it resolved.
#[tokio::test]
async fn each_method_gets_its_own_default_learning_rate() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(10)).await;
    for (method, rate) in [("full", 5e-5), ("lora", 2e-3), ("head", 1e-2)] {
        let hp = json!({"method": method, "epochs": 1});
        let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": hp})).await;
        assert_eq!(job["hyperparameters"]["learning_rate"], rate, "{method}: {job}");
        app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_model_that_lora_adapters_run_over_cannot_be_deleted() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(24)).await;
    let job = app
        .create_job(
            &json!({"base_model": "tiny", "training_dataset": ds, "model_name": "toy-base", "hyperparameters": crate::helpers::tiny_hp(1)}),
        )
        .await;
    assert_eq!(app.wait_ended(job["id"].as_str().unwrap(), 300).await["status"], "succeeded");
    let job = app
        .create_job(&json!({"base_model": "toy-base", "training_dataset": ds, "hyperparameters": {"epochs": 1, "method": "lora"}}))
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 300).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let r = app.client.delete(format!("{}/v1/models/toy-base", app.base)).send().await.unwrap();
    let err = assert_error(r, StatusCode::CONFLICT, "conflict").await;
    assert!(err["message"].as_str().unwrap().contains("LoRA adapter"), "{err}");
    let adapter = done["model"].as_str().unwrap();
    let r = app.client.delete(format!("{}/v1/models/{adapter}", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.client.delete(format!("{}/v1/models/toy-base", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "deletable once its adapter is gone");
    app.stop().await;
}
