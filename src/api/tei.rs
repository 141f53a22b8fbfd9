//! Routes in the shapes of Hugging Face's text-embeddings-inference (TEI), so that clients
//! written for it work unchanged: `POST /predict`, `POST /rerank`, `GET /info` and `POST /tokenize`, for the
//! model named by the `X-Model` header or, without one, by `--default-model`.

use super::hf::{hf_parameters, HfParameters};
use super::json::ApiJson;
use super::predict::{classifier, predict_body, ranked, score_pairs, timing_headers, BodyLimits};
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::model::predict::predictor::Overflow;
use crate::serve::Output;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// The header that names the model a TEI route serves (else `--default-model`).
pub const MODEL_HEADER: &str = "x-model";

/// The TEI routes; their bodies share the predict route's limit.
pub fn router(max_body_bytes: usize) -> Router<AppState> {
    Router::new()
        .route("/predict", post(predict))
        .route("/tokenize", post(tokenize))
        .route("/rerank", post(rerank))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .route("/info", get(info))
}

/// The model a request names, or the default one.
fn model_id(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
    let named = headers.get(MODEL_HEADER).map(|v| v.to_str().map(str::trim).unwrap_or_default());
    match named.filter(|v| !v.is_empty()).map(str::to_string).or_else(|| state.config.default_model.clone()) {
        Some(id) => Ok(id),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "model_required",
            "no model named: send the X-Model header or start the server with --default-model",
        )
        .param("X-Model")),
    }
}

/// TEI's `inputs`: one text (`"a"` or `["a"]`), one pair (`["a", "b"]`), or a batch of
/// one-text lists or of pairs (`[["a"], ["b"]]`, `[["a", "b"], ["c", "d"]]`; not both kinds).
/// `pairs` holds each text's second text when the inputs are pairs.
#[derive(Debug)]
struct TeiInputs {
    texts: Vec<String>,
    pairs: Option<Vec<String>>,
    single: bool,
}

