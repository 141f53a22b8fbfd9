//! `POST /v1/models/{id}/rerank`, and the body and answer that TEI's `POST /rerank` shares: a
//! query and the texts to order by a cross-encoder's relevance, each (query, text) pair scored
//! in the predict route's dynamic batches.

use super::json::ApiJson;
use super::predict::{predict_body, score_pairs, timing_headers, BodyLimits};
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::model::predict::predictor::{Head, Overflow};
use crate::serve::Output;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// The rerank route, with the predict route's body limit.
pub fn router(max_body_bytes: usize) -> Router<AppState> {
    Router::new().route("/v1/models/{id}/rerank", post(rerank)).layer(DefaultBodyLimit::max(max_body_bytes))
}

/// A rerank body, as text-embeddings-inference takes it (plus `top_n`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RerankRequest {
    query: String,
    texts: Vec<String>,
    /// The logits rather than their sigmoid.
    #[serde(default)]
    raw_scores: bool,
    /// Each result carries its text.
    #[serde(default)]
    return_text: bool,
    /// `false`: refuse a pair longer than the model takes rather than cut it.
    truncate: Option<bool>,
    /// TEI's; a pair is cut from the right (the end of the longer text) only.
    truncation_direction: Option<String>,
    /// Only the best `top_n` results.
    top_n: Option<usize>,
}

impl RerankRequest {
    fn check(&self, limits: BodyLimits) -> ApiResult<Overflow> {
        if self.texts.is_empty() {
            return Err(ApiError::invalid("texts", "texts must hold at least one text"));
        }
        limits.check(&self.texts).map_err(|e| rename_param(e, "inputs", "texts"))?;
        limits.check(std::slice::from_ref(&self.query)).map_err(|e| rename_param(e, "inputs[0]", "query"))?;
        if self.top_n == Some(0) {
            return Err(ApiError::invalid("top_n", "top_n must be at least 1"));
        }
        match self.truncation_direction.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("right") => {}
            Some(_) => {
                return Err(ApiError::invalid("truncation_direction", "a (query, text) pair is cut from the right only (\"Right\")"));
            }
        }
        Ok(if self.truncate.unwrap_or(true) { Overflow::Truncate } else { Overflow::Refuse })
    }
}

/// `e` with its parameter `from` (or `from[i]`) named `to` (`to[i]`) instead.
fn rename_param(mut e: ApiError, from: &str, to: &str) -> ApiError {
    if let Some(p) = e.param.as_deref().and_then(|p| p.strip_prefix(from)) {
        e.param = Some(format!("{to}{p}"));
    }
    e
}

/// The texts of `req` ordered by model `id`'s relevance to the query, best first: each
/// `{index, score, text?}` (ties keep the texts' order).
pub(crate) async fn ranked(state: &AppState, id: &str, req: RerankRequest) -> ApiResult<(Vec<Value>, crate::serve::Scored)> {
    let limits = BodyLimits { max_inputs: state.config.max_batch_inputs, max_input_chars: state.config.max_input_chars };
    let overflow = req.check(limits)?;
    let output = if req.raw_scores { Output::Logits } else { Output::Uncalibrated };
    let queries = vec![req.query.clone(); req.texts.len()];
    let scored = score_pairs(state, id, queries, Some(req.texts.clone()), overflow, output).await.map_err(|e| match e {
        e if e.param.as_deref().is_some_and(|p| p.starts_with("inputs")) => rename_param(e, "inputs", "texts"),
        e => e,
    });
    let scored = scored?;
    if !scored.head.one_output() {
        return Err(ApiError::invalid(
            "model",
            format!("{id} is a classifier of {} labels, not a reranker: rerank takes a model with one output", scored.labels.len()),
        ));
    }
    let mut order: Vec<usize> = (0..req.texts.len()).collect();
    order.sort_by(|&a, &b| scored.scores[b][0].total_cmp(&scored.scores[a][0]).then(a.cmp(&b)));
    let results = order
        .into_iter()
        .take(req.top_n.unwrap_or(usize::MAX))
        .map(|i| {
            let mut r = json!({"index": i, "score": scored.scores[i][0]});
            if req.return_text {
                r["text"] = json!(req.texts[i]);
            }
            r
        })
        .collect();
    Ok((results, scored))
}

async fn rerank(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<ApiJson<RerankRequest>, ApiError>,
) -> ApiResult<Response> {
    let req = predict_body(&state, body)?;
    let (results, scored) = ranked(&state, &id, req).await?;
    let task = if scored.head == Head::Rerank { "rerank" } else { "regression" };
    Ok((timing_headers(&scored), Json(json!({"model": id, "task": task, "results": results}))).into_response())
}
