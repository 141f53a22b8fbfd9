//! `Idempotency-Key` on `POST /v1/jobs`: a client that retries a request whose answer it never
//! got (a timeout, a dropped connection) sends the same key, and gets the job the first request
//! queued (`201`, with `Idempotent-Replayed: true`) instead of training twice. The same key with
//! a different request is refused, as is a key whose first request is still being handled.

use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::store::{idempotency, jobs, jobs::JobRecord};
use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

/// The request header, and the longest key it may hold.
pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

/// A request's key and the hash of what it asked for.
pub struct Idempotency {
    key: String,
    hash: String,
}

/// The request's `Idempotency-Key`, checked: 1 to 255 visible ASCII characters.
pub fn key_of(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(HEADER) else { return Ok(None) };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(key.to_string())),
        _ => Err(ApiError::bad_request(format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters")).param(HEADER)),
    }
}

/// Hashes what a request asks for: its JSON body, or its multipart parts (their names, file
/// names, types and bytes, not the boundary, which clients draw anew for each attempt).
#[derive(Default)]
pub struct RequestHasher(Sha256);

impl RequestHasher {
    pub fn json(body: &[u8]) -> Self {
        let mut h = Self::default();
        h.field(b"json");
        h.field(body);
        h
    }

    pub fn part(&mut self, name: &str, filename: Option<&str>, content_type: Option<&str>, bytes: &[u8]) {
        for field in [b"part".as_slice(), name.as_bytes(), filename.unwrap_or("").as_bytes(), content_type.unwrap_or("").as_bytes(), bytes]
        {
            self.field(field);
        }
    }

    /// Each field with its length first, so that no two sequences of fields hash alike.
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub fn finish(self, key: Option<String>) -> Option<Idempotency> {
        key.map(|key| Idempotency { key, hash: format!("{:x}", self.0.finalize()) })
    }
}

/// The job queued by an earlier request with this key, when it asked for the same; an error
/// when it asked for something else.
pub async fn replay(state: &AppState, idem: Option<&Idempotency>) -> ApiResult<Option<JobRecord>> {
    let Some(idem) = idem else { return Ok(None) };
    let Some(seen) = idempotency::find(&state.pool, &idem.key).await? else { return Ok(None) };
    if seen.request_hash != idem.hash {
        let msg = "this Idempotency-Key was used for a different request in the last 24 hours: use a new key for a new request";
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused", msg).param(HEADER));
    }
    Ok(jobs::get(&state.pool, &seen.job_id).await?)
}

/// Records the key with the job `tx` queues; refused while a concurrent request with the same
/// key is being handled (its job wins).
pub async fn record(tx: &mut crate::store::Tx, idem: Option<&Idempotency>, job_id: &str) -> ApiResult<()> {
    let Some(idem) = idem else { return Ok(()) };
    if !idempotency::record(tx, &idem.key, &idem.hash, job_id).await? {
        let msg = "a request with this Idempotency-Key is being handled: retry it to get its job";
        return Err(ApiError::new(StatusCode::CONFLICT, "idempotency_key_in_use", msg).param(HEADER));
    }
    Ok(())
}
