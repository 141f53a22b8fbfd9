//! Serving: a cache of loaded classifiers, each with its own inference thread that batches
//! concurrent requests, and a bound on requests in flight (past it, 429).

pub mod adapters;
pub mod batcher;
pub mod entities;

use crate::model::predict::adapter_serving::LoadedAdapter;
use crate::model::predict::predictor::{Head, LoadedClassifier, Overflow, Token, TooLong, Weights};
use batcher::{BatchLimits, Batcher, Timings};
use candle_core::{DType, Device};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{OnceCell, Semaphore};

/// Each input's sequences (one, or a long text's windows) and, for pairs, each one's token types.
type Tokenized = (Vec<Vec<Vec<u32>>>, Vec<Vec<u32>>);

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
    /// The model's inference thread panicked; the model was unloaded and loads again on the
    /// next request.
    #[error("the model's inference thread crashed: {0}")]
    Crashed(String),
}

/// Scores for each input, in input order, and where the time went.
pub struct Scored {
    pub timings: Timings,
    pub tokenization: std::time::Duration,
    pub labels: Arc<Vec<String>>,
    /// What the scores are: a probability per label, or one number per input.
    pub head: Head,
    pub multi_label: bool,
    /// A multi-label model's own decision threshold per label (tuned when it trained), on the
    /// scale of `scores`.
    pub thresholds: Option<Vec<f32>>,
    /// Probabilities (or raw logits) per input, one value per label.
    pub scores: Vec<Vec<f32>>,
}

/// Each text's scored sub-words, from a token classifier.
pub struct Tagged {
    pub labels: Arc<Vec<String>>,
    pub texts: Vec<Vec<entities::Piece>>,
    pub timings: Timings,
    pub tokenization: std::time::Duration,
}

/// What a prediction's scores are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Probabilities at the model's calibration temperature (the default).
    Calibrated,
    /// Probabilities of the logits as they are.
    Uncalibrated,
    /// The logits.
    Logits,
}

/// A loaded model and the handle on its inference thread.
pub struct Loaded {
    pub model: Arc<LoadedClassifier>,
    batcher: Batcher,
}

type Slot = Arc<OnceCell<Arc<Loaded>>>;

/// What joins a base's path and pooling in the cache key of a base loaded for adapters (model
/// ids cannot contain it).
const BASE_KEY: &str = "#";

/// Requests of at most this many texts and bytes are tokenized on the async runtime.
const INLINE_TEXTS: usize = 4;
const INLINE_BYTES: usize = 1024;

