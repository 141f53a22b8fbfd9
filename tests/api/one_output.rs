//! One-output tasks through the API: regression on STS-B's first pairs and a cross-encoder
//! reranker on MRPC's, each trained with every method and served: `{"score"}` on predict, the
//! reranker on our `/rerank` route and TEI's.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn shared_rows(dataset: &str, n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(crate::common::shared().join(format!("datasets/{dataset}/train.jsonl"))).unwrap();
    text.lines().take(n).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

#[tokio::test]
async fn a_regression_trains_with_each_method_and_predicts_a_number() {
    let app = spawn_app().await;
    let ds = app.upload_ok(jsonl(&shared_rows("stsb", 64))).await;
    let d: Value = app.get(&format!("/v1/datasets/{ds}")).await.json().await.unwrap();
    assert!(d["labels"].as_object().unwrap().contains_key("4.2"), "a float label is kept as written: {d}");
    let pair = json!({"text": "A man is playing a guitar.", "text_pair": "A man plays the guitar."});
    for method in ["full", "lora", "head"] {
        let name = format!("sts-{method}");
        let mut hp = tiny_hp(2);
        hp["method"] = json!(method);
        let body = json!({"base_model": "tiny", "training_dataset": ds, "task": "regression", "model_name": name, "hyperparameters": hp});
        let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let validation = &done["metrics"]["validation"];
        for key in ["pearson", "spearman", "mse", "loss"] {
            assert!(validation[key].is_number(), "{method}: validation {key}: {done}");
        }
        assert!(validation.get("accuracy").is_none() && validation.get("macro_f1").is_none(), "{done}");
        let metrics: Value = app.get(&format!("/v1/jobs/{}/metrics", done["id"].as_str().unwrap())).await.json().await.unwrap();
        assert!(metrics["validation"][0]["spearman"].is_number(), "{metrics}");
        let model: Value = app.get(&format!("/v1/models/{name}")).await.json().await.unwrap();
        assert_eq!(model["task"], "regression", "{model}");
        assert_eq!(model["labels"], json!(["score"]), "{model}");

        let r: Value = app.predict(&name, &json!({"inputs": [pair.clone(), pair.clone()]})).await.json().await.unwrap();
        let preds = r["predictions"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(preds.len(), 2);
        assert!(preds[0]["score"].is_number() && preds[0] == preds[1], "{r}");
        // A number is not a probability: raw scores are the same number.
        let raw: Value = app.predict(&name, &json!({"inputs": [pair.clone()], "raw_scores": true})).await.json().await.unwrap();
        // (A batch of two and a batch of one may round differently in the last bit.)
        let (a, b) = (raw["predictions"][0]["score"].as_f64().unwrap(), preds[0]["score"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-6, "{raw} {r}");
    }
}

#[tokio::test]
async fn a_regression_on_labels_that_are_not_numbers_is_refused_with_the_line() {
    let app = spawn_app().await;
    let mut rows = shared_rows("stsb", 8);
    rows[5]["label"] = json!("high");
    let ds = app.upload_ok(jsonl(&rows)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ds, "task": "regression", "hyperparameters": tiny_hp(1)});
    let e = assert_error(app.post_json("/v1/jobs", &body).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(e["param"], "training_dataset", "{e}");
    assert!(e["message"].as_str().unwrap().contains("line 6"), "{e}");
    // One call with the file: the same refusal, and nothing stored.
    let form = reqwest::multipart::Form::new()
        .text("job", json!({"base_model": "tiny", "task": "rerank"}).to_string())
        .part("training_file", reqwest::multipart::Part::text(jsonl(&rows)).file_name("t.jsonl"));
    let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
    let e = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(e["param"], "training_file", "{e}");
    let listed: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
}

/// Reranking rows from MRPC: each pair's first sentence is a query, its paraphrase (or not)
/// a document of relevance 1 (or 0), and two other rows' sentences documents of relevance 0.
fn rerank_rows(n: usize) -> Vec<Value> {
    let rows = shared_rows("mrpc", n);
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let relevant = if r["label"] == "equivalent" { 1 } else { 0 };
        out.push(json!({"query": r["text"], "document": r["text_pair"], "label": relevant}));
        for k in [1, 2] {
            out.push(json!({"query": r["text"], "document": rows[(i + k * 7) % n]["text_pair"], "label": 0}));
        }
    }
    out
}

#[tokio::test]
async fn a_reranker_trains_with_each_method_and_ranks_on_our_route_and_teis() {
    let app = spawn_app().await;
    let ds = app.upload_ok(jsonl(&rerank_rows(32))).await;
    let query = "The cat sat on the mat.";
    let texts = ["Stocks fell sharply on Monday.", "A cat was sitting on the mat.", "The mat was red."];
    for method in ["full", "lora", "head"] {
        let name = format!("rr-{method}");
        let mut hp = tiny_hp(2);
        hp["method"] = json!(method);
        let body = json!({"base_model": "tiny", "training_dataset": ds, "task": "rerank", "model_name": name, "hyperparameters": hp});
        let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let validation = &done["metrics"]["validation"];
        for key in ["mrr_at_10", "ndcg_at_10", "accuracy"] {
            assert!(validation[key].is_number(), "{method}: validation {key}: {done}");
        }
        let model: Value = app.get(&format!("/v1/models/{name}")).await.json().await.unwrap();
        assert_eq!(model["task"], "rerank", "{model}");

        let body = json!({"query": query, "texts": texts, "return_text": true});
        let r = app.post_json(&format!("/v1/models/{name}/rerank"), &body).await;
        assert_eq!(r.status(), StatusCode::OK);
        let ours: Value = r.json().await.unwrap();
        let results = ours["results"].as_array().unwrap_or_else(|| panic!("{ours}"));
        assert_eq!(results.len(), 3);
        let scores: Vec<f64> = results.iter().map(|r| r["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {ours}");
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "sigmoid scores: {ours}");
        for r in results {
            assert_eq!(r["text"], texts[r["index"].as_u64().unwrap() as usize], "{ours}");
        }
        // TEI's route: the same array.
        let tei = app.client.post(app.url("/rerank")).header("X-Model", &name).json(&body).send().await.unwrap();
        assert_eq!(tei.status(), StatusCode::OK);
        assert_eq!(tei.json::<Value>().await.unwrap(), ours["results"], "{method}");
        // Predict on the pairs gives each text's score; raw scores are the logits.
        let pairs: Vec<Value> = texts.iter().map(|t| json!({"text": query, "text_pair": t})).collect();
        let p: Value = app.predict(&name, &json!({"inputs": pairs})).await.json().await.unwrap();
        let raw: Value = app
            .post_json(&format!("/v1/models/{name}/rerank"), &json!({"query": query, "texts": texts, "raw_scores": true, "top_n": 1}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(raw["results"].as_array().unwrap().len(), 1, "{raw}");
        for r in results {
            let i = r["index"].as_u64().unwrap() as usize;
            assert_eq!(p["predictions"][i]["score"], r["score"], "{p} {ours}");
        }
        let top = &raw["results"][0];
        let logit = top["score"].as_f64().unwrap();
        assert_eq!(top["index"], results[0]["index"]);
        assert!((1.0 / (1.0 + (-logit).exp()) - scores[0]).abs() < 1e-6, "{raw} {ours}");
    }
    // A classifier of several labels is not a reranker; an empty list and a left cut are refused.
    let ml = app.upload_ok(crate::multilabel::multilabel_jsonl(16)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ml, "task": "multi_label_classification", "model_name": "ml", "hyperparameters": tiny_hp(1)});
    let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let r = app.post_json("/v1/models/ml/rerank", &json!({"query": query, "texts": texts})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "model");
    let r = app.post_json("/v1/models/rr-full/rerank", &json!({"query": query, "texts": []})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "texts");
    let left = json!({"query": query, "texts": texts, "truncation_direction": "Left"});
    let r = app.post_json("/v1/models/rr-full/rerank", &left).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "truncation_direction");
    let long = vec!["word"; 200].join(" ");
    let r = app.post_json("/v1/models/rr-full/rerank", &json!({"query": query, "texts": ["a", long], "truncate": false})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "texts[1]");
}

#[tokio::test]
async fn a_rerank_job_refuses_a_relevance_outside_zero_to_one() {
    let app = spawn_app().await;
    let mut rows = rerank_rows(4);
    rows[2]["label"] = json!(3);
    let ds = app.upload_ok(jsonl(&rows)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ds, "task": "rerank", "hyperparameters": tiny_hp(1)});
    let e = assert_error(app.post_json("/v1/jobs", &body).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert!(e["message"].as_str().unwrap().contains("relevance 3"), "{e}");
}
