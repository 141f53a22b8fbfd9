//! A peft LoRA adapter in the models dir: listed with its method, rank and base, served by
//! predict, and refused as a job's base.

use crate::helpers::{assert_error, models_dir, spawn_with};
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn add_golden_adapter(models: &std::path::Path, name: &str) {
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden/peft-adapter");
    let to = models.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in [finetuned::model::hf::lora::ADAPTER_CONFIG, finetuned::model::hf::lora::ADAPTER_WEIGHTS] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[tokio::test]
async fn a_peft_adapter_in_the_models_dir_is_listed_and_served_over_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    add_golden_adapter(&models, "peft-tiny");
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

    // Served over the shared base: the raw scores are peft's logits.
    // The texts `tests/lora.rs` asked peft about when the golden file was made.
    let texts =
        ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés,", "unflinchingly bleak and desperate", "x"];
    let r = app.predict("peft-tiny", &json!({"inputs": texts, "raw_scores": true})).await;
    let got = scores(r.json().await.unwrap());
    let want: Vec<Vec<f32>> = serde_json::from_value(golden["logits"].clone()).unwrap();
    assert_close(&got, &want);
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["adapters_loaded"], json!(["peft-tiny"]), "{info}");
    assert!(info["models_loaded"].as_array().unwrap().iter().all(|m| m != "peft-tiny"), "not loaded as a model of its own: {info}");

    let r = app.post_json("/v1/jobs", &json!({"base_model": "peft-tiny", "training_dataset": "ds-none"})).await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "base_model");
    assert!(err["message"].as_str().unwrap().contains("all-minilm-l6-v2"), "{err}");
    app.stop().await;
}

/// Scores per input, in the model's label order, from a predict answer.
fn scores(body: Value) -> Vec<Vec<f32>> {
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut row: Vec<(String, f32)> = p
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["label"].as_str().unwrap().to_string(), s["score"].as_f64().unwrap() as f32))
                .collect();
            row.sort_by(|a, b| a.0.cmp(&b.0));
            row.into_iter().map(|(_, s)| s).collect()
        })
        .collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() <= 1e-4, "{got:?} against {want:?}");
        }
    }
}

/// Writes, as `name`, the golden adapter with its low-rank B matrices negated and its head
/// scaled: a second adapter over the same base that answers differently.
fn add_turned_adapter(models: &std::path::Path, name: &str) {
    add_golden_adapter(models, name);
    let path = models.join(name).join(finetuned::model::hf::lora::ADAPTER_WEIGHTS);
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for (k, t) in tensors.iter_mut() {
        if k.ends_with("lora_B.weight") {
            *t = t.neg().unwrap();
        } else if k.contains("classifier") {
            *t = (t.clone() * 3.0).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[tokio::test]
async fn adapters_of_one_base_share_it_and_each_request_gets_its_own_adapters_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    add_golden_adapter(&models, "first");
    add_turned_adapter(&models, "second");
    // The second pools by mean where the first reads the pooler: still one base between them.
    let base = finetuned::model::hf::lora::inspect_adapter(&models.join("second")).unwrap().base;
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    cfg["finetuned_pooling"] = json!("mean");
    std::fs::write(models.join("second").join("config.json"), cfg.to_string()).unwrap();
    let device = candle_core::Device::Cpu;
    let texts = ["a gorgeous, witty, seductive movie.", "unflinchingly bleak and desperate", "x", "the plot is nothing but boilerplate"];
    // What each adapter gives alone, merged into its own copy of the base.
    let alone = |name: &str| {
        let m = finetuned::model::predict::predictor::LoadedClassifier::load(&models.join(name), &device).unwrap();
        let ids = m.tokenize(&texts, true).unwrap().unwrap();
        m.logits(&ids, 8).unwrap()
    };
    let (first, second) = (alone("first"), alone("second"));
    assert!((first[0][0] - second[0][0]).abs() > 1e-3, "the two adapters must answer differently");
    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;

    // Many requests at once, alternating adapters, so that passes hold rows of both.
    let calls = (0..16).map(|i| {
        let name = if i % 2 == 0 { "first" } else { "second" };
        let text = texts[i % texts.len()];
        let app = &app;
        async move { (name, i % texts.len(), app.predict(name, &json!({"inputs": [text], "raw_scores": true})).await) }
    });
    for (name, t, r) in futures::future::join_all(calls).await {
        assert_eq!(r.status(), StatusCode::OK);
        let want = if name == "first" { &first[t] } else { &second[t] };
        assert_close(&scores(r.json().await.unwrap()), std::slice::from_ref(want));
    }
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["adapters_loaded"], json!(["first", "second"]), "{info}");
    assert_eq!(info["bases_loaded"], 1, "one base for both adapters, whatever their pooling: {info}");
    assert_eq!(info["models_loaded"], json!([]), "no adapter is loaded as a model of its own: {info}");
    app.stop().await;
}
