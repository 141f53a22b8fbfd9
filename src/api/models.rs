//! `/v1/models`: list, get, delete, download.

use super::AppState;
use crate::catalog::ModelView;
use crate::error::{ApiError, ApiResult};
use crate::store::models;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{id}", get(get_one).delete(delete))
        .route("/v1/models/{id}/download", get(download))
}

async fn list(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let data = state.catalog.list().await?;
    Ok(Json(json!({"object": "list", "data": data, "has_more": false})))
}

async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<ModelView>> {
    Ok(Json(state.catalog.get(&id).await?.ok_or_else(|| ApiError::not_found("model", &id))?))
}

async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if state.catalog.is_dir_model(&id) {
        return Err(ApiError::conflict(format!("{id} is a model of the models dir; remove its directory instead")));
    }
    let rec = models::get(&state.pool, &id).await?.ok_or_else(|| ApiError::not_found("model", &id))?;
    if models::delete(&state.pool, &id).await? == 0 {
        return Err(ApiError::conflict(format!("model {id} is the base of a queued or running job, or of a LoRA adapter")));
    }
    state.predictor.evict(&id);
    state.predictor.evict_base(&state.config.data_dir.join(&rec.path));
    state.catalog.forget(&id);
    let _ = std::fs::remove_dir_all(state.config.data_dir.join(&rec.path));
    state.catalog.objects.delete(&rec.path).await;
    Ok(Json(json!({"id": id, "object": "model", "deleted": true})))
}

/// `?merged=true`: a LoRA adapter comes as a whole model with the adapter merged in.
#[derive(Debug, Default, serde::Deserialize)]
struct DownloadQuery {
    #[serde(default)]
    merged: bool,
}

/// A gzip'd tar of the model directory (or, merged, of the whole model a LoRA adapter makes),
/// built in memory off the async runtime.
async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<DownloadQuery>,
) -> ApiResult<Response> {
    let resolved = state.catalog.resolve(&id).await?.ok_or_else(|| ApiError::not_found("model", &id))?;
    state.catalog.fetch(&resolved).await?;
    let name = id.clone();
    let bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.follow_symlinks(true);
        if q.merged && crate::model::hf::lora::is_adapter(&resolved.path) {
            let tmp = tempfile::tempdir()?;
            let merged = tmp.path().join("merged");
            crate::model::hf::lora::write_merged(&resolved.path, &merged)?;
            tar.append_dir_all(&name, &merged)?;
        } else {
            tar.append_dir_all(&name, &resolved.path)?;
        }
        Ok(tar.into_inner()?.finish()?)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| match e.downcast_ref::<std::io::Error>() {
        // Deleted while we were reading it.
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => ApiError::not_found("model", &id),
        _ => ApiError::internal(format!("{e:#}")),
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{id}.tar.gz\"")),
        ],
        Body::from(bytes),
    )
        .into_response())
}