/// Element-wise mean of equally long rows.
fn mean_rows(rows: Vec<Vec<f32>>) -> Vec<f32> {
    let n = rows.len().max(1) as f32;
    let mut out = vec![0f32; rows.first().map_or(0, Vec::len)];
    for r in &rows {
        out.iter_mut().zip(r).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// Loaded models by id, least recently used first out.
struct Cache {
    slots: HashMap<String, (Slot, u64)>,
    clock: u64,
    capacity: usize,
    budget_bytes: usize,
}

/// Runs classifiers for the predict route.
#[derive(Clone)]
pub struct Predictor {
    cache: Arc<Mutex<Cache>>,
    permits: Arc<Semaphore>,
    device: Device,
    threads: Arc<rayon::ThreadPool>,
    pub limits: BatchLimits,
    /// What loaded models' dense layers compute in.
    pub weights: Weights,
    adapters: adapters::AdapterCache,
}

impl Predictor {
    /// A predictor whose models run on `threads` (the inference thread budget).
    pub fn new(device: Device, capacity: usize, budget_mib: usize, max_in_flight: usize, threads: Arc<rayon::ThreadPool>) -> Self {
        let cache = Cache { slots: HashMap::new(), clock: 0, capacity: capacity.max(1), budget_bytes: budget_mib << 20 };
        Self {
            cache: Arc::new(Mutex::new(cache)),
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            device,
            threads,
            limits: BatchLimits::default(),
            weights: Weights::F32,
            adapters: adapters::AdapterCache::new(512),
        }
    }

    /// Sets the memory budget of adapters loaded over a shared base.
    pub fn set_adapter_budget_mib(&mut self, mib: usize) {
        self.adapters = adapters::AdapterCache::new(mib);
    }

    /// Ids of the adapters loaded over a shared base now (for tests and the info endpoint).
    pub fn adapters_loaded(&self) -> Vec<String> {
        self.adapters.loaded_ids()
    }

    fn slot(&self, id: &str) -> Slot {
        let mut c = self.cache.lock();
        c.clock += 1;
        let clock = c.clock;
        if let Some((slot, used)) = c.slots.get_mut(id) {
            *used = clock;
            return slot.clone();
        }
        if c.slots.len() >= c.capacity {
            if let Some(oldest) = c.slots.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                c.slots.remove(&oldest);
                metrics::counter!(crate::monitoring::MODEL_CACHE_EVICTIONS).increment(1);
            }
        }
        let slot: Slot = Arc::new(OnceCell::new());
        c.slots.insert(id.to_string(), (slot.clone(), clock));
        slot
    }

    /// Unloads least recently used models (never `keep`) until the loaded ones fit the budget.
    fn enforce_budget(&self, keep: &str) {
        let mut c = self.cache.lock();
        loop {
            let bytes: usize = c.slots.values().filter_map(|(s, _)| s.get()).map(|l| l.model.bytes).sum();
            if bytes <= c.budget_bytes {
                return;
            }
            let victim = c
                .slots
                .iter()
                .filter(|(k, (s, _))| k.as_str() != keep && s.initialized())
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { return };
            tracing::info!(model = %victim, "unloading model: cache memory budget exceeded");
            c.slots.remove(&victim);
            metrics::counter!(crate::monitoring::MODEL_CACHE_EVICTIONS).increment(1);
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Ids of the models loaded now (for tests and the info endpoint); bases loaded for
    /// adapters to run over are not among them (see [`Predictor::bases_loaded`]).
    pub fn loaded_ids(&self) -> Vec<String> {
        let c = self.cache.lock();
        let mut ids: Vec<String> =
            c.slots.iter().filter(|(k, (s, _))| s.initialized() && !k.contains(BASE_KEY)).map(|(k, _)| k.clone()).collect();
        ids.sort();
        ids
    }

    /// How many base encoders are loaded for adapters to run over (one per base, whatever the
    /// adapters' poolings).
    pub fn bases_loaded(&self) -> usize {
        self.cache.lock().slots.iter().filter(|(k, (s, _))| s.initialized() && k.contains(BASE_KEY)).count()
    }

    /// Unloads the base encoders loaded from the model dir at `path` (it is being deleted).
    pub fn evict_base(&self, path: &std::path::Path) {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let prefix = format!("{}{BASE_KEY}", path.display());
        self.cache.lock().slots.retain(|k, _| !k.starts_with(&prefix));
    }

    /// Panics while holding the model cache's and the adapter cache's locks: the test of
    /// predict's recovery from a panic under them (the locks do not poison).
    #[doc(hidden)]
    pub fn panic_holding_locks(&self) {
        let _cache = self.cache.lock();
        self.adapters.with_lock_held(|| panic!("a panic while the predict caches are locked (test hook)"));
    }

    /// Unloads a model (after it was deleted).
    pub fn evict(&self, id: &str) {
        self.adapters.evict(id);
        self.cache.lock().slots.remove(id);
    }

    /// Unloads `loaded` if it is still model `id`'s entry: its inference thread died.
    fn unload_crashed(&self, id: &str, loaded: &Arc<Loaded>) {
        let mut c = self.cache.lock();
        if c.slots.get(id).and_then(|(s, _)| s.get()).is_some_and(|l| Arc::ptr_eq(l, loaded)) {
            c.slots.remove(id);
            tracing::warn!(model = %id, "unloaded model: its inference thread crashed");
        }
    }

    /// Model `id`, loaded (from `path`) unless it is already; one whose inference thread
    /// crashed is loaded again.
    async fn model(&self, id: &str, path: PathBuf, encoder: bool) -> Result<Arc<Loaded>, PredictError> {
        let loaded = self.load(id, path.clone(), encoder).await?;
        if loaded.batcher.is_alive() {
            return Ok(loaded);
        }
        self.unload_crashed(id, &loaded);
        self.load(id, path, encoder).await
    }

    /// Loads model `id` from `path`: a classifier, or with `encoder` a base's encoder for
    /// adapters to run over.
    async fn load(&self, id: &str, path: PathBuf, encoder: bool) -> Result<Arc<Loaded>, PredictError> {
        let slot = self.slot(id);
        let device = self.device.clone();
        let (name, limits, weights) = (id.to_string(), self.limits, self.weights);
        let loaded = slot
            .get_or_try_init(|| async move {
                let load = move || {
                    if encoder {
                        LoadedClassifier::load_encoder(&path, &device, weights)
                    } else {
                        LoadedClassifier::load_as(&path, &device, weights)
                    }
                };
                let model = tokio::task::spawn_blocking(load)
                    .await
                    .map_err(|e| PredictError::Load(e.to_string()))?
                    .map(Arc::new)
                    .map_err(|e| PredictError::Load(format!("{e:#}")))?;
                let batcher =
                    Batcher::spawn(model.clone(), &name, limits, self.threads.clone()).map_err(|e| PredictError::Load(e.to_string()))?;
                Ok::<_, PredictError>(Arc::new(Loaded { model, batcher }))
            })
            .await;
        if loaded.is_err() {
            self.evict(id);
        } else {
            self.enforce_budget(id);
        }
        loaded.cloned()
    }

    /// Scores `texts` with model `id` at `path` as `output` says. With [`Overflow::Chunk`], a
    /// long text's score is the mean over its windows (of the probabilities, or of the logits).
    pub async fn predict(
        &self,
        id: &str,
        path: PathBuf,
        texts: Vec<String>,
        overflow: Overflow,
        output: Output,
    ) -> Result<Scored, PredictError> {
        self.predict_pairs(id, path, texts, None, overflow, output).await
    }

    /// Each text's sub-words scored by token classifier `id` (probabilities per tag, or the
    /// logits for [`Output::Logits`]), for [`entities::aggregate`]. A text longer than the model
    /// takes is scored in windows half a window apart, each sub-word by the window that gives it
    /// the most context on both sides, so no entity is lost at a window's edge.
    pub async fn predict_tokens(&self, id: &str, path: PathBuf, texts: Vec<String>, output: Output) -> Result<Tagged, PredictError> {
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| PredictError::Overloaded)?;
        let (key, loaded, adapter) = self.runner(id, path).await?;
        let model = loaded.model.clone();
        let started = std::time::Instant::now();
        let pieces = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            model.pieces(&refs)
        })
        .await
        .map_err(|e| PredictError::Inference(e.to_string()))?
        .map_err(|e| PredictError::Inference(format!("{e:#}")))?;
        let tokenization = started.elapsed();
        let (mut seqs, mut plans) = (Vec::new(), Vec::new());
        for p in &pieces {
            let head = p.content().start;
            let mut plan = Vec::new();
            for (ids, range) in crate::model::hf::words::cut(p, loaded.model.max_len) {
                plan.push((seqs.len(), range, head));
                seqs.push(ids);
            }
            plans.push(plan);
        }
        let (rows, timings) = match loaded.batcher.logits_typed_with(seqs, Vec::new(), adapter.clone()).await {
            Ok(done) => done,
            Err(e) if !loaded.batcher.is_alive() => {
                self.unload_crashed(&key, &loaded);
                return Err(PredictError::Crashed(format!("{e:#}")));
            }
            Err(e) => return Err(PredictError::Inference(format!("{e:#}"))),
        };
        let labels = adapter.as_ref().map_or_else(|| loaded.model.labels.clone(), |a| a.labels.clone());
        let k = labels.len();
        let texts = pieces
            .iter()
            .zip(&plans)
            .map(|(p, plan)| {
                let ranges: Vec<std::ops::Range<usize>> = plan.iter().map(|(_, r, _)| r.clone()).collect();
                p.content()
                    .map(|pos| {
                        let (seq, range, head) = &plan[crate::model::hf::words::best_window(&ranges, pos)];
                        let at = (head + pos - range.start) * k;
                        let raw = &rows[*seq][at..at + k];
                        let scores = if output == Output::Logits { raw.to_vec() } else { crate::model::predict::predictor::softmax(raw) };
                        let (start, end) = p.offsets[pos];
                        entities::Piece { index: pos, start, end, is_subword: p.continues.get(pos).copied().unwrap_or(false), scores }
                    })
                    .collect()
            })
            .collect();
        Ok(Tagged { labels: Arc::new(labels), texts, timings, tokenization })
    }

    /// [`Self::predict`], where `pairs` (when given) holds each text's second text: each input
    /// is then the pair, encoded by the tokenizer's pair template.
    pub async fn predict_pairs(
        &self,
        id: &str,
        path: PathBuf,
        texts: Vec<String>,
        pairs: Option<Vec<String>>,
        overflow: Overflow,
        output: Output,
    ) -> Result<Scored, PredictError> {
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| PredictError::Overloaded)?;
        let (key, loaded, adapter) = self.runner(id, path).await?;
        let model = loaded.model.clone();
        let bytes = texts.iter().chain(pairs.iter().flatten()).map(String::len).sum::<usize>();
        let small = texts.len() <= INLINE_TEXTS && bytes <= INLINE_BYTES;
        let started = std::time::Instant::now();
        let tokenize = move || -> Result<Result<Tokenized, TooLong>, PredictError> {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let err = |e: anyhow::Error| PredictError::Inference(format!("{e:#}"));
            match &pairs {
                None => Ok(model.tokenize_windows(&refs, overflow).map_err(err)?.map(|w| (w, Vec::new()))),
                Some(seconds) => {
                    let both: Vec<(&str, &str)> = refs.iter().zip(seconds).map(|(a, b)| (*a, b.as_str())).collect();
                    Ok(model.tokenize_pairs(&both, overflow).map_err(err)?.map(|encoded| {
                        let (seqs, types): (Vec<Vec<u32>>, Vec<Vec<u32>>) = encoded.into_iter().unzip();
                        (seqs.into_iter().map(|s| vec![s]).collect(), types)
                    }))
                }
            }
        };
        // A short request takes the tokenizer well under 0.1 ms (docs/benchmarks-history.md §25),
        // about what handing it to a blocking thread and back costs; anything longer goes there.
        let (windows, types) = if small {
            tokenize()??
        } else {
            tokio::task::spawn_blocking(tokenize).await.map_err(|e| PredictError::Inference(e.to_string()))???
        };
        let tokenization = started.elapsed();
        let counts: Vec<usize> = windows.iter().map(Vec::len).collect();
        let seqs: Vec<Vec<u32>> = windows.into_iter().flatten().collect();
        let (logits, timings) = match loaded.batcher.logits_typed_with(seqs, types, adapter.clone()).await {
            Ok(done) => done,
            Err(e) if !loaded.batcher.is_alive() => {
                self.unload_crashed(&key, &loaded);
                return Err(PredictError::Crashed(format!("{e:#}")));
            }
            Err(e) => return Err(PredictError::Inference(format!("{e:#}"))),
        };
        let model = &loaded.model;
        let calibrated = output == Output::Calibrated;
        let per_window: Vec<Vec<f32>> = match (&adapter, output) {
            (_, Output::Logits) => logits,
            (Some(a), _) => logits.iter().map(|l| a.probabilities(l, calibrated)).collect(),
            (None, _) => logits.iter().map(|l| model.probabilities(l, calibrated)).collect(),
        };
        let mut rows = per_window.into_iter();
        let scores = counts.iter().map(|&n| mean_rows(rows.by_ref().take(n).collect())).collect();
        metrics::histogram!(crate::monitoring::PREDICT_QUEUE_SECONDS).record(timings.queue.as_secs_f64());
        let (labels, head, thresholds, temperature) = match &adapter {
            Some(a) => (a.labels.clone(), a.head_kind, a.thresholds.clone(), a.temperature),
            None => (model.labels.clone(), model.head, model.thresholds.clone(), model.temperature),
        };
        let multi_label = head == Head::MultiLabel;
        // The thresholds were tuned on calibrated probabilities: the same decisions on others.
        let thresholds = thresholds.map(|t| match output {
            Output::Uncalibrated => crate::train::calibration::move_thresholds(&t, temperature, 1.0),
            _ => t,
        });
        Ok(Scored { labels: Arc::new(labels), head, multi_label, thresholds, scores, timings, tokenization })
    }

    /// What runs model `id`: its cache key, the loaded model, and the adapter when it is one
    /// served over a shared base.
    async fn runner(&self, id: &str, path: PathBuf) -> Result<(String, Arc<Loaded>, Option<Arc<LoadedAdapter>>), PredictError> {
        let adapter = self.shared_adapter(id, &path).await?;
        // An adapter over a shared base runs on the base's inference thread, with other
        // adapters' rows in the same passes; the base is cached under a key of its own.
        Ok(match adapter {
            Some(a) => {
                let base = a.base.canonicalize().unwrap_or_else(|_| a.base.clone());
                let key = format!("{}{BASE_KEY}", base.display());
                let loaded = self.model(&key, a.base.clone(), true).await?;
                (key, loaded, Some(a))
            }
            None => (id.to_string(), self.model(id, path, false).await?, None),
        })
    }

    /// Each text's tokens under model `id`'s tokenizer (the model is loaded if it is not).
    pub async fn tokenize(&self, id: &str, path: PathBuf, texts: Vec<String>, special: bool) -> Result<Vec<Vec<Token>>, PredictError> {
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| PredictError::Overloaded)?;
        let (_, loaded, _) = self.runner(id, path).await?;
        let model = loaded.model.clone();
        let work = move || model.tokens(&texts, special).map_err(|e| PredictError::Inference(format!("{e:#}")));
        tokio::task::spawn_blocking(work).await.map_err(|e| PredictError::Inference(e.to_string()))?
    }

    /// The longest input model `id` takes, in tokens, and its labels.
    pub async fn shape(&self, id: &str, path: PathBuf) -> Result<(usize, Vec<String>, Head), PredictError> {
        let (_, loaded, adapter) = self.runner(id, path).await?;
        let (labels, head) = adapter.map_or_else(|| (loaded.model.labels.clone(), loaded.model.head), |a| (a.labels.clone(), a.head_kind));
        Ok((loaded.model.max_len, labels, head))
    }

    /// The adapter `id` at `path` when it is one served over a shared base.
    async fn shared_adapter(&self, id: &str, path: &std::path::Path) -> Result<Option<Arc<LoadedAdapter>>, PredictError> {
        if !crate::model::hf::lora::is_adapter(path) {
            return Ok(None);
        }
        // Activations are f32 but on a GPU in bf16, where every weight is bf16.
        let dtype = if self.weights.effective(&self.device) == Weights::Bf16 && !self.device.is_cpu() { DType::BF16 } else { DType::F32 };
        match self.adapters.get(id, path.to_path_buf(), &self.device, dtype).await {
            Ok(adapters::Served::Shared(a)) => Ok(Some(a)),
            Ok(adapters::Served::Merged) => Ok(None),
            Err(e) => Err(PredictError::Load(format!("{e:#}"))),
        }
    }
}
