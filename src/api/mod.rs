//! HTTP: one router per resource, merged here with the layers every route shares.

pub mod dashboard;
pub mod datasets;
pub mod health;
pub mod hf;
pub mod idempotency;
pub mod job_metadata;
pub mod jobs;
pub mod json;
pub mod models;
pub mod predict;
pub mod rerank;
pub mod tei;

use crate::catalog::Catalog;
use crate::config::ServeConfig;
use crate::error::ApiError;
use crate::serve::Predictor;
use crate::store::Pool;
use crate::train::worker::JobQueue;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::Arc;
use std::time::Instant;
use tower_http::trace::TraceLayer;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub config: Arc<ServeConfig>,
    pub catalog: Arc<Catalog>,
    pub queue: JobQueue,
    pub predictor: Predictor,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Fires when the server starts stopping (long-lived responses end then).
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(datasets::router())
        .merge(jobs::router())
        .merge(models::router())
        .merge(predict::router(state.config.max_predict_body_bytes))
        .merge(rerank::router(state.config.max_predict_body_bytes))
        .merge(tei::router(state.config.max_predict_body_bytes))
        .merge(health::info_router())
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    // A worker process (`--role worker`) answers only the probes and the metrics.
    let app = Router::new().merge(health::router());
    let app = if state.config.runs_api() { app.merge(dashboard::router()).merge(v1) } else { app };
    app.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(state.config.max_upload_bytes))
        .layer(middleware::from_fn(envelope_errors))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")
                .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Rewrites any error response that is not already our JSON envelope (framework rejections,
/// body-limit 413s) into the envelope, keeping its message.
async fn envelope_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap_or_default();
    let mut message = String::from_utf8_lossy(&body).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        message = format!("{message} (see --max-upload-bytes)");
    }
    ApiError::from_status(status, message).into_response()
}

async fn record_metrics(req: Request<Body>, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(crate::monitoring::HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::monitoring::HTTP_REQUEST_SECONDS, "route" => route, "method" => method)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// `?limit=` checked against `1..=max`.
pub fn check_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let l = limit.unwrap_or(default);
    if !(1..=max).contains(&l) {
        return Err(ApiError::invalid("limit", format!("limit must be from 1 to {max}")));
    }
    Ok(l)
}
