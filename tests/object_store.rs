//! Files in an object store: API and worker processes that share no disk (each its own data
//! dir), only Postgres and an S3-protocol server (s3s-fs, started by `scripts/s3-server.sh`).

mod common;

use common::process::{ended, post, start_with, start_with_env, wait_for, Server};
use common::servers::Script;
use serde_json::{json, Value};
use std::path::Path;

struct Deployment {
    pg: Script,
    s3: Script,
    models: std::path::PathBuf,
    root: tempfile::TempDir,
}

impl Deployment {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        common::write_tiny_model(&models, "tiny");
        Self { pg: Script::start("postgres.sh"), s3: Script::start("s3-server.sh"), models, root }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "finetuned"),
            ("AWS_SECRET_ACCESS_KEY", "finetuned-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ENDPOINT_URL", self.s3.url.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A process with a data dir of its own, named `name`.
    fn process(&self, name: &str, role: &str, extra: &[&str]) -> (Server, String) {
        let db = format!("--database-url={}", self.pg.url);
        let mut args = vec!["--role", role, "--object-store", "s3://finetuned/ft", "--poll-interval-ms", "100", &db];
        args.extend_from_slice(extra);
        start_with_env(&self.root.path().join(name), &self.models, &args, &self.env())
    }

    /// The objects under `rel` in the store, as files of the S3 server's root.
    fn objects(&self, rel: &str) -> Vec<String> {
        let base = self.s3.dir().join("root/finetuned/ft");
        let mut out = vec![];
        let mut stack = vec![base.join(rel)];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else if p.is_file() {
                out.push(p.strip_prefix(&base).unwrap().to_string_lossy().to_string());
            }
        }
        out
    }
}

async fn upload(client: &reqwest::Client, api: &str) -> Value {
    post(client.post(format!("{api}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(64))).await
}

fn job_body(ds: &Value) -> Value {
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3, "seed": 7});
    json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": "shared", "hyperparameters": hp})
}

#[tokio::test]
async fn processes_sharing_only_postgres_and_an_object_store_train_resume_and_serve_each_others_files() {
    let d = Deployment::new();
    let client = reqwest::Client::new();
    let flags = ["--checkpoint-every", "7", "--lease-seconds", "3"];

    // The job run through by one process with a local data dir: the figures to match.
    let (_all, url) = start_with(&d.root.path().join("straight"), &d.models, &["--role", "all", "--checkpoint-every", "7"]);
    let ds = upload(&client, &url).await;
    let job = post(client.post(format!("{url}/v1/jobs")).json(&job_body(&ds))).await;
    let straight_url = format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap());
    let straight = wait_for(&client, &straight_url, 300, ended).await;
    assert_eq!(straight["status"], "succeeded", "{straight}");
    let straight_metrics: Value = client.get(format!("{straight_url}/metrics")).send().await.unwrap().json().await.unwrap();

    let (_a, a) = d.process("api-a", "api", &flags);
    let (_b, b) = d.process("api-b", "api", &flags);
    let mut workers: Vec<Server> = ["worker-1", "worker-2"].iter().map(|n| d.process(n, "worker", &flags).0).collect();
    let ds = upload(&client, &a).await;
    assert_eq!(d.objects("datasets").len(), 1, "the upload is in the store: {:?}", d.objects(""));
    let job = post(client.post(format!("{b}/v1/jobs")).json(&job_body(&ds))).await;
    let job_url = format!("{b}/v1/jobs/{}", job["id"].as_str().unwrap());
    wait_for(&client, &job_url, 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 30) || ended(j)).await;
    assert!(d.objects("checkpoints").iter().any(|o| o.ends_with("checkpoint.json")), "{:?}", d.objects(""));

    // The worker running it dies; the other, whose disk never saw the job, takes it over from
    // the checkpoint in the store.
    let events: Value = client.get(format!("{job_url}/events?limit=1000")).send().await.unwrap().json().await.unwrap();
    let started = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find(|m| m.starts_with("job started on worker "))
        .unwrap()
        .to_string();
    let pid: u32 = started.rsplit('-').next().unwrap().parse().unwrap();
    let mut victim = workers.remove(workers.iter().position(|w| w.id() == pid).expect("the job's worker"));
    victim.kill().unwrap();
    victim.wait().unwrap();
    let done = wait_for(&client, &job_url, 300, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events: Value = client.get(format!("{job_url}/events?limit=1000")).send().await.unwrap().json().await.unwrap();
    let messages: Vec<&str> = events["data"].as_array().unwrap().iter().filter_map(|e| e["message"].as_str()).collect();
    let resumed = messages.iter().find(|m| m.starts_with("resumed from the checkpoint at step")).unwrap_or_else(|| panic!("{messages:?}"));
    // Checkpoints reach the store in the background: the newest whole one there, not from scratch.
    let step: u64 = resumed.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert!(step >= 7 && step.is_multiple_of(7), "{resumed}");
    let metrics: Value = client.get(format!("{job_url}/metrics")).send().await.unwrap().json().await.unwrap();
    assert_eq!(metrics["train"], straight_metrics["train"]);
    assert_eq!(metrics["validation"], straight_metrics["validation"]);
    assert!(d.objects("checkpoints").is_empty(), "checkpoints are removed when the job ends: {:?}", d.objects("checkpoints"));
    assert!(d.objects("models/shared").iter().any(|o| o.ends_with("model.safetensors")), "{:?}", d.objects(""));

    // Neither API process trained it: each fetches the model from the store on first use.
    let mut answers = vec![];
    for api in [&a, &b] {
        assert!(!Path::new(&d.root.path().join(if api == &a { "api-a" } else { "api-b" }).join("models/shared")).exists());
        let r = client
            .post(format!("{api}/v1/models/shared/predict"))
            .json(&json!({"inputs": ["good lovely", "awful dull"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answers.push(r.json::<Value>().await.unwrap()["predictions"].clone());
    }
    assert_eq!(answers[0], answers[1]);
    let r = client.get(format!("{b}/v1/models/shared/download")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.bytes().await.unwrap().is_empty());

    // Deleting the model or the dataset removes their objects.
    assert_eq!(client.delete(format!("{a}/v1/models/shared")).send().await.unwrap().status(), 200);
    assert!(d.objects("models/shared").is_empty(), "{:?}", d.objects("models"));
    assert_eq!(client.delete(format!("{b}/v1/datasets/{}", ds["id"].as_str().unwrap())).send().await.unwrap().status(), 200);
    assert!(d.objects("datasets").is_empty(), "{:?}", d.objects("datasets"));
}

#[tokio::test]
async fn an_object_store_that_refuses_writes_gets_a_503_and_keeps_nothing_half_written() {
    let d = Deployment::new();
    let client = reqwest::Client::new();
    let (_a, a) = d.process("api", "api", &[]);
    upload(&client, &a).await;
    d.s3.run("stop");
    let r = client
        .post(format!("{a}/v1/datasets"))
        .header("content-type", "application/x-ndjson")
        .body(common::toy_jsonl(8))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    d.s3.run("resume");
    // Only the first upload is listed, and only its object is in the store.
    let listed: Value = client.get(format!("{a}/v1/datasets")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(d.objects("datasets").len(), 1, "{:?}", d.objects(""));
    upload(&client, &a).await;
    assert_eq!(d.objects("datasets").len(), 2);
}
