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

async fn readyz(State(state): State<AppState>) -> Response {
    let db_ok = sqlx::query("select 1").execute(&state.pool).await.is_ok();
    if db_ok && state.queue.is_alive() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let what = if db_ok { "the training worker is not running" } else { "the database does not answer" };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", what).into_response()
    }
}

async fn prometheus(State(state): State<AppState>) -> Response {
    metrics::gauge!("finetuned_models_loaded").set(state.predictor.loaded() as f64);
    for status in ["queued", "running", "succeeded", "failed", "cancelled"] {
        let n: i64 = sqlx::query_scalar("select count(*) from jobs where status = ?")
            .bind(status)
            .fetch_one(&state.pool)
            .await
            .unwrap_or(0);
        metrics::gauge!("finetuned_jobs", "status" => status).set(n as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml")).into_response()
}
