//! `/v1/jobs`: create (JSON, or multipart with the dataset files), list, get, cancel,
//! events (JSON or Server-Sent Events) and metrics.

use super::datasets::{format_of, multipart_error, repeated_part, store_upload, Upload, UploadQuery};
use super::idempotency::{self, Idempotency, RequestHasher};
use super::job_metadata::{check_filter, check_metadata, filter_of};
use super::json::{is_json, parse_json, parse_query, ApiQuery};
use super::{check_limit, AppState};
use crate::dataset::Format;
use crate::error::{ApiError, ApiResult};
use crate::store::jobs::{JobStatus, JobTask};
use crate::store::{self, datasets, jobs, jobs::JobRecord};
use crate::train::hyper::{HyperparametersInput, JobKind};
use crate::train::mlm::ScratchSpec;
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list).post(create))
        .route("/v1/jobs/{id}", get(get_one))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/metrics", get(metrics))
        .route("/v1/jobs/{id}/checkpoints", get(checkpoints))
}

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub base_model: String,
    pub training_dataset: Option<String>,
    pub validation_dataset: Option<String>,
    pub task: Option<String>,
    pub model_name: Option<String>,
    pub hyperparameters: Option<HyperparametersInput>,
    /// `mlm` only: train from scratch with this architecture (and `base_model`'s tokenizer).
    pub config: Option<ScratchSpec>,
    /// Gets a signed POST of the job on each of its state changes.
    pub webhook_url: Option<String>,
    /// Up to 16 string pairs to find the job by (`GET /v1/jobs?metadata[key]=value`).
    pub metadata: Option<BTreeMap<String, String>>,
}

fn check_model_name(name: &str) -> ApiResult<()> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(ApiError::invalid("model_name", "model_name must be 1 to 64 characters of A-Z a-z 0-9 . _ - and not start with '.'"));
    }
    Ok(())
}

/// Checks everything that does not need the datasets; returns (task, resolved hyperparameters JSON).
async fn check_request(state: &AppState, req: &JobRequest) -> ApiResult<(JobTask, Value)> {
    let task = match req.task.as_deref() {
        None => JobTask::Classification,
        Some(t) => JobTask::parse(t).ok_or_else(|| {
            ApiError::invalid(
                "task",
                "task must be classification, multi_label_classification, regression, rerank, token_classification or mlm",
            )
        })?,
    };
    if let Some(c) = &req.config {
        if task != JobTask::Mlm {
            return Err(ApiError::invalid("config", "config (training from scratch) applies to task mlm only"));
        }
        c.check().map_err(|(param, msg)| ApiError::invalid(param, msg))?;
    }
    if let Some(name) = &req.model_name {
        check_model_name(name)?;
        // Model ids are one namespace: a trained model named like a base model would be
        // hidden behind it.
        if state.catalog.is_dir_model(name) {
            return Err(ApiError::conflict(format!(
                "model_name {name:?} is already used by a model of the models dir: choose another name"
            ))
            .param("model_name"));
        }
    }
    if let Some(m) = &req.metadata {
        check_metadata(m)?;
    }
    if req.webhook_url.as_deref().is_some_and(|u| !crate::webhooks::valid_url(u)) {
        return Err(ApiError::invalid("webhook_url", "webhook_url must be an absolute http or https URL of at most 2048 characters"));
    }
    // A hub id that is not a local model is fetched by the worker; `pooling: auto` is then
    // decided when its files are there.
    let resolved = state.catalog.resolve(&req.base_model).await?;
    let base_path = resolved.as_ref().map(|b| b.path.clone());
    let auto_pooling = match resolved {
        Some(base) if state.catalog.adapter_base(&req.base_model).is_some() || crate::model::hf::lora::is_adapter(&base.path) => {
            let of = state.catalog.adapter_base(&req.base_model).unwrap_or_else(|| "its base".into());
            let msg = format!("{} is a LoRA adapter over {of}: fine-tune from {of} instead", req.base_model);
            return Err(ApiError::invalid("base_model", msg));
        }
        Some(base) => {
            if task == JobTask::Mlm && req.config.is_none() {
                if let Some(why) = crate::model::hf::artifacts::pretraining_refusal(&base.path) {
                    return Err(ApiError::invalid("base_model", format!("{}: {why}", req.base_model)));
                }
            }
            base.auto_pooling
        }
        None if state.catalog.refused().contains_key(&req.base_model) => {
            let why = &state.catalog.refused()[&req.base_model];
            return Err(ApiError::invalid("base_model", format!("{} cannot be fine-tuned here: {why}", req.base_model)));
        }
        None if crate::hub::is_repo_id(&req.base_model) => "auto".to_string(),
        None => return Err(ApiError::not_found("model", &req.base_model).param("base_model")),
    };
    let kind = if task == JobTask::Mlm { JobKind::Pretrain { from_config: req.config.is_some() } } else { JobKind::FineTune };
    let hp =
        req.hyperparameters.clone().unwrap_or_default().resolve(&auto_pooling, kind).map_err(|e| ApiError::invalid(e.param, e.message))?;
    let method = serde_json::to_value(hp.method).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    if let Some(why) = base_path.and_then(|p| crate::model::hf::artifacts::job_refusal(&p, task.as_str(), &method)) {
        return Err(ApiError::invalid("base_model", format!("{}: {why}", req.base_model)));
    }
    Ok((task, serde_json::to_value(hp).expect("hyperparameters serialise")))
}

