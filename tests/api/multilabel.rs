use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Texts whose labels are independent: "pos" when a positive word is present, "film" when
/// "film" is, both, or neither.
pub(crate) fn multilabel_jsonl(n: usize) -> String {
    let pos = ["good", "great", "nice"];
    let neg = ["bad", "awful", "dull"];
    (0..n)
        .map(|i| {
            let (p, f) = (i % 2 == 0, (i / 2) % 2 == 0);
            let word = if p { pos[i % 3] } else { neg[i % 3] };
            let noun = if f { "film" } else { "plot" };
            let mut labels = vec![];
            if p {
                labels.push("pos");
            }
            if f {
                labels.push("film");
            }
            json!({"text": format!("the {noun} was {word}"), "label": labels}).to_string() + "\n"
        })
        .collect()
}

#[tokio::test]
async fn multi_label_job_trains_and_predict_applies_thresholds() {
    let app = spawn_app().await;
    let ds = app.upload_ok(multilabel_jsonl(64)).await;
    let d: Value = app.get(&format!("/v1/datasets/{ds}")).await.json().await.unwrap();
    assert_eq!(d["multi_label"], true);
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "training_dataset");
    // Mean pooling sees the noun directly; through [CLS] the random 2-layer model learnt the
    // "film" label in only some seeds (it must learn attention first), which made the test
    // depend on luck rather than on the multi-label path it checks.
    let mut hp = tiny_hp(15);
    hp["pooling"] = json!("mean");
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": ds, "task": "multi_label_classification",
                            "model_name": "ml", "hyperparameters": hp}))
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let metrics: Value = app.get(&format!("/v1/jobs/{}/metrics", job["id"].as_str().unwrap())).await.json().await.unwrap();
    let last = metrics["validation"].as_array().unwrap().last().unwrap().clone();
    assert!(last["micro_f1"].as_f64().unwrap() > 0.9, "{last}");
    let model: Value = app.get("/v1/models/ml").await.json().await.unwrap();
    assert_eq!(model["task"], "multi_label_classification");

    let v: Value =
        app.predict("ml", &json!({"inputs": ["the film was great", "the plot was awful"], "threshold": 0.5})).await.json().await.unwrap();
    assert_eq!(v["labels"][0], json!(["film", "pos"]), "{v}");
    assert_eq!(v["labels"][1], json!([]), "{v}");
    // Sigmoid scores are independent: they need not sum to 1.
    let s: f64 = v["predictions"][0].as_array().unwrap().iter().map(|p| p["score"].as_f64().unwrap()).sum();
    assert!(s > 1.0, "{v}");
    // Uncalibrated: the calibrated score of a label this sure may round to exactly 1.
    let body = json!({"inputs": "the film was great", "threshold": {"film": 1.0}, "calibrated": false});
    let per: Value = app.predict("ml", &body).await.json().await.unwrap();
    assert_eq!(per["labels"][0], json!(["pos"]), "film's own threshold of 1.0 drops it");
    let r = app.predict("ml", &json!({"inputs": "x", "threshold": {"nope": 0.5}})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "threshold.nope");
    let r = app.predict("ml", &json!({"inputs": "x", "threshold": 2})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
}

