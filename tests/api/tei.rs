//! The text-embeddings-inference routes (`/predict`, `/info`, `/tokenize`) and the Hugging Face
//! inference request shape on our own predict route.

use crate::common::toy_jsonl;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn trained(app: &TestApp, name: &str, task: &str, data: String) {
    let ds = app.upload_ok(data).await;
    let mut hp = tiny_hp(10);
    hp["pooling"] = json!("mean");
    let body = json!({"base_model": "tiny", "training_dataset": ds, "model_name": name, "task": task, "hyperparameters": hp});
    let job = app.create_job(&body).await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

async fn post(app: &TestApp, path: &str, model: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = app.client.post(app.url(path)).json(body);
    if let Some(m) = model {
        req = req.header("X-Model", m);
    }
    req.send().await.unwrap()
}

async fn ok_json(r: reqwest::Response) -> Value {
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// Our own predictions for `body` (the contract's shape), one list per input.
async fn ours(app: &TestApp, model: &str, body: Value) -> Value {
    ok_json(app.predict(model, &body).await).await["predictions"].clone()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[tokio::test]
async fn tei_examples_answer_in_teis_shapes() {
    let app = spawn_app_with(|c| c.default_model = Some("toy".into())).await;
    trained(&app, "toy", "classification", toy_jsonl(48)).await;
    // TEI's README examples: one text, a batch of one-text lists, raw scores.
    let single = ok_json(post(&app, "/predict", None, &json!({"inputs": "a great superb film"})).await).await;
    assert_eq!(single, ours(&app, "toy", json!({"inputs": "a great superb film"})).await[0], "one input: a list of {{label, score}}");
    assert_eq!(single[0]["label"], "pos");
    assert!(single[0]["score"].as_f64().unwrap() > single[1]["score"].as_f64().unwrap(), "best first: {single}");
    let one_in_list = ok_json(post(&app, "/predict", None, &json!({"inputs": ["a great superb film"]})).await).await;
    assert_eq!(one_in_list, single, "[text] is one input in TEI");
    let batch = ok_json(post(&app, "/predict", None, &json!({"inputs": [["good"], ["awful and dull"]]})).await).await;
    assert_eq!(batch, ours(&app, "toy", json!({"inputs": ["good", "awful and dull"]})).await, "a batch: a list of lists");
    let raw = ok_json(post(&app, "/predict", None, &json!({"inputs": "good", "raw_scores": true})).await).await;
    assert_eq!(raw, ours(&app, "toy", json!({"inputs": "good", "raw_scores": true})).await[0]);
    // Truncation: the tiny model takes 64 positions.
    let long = vec!["good"; 200].join(" ");
    let r = post(&app, "/predict", None, &json!({"inputs": long, "truncate": false})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    for body in [json!({"inputs": long}), json!({"inputs": long, "truncate": true, "truncation_direction": "Left"})] {
        let v = ok_json(post(&app, "/predict", None, &body).await).await;
        assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    }
    // The end of a text decides a left-truncated score, its start a right-truncated one.
    let mixed = format!("{} {}", vec!["superb"; 100].join(" "), vec!["awful"; 100].join(" "));
    let right = ok_json(post(&app, "/predict", None, &json!({"inputs": mixed, "truncation_direction": "Right"})).await).await;
    let left = ok_json(post(&app, "/predict", None, &json!({"inputs": mixed, "truncation_direction": "left"})).await).await;
    assert_eq!((right[0]["label"].as_str(), left[0]["label"].as_str()), (Some("pos"), Some("neg")), "{right} {left}");
    let r = post(&app, "/predict", None, &json!({"inputs": "good", "truncation_direction": "middle"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "truncation_direction");
    // A pair of texts is one input to TEI, and to our route in the Hugging Face shape.
    let pair = ok_json(post(&app, "/predict", None, &json!({"inputs": ["good", "awful and dull"]})).await).await;
    let hf_pair = json!({"inputs": [{"text": "good", "text_pair": "awful and dull"}]});
    assert_eq!(pair, ours(&app, "toy", hf_pair).await[0], "a pair: the same scores on both routes");
    let alone = ok_json(post(&app, "/predict", None, &json!({"inputs": "good"})).await).await;
    assert_ne!(pair, alone, "the second text counts");
    let pairs = ok_json(post(&app, "/predict", None, &json!({"inputs": [["good", "awful and dull"], ["bad", "superb"]]})).await).await;
    // The first pair scores the same in a batch of two as alone (up to the last bit's rounding).
    let close = |a: &Value, b: &Value| {
        a.as_array()
            .unwrap()
            .iter()
            .zip(b.as_array().unwrap())
            .all(|(x, y)| x["label"] == y["label"] && (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-6)
    };
    assert!(close(&pairs[0], &pair), "a batch of pairs: {pairs} against {pair}");
    assert_eq!(pairs.as_array().unwrap().len(), 2);
    let r = post(&app, "/predict", None, &json!({"inputs": [["good"], ["bad", "superb"]]})).await;
    let e = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert!(e["message"].as_str().unwrap().contains("mixes single texts and pairs"), "{e}");
    let mixed = json!({"inputs": ["good", {"text": "bad", "text_pair": "superb"}]});
    assert_error(app.predict("toy", &mixed).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    let chunked = json!({"inputs": {"text": "bad", "text_pair": "superb"}, "overflow": "chunk"});
    let e = assert_error(app.predict("toy", &chunked).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(e["param"], "overflow");
    // The header names another model; an unknown or base model is our usual error.
    assert_error(post(&app, "/predict", Some("nope"), &json!({"inputs": "good"})).await, StatusCode::NOT_FOUND, "not_found").await;
    let r = post(&app, "/predict", Some("tiny"), &json!({"inputs": "good"})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;

    let info = ok_json(app.get("/info").await).await;
    assert_eq!(info["model_id"], "toy");
    assert_eq!(info["max_input_length"], 64);
    assert_eq!(info["model_type"]["classifier"]["id2label"], json!({"0": "neg", "1": "pos"}), "{info}");
    assert_eq!(info["model_type"]["classifier"]["label2id"], json!({"neg": 0, "pos": 1}));

    let tokens = ok_json(post(&app, "/tokenize", None, &json!({"inputs": "Good film"})).await).await;
    let want = json!([[
        {"id": 2, "text": "[CLS]", "special": true, "start": null, "stop": null},
        {"id": 5, "text": "Good", "special": false, "start": 0, "stop": 4},
        {"id": 19, "text": "film", "special": false, "start": 5, "stop": 9},
        {"id": 3, "text": "[SEP]", "special": true, "start": null, "stop": null},
    ]]);
    assert_eq!(tokens, want);
    let plain = ok_json(post(&app, "/tokenize", None, &json!({"inputs": ["Good film", "bad"], "add_special_tokens": false})).await).await;
    assert_eq!(plain[0], json!(want[0].as_array().unwrap()[1..3]));
    assert_eq!(plain[1][0]["text"], "bad");
}

#[tokio::test]
async fn without_a_default_model_the_tei_routes_need_the_header() {
    let app = spawn_app().await;
    for r in [post(&app, "/predict", None, &json!({"inputs": "good"})).await, app.get("/info").await] {
        assert_eq!(assert_error(r, StatusCode::BAD_REQUEST, "model_required").await["param"], "X-Model");
    }
    let r = post(&app, "/tokenize", Some("tiny"), &json!({"inputs": "good"})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
}

#[tokio::test]
async fn hugging_face_parameters_get_the_hugging_face_shape() {
    let app = spawn_app().await;
    trained(&app, "toy", "classification", toy_jsonl(48)).await;
    let texts = ["a great superb film", "awful and dull"];
    // What huggingface_hub's InferenceClient.text_classification sends: parameters, maybe empty.
    let v = ok_json(app.predict("toy", &json!({"inputs": texts[0], "parameters": {}})).await).await;
    assert_eq!(v, ours(&app, "toy", json!({"inputs": texts[0]})).await, "[[{{label, score}}, ...]]");
    let on_tei = ok_json(post(&app, "/predict", Some("toy"), &json!({"inputs": texts[0], "parameters": {}})).await).await;
    assert_eq!(on_tei, v);
    let v = ok_json(app.predict("toy", &json!({"inputs": texts, "parameters": {"top_k": 1}})).await).await;
    assert_eq!(v, ours(&app, "toy", json!({"inputs": texts, "top_k": 1})).await);
    let raw = ours(&app, "toy", json!({"inputs": texts[0], "raw_scores": true})).await;
    let none = ok_json(app.predict("toy", &json!({"inputs": texts[0], "parameters": {"function_to_apply": "none"}})).await).await;
    assert_eq!(none, raw);
    let sig = ok_json(app.predict("toy", &json!({"inputs": texts[0], "parameters": {"function_to_apply": "sigmoid"}})).await).await;
    for (s, r) in sig[0].as_array().unwrap().iter().zip(raw[0].as_array().unwrap()) {
        assert_eq!(s["label"], r["label"]);
        assert!((s["score"].as_f64().unwrap() - sigmoid(r["score"].as_f64().unwrap())).abs() < 1e-5, "{sig} {raw}");
    }
    // function_to_apply works on the logits as they are: our uncalibrated probabilities.
    let soft = ok_json(app.predict("toy", &json!({"inputs": texts[0], "parameters": {"function_to_apply": "softmax"}})).await).await;
    let probs = ours(&app, "toy", json!({"inputs": texts[0], "calibrated": false})).await;
    for (s, p) in soft[0].as_array().unwrap().iter().zip(probs[0].as_array().unwrap()) {
        assert!((s["score"].as_f64().unwrap() - p["score"].as_f64().unwrap()).abs() < 1e-5, "{soft} {probs}");
    }
    for (body, param) in [
        (json!({"inputs": "x", "parameters": {"function_to_apply": "tanh"}}), "parameters.function_to_apply"),
        (json!({"inputs": "x", "parameters": {"top_k": 0}}), "parameters.top_k"),
        (json!({"inputs": "x", "parameters": {"temperature": 1}}), "parameters.temperature"),
        (json!({"inputs": "x", "parameters": [null, null]}), "parameters"),
        (json!({"inputs": "x", "parameters": {"function_to_apply": "none"}, "raw_scores": true}), "raw_scores"),
        (json!({"inputs": "x", "parameters": {"function_to_apply": "softmax"}, "calibrated": false}), "calibrated"),
    ] {
        let e = assert_error(app.predict("toy", &body).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(e["param"], param, "{body}");
    }
}

#[tokio::test]
async fn a_multi_label_model_gets_calibrated_sigmoid_scores_on_the_tei_route() {
    let app = spawn_app_with(|c| c.default_model = Some("ml".into())).await;
    trained(&app, "ml", "multi_label_classification", crate::multilabel::multilabel_jsonl(32)).await;
    let text = "the film was great";
    let v = ok_json(post(&app, "/predict", None, &json!({"inputs": text})).await).await;
    let raw = ours(&app, "ml", json!({"inputs": text, "raw_scores": true})).await;
    let raw: std::collections::HashMap<&str, f64> =
        raw[0].as_array().unwrap().iter().map(|p| (p["label"].as_str().unwrap(), p["score"].as_f64().unwrap())).collect();
    let model: Value = app.get("/v1/models/ml").await.json().await.unwrap();
    let t = model["metrics"]["calibration"]["temperature"].as_f64().unwrap_or_else(|| panic!("{model}"));
    for p in v.as_array().unwrap() {
        let want = sigmoid(raw[p["label"].as_str().unwrap()] / t);
        assert!((p["score"].as_f64().unwrap() - want).abs() < 1e-5, "{v}");
    }
    assert_eq!(v, ours(&app, "ml", json!({"inputs": text})).await[0]);
}
