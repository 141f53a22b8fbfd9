//! `/healthz`, `/readyz`, `/metrics` (Prometheus) and `/openapi.yaml`.

use super::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/openapi.yaml", get(openapi))
}

/// `/v1/info` (behind the API key like every `/v1` route).
pub fn info_router() -> Router<AppState> {
    Router::new().route("/v1/info", get(info))
}

/// The server's version, device and every limit a client may run into.
async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    let c = &state.config;
    let l = state.predictor.limits;
    Json(json!({
        "object": "info",
        "version": env!("CARGO_PKG_VERSION"),
        "device": format!("{:?}", state.predictor.device()),
        "predict_dtype": state.predictor.weights.as_str(),
        "architectures": crate::model::encoder::arch::Arch::supported_types(),
        "refused_models": state.catalog.refused().iter().map(|(id, reason)| json!({"id": id, "reason": reason})).collect::<Vec<_>>(),
        "limits": {
            "max_upload_bytes": c.max_upload_bytes,
            "max_batch_inputs": c.max_batch_inputs,
            "max_predict_body_bytes": c.max_predict_body_bytes,
            "max_input_chars": c.max_input_chars,
            "max_concurrent_predicts": c.max_concurrent_predicts,
            "model_cache_size": c.model_cache_size,
            "model_cache_mib": c.model_cache_mib,
            "adapter_cache_mib": c.adapter_cache_mib,
            "max_batch_tokens": l.max_batch_tokens,
            "max_batch_size": l.max_batch_size,
            "max_batch_wait_ms": l.max_wait.as_secs_f64() * 1e3,
            "batch_rejoin_wait_ms": l.rejoin_wait.as_secs_f64() * 1e3,
        },
        "models_loaded": state.predictor.loaded_ids(),
        "adapters_loaded": state.predictor.adapters_loaded(),
        "bases_loaded": state.predictor.bases_loaded(),
    }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let db_ok = crate::store::ping(&state.pool).await;
    // An API-only process has no worker of its own to wait for.
    if db_ok && (!state.config.runs_worker() || state.queue.is_alive()) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let what = if db_ok { "the training worker is not running" } else { "the database does not answer" };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", what).into_response()
    }
}

async fn prometheus(State(state): State<AppState>) -> Response {
    metrics::gauge!("finetuned_models_loaded").set(state.predictor.loaded_ids().len() as f64);
    // The database out of reach reads as no jobs, as before: /metrics still answers.
    let counts = crate::store::jobs::status_counts(&state.pool).await;
    for status in crate::store::jobs::JobStatus::ALL {
        let n = counts.as_ref().ok().and_then(|c| c.iter().find(|(s, _)| *s == status)).map_or(0, |(_, n)| *n);
        metrics::gauge!(crate::monitoring::JOBS, "status" => status.as_str()).set(n as f64);
    }
    if let Ok((oldest, expired)) = crate::store::jobs::queue_health(&state.pool).await {
        let age = oldest.map_or(0, |t| (crate::store::now() - t).max(0));
        metrics::gauge!(crate::monitoring::OLDEST_QUEUED_AGE).set(age as f64);
        metrics::gauge!(crate::monitoring::LEASE_EXPIRED).set(expired as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml")).into_response()
}