#[tokio::test]
async fn thresholds_tuned_on_validation_are_saved_and_predict_uses_them_by_default() {
    let app = spawn_app().await;
    let train = app.upload_ok(multilabel_jsonl(64)).await;
    // 24 validation rows: each label has 12 positives there, enough to tune.
    let val = app.upload_ok(multilabel_jsonl(24)).await;
    let mut hp = tiny_hp(6);
    hp["pooling"] = json!("mean");
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": train, "validation_dataset": val,
                            "task": "multi_label_classification", "model_name": "tuned", "hyperparameters": hp}))
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model: Value = app.get("/v1/models/tuned").await.json().await.unwrap();
    let thresholds = model["metrics"]["thresholds"].as_object().unwrap_or_else(|| panic!("{model}")).clone();
    assert_eq!(thresholds.keys().collect::<Vec<_>>(), vec!["film", "pos"], "{model}");
    assert!(thresholds.values().all(|t| (0.0..=1.0).contains(&t.as_f64().unwrap())), "{thresholds:?}");
    assert!(
        model["metrics"]["validation_tuned"]["macro_f1"].as_f64().unwrap()
            >= model["metrics"]["validation"]["macro_f1"].as_f64().unwrap() - 1e-9,
        "tuning on validation cannot score below 0.5 there: {model}"
    );
    let cfg: Value = serde_json::from_slice(&std::fs::read(app.data_dir.join("models/tuned/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["finetuned_thresholds"].as_object().unwrap().len(), 2, "saved with the model: {cfg}");

    // Without a threshold in the request, each input's labels are those at or above the model's own.
    let texts = ["the film was great", "the plot was awful", "the film was dull", "the plot was nice"];
    let v: Value = app.predict("tuned", &json!({"inputs": texts})).await.json().await.unwrap();
    for (i, preds) in v["predictions"].as_array().unwrap().iter().enumerate() {
        let want: Vec<&str> = {
            let mut w: Vec<&str> = preds
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["score"].as_f64().unwrap() >= thresholds[p["label"].as_str().unwrap()].as_f64().unwrap() - 1e-6)
                .map(|p| p["label"].as_str().unwrap())
                .collect();
            w.sort();
            w
        };
        let mut got: Vec<&str> = v["labels"][i].as_array().unwrap_or_else(|| panic!("{v}")).iter().map(|l| l.as_str().unwrap()).collect();
        got.sort();
        assert_eq!(got, want, "input {i}: {v}");
    }
    // The request's own threshold wins; raw scores carry no labels.
    let all: Value = app.predict("tuned", &json!({"inputs": texts, "threshold": 0.0})).await.json().await.unwrap();
    assert!(all["labels"].as_array().unwrap().iter().all(|l| l.as_array().unwrap().len() == 2), "{all}");
    let raw: Value = app.predict("tuned", &json!({"inputs": texts, "raw_scores": true})).await.json().await.unwrap();
    assert!(raw.get("labels").is_none(), "{raw}");
    // The thresholds are on the calibrated scores; uncalibrated scores get the same decisions.
    let t = model["metrics"]["calibration"]["temperature"].as_f64().unwrap_or_else(|| panic!("{model}"));
    assert_eq!(cfg["finetuned_temperature"].as_f64().unwrap(), t, "{cfg}");
    let plain: Value = app.predict("tuned", &json!({"inputs": texts, "calibrated": false})).await.json().await.unwrap();
    assert_eq!(plain["labels"], v["labels"], "{plain} against {v}");
    let score = |v: &Value, i: usize, label: &str| {
        v["predictions"][i].as_array().unwrap().iter().find(|p| p["label"] == label).unwrap()["score"].as_f64().unwrap()
    };
    for i in 0..texts.len() {
        let z = score(&raw, i, "film");
        assert!((score(&v, i, "film") - 1.0 / (1.0 + (-z / t).exp())).abs() < 1e-5, "calibrated: {v}");
        assert!((score(&plain, i, "film") - 1.0 / (1.0 + (-z).exp())).abs() < 1e-5, "uncalibrated: {plain}");
    }
}

#[tokio::test]
async fn every_classifier_gets_a_temperature_fitted_on_validation_with_its_calibration_error() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ds, "model_name": "cal", "hyperparameters": tiny_hp(10)});
    let job = app.create_job(&body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = app.wait_ended(&id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model: Value = app.get("/v1/models/cal").await.json().await.unwrap();
    let cal = &model["metrics"]["calibration"];
    let t = cal["temperature"].as_f64().unwrap_or_else(|| panic!("{model}"));
    assert!(t > 0.0 && t.is_finite(), "{cal}");
    for k in ["validation_ece_before", "validation_ece_after"] {
        assert!((0.0..=1.0).contains(&cal[k].as_f64().unwrap_or(-1.0)), "{k}: {cal}");
    }
    let metrics: Value = app.get(&format!("/v1/jobs/{id}/metrics")).await.json().await.unwrap();
    assert_eq!(metrics["calibration"], *cal, "the job's metrics: {metrics}");
    let cfg: Value = serde_json::from_slice(&std::fs::read(app.data_dir.join("models/cal/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["finetuned_temperature"].as_f64().unwrap(), t, "saved with the model: {cfg}");
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events.to_string().contains("calibrated on validation: temperature"), "{events}");
}
