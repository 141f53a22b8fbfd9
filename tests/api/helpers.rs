use finetuned::config::ServeConfig;
use finetuned::startup::Application;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A running server and its directories.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub data_dir: PathBuf,
    /// The server's predictor, for the tests of its test hooks.
    pub predictor: finetuned::serve::Predictor,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A models dir with the tiny random BERT (`tiny`) and a link to the shared all-MiniLM-L6-v2.
pub fn models_dir(root: &Path) -> PathBuf {
    let dir = root.join("models");
    std::fs::create_dir_all(&dir).unwrap();
    crate::common::write_tiny_model(&dir, "tiny");
    let minilm = crate::common::shared().join("models/all-minilm-l6-v2").canonicalize().unwrap();
    std::os::unix::fs::symlink(minilm, dir.join("all-minilm-l6-v2")).unwrap();
    dir
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// [`spawn_app`] with the test config changed by `change` first.
pub async fn spawn_app_with(change: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let mut config = ServeConfig::for_test(tmp.path().join("data"), models);
    change(&mut config);
    let mut app = spawn_with(config).await;
    app._tmp = Some(tmp);
    app
}

/// Starts the server with `config` (on the test Postgres server when there is one: see
/// `common::test_database_url`).
pub async fn spawn_with(mut config: ServeConfig) -> TestApp {
    if config.database_url.is_none() {
        config.database_url = crate::common::test_database_url(&config.data_dir);
    }
    if config.object_store.is_none() {
        config.object_store = crate::common::test_object_store(&config.data_dir);
    }
    spawn_embedded(config).await
}

/// Starts the server with `config` as it is: SQLite and the local data dir unless `config`
/// names others, whatever the test environment provides.
pub async fn spawn_embedded(config: ServeConfig) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        finetuned::telemetry::init("text");
    }
    let data_dir = config.data_dir.clone();
    let app = Application::build(config).await.expect("app builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let token = app.shutdown_token();
    let predictor = app.predictor();
    let handle = tokio::spawn(app.run_until_stopped());
    TestApp { base, client: Client::new(), data_dir, predictor, token, handle, _tmp: None }
}

impl TestApp {
    /// Stops the server gracefully and returns its temp dir so a new one can reuse it.
    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.token.cancel();
        self.handle.await.unwrap().unwrap();
        self._tmp
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().await.unwrap()
    }

    pub async fn upload(&self, body: impl Into<String>, content_type: &str) -> Response {
        self.client.post(self.url("/v1/datasets")).header("content-type", content_type).body(body.into()).send().await.unwrap()
    }

    /// Uploads JSONL and returns the dataset id.
    pub async fn upload_ok(&self, body: impl Into<String>) -> String {
        let r = self.upload(body, "application/x-ndjson").await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
    }

    pub async fn create_job(&self, body: &Value) -> Value {
        let r = self.post_json("/v1/jobs", body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).await.json().await.unwrap()
    }

    /// Polls the job until `done(job)` holds, or panics with the last body after `secs`.
    pub async fn wait_job(&self, id: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.job(id).await;
            if done(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "job did not reach the expected state in {secs}s: {j}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the job to end (succeeded, failed or cancelled).
    pub async fn wait_ended(&self, id: &str, secs: u64) -> Value {
        self.wait_job(id, secs, |j| ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap())).await
    }

    pub async fn predict(&self, model: &str, body: &Value) -> Response {
        self.post_json(&format!("/v1/models/{model}/predict"), body).await
    }
}

/// Asserts the contract's error envelope and returns `error`.
pub async fn assert_error(r: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(r.status(), status);
    let v: Value = r.json().await.expect("error body is JSON");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["error"].clone()
}

/// Hyperparameters that make the tiny model learn the toy set quickly.
pub fn tiny_hp(epochs: u64) -> Value {
    json!({"epochs": epochs, "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0, "seed": 1})
}
