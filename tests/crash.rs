//! Crash safety: the real binary killed with SIGKILL mid-training, then restarted.

mod common;

use common::process::{ended, post, start, start_with, wait_for};

use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn kill_9_mid_training_then_restart_finishes_the_job_on_a_sound_database() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();

    let (mut server, url) = start_with(&data, &models, &["--checkpoint-every", "2"]);
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
    wait_for(&client, &job_url, 60, |j| j["status"] == "running" && j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)).await;
    server.kill().unwrap(); // SIGKILL: no chance to clean up
    server.wait().unwrap();
    // The whole checkpoints the kill left (the newest two are kept): the job must go on from
    // the newest, so there must be an older one to tell it from.
    let job_id = job["id"].as_str().unwrap();
    let mut steps: Vec<u64> = std::fs::read_dir(data.join(format!("checkpoints/{job_id}")))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_prefix("step-").map(|n| n.parse().unwrap()))
        .collect();
    steps.sort();
    assert!(steps.len() >= 2, "two checkpoints to tell apart: {steps:?}");
    let newest = *steps.last().unwrap();
    // What a kill in the middle of a save leaves: half-written temp files and dirs of a
    // checkpoint, a model and a dataset (each is only renamed into place once whole).
    let half = [
        data.join(format!("checkpoints/{job_id}/.tmp-step-00009999-0/params.safetensors")),
        data.join("models/.tmp-survivor-0/model.safetensors"),
    ];
    for f in &half {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"half a file").unwrap();
    }
    std::fs::write(data.join("datasets/.tmp-upload-0"), b"{\"text\": \"half").unwrap();

    let (mut server, url) = start(&data, &models);
    let job_url = format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap());
    let done = wait_for(&client, &job_url, 300, |j| ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap())).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events: Value = client.get(format!("{job_url}/events?limit=1000")).send().await.unwrap().json().await.unwrap();
    let messages: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.contains("queued again")), "{messages:?}");
    // Checkpoints every 2 steps and killed after step 5: it went on from a checkpoint, not from scratch.
    let resumed = messages.iter().find(|m| m.starts_with("resumed from the checkpoint at step")).unwrap_or_else(|| panic!("{messages:?}"));
    assert!(!resumed.contains("9999"), "resumed from a half-written checkpoint: {resumed}");
    assert!(resumed.starts_with(&format!("resumed from the checkpoint at step {newest} ")), "not from the newest ({steps:?}): {resumed}");
    for f in &half {
        assert!(!f.parent().unwrap().exists(), "{} was left behind", f.parent().unwrap().display());
    }
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
    // The embedded database file survived the kill (on Postgres the server keeps its own files).
    if !common::on_postgres() {
        let url = format!("sqlite://{}", data.join("finetuned.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let check: String = sqlx::query_scalar("pragma integrity_check").fetch_one(&pool).await.unwrap();
        assert_eq!(check, "ok");
    }
}

/// The job the stop-and-resume tests run: fine-tuning, or masked-LM pre-training on the texts.
#[derive(Clone, Copy)]
enum Kind {
    FineTune,
    Pretrain,
}

/// Uploads the toy set and starts the same job; returns the job's URL.
async fn start_job(client: &reqwest::Client, url: &str, kind: Kind) -> String {
    let data = match kind {
        // 256 rows: ~6,400 steps, seconds of training left when the recorded progress reaches the
        // step the test stops at (recording lags behind training).
        Kind::FineTune => common::toy_jsonl(256),
        Kind::Pretrain => common::toy_rows(64).iter().map(|r| json!({"text": r.text}).to_string() + "\n").collect(),
    };
    let ds = post(client.post(format!("{url}/v1/datasets")).header("content-type", "application/x-ndjson").body(data)).await;
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3, "seed": 7});
    let mut body = json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": "resumed", "hyperparameters": hp});
    if let Kind::Pretrain = kind {
        body["task"] = json!("mlm");
    }
    let job = post(client.post(format!("{url}/v1/jobs")).json(&body)).await;
    format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap())
}

#[tokio::test]
async fn sigterm_checkpoints_the_job_and_after_restart_it_ends_with_the_metrics_of_an_uninterrupted_run() {
    stop_and_resume(Kind::FineTune).await;
}

#[tokio::test]
async fn sigterm_checkpoints_a_pretraining_job_and_after_restart_it_ends_with_the_metrics_of_an_uninterrupted_run() {
    stop_and_resume(Kind::Pretrain).await;
}

