//! Job webhooks: every state change is POSTed once, in order, signed, and retried with the
//! same body when the receiver fails; a receiver that never answers does not affect the job.

use crate::helpers::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use finetuned::config::ServeConfig;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the receiver got.
struct Received {
    /// The status it answered.
    status: u16,
    signature: Option<String>,
    delivery: Option<String>,
    /// Standard Webhooks' `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    standard: [Option<String>; 3],
    body: Vec<u8>,
    /// Whether it came while the first request was still waiting for its answer.
    during_first: bool,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// The receiver's log, and a flag the test raises once the job has ended.
#[derive(Clone, Default)]
struct Receiver {
    log: Log,
    job_ended: Arc<tokio::sync::Notify>,
    first_answered: Arc<std::sync::atomic::AtomicBool>,
}

async fn receive(State(rx): State<Receiver>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    use std::sync::atomic::Ordering::SeqCst;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(String::from);
    let first = {
        let mut log = rx.log.lock().unwrap();
        // The very first delivery fails, to see it retried.
        let status = if log.is_empty() { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
        let during_first = !log.is_empty() && !rx.first_answered.load(SeqCst);
        log.push(Received {
            status: status.as_u16(),
            signature: header("x-finetuned-signature"),
            delivery: header("x-finetuned-delivery"),
            standard: ["webhook-id", "webhook-timestamp", "webhook-signature"].map(header),
            body: body.to_vec(),
            during_first,
        });
        log.len() == 1
    };
    if first {
        // Answer the failure only once the job has moved on (or after 8 s, within the sender's
        // 10 s timeout), so that the retry comes when the job is no longer what it was.
        let _ = tokio::time::timeout(Duration::from_secs(8), rx.job_ended.notified()).await;
        rx.first_answered.store(true, SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::OK
}

async fn spawn_receiver() -> (String, Receiver) {
    let rx = Receiver::default();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

fn delivered_statuses(log: &Log) -> Vec<String> {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|r| r.status == 200)
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["status"].as_str().unwrap().to_string())
        .collect()
}

/// A Standard Webhooks secret (`whsec_` and a base64 key): deliveries carry both signatures.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Polls `done` every 50 ms until it holds or `secs` pass.
async fn poll_until(secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_state_change_is_posted_once_in_order_signed_and_retried() {
    // An API process and, later, a worker process on one database, as a scaled-out deployment
    // runs them: both deliver webhooks, and each change must still reach the receiver once.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    config.webhook_secret = Some(SECRET.into());
    config.poll_interval_ms = 100;
    let worker_config = ServeConfig { role: "worker".into(), ..config.clone() };
    config.role = "api".into();
    let app = spawn_with(config).await;
    let (url, rx) = spawn_receiver().await;
    let log = rx.log.clone();
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;

    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "webhook_url": "ftp://x/y"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "webhook_url");

    let job =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1), "webhook_url": url})).await;
    let id = job["id"].as_str().unwrap().to_string();
    // The first attempt (of `queued`, with no worker yet) is held by the receiver while a
    // worker starts and trains the job; the retry comes once the job has ended.
    poll_until(30, || !log.lock().unwrap().is_empty()).await;
    assert!(!log.lock().unwrap().is_empty(), "no delivery within 30 s");
    let worker = spawn_with(worker_config).await;
    assert_eq!(app.wait_ended(&id, 120).await["status"], "succeeded");
    rx.job_ended.notify_one();
    poll_until(30, || delivered_statuses(&log).len() >= 3).await;
    worker.stop().await;
    app.stop().await;
    assert_eq!(delivered_statuses(&log), ["queued", "running", "succeeded"]);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 4, "the failed first delivery was retried once, and nothing was sent twice");
    assert!(log.iter().all(|r| !r.during_first), "nothing was sent while the first attempt waited for its answer");
    let first: Value = serde_json::from_slice(&log[0].body).unwrap();
    assert_eq!(first["job"]["finished_at"], Value::Null, "the first attempt was sent before the job ended");
    assert_eq!(
        String::from_utf8_lossy(&log[0].body),
        String::from_utf8_lossy(&log[1].body),
        "the retry sends the same bytes as the first attempt, though the job has ended since"
    );
    assert!(log[0].delivery.is_some());
    assert_eq!(log[0].delivery, log[1].delivery, "a retry keeps its delivery id");
    assert_ne!(log[1].delivery, log[2].delivery, "each change has a delivery id of its own");
    let key = finetuned::webhooks::standard_key(SECRET).unwrap().unwrap();
    let sent_after = first["job"]["created_at"].as_i64().unwrap();
    for r in log.iter() {
        assert_eq!(r.signature.as_deref(), Some(finetuned::webhooks::signature(SECRET, &r.body).as_str()));
        let [Some(msg), Some(ts), Some(sig)] = &r.standard else { panic!("Standard Webhooks headers missing: {:?}", r.standard) };
        assert_eq!(Some(msg), r.delivery.as_ref());
        let ts: i64 = ts.parse().unwrap();
        assert!(ts >= sent_after, "webhook-timestamp {ts} is the time of the attempt");
        assert_eq!(sig, &finetuned::webhooks::standard_signature(&key, msg, ts, &r.body));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["job"]["id"], id.as_str());
        assert_eq!(v["type"], "job.status_changed");
    }
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

#[tokio::test]
async fn a_receiver_that_hangs_holds_back_only_its_own_jobs_webhooks() {
    // The sender waits up to 5 minutes for an answer: all of the other job's changes must
    // arrive while the hung receiver still holds the first one.
    let app = spawn_app_with(|c| c.webhook_timeout_seconds = 300).await;
    let hung = Arc::new(tokio::sync::Notify::new());
    let hung_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hang_url = {
        let (release, count) = (hung.clone(), hung_requests.clone());
        let handler = move || {
            let (release, count) = (release.clone(), count.clone());
            async move {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(120), release.notified()).await;
                StatusCode::OK
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, axum::Router::new().route("/hook", axum::routing::post(handler))).await.unwrap() });
        url
    };
    let (url, rx) = spawn_receiver().await;
    rx.job_ended.notify_one(); // this receiver's first delivery fails at once
    let ds = app.upload_ok(crate::common::toy_jsonl(48)).await;
    let job = |url: &str| json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1), "webhook_url": url});
    let slow = app.create_job(&job(&hang_url)).await;
    poll_until(30, || hung_requests.load(std::sync::atomic::Ordering::SeqCst) > 0).await;
    let fast = app.create_job(&job(&url)).await;
    assert_eq!(app.wait_ended(fast["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    poll_until(60, || delivered_statuses(&rx.log).len() >= 3).await;
    assert_eq!(delivered_statuses(&rx.log), ["queued", "running", "succeeded"]);
    assert_eq!(hung_requests.load(std::sync::atomic::Ordering::SeqCst), 1, "the hung receiver got its first change only");
    hung.notify_one();
    assert_eq!(app.wait_ended(slow["id"].as_str().unwrap(), 120).await["status"], "succeeded");
}

#[tokio::test]
async fn a_standard_webhooks_secret_that_is_not_base64_stops_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    config.webhook_secret = Some("whsec_not base64!".into());
    let err = finetuned::startup::Application::build(config).await.err().expect("start-up refuses the secret");
    assert!(format!("{err:#}").contains("--webhook-secret: the key after `whsec_` is not base64"), "{err:#}");
}
