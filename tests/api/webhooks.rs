//! Job webhooks: every state change is POSTed in order, signed, and retried when the
//! receiver fails; a receiver that never answers does not affect the job.

use crate::helpers::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use finetuned::config::ServeConfig;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every request the receiver got: (status it answered, signature header, body).
type Log = Arc<Mutex<Vec<(u16, Option<String>, Vec<u8>)>>>;

async fn receive(State(log): State<Log>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    let mut log = log.lock().unwrap();
    // The very first delivery fails, to see it retried.
    let status = if log.is_empty() { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    let sig = headers.get("x-finetuned-signature").and_then(|v| v.to_str().ok()).map(String::from);
    log.push((status.as_u16(), sig, body.to_vec()));
    status
}

async fn spawn_receiver() -> (String, Log) {
    let log: Log = Arc::default();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

fn delivered_statuses(log: &Log) -> Vec<String> {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|(code, _, _)| *code == 200)
        .map(|(_, _, body)| serde_json::from_slice::<Value>(body).unwrap()["status"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn each_state_change_is_posted_in_order_signed_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    config.webhook_secret = Some("s3cret".into());
    let app = spawn_with(config).await;
    let (url, log) = spawn_receiver().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;

    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "webhook_url": "ftp://x/y"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "webhook_url");

    let job =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1), "webhook_url": url})).await;
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(app.wait_ended(&id, 120).await["status"], "succeeded");
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered_statuses(&log).len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered_statuses(&log), ["queued", "running", "succeeded"]);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 4, "the failed first delivery was retried once");
    assert_eq!(log[0].2, log[1].2, "the retry sends the same change");
    for (_, sig, body) in log.iter() {
        assert_eq!(sig.as_deref(), Some(finetuned::webhooks::signature("s3cret", body).as_str()));
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["job"]["id"], id.as_str());
        assert_eq!(v["type"], "job.status_changed");
    }
    // Known-answer check of the signature itself (HMAC-SHA256, RFC 4231 test case 2).
    assert_eq!(
        finetuned::webhooks::signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn a_receiver_that_is_down_does_not_affect_the_job() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    // Port 1 on loopback: connection refused on every attempt.
    let job = app
        .create_job(
            &json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1), "webhook_url": "http://127.0.0.1:1/hook"}),
        )
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}