async fn stop_and_resume(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let client = reqwest::Client::new();

    // The same job, run through without a stop (checkpointing as it goes, as the stopped one does).
    let (mut server, url) = start_with(&tmp.path().join("straight"), &models, &["--checkpoint-every", "7"]);
    let job_url = start_job(&client, &url, kind).await;
    let straight = wait_for(&client, &job_url, 300, ended).await;
    assert_eq!(straight["status"], "succeeded", "{straight}");
    let straight_metrics: Value = client.get(format!("{job_url}/metrics")).send().await.unwrap().json().await.unwrap();
    server.kill().unwrap();
    server.wait().unwrap();

    let data = tmp.path().join("stopped");
    let (mut server, url) = start_with(&data, &models, &["--checkpoint-every", "7"]);
    let job_url = start_job(&client, &url, kind).await;
    wait_for(&client, &job_url, 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 30) || ended(j)).await;
    let listed: Value = client.get(format!("{job_url}/checkpoints")).send().await.unwrap().json().await.unwrap();
    let steps: Vec<u64> = listed["data"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert!(!steps.is_empty() && steps.len() <= 2 && steps.iter().all(|s| s % 7 == 0), "{listed}");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let status = server.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    let stopped: Value = {
        let (mut again, url) = start_with(&data, &models, &["--checkpoint-every", "7"]);
        let job_url = job_url.replacen(&job_url[..job_url.find("/v1/").unwrap()], &url, 1);
        let done = wait_for(&client, &job_url, 300, ended).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let events: Value = client.get(format!("{job_url}/events?limit=1000")).send().await.unwrap().json().await.unwrap();
        let messages: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
        let resumed =
            messages.iter().find(|m| m.starts_with("resumed from the checkpoint at step")).unwrap_or_else(|| panic!("{messages:?}"));
        // The stop saved a checkpoint of its own, at the step it stopped after (not a multiple of 7 by luck alone).
        assert!(messages.iter().any(|m| m.starts_with("server stopping")), "{messages:?}");
        let step: u64 = resumed.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert!(step >= 30, "{resumed}");
        let metrics: Value = client.get(format!("{job_url}/metrics")).send().await.unwrap().json().await.unwrap();
        assert_eq!(metrics["train"], straight_metrics["train"]);
        assert_eq!(metrics["validation"], straight_metrics["validation"]);
        assert_eq!(done["metrics"], straight["metrics"]);
        let listed: Value = client.get(format!("{job_url}/checkpoints")).send().await.unwrap().json().await.unwrap();
        assert_eq!(listed["data"], json!([]), "checkpoints are removed when the job ends");
        again.kill().unwrap();
        again.wait().unwrap();
        done
    };
    assert_eq!(stopped["model"], "resumed");
}

#[test]
fn a_data_dir_that_cannot_be_created_stops_start_up_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finetuned"))
        .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu", "--models-dir"])
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(file.join("data"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot create the data dir"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn kill_9_mid_upload_leaves_no_dataset_and_no_file_behind() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let data = tmp.path().join("data");
    let (mut server, url) = start(&data, &models);
    // A 64 MiB upload announced in full, of which only the first 8 MiB arrive before the kill.
    let addr = url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    let total = 64usize << 20;
    write!(conn, "POST /v1/datasets HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {total}\r\n\r\n")
        .unwrap();
    let line = b"{\"text\": \"a line of a big upload\", \"label\": \"pos\"}\n";
    let chunk: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
    for _ in 0..8 {
        conn.write_all(&chunk).unwrap();
    }
    conn.flush().unwrap();
    // The server writes the body to a temp file as it arrives: the kill comes once several MiB
    // of it are on disk, so it lands mid-upload.
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        if let Some(p) = upload_temp_file(&data).filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= 4 << 20)) {
            break p;
        }
        assert!(Instant::now() < deadline, "no temp file of the upload with 4 MiB in it: {:?}", upload_temp_file(&data));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();
    drop(conn);
    assert!(partial.exists(), "the killed server left its half upload: start-up must deal with it");

    let (_server, url) = start(&data, &models);
    let client = reqwest::Client::new();
    let listed: Value = client.get(format!("{url}/v1/datasets")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"], json!([]), "{listed}");
    let files: Vec<_> = std::fs::read_dir(data.join("datasets")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(files.is_empty(), "{files:?}");
    // The server works: the same upload, sent whole, is stored.
    let r = client
        .post(format!("{url}/v1/datasets"))
        .header("content-type", "application/x-ndjson")
        .body(common::toy_jsonl(8))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

/// The temp file an upload in progress is being written to, if there is one.
fn upload_temp_file(data: &std::path::Path) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(data.join("datasets")).ok()?;
    entries.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-upload-")))
}

#[tokio::test]
async fn sigterm_with_an_open_event_stream_still_stops_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let (mut server, url) = start(&tmp.path().join("data"), &models);
    let client = reqwest::Client::new();
    let job_url = start_job(&client, &url, Kind::FineTune).await;
    let mut stream = client.get(format!("{job_url}/events")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some(), "the stream sends the job's first events");
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not stop while an event stream was open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    // The stream ended cleanly rather than hanging.
    while let Ok(Some(_)) = stream.chunk().await {}
}
