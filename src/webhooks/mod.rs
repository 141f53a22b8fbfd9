//! Job webhooks: a POST of the job to its `webhook_url` on each state change, signed with an
//! HMAC-SHA256 of the body (`--webhook-secret`; `signing.rs` adds the Standard Webhooks
//! headers), retried with exponential backoff and the same body. Delivery runs from the durable
//! outbox on tasks of its own: a failing receiver never affects the job, and processes sharing
//! a database claim each change before sending it, so it goes out once.

use crate::store::Pool;
use crate::store::{jobs, webhooks};
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod signing;
pub use signing::{signature, standard_key, standard_signature, Signer};

/// Attempts per state change before it is given up (with a warning event on the job).
pub const MAX_ATTEMPTS: i64 = 6;
/// The first retry waits this long; each later one twice as long as the one before.
const FIRST_BACKOFF_MS: i64 = 500;
const POLL: Duration = Duration::from_millis(200);

/// Whether `url` can be a webhook: absolute http(s), at most 2048 characters.
pub fn valid_url(url: &str) -> bool {
    url.len() <= 2048 && reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Deliveries in flight at once, at most.
const IN_FLIGHT: usize = 64;

/// Delivers the outbox until `shutdown` fires. Each delivery runs on a task of its own, so a
/// slow receiver holds back only the changes of its own job (a claimed change is not due
/// again, see [`webhooks::claim`]); deliveries cut off by the stop are retried after their claim
/// runs out, by this server's next start or another one.
pub async fn run_until_stopped(pool: Pool, signer: Option<Signer>, timeout: Duration, shutdown: CancellationToken) {
    let client = reqwest::Client::builder().timeout(timeout).build().expect("HTTP client builds");
    // A claim keeps other servers from sending a change while this one does: it outlasts the
    // attempt's timeout, so it never runs out while the attempt may still succeed.
    let claim_ms = 3 * timeout.as_millis() as i64;
    let signer = signer.map(std::sync::Arc::new);
    let mut in_flight = tokio::task::JoinSet::new();
    while !shutdown.is_cancelled() {
        while in_flight.try_join_next().is_some() {}
        let room = IN_FLIGHT.saturating_sub(in_flight.len()) as i64;
        match webhooks::due(&pool, now_ms(), room).await {
            Ok(rows) => {
                for row in rows {
                    let (pool, client, signer) = (pool.clone(), client.clone(), signer.clone());
                    in_flight.spawn(async move { deliver(&pool, &client, signer.as_deref(), claim_ms, row).await });
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the webhook outbox failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The body of a change: the one fixed at its first attempt, or else the job as it is now with
/// the status of the change, fixed in the outbox before it is first sent.
async fn body_of(pool: &Pool, row: &webhooks::Pending) -> Result<Option<String>, sqlx::Error> {
    if let Some(body) = &row.body {
        return Ok(Some(body.clone()));
    }
    let Some(job) = jobs::get(pool, &row.job_id).await? else { return Ok(None) };
    let mut job = serde_json::to_value(job).expect("job serialises");
    job["status"] = json!(row.status);
    let body = json!({"type": "job.status_changed", "status": row.status, "job": job}).to_string();
    webhooks::fix_body(pool, row.id, &body).await.map(Some)
}

async fn deliver(pool: &Pool, client: &reqwest::Client, signer: Option<&Signer>, claim_ms: i64, row: webhooks::Pending) {
    match webhooks::claim(pool, &row, now_ms() + claim_ms).await {
        Ok(true) => {}
        Ok(false) => return, // another server sharing the database is sending it
        Err(e) => return tracing::error!(error = %e, "claiming a webhook delivery failed"),
    }
    let body = match body_of(pool, &row).await {
        Ok(Some(body)) => body,
        Ok(None) => return drop(webhooks::done(pool, row.id).await),
        Err(e) => return tracing::error!(error = %e, "preparing a webhook body failed"),
    };
    // Standard Webhooks' id and time of the attempt (the id stays across retries; the time is
    // each attempt's own, so that receivers can refuse old replays).
    let (id, timestamp) = (row.id.to_string(), now_ms() / 1000);
    let mut req = client
        .post(&row.url)
        .header("content-type", "application/json")
        .header("x-finetuned-event", "job.status_changed")
        .header("x-finetuned-delivery", &id)
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string());
    for (name, value) in signer.map(|s| s.headers(&id, timestamp, body.as_bytes())).unwrap_or_default() {
        req = req.header(name, value);
    }
    let outcome = match req.body(body).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("HTTP {}", r.status())),
        Err(e) => Err(e.to_string()),
    };
    let result = match outcome {
        Ok(()) => webhooks::done(pool, row.id).await,
        Err(why) if row.attempts + 1 >= MAX_ATTEMPTS => {
            tracing::warn!(job = %row.job_id, url = %row.url, error = %why, "webhook given up");
            let msg = format!("webhook for status {} not delivered after {MAX_ATTEMPTS} attempts: {why}", row.status);
            let _ = jobs::add_event(pool, &row.job_id, "warning", "message", &msg, None).await;
            webhooks::done(pool, row.id).await
        }
        Err(why) => {
            tracing::debug!(job = %row.job_id, error = %why, attempt = row.attempts + 1, "webhook failed; retrying");
            webhooks::retry_at(pool, row.id, now_ms() + (FIRST_BACKOFF_MS << row.attempts)).await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "updating the webhook outbox failed");
    }
}
