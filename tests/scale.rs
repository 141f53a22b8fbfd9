//! Several processes on one store: API processes (`--role api`) and worker processes
//! (`--role worker`) sharing the database and the data dir, as a scaled-out deployment runs.

mod common;

use common::process::{ended, post, start_with, wait_for, Server};
use serde_json::{json, Value};
use std::path::Path;

async fn get(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

fn role(data: &Path, models: &Path, role: &str, extra: &[&str]) -> (Server, String) {
    let mut args = vec!["--role", role, "--poll-interval-ms", "100"];
    args.extend_from_slice(extra);
    start_with(data, models, &args)
}

/// The messages of a job's events.
async fn messages(client: &reqwest::Client, job_url: &str) -> Vec<String> {
    let events = get(client, &format!("{job_url}/events?limit=1000")).await;
    events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn thirty_jobs_sent_to_two_api_processes_each_run_once_on_one_of_three_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, data) = (tmp.path().join("models"), tmp.path().join("data"));
    common::write_tiny_model(&models, "tiny");
    let client = reqwest::Client::new();
    let (_a, a) = role(&data, &models, "api", &[]);
    let (_b, b) = role(&data, &models, "api", &[]);
    let _workers: Vec<_> = (0..3).map(|_| role(&data, &models, "worker", &[]).0).collect();
    let apis = [a.as_str(), b.as_str()];
    let ds = post(client.post(format!("{a}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(48))).await;
    let hp = json!({"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "seed": 3});
    let mut ids = Vec::new();
    for i in 0..30 {
        let body = json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": format!("m{i}"), "hyperparameters": hp});
        let job = post(client.post(format!("{}/v1/jobs", apis[i % 2])).json(&body)).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let mut workers_seen = std::collections::HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        let job_url = format!("{}/v1/jobs/{id}", apis[(i + 1) % 2]);
        let done = wait_for(&client, &job_url, 300, ended).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let from_a = messages(&client, &format!("{a}/v1/jobs/{id}")).await;
        let starts: Vec<&String> = from_a.iter().filter(|m| m.starts_with("job started on worker ")).collect();
        assert_eq!(starts.len(), 1, "job {id} did not run exactly once: {from_a:?}");
        workers_seen.insert(starts[0].clone());
        assert_eq!(from_a, messages(&client, &format!("{b}/v1/jobs/{id}")).await);
        let (ma, mb) = (get(&client, &format!("{a}/v1/jobs/{id}/metrics")).await, get(&client, &format!("{b}/v1/jobs/{id}/metrics")).await);
        assert!(ma["validation"].as_array().is_some_and(|v| v.len() == 2), "{ma}");
        assert_eq!(ma, mb);
    }
    assert!(workers_seen.len() >= 2, "all jobs ran on one worker: {workers_seen:?}");
    // A model trained by one worker answers on both API processes, with the same scores.
    for i in [0, 29] {
        let ask =
            |api: &str| client.post(format!("{api}/v1/models/m{i}/predict")).json(&json!({"inputs": ["good lovely", "awful dull"]})).send();
        let (ra, rb) = (ask(&a).await.unwrap(), ask(&b).await.unwrap());
        assert_eq!((ra.status(), rb.status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
        let (pa, pb): (Value, Value) = (ra.json().await.unwrap(), rb.json().await.unwrap());
        assert_eq!(pa["predictions"], pb["predictions"]);
    }
}

#[tokio::test]
async fn a_job_whose_worker_is_killed_is_resumed_by_another_once_the_lease_runs_out_and_ends_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    common::write_tiny_model(&models, "tiny");
    let client = reqwest::Client::new();
    let flags = ["--checkpoint-every", "7", "--lease-seconds", "3"];
    let submit = |url: String| {
        let client = client.clone();
        async move {
            let ds =
                post(client.post(format!("{url}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(64)))
                    .await;
            let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3, "seed": 7});
            let body = json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": "resumed", "hyperparameters": hp});
            let job = post(client.post(format!("{url}/v1/jobs")).json(&body)).await;
            format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap())
        }
    };

    // The same job, run through by one process.
    let straight_dir = tmp.path().join("straight");
    let (_all, url) = role(&straight_dir, &models, "all", &flags);
    let job_url = submit(url).await;
    let straight = wait_for(&client, &job_url, 300, ended).await;
    assert_eq!(straight["status"], "succeeded", "{straight}");
    let straight_metrics = get(&client, &format!("{job_url}/metrics")).await;

    let data = tmp.path().join("shared");
    let (_api, url) = role(&data, &models, "api", &flags);
    let mut workers: Vec<Server> = (0..2).map(|_| role(&data, &models, "worker", &flags).0).collect();
    let job_url = submit(url).await;
    wait_for(&client, &job_url, 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 30) || ended(j)).await;
    let started = messages(&client, &job_url).await.into_iter().find(|m| m.starts_with("job started on worker ")).unwrap();
    let pid: u32 = started.rsplit('-').next().unwrap().parse().unwrap();
    let victim = workers.iter().position(|w| w.id() == pid).unwrap_or_else(|| panic!("no worker with pid {pid}: {started}"));
    let mut killed = workers.remove(victim);
    killed.kill().unwrap(); // SIGKILL: its lease is never given back
    killed.wait().unwrap();

    let done = wait_for(&client, &job_url, 300, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let msgs = messages(&client, &job_url).await;
    assert!(msgs.iter().any(|m| m.contains("stopped renewing its lease")), "{msgs:?}");
    assert_eq!(msgs.iter().filter(|m| m.starts_with("job started on worker ")).count(), 2, "{msgs:?}");
    let resumed = msgs.iter().find(|m| m.starts_with("resumed from the checkpoint at step")).unwrap_or_else(|| panic!("{msgs:?}"));
    let step: u64 = resumed.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert!(step >= 28 && step.is_multiple_of(7), "{resumed}");
    let metrics = get(&client, &format!("{job_url}/metrics")).await;
    assert_eq!(metrics["train"], straight_metrics["train"]);
    assert_eq!(metrics["validation"], straight_metrics["validation"]);
    assert_eq!(done["metrics"], straight["metrics"]);
}

#[tokio::test]
async fn a_cancel_sent_to_an_api_process_stops_the_job_on_a_worker_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, data) = (tmp.path().join("models"), tmp.path().join("data"));
    common::write_tiny_model(&models, "tiny");
    let client = reqwest::Client::new();
    let flags = ["--lease-seconds", "3"];
    let (_api, url) = role(&data, &models, "api", &flags);
    let (_worker, worker_url) = role(&data, &models, "worker", &flags);
    // A worker process answers the probes, not the API.
    assert_eq!(client.get(format!("{worker_url}/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(format!("{worker_url}/v1/jobs")).send().await.unwrap().status(), 404);
    // Long enough (~6,400 steps) that a cancel not seen would leave it training for many seconds.
    let ds =
        post(client.post(format!("{url}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(256))).await;
    let hp = json!({"epochs": 100, "batch_size": 4});
    let job = post(
        client.post(format!("{url}/v1/jobs")).json(&json!({"base_model": "tiny", "training_dataset": ds["id"], "hyperparameters": hp})),
    )
    .await;
    let job_url = format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap());
    wait_for(&client, &job_url, 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)).await;
    post(client.post(format!("{job_url}/cancel"))).await;
    // The worker sees the cancel at its next lease renewal (a third of a lease) and stops. It runs
    // one job at a time, so a job queued now starts there only once the cancelled one has stopped.
    let next = post(
        client.post(format!("{url}/v1/jobs")).json(&json!({"base_model": "tiny", "training_dataset": ds["id"], "hyperparameters": hp})),
    )
    .await;
    let next_url = format!("{url}/v1/jobs/{}", next["id"].as_str().unwrap());
    wait_for(&client, &next_url, 30, |j| j["status"] == "running").await;
    let job = get(&client, &job_url).await;
    assert_eq!(job["status"], "cancelled");
    // Stopped well before the end, not trained to completion regardless.
    assert!(job["progress"]["step"].as_u64().unwrap() < job["progress"]["total_steps"].as_u64().unwrap() / 2, "{job}");
}

#[tokio::test]
async fn one_process_with_two_devices_runs_two_workers_that_train_jobs_at_the_same_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, data) = (tmp.path().join("models"), tmp.path().join("data"));
    common::write_tiny_model(&models, "tiny");
    let client = reqwest::Client::new();
    // Two CPU "devices" stand in for cuda:0,cuda:1: a worker each, with a name each.
    let (_server, url) = role(&data, &models, "all", &["--devices", "cpu,cpu"]);
    let ds =
        post(client.post(format!("{url}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(256))).await;
    let hp = json!({"epochs": 100, "batch_size": 4});
    let mut urls = vec![];
    for _ in 0..2 {
        let job = post(
            client.post(format!("{url}/v1/jobs")).json(&json!({"base_model": "tiny", "training_dataset": ds["id"], "hyperparameters": hp})),
        )
        .await;
        urls.push(format!("{url}/v1/jobs/{}", job["id"].as_str().unwrap()));
    }
    let mut done = vec![];
    let mut names = std::collections::HashSet::new();
    for u in &urls {
        let j = wait_for(&client, u, 300, ended).await;
        assert_eq!(j["status"], "succeeded", "{j}");
        done.push((j["started_at"].as_i64().unwrap(), j["finished_at"].as_i64().unwrap()));
        names.insert(messages(&client, u).await.into_iter().find(|m| m.starts_with("job started on worker ")).unwrap());
    }
    // Both (several seconds long) ran at once: each started before the other ended.
    assert!(done[0].0 < done[1].1 && done[1].0 < done[0].1, "one after the other: {done:?}");
    assert_eq!(names.len(), 2, "{names:?}");
}
