//! `POST /v1/models/{id}/predict`.

use super::json::ApiJson;
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::serve::PredictError;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/models/{id}/predict", post(predict))
}

/// One text or a list of texts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    inputs: Inputs,
    top_k: Option<u64>,
    raw_scores: Option<bool>,
    truncate: Option<bool>,
}

impl From<PredictError> for ApiError {
    fn from(e: PredictError) -> Self {
        match e {
            PredictError::Overloaded => ApiError::overloaded(e.to_string()),
            PredictError::TooLong(t) => ApiError::invalid(format!("inputs[{}]", t.index), t.to_string()),
            PredictError::Load(m) | PredictError::Inference(m) => ApiError::internal(m),
        }
    }
}

async fn predict(State(state): State<AppState>, Path(id): Path<String>, ApiJson(req): ApiJson<PredictRequest>) -> ApiResult<Json<Value>> {
    let texts = match req.inputs {
        Inputs::One(t) => vec![t],
        Inputs::Many(ts) => ts,
    };
    if texts.is_empty() {
        return Err(ApiError::invalid("inputs", "inputs must hold at least one text"));
    }
    let max = state.config.max_batch_inputs;
    if texts.len() > max {
        return Err(ApiError::invalid("inputs", format!("at most {max} inputs per request (got {})", texts.len())));
    }
    if req.top_k == Some(0) {
        return Err(ApiError::invalid("top_k", "top_k must be at least 1"));
    }
    let model = state.catalog.resolve(&id).await?.ok_or_else(|| ApiError::not_found("model", &id))?;
    if !model.is_classifier {
        return Err(ApiError::invalid("model", format!("{id} is a base model, not a classifier: fine-tune it first")));
    }
    let scored = state
        .predictor
        .predict(&id, model.path, texts, req.truncate.unwrap_or(true), req.raw_scores.unwrap_or(false))
        .await?;
    let k = req.top_k.map(|k| k as usize).unwrap_or(usize::MAX);
    let predictions: Vec<Vec<Value>> = scored
        .scores
        .iter()
        .map(|row| {
            let mut pairs: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
            pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            pairs.into_iter().take(k).map(|(i, s)| json!({"label": scored.labels[i], "score": s})).collect()
        })
        .collect();
    Ok(Json(json!({"model": id, "predictions": predictions})))
}