fn check_dataset_kind(d: &datasets::DatasetRecord, param: &str, task: &JobTask) -> ApiResult<()> {
    if *task == JobTask::Mlm {
        // Pre-training reads only the texts: labeled or unlabeled data both serve.
        return Ok(());
    }
    if d.labels.is_empty() {
        return Err(ApiError::invalid(param, format!("dataset {} has no labels; {task} needs labeled data", d.id)));
    }
    match (*task == JobTask::TokenClassification, d.kind == "tokens") {
        (true, false) => {
            return Err(ApiError::invalid(
                param,
                format!(
                    "dataset {} is {}, not tagged words: token_classification needs rows of \"tokens\" and \"tags\", entity spans or CoNLL",
                    d.id, d.kind
                ),
            ));
        }
        (false, true) => {
            return Err(ApiError::invalid(param, format!("dataset {} is tagged words: use task token_classification", d.id)));
        }
        (true, true) => return Ok(()),
        (false, false) => {}
    }
    if matches!(task, JobTask::Regression | JobTask::Rerank) {
        if d.multi_label {
            return Err(ApiError::invalid(param, format!("dataset {} has lists of labels; {task} needs a number per row", d.id)));
        }
        if let Some(line) = d.text_label_line {
            let what = if *task == JobTask::Rerank { "a relevance from 0 to 1" } else { "a number" };
            let mut e = ApiError::invalid(param, format!("dataset {} line {line}: the label is not a number; {task} needs {what}", d.id));
            e.line = Some(line as usize);
            return Err(e);
        }
        if *task == JobTask::Rerank {
            if let Some(v) = d.labels.keys().find(|l| l.trim().parse::<f64>().is_ok_and(|v| !(0.0..=1.0).contains(&v))) {
                return Err(ApiError::invalid(param, format!("dataset {}: relevance {v} is outside 0 to 1", d.id)));
            }
        }
        return Ok(());
    }
    if param.starts_with("training") && d.labels.len() < 2 {
        return Err(ApiError::invalid(param, format!("dataset {} has a single label; classification needs at least two", d.id)));
    }
    match (task, d.multi_label) {
        (JobTask::Classification, true) => {
            Err(ApiError::invalid(param, format!("dataset {} is multi-label; use task multi_label_classification", d.id)))
        }
        (JobTask::MultiLabelClassification, false) => {
            Err(ApiError::invalid(param, format!("dataset {} has one label per text; use task classification", d.id)))
        }
        _ => Ok(()),
    }
}

