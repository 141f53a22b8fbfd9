//! `POST /v1/models/{id}/predict`.

use super::hf::{check_top_k, hf_parameters, Function, HfParameters};
use super::json::ApiJson;
use super::AppState;
use crate::error::{ApiError, ApiResult};
use crate::model::predict::predictor::Head;
use crate::model::predict::predictor::Overflow;
use crate::serve::entities::Aggregation;
use crate::serve::{Output, PredictError, Scored};
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

impl BodyLimits {
    /// Refuses an empty list, too many texts, or a text of too many characters.
    pub(crate) fn check(&self, texts: &[String]) -> ApiResult<()> {
        let BodyLimits { max_inputs, max_input_chars } = *self;
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
        Ok(())
    }
}

/// One input or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(Input),
    Many(Vec<Input>),
}

/// A text, or a pair of texts in the Hugging Face inference API's shape: an object
/// `{"text", "text_pair"}` (a map, so that a list of two texts stays two inputs).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Pair(std::collections::BTreeMap<String, String>),
}

/// A pair's two texts, or the error naming what the object lacks or has too many of.
fn pair_of(mut m: std::collections::BTreeMap<String, String>) -> ApiResult<(String, String)> {
    match (m.remove("text"), m.remove("text_pair")) {
        (Some(a), Some(b)) if m.is_empty() => Ok((a, b)),
        _ => Err(ApiError::invalid("inputs", "a pair of texts is an object with exactly \"text\" and \"text_pair\"")),
    }
}

