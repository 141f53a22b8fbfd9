//! Hub base models: `base_model: "owner/name"` is fetched once from `HF_ENDPOINT` through
//! hf-hub, here from a local server that answers the way the hub does.

use crate::helpers::*;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use finetuned::config::ServeConfig;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const REPO: (&str, &str) = ("acme", "tiny-bert");
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone)]
struct Hub {
    dir: PathBuf,
    requests: Arc<AtomicUsize>,
}

/// `GET /{owner}/{name}/resolve/{revision}/{file}` with the hub's headers: the commit, an
/// ETag per file, and byte ranges (hf-hub reads the size from a `bytes=0-0` request).
async fn resolve(
    State(hub): State<Hub>,
    UrlPath((owner, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    let Ok(bytes) = std::fs::read(hub.dir.join(&file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    if (owner.as_str(), name.as_str()) != REPO {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    }
    let etag = format!("\"{}-{}\"", file.replace(['/', '.'], "-"), bytes.len());
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| r.strip_prefix("bytes="));
    let base = [("x-repo-commit", COMMIT.to_string()), ("etag", etag)];
    match range.and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap();
            let end = b.parse::<usize>().map_or(bytes.len() - 1, |e| e.min(bytes.len() - 1));
            let content_range = format!("bytes {start}-{end}/{}", bytes.len());
            (StatusCode::PARTIAL_CONTENT, base, [(header::CONTENT_RANGE, content_range)], bytes[start..=end].to_vec()).into_response()
        }
        None => (StatusCode::OK, base, bytes).into_response(),
    }
}

async fn spawn_hub(dir: PathBuf) -> (String, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/{owner}/{name}/resolve/{rev}/{*file}", axum::routing::get(resolve))
        .with_state(Hub { dir, requests: requests.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, requests)
}

#[tokio::test]
async fn a_hub_model_is_fetched_once_and_a_missing_one_fails_the_job_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let served = crate::common::write_tiny_model(tmp.path(), "hub-copy");
    let (hub_url, requests) = spawn_hub(served).await;
    let mut config = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    config.hf_endpoint = Some(hub_url);
    let app = spawn_with(config).await;
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;

    let job = app.create_job(&json!({"base_model": "acme/tiny-bert", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(requests.load(Ordering::SeqCst) >= 3, "config, tokenizer and weights came from the hub");
    let cached = tmp.path().join("data/hub/models--acme--tiny-bert/snapshots").join(COMMIT);
    assert!(cached.join("model.safetensors").exists(), "cached under the data dir's hub/");
    let events: Value = app.get(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap())).await.json().await.unwrap();
    assert!(events.to_string().contains("fetching base model acme/tiny-bert from the hub"), "{events}");

    // A second job finds it in the cache: no new request reaches the hub.
    let before = requests.load(Ordering::SeqCst);
    let again = app.create_job(&json!({"base_model": "acme/tiny-bert", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    let again = app.wait_ended(again["id"].as_str().unwrap(), 120).await;
    assert_eq!(again["status"], "succeeded", "{again}");
    assert_eq!(requests.load(Ordering::SeqCst), before);

    let missing = app.create_job(&json!({"base_model": "acme/no-such-model", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    let failed = app.wait_ended(missing["id"].as_str().unwrap(), 60).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "base_model_unavailable", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("acme/no-such-model") && message.contains("could not be fetched"), "{message}");

    // Not a repo id and not a local model: refused at once.
    let r = app.post_json("/v1/jobs", &json!({"base_model": "a/b/c", "training_dataset": ds})).await;
    assert_eq!(assert_error(r, reqwest::StatusCode::NOT_FOUND, "not_found").await["param"], "base_model");
}
