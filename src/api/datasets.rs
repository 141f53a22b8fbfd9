//! `/v1/datasets`: upload (raw JSONL/CSV body or multipart), list, get, delete.

use super::json::ApiQuery;
use super::{check_limit, AppState};
use crate::dataset::{self, Format};
use crate::error::{ApiError, ApiResult};
use crate::store::{self, datasets, datasets::DatasetRecord};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/datasets", get(list).post(upload)).route("/v1/datasets/{id}", get(get_one).delete(delete))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    pub name: Option<String>,
    pub text_column: Option<String>,
    pub text_pair_column: Option<String>,
    pub label_column: Option<String>,
}

/// An uploaded file: its bytes, the format, and a name to show.
pub struct Upload {
    pub bytes: Bytes,
    pub format: Format,
    pub filename: Option<String>,
}

/// The format a content type or file name implies.
pub fn format_of(content_type: Option<&str>, filename: Option<&str>) -> Option<Format> {
    if let Some(f) = filename {
        let f = f.to_ascii_lowercase();
        if f.ends_with(".csv") {
            return Some(Format::Csv);
        }
        if f.ends_with(".jsonl") || f.ends_with(".ndjson") || f.ends_with(".json") {
            return Some(Format::Jsonl);
        }
        if f.ends_with(".conll") || f.ends_with(".conllu") || f.ends_with(".iob") || f.ends_with(".bio") {
            return Some(Format::Conll);
        }
    }
    let essence = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "text/csv" => Some(Format::Csv),
        "text/x-conll" => Some(Format::Conll),
        "application/x-ndjson" | "application/jsonl" | "application/x-jsonlines" | "application/json" | "application/ndjson" => {
            Some(Format::Jsonl)
        }
        _ => None,
    }
}

