//! Crash safety: the real binary killed with SIGKILL mid-training, then restarted.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `finetuned serve` on a free port; returns the child and its base URL.
fn start(data: &Path, models: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_finetuned"))
        .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu"])
        .arg("--data-dir")
        .arg(data)
        .arg("--models-dir")
        .arg(models)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().trim_end_matches(|c: char| !c.is_ascii_digit()).to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

async fn wait_for(client: &reqwest::Client, url: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "not reached in {secs}s: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kill_9_mid_training_then_restart_finishes_the_job_on_a_sound_database() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();

    let (mut server, url) = start(&data, &models);
    let ds: Value = client
        .post(format!("{url}/v1/datasets"))
        .header("content-type", "application/x-ndjson")
        .body(common::toy_jsonl(64))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hp = json!({"epochs": 60, "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0});
    let job: Value = client
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": "survivor", "hyperparameters": hp}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_url = format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap());
    wait_for(&client, &job_url, 60, |j| j["status"] == "running" && j["progress"]["step"].as_u64().is_some_and(|s| s >= 3)).await;
    server.kill().unwrap(); // SIGKILL: no chance to clean up
    server.wait().unwrap();

    let (mut server, url) = start(&data, &models);
    let job_url = format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap());
    let done = wait_for(&client, &job_url, 300, |j| ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap())).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events: Value = client.get(format!("{job_url}/events?limit=1000")).send().await.unwrap().json().await.unwrap();
    assert!(events["data"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap().contains("queued again")));
    let r = client.post(format!("{url}/v1/models/survivor/predict")).json(&json!({"inputs": "good"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    server.kill().unwrap();
    server.wait().unwrap();

    let leftovers: Vec<_> = ["datasets", "models"]
        .iter()
        .flat_map(|d| std::fs::read_dir(data.join(d)).unwrap())
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let url = format!("sqlite://{}", data.join("finetuned.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let check: String = sqlx::query_scalar("pragma integrity_check").fetch_one(&pool).await.unwrap();
    assert_eq!(check, "ok");
}
