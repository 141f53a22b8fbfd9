//! Every model the service knows: base (and classifier) checkpoints found in the models dir,
//! and models made by jobs (in the database, files under the data dir).

use crate::model::hf::artifacts::{inspect, ModelInfo};
use crate::store::Pool;
use crate::store::{self, models::ModelRecord};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// A checkpoint directory of the models dir.
#[derive(Debug, Clone)]
pub struct DirModel {
    pub id: String,
    pub path: PathBuf,
    pub info: ModelInfo,
    pub created_at: i64,
    /// For a peft LoRA adapter: its base's id (the base's folder name) and its rank.
    pub adapter: Option<(String, usize)>,
}

/// A model as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    pub id: String,
    pub object: &'static str,
    pub kind: String,
    pub task: Option<String>,
    pub base_model: Option<String>,
    pub job: Option<String>,
    pub labels: Vec<String>,
    pub metrics: Option<Value>,
    pub created_at: i64,
    pub pooling: Option<String>,
    pub max_seq_len: Option<i64>,
    /// The encoder's architecture: its `model_type` (`bert`, `roberta`, `distilbert`…).
    pub architecture: Option<String>,
    /// How a classifier was made: `full` (every weight trained), `lora` (a low-rank adapter
    /// over `base_model`, which it needs to run) or `head` (only the pooler and head trained);
    /// null for a base model.
    pub method: Option<&'static str>,
    /// A LoRA adapter's rank; null otherwise.
    pub rank: Option<usize>,
    /// The models this one descends from, nearest first: its base, that base's base, and so on
    /// to a model no job made (a models-dir model or a hub repo).
    pub lineage: Vec<String>,
}

/// Where a model lives and what it is.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub id: String,
    pub path: PathBuf,
    /// For a trained model, its directory relative to the data dir (where the object store,
    /// if any, keeps it too).
    pub stored_at: Option<String>,
    pub is_classifier: bool,
    /// The pooling `auto` picks when fine-tuning from this model.
    pub auto_pooling: String,
}

/// The models of the models dir (scanned) and of the database.
pub struct Catalog {
    data_dir: PathBuf,
    pool: Pool,
    dirs: RwLock<BTreeMap<String, DirModel>>,
    /// Entries of the models dir that cannot be run, with the reason (shown on `/v1/info`; a
    /// job naming one is refused with it).
    refused: BTreeMap<String, String>,
    /// Where trained models are kept besides the data dir.
    pub objects: crate::objects::Objects,
    /// Trained models resolved in the last [`RESOLVED_TTL`]: predict asks for the same model
    /// many times a second, and on Postgres each lookup is a round trip that would hold every
    /// request up (and spread callers out of shared batches).
    recent: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Resolved)>>,
}

/// How long a trained model's lookup is reused; a model deleted through another process is
/// still found here for at most this long.
const RESOLVED_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl DirModel {
    fn view(&self) -> ModelView {
        let labels = self.info.labels.clone();
        ModelView {
            id: self.id.clone(),
            object: "model",
            kind: if labels.is_some() { "classifier" } else { "base" }.into(),
            task: labels.as_ref().map(|_| self.info.config.head_task().to_string()),
            base_model: self.adapter.as_ref().map(|(base, _)| base.clone()),
            job: None,
            labels: labels.unwrap_or_default(),
            metrics: None,
            created_at: self.created_at,
            pooling: Some(self.info.auto_pooling()),
            max_seq_len: Some(self.info.config.max_tokens() as i64),
            architecture: Some(self.info.config.model_type.clone()),
            method: match (&self.adapter, &self.info.labels) {
                (Some(_), _) => Some("lora"),
                (None, Some(_)) => Some("full"),
                (None, None) => None,
            },
            rank: self.adapter.as_ref().map(|(_, r)| *r),
            lineage: self.adapter.as_ref().map(|(base, _)| vec![base.clone()]).unwrap_or_default(),
        }
    }
}

/// The API view of a trained model.
pub fn record_view(m: &ModelRecord) -> ModelView {
    ModelView {
        id: m.id.clone(),
        object: "model",
        kind: m.kind.clone(),
        task: m.task.map(|t| t.to_string()),
        base_model: m.base_model.clone(),
        job: m.job_id.clone(),
        labels: m.labels.clone(),
        metrics: m.metrics.clone(),
        created_at: m.created_at,
        pooling: m.pooling.clone(),
        max_seq_len: m.max_seq_len,
        architecture: m.architecture.clone(),
        method: match m.method.as_deref() {
            Some("lora") => Some("lora"),
            Some("head") => Some("head"),
            _ => (m.kind == "classifier").then_some("full"),
        },
        rank: m.lora_rank.map(|r| r as usize),
        lineage: m.base_model.iter().cloned().collect(),
    }
}

/// Scans `models_dir`: every sub-directory that is a checkpoint we can run, and the others
/// (each skipped with a logged reason, which is returned with it).
pub fn scan_models_dir(models_dir: &Path) -> (BTreeMap<String, DirModel>, BTreeMap<String, String>) {
    let (mut out, mut refused) = (BTreeMap::new(), BTreeMap::new());
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        tracing::warn!(dir = %models_dir.display(), "models dir not readable; no base models");
        return (out, refused);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let id = entry.file_name().to_string_lossy().to_string();
        if !path.is_dir() || id.starts_with('.') {
            continue;
        }
        let checked = if crate::model::hf::lora::is_adapter(&path) {
            crate::model::hf::lora::inspect_adapter(&path).map(|a| {
                let base = a.base.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                (a.info, Some((base, a.config.r)))
            })
        } else {
            inspect(&path).map(|info| (info, None))
        };
        match checked {
            Ok((info, adapter)) => {
                let created_at = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                tracing::info!(model = %id, classifier = info.labels.is_some(), "found model");
                out.insert(id.clone(), DirModel { id, path, info, created_at, adapter });
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(entry = %path.display(), reason = %reason, "skipping models dir entry");
                refused.insert(id, reason);
            }
        }
    }
    (out, refused)
}