async fn create(State(state): State<AppState>, headers: HeaderMap, req: Request) -> ApiResult<Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let key = idempotency::key_of(&headers)?;
    let created = if ct.starts_with("multipart/form-data") {
        create_multipart(&state, req, key).await?
    } else if is_json(&headers) {
        let bytes = Bytes::from_request(req, &state).await.map_err(|e| ApiError::from_status(e.status(), e.body_text()))?;
        let idem = RequestHasher::json(&bytes).finish(key);
        let req = parse_json(&bytes, "")?;
        match idempotency::replay(&state, idem.as_ref()).await? {
            Some(job) => Created::Replayed(job),
            None => create_json(&state, req, idem.as_ref()).await?,
        }
    } else {
        return Err(ApiError::bad_request("Content-Type must be application/json or multipart/form-data"));
    };
    Ok(match created {
        Created::Queued(job) => {
            state.queue.notify();
            (StatusCode::CREATED, Json(job)).into_response()
        }
        Created::Replayed(job) => (StatusCode::CREATED, [("idempotent-replayed", "true")], Json(job)).into_response(),
    })
}

/// A job a create request queued, or the one an earlier request with its idempotency key did.
enum Created {
    Queued(JobRecord),
    Replayed(JobRecord),
}

async fn create_json(state: &AppState, req: JobRequest, idem: Option<&Idempotency>) -> ApiResult<Created> {
    let (task, hp) = check_request(state, &req).await?;
    let train_id = req.training_dataset.clone().ok_or_else(|| ApiError::invalid("training_dataset", "training_dataset is required"))?;
    for (param, id) in [("training_dataset", Some(&train_id)), ("validation_dataset", req.validation_dataset.as_ref())] {
        let Some(id) = id else { continue };
        let d = datasets::get(&state.pool, id).await?.ok_or_else(|| ApiError::not_found("dataset", id).param(param))?;
        check_dataset_kind(&d, param, &task)?;
    }
    let mut tx = crate::store::Tx::begin(&state.pool).await?;
    let id = insert_job(&mut tx, &req, &task, &hp, &train_id, req.validation_dataset.as_deref(), idem).await?;
    tx.commit().await?;
    Ok(Created::Queued(jobs::get(&state.pool, &id).await?.expect("job just inserted")))
}

async fn insert_job(
    tx: &mut crate::store::Tx,
    req: &JobRequest,
    task: &JobTask,
    hp: &Value,
    train: &str,
    val: Option<&str>,
    idem: Option<&Idempotency>,
) -> ApiResult<String> {
    let id = store::new_id("job");
    let config = req.config.as_ref().map(|c| serde_json::to_value(c).expect("config serialises"));
    let new = jobs::NewJob {
        id: &id,
        task: *task,
        base_model: &req.base_model,
        training_dataset: train,
        validation_dataset: val,
        model_name: req.model_name.as_deref(),
        hyperparameters: hp,
        config: config.as_ref(),
        webhook_url: req.webhook_url.as_deref(),
        metadata: req.metadata.as_ref(),
    };
    match jobs::insert(tx, &new).await? {
        jobs::InsertOutcome::Queued => idempotency::record(tx, idem, &id).await.map(|()| id),
        jobs::InsertOutcome::DatasetMissing => Err(ApiError::not_found("dataset", train).param("training_dataset")),
        jobs::InsertOutcome::NameTaken => Err(ApiError::conflict(format!(
            "model_name {:?} is already used by a model or an active job",
            req.model_name.as_deref().unwrap_or_default()
        ))
        .param("model_name")),
    }
}

