//! Postgres stopped under a running deployment (an API process and a worker process), then
//! started again: requests get a 503 with `Retry-After` meanwhile, never a hang, and afterwards
//! every job finishes with nothing lost. The test runs its own Postgres server
//! (`scripts/postgres.sh`, as `.ci/run` does), since it stops and starts it.

mod common;

use common::process::{start_with, wait_for};
use common::servers::Script;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn postgres_down_for_ten_seconds_gets_503s_with_retry_after_and_afterwards_every_job_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Script::start("postgres.sh");
    let url = pg.url.clone();
    let (models, data) = (tmp.path().join("models"), tmp.path().join("data"));
    common::write_tiny_model(&models, "tiny");
    let db = format!("--database-url={url}");
    let (_api, api) = start_with(&data, &models, &["--role", "api", &db]);
    let (_worker, _) = start_with(&data, &models, &["--role", "worker", "--poll-interval-ms", "100", &db]);
    // A client that gives up after a minute: a request that hangs fails the test.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let r = client
        .post(format!("{api}/v1/datasets"))
        .header("content-type", "application/x-ndjson")
        .body(common::toy_jsonl(64))
        .send()
        .await
        .unwrap();
    let ds: Value = r.json().await.unwrap();
    let hp = json!({"epochs": 40, "batch_size": 4, "learning_rate": 1e-3, "seed": 7});
    let mut jobs = Vec::new();
    for i in 0..3 {
        let body = json!({"base_model": "tiny", "training_dataset": ds["id"], "model_name": format!("outage-{i}"), "hyperparameters": hp});
        let job: Value = client.post(format!("{api}/v1/jobs")).json(&body).send().await.unwrap().json().await.unwrap();
        jobs.push(format!("{api}/v1/jobs/{}", job["id"].as_str().unwrap()));
    }
    wait_for(&client, &jobs[0], 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 5)).await;
    // A follower of the running job's events, open across the outage.
    let mut follower = client.get(format!("{}/events", jobs[0])).header("accept", "text/event-stream").send().await.unwrap();
    let mut before = String::new();
    while !before.contains("\n\n") {
        before.push_str(&String::from_utf8_lossy(&follower.chunk().await.unwrap().expect("the job's first events")));
    }

    pg.run("stop");
    let down = Instant::now();
    // Reads, writes and the readiness probe, at once: each answers 503 within the pool's wait.
    let (job, upload, ready, models_list) = tokio::join!(
        client.get(&jobs[1]).send(),
        client.post(format!("{api}/v1/datasets")).header("content-type", "application/x-ndjson").body(common::toy_jsonl(8)).send(),
        client.get(format!("{api}/readyz")).send(),
        client.get(format!("{api}/v1/models")).send(),
    );
    for r in [job.unwrap(), upload.unwrap(), ready.unwrap()] {
        assert_eq!(r.status(), 503, "{:?}", r.text().await);
    }
    let r = models_list.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    // The event stream says it cannot read, and ends (the client reconnects), rather than going
    // quiet as if the job had nothing to say.
    let rest = tokio::time::timeout(Duration::from_secs(30), follower.text()).await.expect("the event stream ends").unwrap();
    let stream = before + &rest;
    let tail = stream.rsplit("\n\n").find(|e| !e.trim().is_empty()).unwrap();
    assert!(tail.contains("event: error") && tail.contains("retry:"), "the stream's last event: {tail}");
    assert!(tail.contains("database_unavailable"), "{tail}");
    let last_id = stream.lines().rev().find_map(|l| l.strip_prefix("id: ")).unwrap().to_string();
    // The outage lasts ten seconds in all.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    pg.run("resume");
    // Reconnected with `Last-Event-ID`, the follower gets what came after, to the job's end.
    let again = wait_for_stream(&client, &format!("{}/events", jobs[0]), &last_id).await;
    let ids: Vec<u64> = stream.lines().chain(again.lines()).filter_map(|l| l.strip_prefix("id: ev_")).map(|n| n.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "each event once, in order: {ids:?}");
    assert!(again.contains("succeeded"), "the resumed stream runs to the job's end: {again}");

    for job_url in &jobs {
        let done =
            wait_for(&client, job_url, 300, |j| ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    // Nothing stored before the outage was lost, and no upload refused during it was half-kept.
    let listed: Value = client.get(format!("{api}/v1/datasets")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    for i in 0..3 {
        let r = client.post(format!("{api}/v1/models/outage-{i}/predict")).json(&json!({"inputs": "good"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// The event stream of `url` from after `last_id`, read to its end once the database answers
/// again (a reconnect during the database's restart gets the error event and is retried).
async fn wait_for_stream(client: &reqwest::Client, url: &str, last_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = client.get(url).header("accept", "text/event-stream").header("last-event-id", last_id).send().await.unwrap();
        if r.status() == 200 {
            let body = r.text().await.unwrap();
            if !body.contains("event: error") {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "the event stream did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