impl TeiInputs {
    fn parse(v: Value) -> ApiResult<Self> {
        let shape = || {
            ApiError::invalid(
                "inputs",
                "inputs must be a string, [string], a pair [string, string], or a batch of either: [[string], ...] or [[string, string], ...]",
            )
        };
        let one = |texts: Vec<String>, pair: Option<String>| Self { texts, pairs: pair.map(|p| vec![p]), single: true };
        match v {
            Value::String(s) => Ok(one(vec![s], None)),
            Value::Array(items) => match items.first() {
                None => Err(ApiError::invalid("inputs", "inputs must hold at least one text")),
                Some(Value::String(_)) if items.len() == 1 => Ok(one(vec![text(&items[0]).ok_or_else(shape)?], None)),
                Some(Value::String(_)) if items.len() == 2 => {
                    Ok(one(vec![text(&items[0]).ok_or_else(shape)?], Some(text(&items[1]).ok_or_else(shape)?)))
                }
                Some(Value::Array(first)) => {
                    let width = first.len();
                    if !(1..=2).contains(&width) {
                        return Err(shape());
                    }
                    let (mut texts, mut seconds) = (Vec::new(), Vec::new());
                    for item in &items {
                        match item.as_array().map(Vec::as_slice) {
                            Some([t]) if width == 1 => texts.push(text(t).ok_or_else(shape)?),
                            Some([a, b]) if width == 2 => {
                                texts.push(text(a).ok_or_else(shape)?);
                                seconds.push(text(b).ok_or_else(shape)?);
                            }
                            Some([_] | [_, _]) => {
                                return Err(ApiError::invalid(
                                    "inputs",
                                    "the batch mixes single texts and pairs: send one kind per request",
                                ))
                            }
                            _ => return Err(shape()),
                        }
                    }
                    Ok(Self { texts, pairs: (width == 2).then_some(seconds), single: false })
                }
                _ => Err(shape()),
            },
            _ => Err(shape()),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// TEI's predict body. Unknown fields are ignored, as TEI does.
#[derive(Debug, Deserialize)]
struct PredictRequest {
    inputs: Value,
    truncate: Option<bool>,
    truncation_direction: Option<String>,
    raw_scores: Option<bool>,
    /// The Hugging Face inference API's parameters (`InferenceClient` sends them): the answer
    /// then takes that API's shape, a list of lists, as on `/v1/models/{id}/predict`.
    #[serde(default, deserialize_with = "hf_parameters")]
    parameters: Option<HfParameters>,
}

async fn predict(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<PredictRequest>, ApiError>,
) -> ApiResult<Response> {
    let req = predict_body(&state, body)?;
    let id = model_id(&state, &headers)?;
    let TeiInputs { texts, pairs, single } = TeiInputs::parse(req.inputs)?;
    let limits = BodyLimits { max_inputs: state.config.max_batch_inputs, max_input_chars: state.config.max_input_chars };
    limits.check(&texts)?;
    if let Some(seconds) = &pairs {
        limits.check(seconds)?;
    }
    // TEI's `--auto-truncate` is on by default: a missing `truncate` truncates.
    let overflow = match (req.truncate.unwrap_or(true), req.truncation_direction.as_deref()) {
        (false, _) => Overflow::Refuse,
        (true, None | Some("Right" | "right")) => Overflow::Truncate,
        (true, Some("Left" | "left")) if pairs.is_some() => {
            return Err(ApiError::invalid("truncation_direction", "a pair of texts is truncated from the right (longer text first)"))
        }
        (true, Some("Left" | "left")) => Overflow::TruncateLeft,
        (true, Some(_)) => return Err(ApiError::invalid("truncation_direction", "truncation_direction must be \"Left\" or \"Right\"")),
    };
    let hf = req.parameters.as_ref().map(HfParameters::checked).transpose()?;
    if hf.is_some_and(|(f, _)| f.needs_logits()) && req.raw_scores == Some(true) {
        return Err(ApiError::invalid("raw_scores", "raw_scores cannot be used with parameters.function_to_apply"));
    }
    let raw = req.raw_scores.unwrap_or(false) || hf.is_some_and(|(f, _)| f.needs_logits());
    let output = if raw { Output::Logits } else { Output::Calibrated };
    let mut scored = score_pairs(&state, &id, texts, pairs, overflow, output).await?;
    let body = match hf {
        Some((f, k)) => {
            f.apply(&mut scored.scores);
            json!(ranked(&scored, k))
        }
        None if single => json!(ranked(&scored, usize::MAX).remove(0)),
        None => json!(ranked(&scored, usize::MAX)),
    };
    Ok((timing_headers(&scored), Json(body)).into_response())
}

/// TEI's `/info`, for the model the request names (loaded to read its input length).
async fn info(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let id = model_id(&state, &headers)?;
    let model = classifier(&state, &id).await?;
    let (max_len, labels, head) = state.predictor.shape(&id, model.path).await?;
    let kind = if head.one_output() { "reranker" } else { "classifier" };
    let id2label: serde_json::Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
    let label2id: serde_json::Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
    let c = &state.config;
    let l = state.predictor.limits;
    let dtype = match state.predictor.weights.as_str() {
        "bf16" => "bfloat16",
        _ => "float32",
    };
    Ok(Json(json!({
        "model_id": id,
        "model_sha": null,
        "model_dtype": dtype,
        "served_model_name": id,
        "model_type": {kind: {"id2label": id2label, "label2id": label2id}},
        "max_concurrent_requests": c.max_concurrent_predicts,
        "max_input_length": max_len,
        "max_batch_tokens": l.max_batch_tokens,
        "max_batch_requests": l.max_batch_size,
        "max_client_batch_size": c.max_batch_inputs,
        "auto_truncate": true,
        "tokenization_workers": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
    })))
}

/// TEI's `/rerank`: the texts ordered by relevance to the query, `[{index, score, text?}]`.
async fn rerank(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<super::rerank::RerankRequest>, ApiError>,
) -> ApiResult<Response> {
    let req = predict_body(&state, body)?;
    let id = model_id(&state, &headers)?;
    let (results, scored) = super::rerank::ranked(&state, &id, req).await?;
    Ok((timing_headers(&scored), Json(results)).into_response())
}

/// TEI's tokenize body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    inputs: TokenizeInputs,
    add_special_tokens: Option<bool>,
    prompt_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenizeInputs {
    One(String),
    Many(Vec<String>),
}

async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<TokenizeRequest>, ApiError>,
) -> ApiResult<Response> {
    let req = predict_body(&state, body)?;
    let id = model_id(&state, &headers)?;
    if req.prompt_name.is_some() {
        return Err(ApiError::invalid("prompt_name", "prompts are not supported: these classifiers have none"));
    }
    let texts = match req.inputs {
        TokenizeInputs::One(t) => vec![t],
        TokenizeInputs::Many(ts) => ts,
    };
    BodyLimits { max_inputs: state.config.max_batch_inputs, max_input_chars: state.config.max_input_chars }.check(&texts)?;
    let model = classifier(&state, &id).await?;
    let tokens = state.predictor.tokenize(&id, model.path, texts, req.add_special_tokens.unwrap_or(true)).await?;
    Ok(Json(tokens).into_response())
}