/// One request: store the uploaded file(s) as datasets and queue the job, all or nothing.
async fn create_multipart(state: &AppState, req: Request, key: Option<String>) -> ApiResult<Created> {
    let mut mp = Multipart::from_request(req, state).await.map_err(|e| ApiError::from_status(e.status(), e.body_text()))?;
    let (mut job_json, mut train, mut val) = (None, None, None);
    let mut hasher = RequestHasher::default();
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let fct = field.content_type().map(str::to_string);
        let bytes = field.bytes().await.map_err(multipart_error)?;
        hasher.part(&name, filename.as_deref(), fct.as_deref(), &bytes);
        let format = format_of(fct.as_deref(), filename.as_deref()).unwrap_or(Format::Jsonl);
        let seen = match name.as_str() {
            "job" => job_json.replace(bytes).is_some(),
            "training_file" => train.replace(Upload { bytes, format, filename }).is_some(),
            "validation_file" => val.replace(Upload { bytes, format, filename }).is_some(),
            other => return Err(ApiError::bad_request(format!("unexpected multipart part {other:?}")).param(other)),
        };
        if seen {
            return Err(repeated_part(&name));
        }
    }
    let idem = hasher.finish(key);
    if let Some(job) = idempotency::replay(state, idem.as_ref()).await? {
        return Ok(Created::Replayed(job));
    }
    let job_json = job_json.ok_or_else(|| ApiError::bad_request("multipart body has no part named \"job\"").param("job"))?;
    let req: JobRequest = parse_json(&job_json, "job")?;
    if req.training_dataset.is_some() || req.validation_dataset.is_some() {
        return Err(ApiError::invalid("job", "with uploaded files, the job part must not name datasets"));
    }
    let train = train.ok_or_else(|| ApiError::bad_request("multipart body has no part named \"training_file\"").param("training_file"))?;
    let (task, hp) = check_request(state, &req).await?;
    let mut tx = crate::store::Tx::begin(&state.pool).await?;
    let mut written = Vec::new();
    let result = async {
        let q = UploadQuery::default();
        let t = store_upload(state, &mut tx, train, &q, "training_file").await?;
        written.push(t.path.clone());
        check_dataset_kind(&t, "training_file", &task)?;
        let v = match val {
            Some(v) => {
                let v = store_upload(state, &mut tx, v, &q, "validation_file").await?;
                written.push(v.path.clone());
                check_dataset_kind(&v, "validation_file", &task)?;
                Some(v.id)
            }
            None => None,
        };
        insert_job(&mut tx, &req, &task, &hp, &t.id, v.as_deref(), idem.as_ref()).await
    }
    .await;
    match result {
        Ok(id) => {
            tx.commit().await?;
            Ok(Created::Queued(jobs::get(&state.pool, &id).await?.expect("job just inserted")))
        }
        Err(e) => {
            drop(tx);
            for p in written {
                let _ = std::fs::remove_file(state.config.data_dir.join(p));
            }
            Err(e)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

async fn list(State(state): State<AppState>, RawQuery(query): RawQuery) -> ApiResult<Json<Value>> {
    let (metadata, rest) = filter_of(query.as_deref().unwrap_or(""));
    let q: ListQuery = parse_query(&rest)?;
    check_filter(&metadata)?;
    let limit = check_limit(q.limit, 20, 1000)?;
    let status = q.status.as_deref().map(|s| {
        JobStatus::parse(s).ok_or_else(|| ApiError::invalid("status", "status must be queued, running, succeeded, failed or cancelled"))
    });
    let mut rows = jobs::list(&state.pool, status.transpose()?, &metadata, q.after.as_deref(), limit).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(json!({"object": "list", "data": rows, "has_more": has_more})))
}

async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<JobRecord>> {
    Ok(Json(jobs::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("job", &id))?))
}

async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<JobRecord>> {
    let job = jobs::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("job", &id))?;
    if !jobs::cancel(&state.pool, &id).await? {
        return Err(ApiError::conflict(format!("job {id} already ended ({})", job.status)));
    }
    state.queue.cancel(&id);
    Ok(Json(jobs::get(&state.pool, &id).await?.expect("job exists")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<String>,
    limit: Option<i64>,
}

fn event_seq(after: Option<&str>) -> ApiResult<i64> {
    match after {
        None => Ok(0),
        Some(a) => {
            a.strip_prefix("ev_").and_then(|n| n.parse().ok()).ok_or_else(|| ApiError::invalid("after", "after must be an event id (ev_…)"))
        }
    }
}

async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Response> {
    jobs::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("job", &id))?;
    let limit = check_limit(q.limit, 100, 1000)?;
    // An SSE client reconnecting says where it was with `Last-Event-ID`; `after` wins if both.
    // The header is whatever id the client last saw: one that is not an event id of ours
    // (mangled on the way) starts from the beginning, as no header does.
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| event_seq(Some(v)).ok());
    let after = match q.after.as_deref() {
        Some(a) => event_seq(Some(a))?,
        None => last_id.unwrap_or(0),
    };
    let wants_sse = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"));
    if wants_sse {
        return Ok(event_stream(state, id, after).into_response());
    }
    let mut rows = jobs::events(&state.pool, &id, after, limit).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(json!({"object": "list", "data": rows, "has_more": has_more})).into_response())
}

