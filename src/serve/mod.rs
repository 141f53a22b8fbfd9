//! Serving: a cache of loaded classifiers and inference off the async runtime, with a
//! bound on requests in flight (past it, 429).

use crate::model::predictor::{LoadedClassifier, TooLong};
use candle_core::Device;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{OnceCell, Semaphore};

/// Why a prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("too many predict requests in flight; retry shortly")]
    Overloaded,
    #[error(transparent)]
    TooLong(#[from] TooLong),
    #[error("model could not be loaded: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Scores for each input, in input order.
pub struct Scored {
    pub labels: Arc<Vec<String>>,
    /// Probabilities (or raw logits) per input, one value per label.
    pub scores: Vec<Vec<f32>>,
}

type Slot = Arc<OnceCell<Arc<LoadedClassifier>>>;

/// Loaded models by id, least recently used first out.
struct Cache {
    slots: HashMap<String, (Slot, u64)>,
    clock: u64,
    capacity: usize,
}

/// Runs classifiers for the predict route.
#[derive(Clone)]
pub struct Predictor {
    cache: Arc<Mutex<Cache>>,
    permits: Arc<Semaphore>,
    device: Device,
}

impl Predictor {
    pub fn new(device: Device, capacity: usize, max_in_flight: usize) -> Self {
        let cache = Cache { slots: HashMap::new(), clock: 0, capacity: capacity.max(1) };
        Self { cache: Arc::new(Mutex::new(cache)), permits: Arc::new(Semaphore::new(max_in_flight.max(1))), device }
    }

    fn slot(&self, id: &str) -> Slot {
        let mut c = self.cache.lock().unwrap();
        c.clock += 1;
        let clock = c.clock;
        if let Some((slot, used)) = c.slots.get_mut(id) {
            *used = clock;
            return slot.clone();
        }
        if c.slots.len() >= c.capacity {
            if let Some(oldest) = c.slots.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                c.slots.remove(&oldest);
            }
        }
        let slot: Slot = Arc::new(OnceCell::new());
        c.slots.insert(id.to_string(), (slot.clone(), clock));
        slot
    }

    /// Unloads a model (after it was deleted).
    pub fn evict(&self, id: &str) {
        self.cache.lock().unwrap().slots.remove(id);
    }

    /// Number of models loaded now.
    pub fn loaded(&self) -> usize {
        self.cache.lock().unwrap().slots.values().filter(|(s, _)| s.initialized()).count()
    }

    async fn model(&self, id: &str, path: PathBuf) -> Result<Arc<LoadedClassifier>, PredictError> {
        let slot = self.slot(id);
        let device = self.device.clone();
        let loaded = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || LoadedClassifier::load(&path, &device))
                    .await
                    .map_err(|e| PredictError::Load(e.to_string()))?
                    .map(Arc::new)
                    .map_err(|e| PredictError::Load(format!("{e:#}")))
            })
            .await;
        if loaded.is_err() {
            self.evict(id);
        }
        loaded.cloned()
    }

    /// Scores `texts` with model `id` at `path`: probabilities, or raw logits when `raw`.
    pub async fn predict(&self, id: &str, path: PathBuf, texts: Vec<String>, truncate: bool, raw: bool) -> Result<Scored, PredictError> {
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| PredictError::Overloaded)?;
        let model = self.model(id, path).await?;
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let seqs = model.tokenize(&refs, truncate).map_err(|e| PredictError::Inference(format!("{e:#}")))??;
            let logits = model.logits(&seqs, 32).map_err(|e| PredictError::Inference(format!("{e:#}")))?;
            let scores = if raw { logits } else { logits.iter().map(|l| model.probabilities(l)).collect() };
            Ok(Scored { labels: Arc::new(model.labels.clone()), scores })
        })
        .await
        .map_err(|e| PredictError::Inference(e.to_string()))?
    }
}