impl Catalog {
    pub fn new(models_dir: PathBuf, data_dir: PathBuf, pool: Pool, objects: crate::objects::Objects) -> Self {
        let (dirs, refused) = scan_models_dir(&models_dir);
        Self { data_dir, pool, dirs: RwLock::new(dirs), refused, objects, recent: Default::default() }
    }

    /// The models dir's entries that cannot be run, each with the reason.
    pub fn refused(&self) -> &BTreeMap<String, String> {
        &self.refused
    }

    /// Is `id` a model of the models dir?
    pub fn is_dir_model(&self, id: &str) -> bool {
        self.dirs.read().unwrap().contains_key(id)
    }

    /// For a LoRA adapter of the models dir, the id of its base.
    pub fn adapter_base(&self, id: &str) -> Option<String> {
        self.dirs.read().unwrap().get(id).and_then(|d| d.adapter.as_ref()).map(|(base, _)| base.clone())
    }

    /// All models: the models dir's, then trained ones.
    pub async fn list(&self) -> sqlx::Result<Vec<ModelView>> {
        let mut out: Vec<ModelView> = self.dirs.read().unwrap().values().map(DirModel::view).collect();
        let records = store::models::list(&self.pool).await?;
        let parents: BTreeMap<String, Option<String>> = records.iter().map(|m| (m.id.clone(), m.base_model.clone())).collect();
        for m in &records {
            let mut view = record_view(m);
            view.lineage =
                self.ancestors(m.base_model.clone(), |id: String| std::future::ready(Ok(parents.get(&id).cloned().flatten()))).await?;
            out.push(view);
        }
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> sqlx::Result<Option<ModelView>> {
        if let Some(d) = self.dirs.read().unwrap().get(id) {
            return Ok(Some(d.view()));
        }
        let Some(m) = store::models::get(&self.pool, id).await? else { return Ok(None) };
        let mut view = record_view(&m);
        let pool = &self.pool;
        view.lineage =
            self.ancestors(m.base_model.clone(), |id: String| async move {
                Ok(store::models::get(pool, &id).await?.and_then(|r| r.base_model))
            })
            .await?;
        Ok(Some(view))
    }

    /// `first` and its ancestors, nearest first: a trained model's base comes from `parent_of`,
    /// an adapter in the models dir names its own; the walk stops at a model with no base (or
    /// on a cycle, which only hand-edited data could make).
    async fn ancestors<F, Fut>(&self, first: Option<String>, parent_of: F) -> sqlx::Result<Vec<String>>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = sqlx::Result<Option<String>>>,
    {
        let mut out: Vec<String> = Vec::new();
        let mut next = first;
        while let Some(id) = next.take() {
            if out.contains(&id) || out.len() >= 64 {
                break;
            }
            let dir_base = self.dirs.read().unwrap().get(&id).map(|d| d.adapter.as_ref().map(|(base, _)| base.clone()));
            next = match dir_base {
                Some(base) => base,
                None => parent_of(id.clone()).await?,
            };
            out.push(id);
        }
        Ok(out)
    }

    /// Makes sure a resolved model's files are in the data dir: a trained model another process
    /// made is fetched from the object store (a no-op without one, or when already here).
    pub async fn fetch(&self, model: &Resolved) -> Result<(), crate::objects::ObjectError> {
        match &model.stored_at {
            Some(rel) => self.objects.fetch(rel).await,
            None => Ok(()),
        }
    }

    /// Where model `id` lives, if it exists.
    pub async fn resolve(&self, id: &str) -> sqlx::Result<Option<Resolved>> {
        if let Some(d) = self.dirs.read().unwrap().get(id) {
            return Ok(Some(Resolved {
                id: id.into(),
                path: d.path.clone(),
                stored_at: None,
                is_classifier: d.info.labels.is_some(),
                auto_pooling: d.info.auto_pooling(),
            }));
        }
        if let Some((at, r)) = self.recent.lock().unwrap().get(id) {
            if at.elapsed() < RESOLVED_TTL {
                return Ok(Some(r.clone()));
            }
        }
        let found = store::models::get(&self.pool, id).await?.map(|m| Resolved {
            id: m.id.clone(),
            path: self.data_dir.join(&m.path),
            stored_at: Some(m.path.clone()),
            is_classifier: m.kind == "classifier",
            auto_pooling: m.pooling.clone().unwrap_or_else(|| "cls".into()),
        });
        let mut recent = self.recent.lock().unwrap();
        match &found {
            Some(r) => recent.insert(id.to_string(), (std::time::Instant::now(), r.clone())),
            None => recent.remove(id),
        };
        Ok(found)
    }

    /// Forgets a model's lookup (it was deleted through this process).
    pub fn forget(&self, id: &str) {
        self.recent.lock().unwrap().remove(id);
    }
}