/// Streams the job's events as they are recorded; ends once the job has ended and every
/// event has been sent. When the database cannot be read, or the job is gone, it sends one
/// `error` event (the error envelope, with a retry hint) and ends: an SSE client reconnects,
/// and `Last-Event-ID` takes it on from the last event it got.
fn event_stream(state: AppState, id: String, after: i64) -> Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let stream = futures::stream::unfold((state, id, after, false), |(state, id, mut after, done)| async move {
        if done {
            return None;
        }
        loop {
            let read = async {
                let job = jobs::get(&state.pool, &id).await?;
                Ok::<_, sqlx::Error>((job, jobs::events(&state.pool, &id, after, 500).await?))
            };
            let (ended, rows) = match read.await {
                Ok((Some(job), rows)) => (job.status.has_ended(), rows),
                Ok((None, _)) => {
                    let gone = ApiError::not_found("job", &id);
                    return Some((futures::stream::iter(vec![Ok(error_event(&gone))]), (state, id, after, true)));
                }
                Err(e) => {
                    let down = ApiError::from(e);
                    return Some((futures::stream::iter(vec![Ok(error_event(&down))]), (state, id, after, true)));
                }
            };
            if !rows.is_empty() {
                after = rows.last().map(|e| e.seq).unwrap_or(after);
                let batch: Vec<Result<SseEvent, _>> = rows
                    .iter()
                    .map(|e| Ok(SseEvent::default().id(e.id.clone()).event(e.kind.clone()).json_data(e).expect("event serialises")))
                    .collect();
                return Some((futures::stream::iter(batch), (state, id, after, false)));
            }
            // The status was read before the events, and a terminal status commits with its
            // closing event: once ended and nothing is left, nothing more will come. A server
            // that is stopping ends the stream too (the client reconnects with `after`).
            if ended || state.shutdown.is_cancelled() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    use futures::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default())
}

/// The `error` event that ends a stream: the API's error envelope, and when to reconnect.
fn error_event(e: &ApiError) -> SseEvent {
    let retry = Duration::from_secs(e.retry_after.unwrap_or(1));
    SseEvent::default().event("error").retry(retry).json_data(e.envelope()).expect("an error serialises")
}

async fn metrics(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job = jobs::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("job", &id))?;
    let (train, validation) = jobs::metrics(&state.pool, &id).await?;
    let train: Vec<Value> =
        train.iter().map(|(step, epoch, loss, lr)| json!({"step": step, "epoch": epoch, "loss": loss, "learning_rate": lr})).collect();
    // Once the job has made its model: why training ended (every epoch ran, or early stopping).
    let of_model = |key: &str| job.metrics.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or(Value::Null);
    // The temperature fitted on validation and the calibration error before and after it.
    let calibration = of_model("calibration");
    Ok(Json(json!({"object": "job.metrics", "job": id, "train": train, "validation": validation, "stopped": of_model("stopped"),
                   "calibration": calibration})))
}

/// The job's checkpoints, oldest first: where a stopped or crashed run resumes from. They are
/// removed when the job ends.
async fn checkpoints(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    jobs::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("job", &id))?;
    let (data_dir, job) = (state.config.data_dir.clone(), id.clone());
    let found = tokio::task::spawn_blocking(move || crate::train::checkpoint::of_job(&data_dir, &job)).await.map_err(ApiError::internal)?;
    // A checkpoint just written is on disk a moment before the oldest is pruned: list only the
    // newest `keep`, the ones a resume may use.
    let skip = found.len().saturating_sub(state.config.keep_checkpoints.max(1));
    let data: Vec<Value> = found[skip..]
        .iter()
        .map(|crate::train::checkpoint::JobCheckpoint { name, meta: m }| {
            let best = m.best.as_ref().map(|b| {
                let mut v = b.report.headline();
                v.insert("epoch".into(), json!(b.epoch));
                v.insert("loss".into(), json!(b.loss));
                v
            });
            json!({"object": "job.checkpoint", "id": name, "job": id,
                   "step": m.step, "epoch": m.epoch, "created_at": m.created_at,
                   "metrics": {"epoch_train_loss": m.epoch_train_loss(), "best_validation": best}})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "has_more": false})))
}
