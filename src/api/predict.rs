//! `POST /v1/models/{id}/predict`.

use super::json::ApiJson;
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::model::predictor::Overflow;
use crate::serve::PredictError;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// The predict route, taking bodies of at most `max_body_bytes` (`--max-predict-body-bytes`)
/// rather than the upload routes' limit.
pub fn router(max_body_bytes: usize) -> Router<AppState> {
    Router::new().route("/v1/models/{id}/predict", post(predict)).layer(DefaultBodyLimit::max(max_body_bytes))
}

/// What a predict body is checked against before any model is touched.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Most texts in one request (`--max-batch-inputs`).
    pub max_inputs: usize,
    /// Most characters (Unicode scalar values) in one text (`--max-input-chars`).
    pub max_input_chars: usize,
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
    /// `truncate` (default: cut at the model's limit, or refuse when `truncate` is false) or
    /// `chunk`: score overlapping windows over the whole text and average them.
    overflow: Option<String>,
    /// Multi-label: one number, or a number per label; each input's `labels` are those whose
    /// probability is at or above it.
    threshold: Option<Threshold>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Threshold {
    All(f64),
    PerLabel(std::collections::BTreeMap<String, f64>),
}

impl Threshold {
    fn check(&self, labels: &[String]) -> ApiResult<()> {
        let values: Vec<(&str, f64)> = match self {
            Threshold::All(t) => vec![("threshold", *t)],
            Threshold::PerLabel(m) => {
                if let Some(unknown) = m.keys().find(|k| !labels.contains(k)) {
                    return Err(ApiError::invalid(format!("threshold.{unknown}"), format!("the model has no label {unknown:?}")));
                }
                m.iter().map(|(k, v)| (k.as_str(), *v)).collect()
            }
        };
        match values.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            Some((k, _)) => Err(ApiError::invalid(
                if *k == "threshold" { "threshold".into() } else { format!("threshold.{k}") },
                "a threshold must be from 0 to 1",
            )),
            None => Ok(()),
        }
    }

    fn of(&self, label: &str) -> f64 {
        match self {
            Threshold::All(t) => *t,
            // Labels without their own threshold use 0.5.
            Threshold::PerLabel(m) => m.get(label).copied().unwrap_or(0.5),
        }
    }
}

impl From<PredictError> for ApiError {
    fn from(e: PredictError) -> Self {
        match e {
            PredictError::Overloaded => ApiError::overloaded(e.to_string()),
            PredictError::TooLong(t) => ApiError::invalid(format!("inputs[{}]", t.index), t.to_string()),
            // The files on disk are gone or damaged: a state of the model, not a server bug.
            PredictError::Load(m) => ApiError::new(
                StatusCode::CONFLICT,
                "model_unavailable",
                format!("the model could not be loaded ({m}); its files are missing or damaged: delete it and train it again"),
            ),
            PredictError::Inference(m) => ApiError::internal(m),
            PredictError::Crashed(m) => {
                tracing::error!(error = %m, "predict failed: the inference thread crashed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the model crashed while scoring this request (see the server log); it was unloaded and loads again on the next request",
                )
            }
        }
    }
}

/// A predict body that passed every check that needs no model.
#[derive(Debug)]
pub struct CheckedRequest {
    pub texts: Vec<String>,
    pub overflow: Overflow,
    top_k: Option<u64>,
    raw_scores: Option<bool>,
    threshold: Option<Threshold>,
}

