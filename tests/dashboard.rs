//! The dashboard page at `/`: served by the binary, self-contained, and open even when the
//! server has an API key (the page asks for the key and sends it with its own `/v1` calls).
//! What the page does in a browser is checked by `scripts/browser-test.sh`.

use finetuned::config::ServeConfig;
use finetuned::startup::Application;
use reqwest::{header, Client, StatusCode};
use tokio_util::sync::CancellationToken;

/// A server on port 0 with a temporary data dir and an empty models dir.
struct Server {
    base: String,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _tmp: tempfile::TempDir,
}

impl Server {
    async fn start(api_key: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let models = tmp.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        let mut config = ServeConfig::for_test(tmp.path().join("data"), models);
        config.api_key = api_key.map(str::to_string);
        let app = Application::build(config).await.expect("app builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let token = app.shutdown_token();
        let handle = tokio::spawn(app.run_until_stopped());
        Server { base, token, handle, _tmp: tmp }
    }

    async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Every element the page's scripts and the browser test reach by id.
const IDS: &[&str] = &[
    "api-key",
    "key-save",
    "key-status",
    "dataset-file",
    "dataset-upload",
    "datasets-table",
    "job-form",
    "job-dataset",
    "job-base",
    "job-task",
    "job-epochs",
    "job-lr",
    "job-batch",
    "job-start",
    "jobs-table",
    "job-detail",
    "loss-chart",
    "epoch-table",
    "per-class-table",
    "confusion-matrix",
    "event-log",
    "models-table",
    "predict-model",
    "predict-input",
    "predict-run",
    "predict-result",
];

async fn get_page(base: &str) -> (StatusCode, header::HeaderMap, String) {
    let r = Client::new().get(format!("{base}/")).send().await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

#[tokio::test]
async fn dashboard_is_a_self_contained_html_page() {
    let server = Server::start(None).await;
    let (status, headers, body) = get_page(&server.base).await;
    assert_eq!(status, StatusCode::OK);
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(ct.starts_with("text/html"), "content type {ct}");
    assert!(body.starts_with("<!doctype html>"), "{}", &body[..body.len().min(80)]);
    for id in IDS {
        assert!(body.contains(&format!("id=\"{id}\"")), "the page has no element with id {id}");
    }
    // It drives the API with the key, and reads the event stream with fetch.
    for needle in ["Authorization", "text/event-stream", "/v1/jobs", "/v1/datasets", "/predict", "<canvas"] {
        assert!(body.contains(needle), "the page lacks {needle}");
    }
    assert!(!body.contains("<script src"), "the page loads a script from elsewhere");
    let csp = headers.get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(csp.contains("connect-src 'self'"), "CSP {csp}");
    server.stop().await;
}

#[tokio::test]
async fn dashboard_needs_no_api_key_but_the_api_still_does() {
    let server = Server::start(Some("s3cret")).await;
    let (status, headers, body) = get_page(&server.base).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    assert!(body.contains("id=\"api-key\""));

    let client = Client::new();
    let info = format!("{}/v1/info", server.base);
    assert_eq!(client.get(&info).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let ok = client.get(&info).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn dashboard_route_answers_only_get() {
    let server = Server::start(None).await;
    let r = Client::new().post(format!("{}/", server.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let head = Client::new().head(format!("{}/", server.base)).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    server.stop().await;
}
