//! `Idempotency-Key` on `POST /v1/jobs`: a retried request gets the job the first one queued.

use crate::helpers::*;
use axum::http::StatusCode;
use serde_json::{json, Value};

async fn job_count(app: &TestApp) -> usize {
    let v: Value = app.get("/v1/jobs?limit=100").await.json().await.unwrap();
    v["data"].as_array().unwrap().len()
}

async fn post_with_key(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.client.post(app.url("/v1/jobs")).header("idempotency-key", key).json(body).send().await.unwrap()
}

#[tokio::test]
async fn a_retried_json_request_gets_the_first_job_and_a_different_one_is_refused() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1)});
    let first = post_with_key(&app, "retry-1", &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = post_with_key(&app, "retry-1", &body).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"], "the retry gets the first request's job");
    assert_eq!(job_count(&app).await, 1);

    let other = json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(2)});
    let err = assert_error(post_with_key(&app, "retry-1", &other).await, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused").await;
    assert_eq!(err["param"], "idempotency-key");
    let r = post_with_key(&app, "retry-2", &other).await;
    assert_eq!(r.status(), StatusCode::CREATED, "a new key is a new request");
    assert_eq!(job_count(&app).await, 2);
    let r = app.post_json("/v1/jobs", &body).await;
    assert_eq!(r.status(), StatusCode::CREATED, "without a key every request queues a job");
    assert_eq!(job_count(&app).await, 3);

    for bad in ["", &"k".repeat(256), "with space"] {
        let err = assert_error(post_with_key(&app, bad, &body).await, StatusCode::BAD_REQUEST, "bad_request").await;
        assert_eq!(err["param"], "idempotency-key", "{bad:?}");
    }
    assert_eq!(job_count(&app).await, 3);
}

#[tokio::test]
async fn a_retried_multipart_request_stores_its_files_once() {
    let app = spawn_app().await;
    let send = || {
        // reqwest draws a new boundary for each form, as clients retrying a request do.
        let form = reqwest::multipart::Form::new()
            .part("training_file", reqwest::multipart::Part::text(crate::common::toy_jsonl(40)).file_name("train.jsonl"))
            .part("job", reqwest::multipart::Part::text(json!({"base_model": "tiny", "hyperparameters": tiny_hp(1)}).to_string()));
        app.client.post(app.url("/v1/jobs")).header("idempotency-key", "upload-1").multipart(form).send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    let datasets: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(datasets["data"].as_array().unwrap().len(), 1, "the file was stored once: {datasets}");
}

#[tokio::test]
async fn concurrent_requests_with_one_key_queue_one_job() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let body = json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1)});
    let answers = futures::future::join_all((0..8).map(|_| post_with_key(&app, "burst", &body))).await;
    let mut ids = std::collections::HashSet::new();
    for r in answers {
        match r.status() {
            StatusCode::CREATED => drop(ids.insert(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string())),
            StatusCode::CONFLICT => drop(assert_error(r, StatusCode::CONFLICT, "idempotency_key_in_use").await),
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!(ids.len(), 1, "every request that got a job got the same one: {ids:?}");
    assert_eq!(job_count(&app).await, 1);
    let id = ids.into_iter().next().unwrap();
    let r = post_with_key(&app, "burst", &body).await;
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id.as_str(), "once settled, a retry gets the job");
}