/// Parses and stores an upload inside `tx`: the normalised file is written first (to a
/// temp name, then renamed); the caller's commit makes it visible. Returns the record.
pub async fn store_upload(
    state: &AppState,
    tx: &mut crate::store::Tx,
    upload: Upload,
    q: &UploadQuery,
    param: &str,
) -> ApiResult<DatasetRecord> {
    let text_col = q.text_column.clone().unwrap_or_else(|| "text".into());
    let pair_col = q.text_pair_column.clone().unwrap_or_else(|| "text_pair".into());
    let label_col = q.label_column.clone().unwrap_or_else(|| "label".into());
    let bytes = upload.bytes.clone();
    let format = upload.format;
    let parsed = tokio::task::spawn_blocking(move || {
        dataset::parse_columns(&bytes, format, &dataset::Columns { text: &text_col, text_pair: &pair_col, label: &label_col })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::invalid_dataset(param, &e))?;
    let id = store::new_id("ds");
    let rel = format!("datasets/{id}.jsonl");
    let path = state.config.data_dir.join(&rel);
    let normalised = dataset::to_jsonl(&parsed.rows);
    let write_path = path.clone();
    tokio::task::spawn_blocking(move || write_atomic(&write_path, &normalised)).await.map_err(ApiError::internal)??;
    let name = q.name.clone().or(upload.filename).unwrap_or_else(|| format!("{id}.{}", format.as_str()));
    let rec = DatasetRecord {
        id,
        name,
        format: format.as_str().into(),
        rows: parsed.rows.len() as i64,
        labels: parsed.labels.iter().map(|(k, v)| (k.clone(), *v as i64)).collect(),
        multi_label: parsed.multi_label,
        text_label_line: parsed.text_label_line.map(|l| l as i64),
        kind: if parsed.tokens {
            "tokens"
        } else if parsed.pairs {
            "pairs"
        } else {
            "texts"
        }
        .into(),
        bytes: upload.bytes.len() as i64,
        path: rel,
        created_at: store::now(),
    };
    // In the object store before the database names it: every process can then read it.
    if let Err(e) = state.catalog.objects.put(&rec.path).await {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    if let Err(e) = datasets::insert(tx, &rec).await {
        let _ = std::fs::remove_file(&path);
        state.catalog.objects.delete(&rec.path).await;
        return Err(e.into());
    }
    Ok(rec)
}

fn write_atomic(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("dataset path has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    // A half-written file (a full disk) is removed at once, not at the next start-up.
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

/// Reads the single file of a dataset upload: a raw body, or the `file` part of a multipart form.
/// The file goes to a temp file in `datasets/` as it arrives (a crash mid-upload leaves only a
/// temp file, which start-up removes) and is read back once whole.
async fn read_upload(headers: &HeaderMap, req: Request, state: &AppState) -> ApiResult<Upload> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    if ct.as_deref().is_some_and(|c| c.starts_with("multipart/form-data")) {
        let mut mp = Multipart::from_request(req, state).await.map_err(|e| ApiError::from_status(e.status(), e.body_text()))?;
        let mut upload = None;
        // The whole body is read before anything is stored, so that a second `file` part is
        // refused rather than one of the two kept silently.
        while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
            if field.name() != Some("file") {
                continue;
            }
            if upload.is_some() {
                return Err(repeated_part("file"));
            }
            let filename = field.file_name().map(str::to_string);
            let fct = field.content_type().map(str::to_string);
            let bytes = spool(state, field, multipart_error).await?.read().await?;
            let format = format_of(fct.as_deref(), filename.as_deref()).unwrap_or(Format::Jsonl);
            upload = Some(Upload { bytes, format, filename });
        }
        return upload.ok_or_else(|| ApiError::bad_request("multipart body has no part named \"file\"").param("file"));
    }
    let Some(format) = format_of(ct.as_deref(), None) else {
        return Err(ApiError::bad_request("Content-Type must be application/x-ndjson, application/jsonl, text/csv or multipart/form-data"));
    };
    let limit = state.config.max_upload_bytes;
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let cut_short = |e: axum::Error| ApiError::bad_request(format!("the upload was cut short: {e}"));
    let bytes = spool(state, req.into_body().into_data_stream(), cut_short).await?.read().await?;
    Ok(Upload { bytes, format, filename: None })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is larger than {limit} bytes (see --max-upload-bytes)"))
}

/// An upload's bytes in a temp file in `datasets/`, removed when dropped: once read back, or
/// when the request fails or is dropped half-way (the client went away).
struct Spooled(std::path::PathBuf);

impl Spooled {
    async fn read(self) -> ApiResult<Bytes> {
        Ok(tokio::fs::read(&self.0).await.map_err(anyhow::Error::from)?.into())
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `chunks` to a new temp file in the data dir's `datasets/` as they arrive, refusing more
/// than `--max-upload-bytes`. A full disk is a 503 (see [`ApiError`]'s `From<anyhow::Error>`).
async fn spool<E>(
    state: &AppState,
    chunks: impl futures::Stream<Item = Result<Bytes, E>>,
    on_error: impl Fn(E) -> ApiError,
) -> ApiResult<Spooled> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| ApiError::from(anyhow::Error::from(e).context("writing the upload to the data dir"));
    let dir = state.config.data_dir.join("datasets");
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let spooled = Spooled(dir.join(format!(".tmp-upload-{}", uuid::Uuid::new_v4().simple())));
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(&spooled.0).await.map_err(io)?);
    let (mut chunks, mut len) = (std::pin::pin!(chunks), 0usize);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(&on_error)?;
        len += chunk.len();
        if len > state.config.max_upload_bytes {
            return Err(too_large(state.config.max_upload_bytes));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    Ok(spooled)
}

/// 422 for a multipart part sent twice: which of the two was meant is not ours to guess.
pub fn repeated_part(name: &str) -> ApiError {
    ApiError::invalid(name, format!("the multipart part {name:?} appears more than once; send it once"))
}

/// A multipart read error: 413 when the body limit was hit, else 400.
pub fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::from_status(e.status(), e.body_text())
}

async fn upload(State(state): State<AppState>, ApiQuery(q): ApiQuery<UploadQuery>, req: Request) -> ApiResult<(StatusCode, Json<Value>)> {
    if q.name.as_ref().is_some_and(|n| n.len() > 256) {
        return Err(ApiError::invalid("name", "name must be at most 256 bytes"));
    }
    let headers = req.headers().clone();
    let upload = read_upload(&headers, req, &state).await?;
    if upload.bytes.is_empty() {
        return Err(ApiError::invalid_dataset("file", &dataset::DatasetError { line: 0, message: "the file is empty".into() }));
    }
    let mut tx = crate::store::Tx::begin(&state.pool).await?;
    let rec = store_upload(&state, &mut tx, upload, &q, "file").await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(dataset_json(&rec))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<i64>,
    after: Option<String>,
}

async fn list(State(state): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = check_limit(q.limit, 100, 1000)?;
    let mut rows = datasets::list(&state.pool, q.after.as_deref(), limit).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(json!({"object": "list", "data": rows.iter().map(dataset_json).collect::<Vec<_>>(), "has_more": has_more})))
}

/// The dataset object of the contract.
pub fn dataset_json(d: &DatasetRecord) -> Value {
    let mut v = serde_json::to_value(d).expect("dataset serialises");
    v["object"] = "dataset".into();
    v
}

async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let d = datasets::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("dataset", &id))?;
    Ok(Json(dataset_json(&d)))
}

async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match datasets::delete(&state.pool, &id).await? {
        datasets::Deleted::Yes(rec) => {
            let _ = std::fs::remove_file(state.config.data_dir.join(&rec.path));
            state.catalog.objects.delete(&rec.path).await;
            Ok(Json(json!({"id": id, "object": "dataset", "deleted": true})))
        }
        datasets::Deleted::NotFound => Err(ApiError::not_found("dataset", &id)),
        datasets::Deleted::InUse => Err(ApiError::conflict(format!("dataset {id} is used by a queued or running job"))),
    }
}