impl PredictRequest {
    fn check(self, limits: BodyLimits) -> ApiResult<CheckedRequest> {
        let BodyLimits { max_inputs, max_input_chars } = limits;
        let texts = match self.inputs {
            Inputs::One(t) => vec![t],
            Inputs::Many(ts) => ts,
        };
        if texts.is_empty() {
            return Err(ApiError::invalid("inputs", "inputs must hold at least one text"));
        }
        if texts.len() > max_inputs {
            return Err(ApiError::invalid("inputs", format!("at most {max_inputs} inputs per request (got {})", texts.len())));
        }
        // Counted before tokenizing: a text's bytes bound its characters, so only texts
        // longer in bytes than the limit are counted.
        let mut too_long = texts.iter().enumerate().filter(|(_, t)| t.len() > max_input_chars).map(|(i, t)| (i, t.chars().count()));
        if let Some((i, chars)) = too_long.find(|&(_, n)| n > max_input_chars) {
            return Err(ApiError::invalid(
                format!("inputs[{i}]"),
                format!("input {i} has {chars} characters, more than the {max_input_chars} allowed per input (--max-input-chars)"),
            ));
        }
        if self.top_k == Some(0) {
            return Err(ApiError::invalid("top_k", "top_k must be at least 1"));
        }
        let overflow = match (self.overflow.as_deref(), self.truncate.unwrap_or(true)) {
            (Some("chunk"), _) => Overflow::Chunk,
            (None | Some("truncate"), true) => Overflow::Truncate,
            (None | Some("truncate"), false) => Overflow::Refuse,
            _ => return Err(ApiError::invalid("overflow", "overflow must be \"truncate\" or \"chunk\"")),
        };
        Ok(CheckedRequest { texts, overflow, top_k: self.top_k, raw_scores: self.raw_scores, threshold: self.threshold })
    }
}

/// Parses and checks a predict body as the route does before it looks at the model: the
/// request, or the 4xx error the route would answer. (The fuzz target drives this.)
pub fn check_body(body: &[u8], limits: BodyLimits) -> ApiResult<CheckedRequest> {
    let req: PredictRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("the body is not a valid predict request: {e}")))?;
    req.check(limits)
}

async fn predict(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<ApiJson<PredictRequest>, ApiError>,
) -> ApiResult<Response> {
    let limit = state.config.max_predict_body_bytes;
    let ApiJson(req) = body.map_err(|e| match e.status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            e.status,
            "payload_too_large",
            format!("the predict body is larger than {limit} bytes (--max-predict-body-bytes): send fewer or shorter inputs per request"),
        )
        .param("body"),
        _ => e,
    })?;
    let limits = BodyLimits { max_inputs: state.config.max_batch_inputs, max_input_chars: state.config.max_input_chars };
    let req = req.check(limits)?;
    let model = state.catalog.resolve(&id).await?.ok_or_else(|| ApiError::not_found("model", &id))?;
    if !model.is_classifier {
        return Err(ApiError::invalid("model", format!("{id} is a base model, not a classifier: fine-tune it first")));
    }
    // A model trained by a worker elsewhere: fetched from the object store on first use.
    state.catalog.fetch(&model).await?;
    let scored = state.predictor.predict(&id, model.path, req.texts, req.overflow, req.raw_scores.unwrap_or(false)).await?;
    if let Some(t) = &req.threshold {
        if !scored.multi_label {
            return Err(ApiError::invalid("threshold", "threshold applies to multi-label models only"));
        }
        t.check(&scored.labels)?;
        if req.raw_scores.unwrap_or(false) {
            return Err(ApiError::invalid("threshold", "threshold compares probabilities; it cannot be used with raw_scores"));
        }
    }
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
    let mut body = json!({"model": id, "predictions": predictions});
    if let Some(t) = &req.threshold {
        let chosen: Vec<Vec<&str>> = scored
            .scores
            .iter()
            .map(|row| scored.labels.iter().zip(row).filter(|(l, &s)| s as f64 >= t.of(l)).map(|(l, _)| l.as_str()).collect())
            .collect();
        body["labels"] = json!(chosen);
    }
    let ms = |d: std::time::Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    let headers = [
        ("x-tokenization-time", ms(scored.tokenization)),
        ("x-queue-time", ms(scored.timings.queue)),
        ("x-inference-time", ms(scored.timings.inference)),
        ("x-batch-size", scored.timings.batch_size.to_string()),
    ];
    Ok((headers, Json(body)).into_response())
}
