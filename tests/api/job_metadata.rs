//! Job metadata (as on OpenAI's fine-tuning jobs): string pairs given at creation, shown on the
//! job, and a filter of the job list that pages like the list itself.

use crate::helpers::*;
use axum::http::StatusCode;
use serde_json::{json, Value};

/// The ids of a job list page, and whether it has more.
async fn page(app: &TestApp, query: &str) -> (Vec<String>, bool) {
    let r = app.get(&format!("/v1/jobs?{query}")).await;
    assert_eq!(r.status(), StatusCode::OK, "{query}");
    let v: Value = r.json().await.unwrap();
    let ids = v["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    (ids, v["has_more"].as_bool().unwrap())
}

#[tokio::test]
async fn jobs_keep_their_metadata_and_the_list_filters_by_it() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let job = |metadata: Value| json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1), "metadata": metadata});
    let a = app.create_job(&job(json!({"team": "search", "experiment": "v1", "note": "é".repeat(512)}))).await;
    let b = app.create_job(&job(json!({"team": "search", "experiment": "v2"}))).await;
    let c = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    let form = reqwest::multipart::Form::new()
        .part("training_file", reqwest::multipart::Part::text(crate::common::toy_jsonl(40)).file_name("train.jsonl"))
        .part("job", reqwest::multipart::Part::text(json!({"base_model": "tiny", "metadata": {"team": "ads"}}).to_string()));
    let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d: Value = r.json().await.unwrap();
    let id = |j: &Value| j["id"].as_str().unwrap().to_string();
    let (a, b, c, d) = (id(&a), id(&b), id(&c), id(&d));

    assert_eq!(app.job(&a).await["metadata"]["experiment"], "v1");
    assert_eq!(app.job(&a).await["metadata"]["note"].as_str().unwrap().chars().count(), 512);
    assert_eq!(app.job(&b).await["metadata"], json!({"team": "search", "experiment": "v2"}));
    assert_eq!(app.job(&c).await["metadata"], Value::Null);
    assert_eq!(app.job(&d).await["metadata"], json!({"team": "ads"}));

    assert_eq!(page(&app, "metadata[team]=search").await, (vec![b.clone(), a.clone()], false));
    assert_eq!(page(&app, "metadata[team]=search&metadata[experiment]=v1").await, (vec![a.clone()], false));
    assert_eq!(page(&app, "metadata%5Bteam%5D=ads").await, (vec![d.clone()], false), "brackets percent-encoded");
    assert_eq!(page(&app, "metadata[team]=nobody").await, (vec![], false));
    assert_eq!(page(&app, "metadata[team]=search&limit=1").await, (vec![b.clone()], true));
    assert_eq!(page(&app, &format!("metadata[team]=search&limit=1&after={b}")).await, (vec![a.clone()], false));
    assert_eq!(page(&app, "").await.0, [d.clone(), c, b, a], "without a filter, every job");
    let done = app.wait_ended(&d, 120).await;
    assert_eq!(done["metadata"], json!({"team": "ads"}), "metadata stays through the run");
    let ended = done["status"].as_str().unwrap();
    assert_eq!(page(&app, &format!("metadata[team]=ads&status={ended}")).await.0, [d]);
    assert_eq!(page(&app, "metadata[team]=ads&status=queued").await.0, Vec::<String>::new());
}

#[tokio::test]
async fn metadata_over_the_limits_is_refused_and_nothing_is_queued() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let job = |metadata: Value| json!({"base_model": "tiny", "training_dataset": ds, "metadata": metadata});
    let seventeen: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases = [
        (Value::Object(seventeen), "metadata"),
        (json!({"k".repeat(65): "v"}), "metadata"),
        (json!({"": "v"}), "metadata"),
        (json!({"k": "v".repeat(513)}), "metadata.k"),
        (json!({"k": 1}), "metadata.k"),
        (json!(["k", "v"]), "metadata"),
    ];
    for (metadata, param) in cases {
        let r = app.post_json("/v1/jobs", &job(metadata.clone())).await;
        let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(err["param"], param, "{metadata}: {err}");
    }
    assert_eq!(page(&app, "").await, (vec![], false), "no job was queued");
    let filter: String = (0..17).map(|i| format!("metadata[k{i}]=v&")).collect();
    let err = assert_error(app.get(&format!("/v1/jobs?{filter}")).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "metadata");
    let long = "v".repeat(513);
    let err =
        assert_error(app.get(&format!("/v1/jobs?metadata[k]={long}")).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "metadata.k");
    assert_eq!(
        page(&app, &format!("metadata[{}]=v&metadata[]=v", "k".repeat(65))).await,
        (vec![], false),
        "keys no job can have match none"
    );
    let err = assert_error(app.get("/v1/jobs?team=search").await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "team", "a pair outside metadata[…] is an unknown parameter: {err}");
}