/// The texts of `inputs`, and each one's second text when they are pairs (all of them or
/// none: a request mixing the two is refused).
fn split_inputs(inputs: Vec<Input>) -> ApiResult<(Vec<String>, Option<Vec<String>>)> {
    let pairs = inputs.iter().filter(|i| matches!(i, Input::Pair(_))).count();
    if pairs > 0 && pairs < inputs.len() {
        return Err(ApiError::invalid("inputs", "inputs mix single texts and pairs: send one kind per request"));
    }
    if pairs == 0 {
        return Ok((inputs.into_iter().map(|i| if let Input::Text(t) = i { t } else { unreachable!("counted") }).collect(), None));
    }
    let both = inputs
        .into_iter()
        .map(|i| if let Input::Pair(p) = i { pair_of(p) } else { unreachable!("counted") })
        .collect::<ApiResult<Vec<(String, String)>>>()?;
    let (texts, seconds) = both.into_iter().unzip();
    Ok((texts, Some(seconds)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    inputs: Inputs,
    top_k: Option<u64>,
    raw_scores: Option<bool>,
    /// `false`: probabilities of the logits as they are, not at the model's calibration
    /// temperature.
    calibrated: Option<bool>,
    truncate: Option<bool>,
    /// `truncate` (default: cut at the model's limit, or refuse when `truncate` is false) or
    /// `chunk`: score overlapping windows over the whole text and average them.
    overflow: Option<String>,
    /// Multi-label: one number, or a number per label; each input's `labels` are those whose
    /// probability is at or above it.
    threshold: Option<Threshold>,
    /// The Hugging Face inference API's parameters; their presence asks for that API's answer
    /// shape (see [`HfParameters`]).
    #[serde(default, deserialize_with = "hf_parameters")]
    parameters: Option<HfParameters>,
    /// Token classifiers: `none`, `simple` (the default), `first`, `average` or `max`.
    aggregation_strategy: Option<String>,
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
    /// Each text's second text, for pairs.
    pub pairs: Option<Vec<String>>,
    pub overflow: Overflow,
    top_k: Option<u64>,
    raw_scores: Option<bool>,
    calibrated: Option<bool>,
    threshold: Option<Threshold>,
    /// Set when the body had `parameters`: answer in the Hugging Face inference API's shape.
    hf: Option<Function>,
    /// Token classifiers: how sub-words become entities (`None`: not asked).
    aggregation: Option<Aggregation>,
    /// Token classifiers: entity types to leave out.
    ignore_labels: Vec<String>,
    /// Whether `inputs` was one text rather than a list.
    single: bool,
}

impl PredictRequest {
    fn check(self, limits: BodyLimits) -> ApiResult<CheckedRequest> {
        let single = matches!(self.inputs, Inputs::One(_));
        let hf_aggregation = self.parameters.as_ref().and_then(|p| p.aggregation_strategy.clone());
        let ignore_labels = self.parameters.as_ref().and_then(|p| p.ignore_labels.clone()).unwrap_or_default();
        let aggregation = match self.aggregation_strategy.as_deref().or(hf_aggregation.as_deref()) {
            None => None,
            Some(s) => Some(Aggregation::parse(s).ok_or_else(|| {
                ApiError::invalid("aggregation_strategy", "aggregation_strategy must be none, simple, first, average or max")
            })?),
        };
        let (texts, pairs) = split_inputs(match self.inputs {
            Inputs::One(t) => vec![t],
            Inputs::Many(ts) => ts,
        })?;
        limits.check(&texts)?;
        if let Some(seconds) = &pairs {
            limits.check(seconds)?;
            if self.overflow.as_deref() == Some("chunk") {
                return Err(ApiError::invalid("overflow", "overflow \"chunk\" applies to single texts, not pairs"));
            }
        }
        check_top_k("top_k", self.top_k)?;
        if self.calibrated.is_some() && self.raw_scores == Some(true) {
            return Err(ApiError::invalid("calibrated", "calibrated applies to probabilities; it cannot be used with raw_scores"));
        }
        let (top_k, hf) = match self.parameters {
            None => (self.top_k, None),
            Some(p) => {
                let (f, _) = p.checked()?;
                if self.threshold.is_some() {
                    return Err(ApiError::invalid(
                        "threshold",
                        "threshold cannot be used with parameters (the Hugging Face answer shape has no place for labels)",
                    ));
                }
                if f.needs_logits() && self.raw_scores == Some(true) {
                    return Err(ApiError::invalid("raw_scores", "raw_scores cannot be used with parameters.function_to_apply"));
                }
                if f.needs_logits() && self.calibrated.is_some() {
                    return Err(ApiError::invalid(
                        "calibrated",
                        "calibrated cannot be used with parameters.function_to_apply (it applies to the logits)",
                    ));
                }
                (p.top_k.or(self.top_k), Some(f))
            }
        };
        let overflow = match (self.overflow.as_deref(), self.truncate.unwrap_or(true)) {
            (Some("chunk"), _) => Overflow::Chunk,
            (None | Some("truncate"), true) => Overflow::Truncate,
            (None | Some("truncate"), false) => Overflow::Refuse,
            _ => return Err(ApiError::invalid("overflow", "overflow must be \"truncate\" or \"chunk\"")),
        };
        Ok(CheckedRequest {
            texts,
            pairs,
            overflow,
            top_k,
            raw_scores: self.raw_scores,
            calibrated: self.calibrated,
            threshold: self.threshold,
            hf,
            aggregation,
            ignore_labels,
            single,
        })
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
    let req = predict_body(&state, body)?;
    let limits = BodyLimits { max_inputs: state.config.max_batch_inputs, max_input_chars: state.config.max_input_chars };
    let req = req.check(limits)?;
    let model = classifier(&state, &id).await?;
    let (_, _, head) = state.predictor.shape(&id, model.path.clone()).await?;
    if head == Head::Tokens {
        return tag(&state, &id, model.path, req).await;
    }
    if req.aggregation.is_some() {
        return Err(ApiError::invalid(
            "aggregation_strategy",
            format!("{id} is not a token classifier: aggregation_strategy applies to entities"),
        ));
    }
    let output = match (req.raw_scores.unwrap_or(false) || req.hf.is_some_and(Function::needs_logits), req.calibrated) {
        (true, _) => Output::Logits,
        (false, Some(false)) => Output::Uncalibrated,
        (false, _) => Output::Calibrated,
    };
    let mut scored = score_pairs(&state, &id, req.texts, req.pairs, req.overflow, output).await?;
    if let Some(f) = req.hf {
        f.apply(&mut scored.scores);
        let k = req.top_k.map(|k| k as usize).unwrap_or(usize::MAX);
        return Ok((timing_headers(&scored), Json(ranked(&scored, k))).into_response());
    }
    if let Some(t) = &req.threshold {
        if !scored.multi_label {
            return Err(ApiError::invalid("threshold", "threshold applies to multi-label models only"));
        }
        t.check(&scored.labels)?;
        if req.raw_scores.unwrap_or(false) {
            return Err(ApiError::invalid("threshold", "threshold compares probabilities; it cannot be used with raw_scores"));
        }
    }
    if scored.head.one_output() {
        // A regression's number, a reranker's relevance: one score per input.
        let predictions: Vec<Value> = scored.scores.iter().map(|row| json!({"score": row[0]})).collect();
        return Ok((timing_headers(&scored), Json(json!({"model": id, "predictions": predictions}))).into_response());
    }
    let k = req.top_k.map(|k| k as usize).unwrap_or(usize::MAX);
    let predictions = ranked(&scored, k);
    let mut body = json!({"model": id, "predictions": predictions});
    // The request's threshold, else (probabilities only) the model's own, tuned when it trained.
    let own = scored.thresholds.as_ref().filter(|_| scored.multi_label && !req.raw_scores.unwrap_or(false));
    let cut: Option<Vec<f64>> = match (&req.threshold, own) {
        (Some(t), _) => Some(scored.labels.iter().map(|l| t.of(l)).collect()),
        (None, Some(own)) => Some(own.iter().map(|&t| t as f64).collect()),
        (None, None) => None,
    };
    if let Some(cut) = cut {
        let chosen: Vec<Vec<&str>> = scored
            .scores
            .iter()
            .map(|row| {
                scored.labels.iter().zip(row).zip(&cut).filter(|((_, &s), &t)| s as f64 >= t).map(|((l, _), _)| l.as_str()).collect()
            })
            .collect();
        body["labels"] = json!(chosen);
    }
    Ok((timing_headers(&scored), Json(body)).into_response())
}

/// A token classifier's answer: each text's entities, `{entity_group, score, word, start, end}`
/// (`{entity, score, index, word, start, end}` with aggregation `none`), as transformers'
/// pipeline gives them; in the Hugging Face inference API's shape when the body had `parameters`
/// (one text: its list of entities).
async fn tag(state: &AppState, id: &str, path: std::path::PathBuf, req: CheckedRequest) -> ApiResult<Response> {
    if req.pairs.is_some() {
        return Err(ApiError::invalid("inputs", format!("{id} is a token classifier: it takes single texts, not pairs")));
    }
    if req.threshold.is_some() || req.top_k.is_some() || req.calibrated.is_some() {
        return Err(ApiError::invalid(
            "inputs",
            format!("{id} is a token classifier: threshold, top_k and calibrated apply to text classifiers"),
        ));
    }
    let output = if req.raw_scores.unwrap_or(false) { Output::Logits } else { Output::Calibrated };
    let strategy = req.aggregation.unwrap_or(Aggregation::Simple);
    let texts = req.texts.clone();
    let tagged = state.predictor.predict_tokens(id, path, req.texts, output).await?;
    let per_text: Vec<Vec<crate::serve::entities::Entity>> = texts
        .iter()
        .zip(&tagged.texts)
        .map(|(text, pieces)| {
            let mut found = crate::serve::entities::aggregate(text, pieces, &tagged.labels, strategy);
            found.retain(|e| {
                let kind = e.entity_group.as_deref().or(e.entity.as_deref()).unwrap_or("");
                let bare = kind.split_once('-').map_or(kind, |(_, k)| k);
                !req.ignore_labels.iter().any(|l| l == kind || l == bare)
            });
            found
        })
        .collect();
    let headers = [
        ("x-tokenization-time", format!("{:.3}", tagged.tokenization.as_secs_f64() * 1e3)),
        ("x-queue-time", format!("{:.3}", tagged.timings.queue.as_secs_f64() * 1e3)),
        ("x-inference-time", format!("{:.3}", tagged.timings.inference.as_secs_f64() * 1e3)),
        ("x-batch-size", tagged.timings.batch_size.to_string()),
    ];
    if req.hf.is_some() {
        let body = if req.single { json!(per_text[0]) } else { json!(per_text) };
        return Ok((headers, Json(body)).into_response());
    }
    Ok((headers, Json(json!({"model": id, "predictions": per_text}))).into_response())
}

/// The body of a predict request, or our error (a 413 naming `--max-predict-body-bytes`).
pub(crate) fn predict_body<T>(state: &AppState, body: Result<ApiJson<T>, ApiError>) -> ApiResult<T> {
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
    Ok(req)
}

/// Classifier `id`, found, fetched from the object store where it was trained elsewhere.
pub(crate) async fn classifier(state: &AppState, id: &str) -> ApiResult<crate::catalog::Resolved> {
    let model = state.catalog.resolve(id).await?.ok_or_else(|| ApiError::not_found("model", id))?;
    if !model.is_classifier {
        return Err(ApiError::invalid("model", format!("{id} is a base model, not a classifier: fine-tune it first")));
    }
    state.catalog.fetch(&model).await?;
    Ok(model)
}

/// `texts` scored by classifier `id` as `output` says, each with its second text when `pairs`
/// holds them.
pub(crate) async fn score_pairs(
    state: &AppState,
    id: &str,
    texts: Vec<String>,
    pairs: Option<Vec<String>>,
    overflow: Overflow,
    output: Output,
) -> ApiResult<Scored> {
    let model = classifier(state, id).await?;
    Ok(state.predictor.predict_pairs(id, model.path, texts, pairs, overflow, output).await?)
}

/// Each input's `{label, score}` pairs, highest score first (ties in label order), at most `k`.
pub(crate) fn ranked(scored: &Scored, k: usize) -> Vec<Vec<Value>> {
    let rank = |row: &Vec<f32>| {
        let mut pairs: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        pairs.into_iter().take(k).map(|(i, s)| json!({"label": scored.labels[i], "score": s})).collect()
    };
    scored.scores.iter().map(rank).collect()
}

/// Where a prediction's time went, as response headers.
pub(crate) fn timing_headers(scored: &Scored) -> [(&'static str, String); 4] {
    let ms = |d: std::time::Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    [
        ("x-tokenization-time", ms(scored.tokenization)),
        ("x-queue-time", ms(scored.timings.queue)),
        ("x-inference-time", ms(scored.timings.inference)),
        ("x-batch-size", scored.timings.batch_size.to_string()),
    ]
}
