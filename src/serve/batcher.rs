//! Dynamic batching: one inference thread per loaded model gathers the sequences of
//! concurrent requests into shared forward passes (bounded by a token budget and a batch
//! size, after waiting at most `max_wait` for company, or `rejoin_wait` for the callers of
//! the previous batch to send their next requests), then hands each caller its rows.

use crate::model::predict::adapter_serving::LoadedAdapter;
use crate::model::predict::predictor::LoadedClassifier;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Limits of one gathered batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most padded tokens in one forward pass.
    pub max_batch_tokens: usize,
    /// Most sequences in one forward pass.
    pub max_batch_size: usize,
    /// Longest a request waits for others to join it.
    pub max_wait: Duration,
    /// Longest a batch waits, after the previous one, for that one's callers to send their
    /// next requests (only when it answered more than one).
    pub rejoin_wait: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        // No waiting for company by default: requests that arrive while a forward pass runs
        // queue up and form the next batch, so batching costs a lone request nothing. The
        // rejoin wait applies only after a batch that answered several callers.
        Self { max_batch_tokens: 16_384, max_batch_size: 64, max_wait: Duration::ZERO, rejoin_wait: Duration::from_millis(5) }
    }
}

/// Where the time of one request went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub queue: Duration,
    pub inference: Duration,
    /// Sequences in the forward passes this request shared.
    pub batch_size: usize,
}

type Reply = oneshot::Sender<anyhow::Result<(Vec<Vec<f32>>, Timings)>>;

struct Work {
    seqs: Vec<Vec<u32>>,
    /// Each sequence's token types (a pair's second text is 1); empty: all 0.
    types: Vec<Vec<u32>>,
    /// The adapter whose terms and head these rows take; `None`: the model's own.
    adapter: Option<Arc<LoadedAdapter>>,
    reply: Reply,
    enqueued: Instant,
}

/// A handle on a model's inference thread; the thread ends when the last handle is dropped,
/// or when a forward pass panics (then every waiting caller gets an error and
/// [`Batcher::is_alive`] turns false before the first of them does).
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Work>,
    alive: Arc<AtomicBool>,
}

impl Batcher {
    /// Starts the inference thread of `model`; its forward passes run on `threads`.
    pub fn spawn(model: Arc<LoadedClassifier>, name: &str, limits: BatchLimits, threads: Arc<rayon::ThreadPool>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let (flag, name) = (MarkDeadOnExit(alive.clone()), name.to_string());
        std::thread::Builder::new().name(format!("infer-{name}")).spawn(move || {
            // Owned by the thread, so that it drops when the thread ends.
            let flag = flag;
            run(model, rx, limits, threads, &flag.0, &name)
        })?;
        Ok(Self { tx, alive })
    }

    /// False once the inference thread died of a panic: the model must be loaded again.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Raw logits for `seqs`, computed together with whatever else is queued.
    pub async fn logits(&self, seqs: Vec<Vec<u32>>) -> anyhow::Result<(Vec<Vec<f32>>, Timings)> {
        self.logits_with(seqs, None).await
    }

    /// Raw logits for `seqs` through `adapter` (over this thread's base model), computed
    /// together with whatever else is queued, other adapters' rows included.
    pub async fn logits_with(&self, seqs: Vec<Vec<u32>>, adapter: Option<Arc<LoadedAdapter>>) -> anyhow::Result<(Vec<Vec<f32>>, Timings)> {
        self.logits_typed_with(seqs, Vec::new(), adapter).await
    }

    /// [`Self::logits_with`] with each sequence's token types (pairs of texts; empty: all 0).
    pub async fn logits_typed_with(
        &self,
        seqs: Vec<Vec<u32>>,
        types: Vec<Vec<u32>>,
        adapter: Option<Arc<LoadedAdapter>>,
    ) -> anyhow::Result<(Vec<Vec<f32>>, Timings)> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work { seqs, types, adapter, reply, enqueued: Instant::now() })
            .map_err(|_| anyhow::anyhow!("inference thread stopped"))?;
        rx.await.map_err(|_| anyhow::anyhow!("inference thread stopped"))?
    }
}

/// Clears the alive flag however the inference thread ends, a panic outside a forward pass
/// included.
struct MarkDeadOnExit(Arc<AtomicBool>);

impl Drop for MarkDeadOnExit {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn padded_tokens(lens: &mut [usize]) -> usize {
    lens.sort_unstable();
    // Batches are cut by length inside `logits`; the longest sequence bounds the padding.
    lens.last().copied().unwrap_or(0) * lens.len()
}

/// Takes requests from the front of `queue` while the batch stays within `limits` (the
/// first one always).
fn take_batch(queue: &mut VecDeque<Work>, limits: BatchLimits) -> Vec<Work> {
    let mut lens: Vec<usize> = Vec::new();
    let mut batch = Vec::new();
    while let Some(w) = queue.front() {
        let mut with: Vec<usize> = lens.iter().copied().chain(w.seqs.iter().map(Vec::len)).collect();
        if !batch.is_empty() && (with.len() > limits.max_batch_size || padded_tokens(&mut with) > limits.max_batch_tokens) {
            break;
        }
        lens = with;
        batch.extend(queue.pop_front());
    }
    batch
}

/// Moves what is waiting in the channel to `queue`; false once every handle is gone and
/// nothing is left.
fn drain(rx: &Receiver<Work>, queue: &mut VecDeque<Work>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(w) => queue.push_back(w),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return !queue.is_empty(),
        }
    }
}

/// Receives into `queue` until it holds `want` requests, or sequences enough for a full
/// batch, or `until` passes.
fn gather_until(rx: &Receiver<Work>, queue: &mut VecDeque<Work>, want: usize, until: Instant, limits: BatchLimits) {
    let mut seqs: usize = queue.iter().map(|w| w.seqs.len()).sum();
    while queue.len() < want && seqs < limits.max_batch_size {
        let now = Instant::now();
        let Some(left) = until.checked_duration_since(now).filter(|d| !d.is_zero()) else { return };
        match rx.recv_timeout(left) {
            Ok(w) => {
                seqs += w.seqs.len();
                queue.push_back(w);
            }
            Err(_) => return,
        }
    }
}

fn run(
    model: Arc<LoadedClassifier>,
    rx: Receiver<Work>,
    limits: BatchLimits,
    threads: Arc<rayon::ThreadPool>,
    alive: &AtomicBool,
    name: &str,
) {
    let mut queue: VecDeque<Work> = VecDeque::new();
    // Requests the next batch may wait for, and until when: those queued when the last
    // batch ended plus the callers it answered. Clients that send one request after another
    // come back within a few milliseconds; without the wait, 32 such clients settle into
    // two alternating half-size batches.
    let (mut expected, mut expected_until) = (0usize, Instant::now());
    loop {
        if !drain(&rx, &mut queue) {
            return;
        }
        if queue.is_empty() {
            match rx.recv() {
                Ok(w) => queue.push_back(w),
                Err(_) => return,
            }
        }
        gather_until(&rx, &mut queue, expected, expected_until, limits);
        if let Some(first) = queue.front() {
            let until = first.enqueued + limits.max_wait;
            gather_until(&rx, &mut queue, usize::MAX, until, limits);
        }
        let batch = take_batch(&mut queue, limits);
        let served = batch.len();
        if let Err((mut hit, panic)) = run_batch(&model, batch, limits, &threads) {
            // The model may be left half-changed: this thread ends, and the predictor loads
            // the model afresh on the next request.
            alive.store(false, Ordering::SeqCst);
            tracing::error!(model = %name, panic = %panic, "a forward pass panicked; unloading the model");
            metrics::counter!(crate::monitoring::INFERENCE_PANICS).increment(1);
            drain(&rx, &mut queue);
            hit.extend(queue);
            for w in hit {
                let _ = w.reply.send(Err(anyhow::anyhow!("the inference thread panicked: {panic}")));
            }
            return;
        }
        drain(&rx, &mut queue);
        expected = if served > 1 { queue.len() + served } else { 0 };
        expected_until = Instant::now() + limits.rejoin_wait;
    }
}

/// The message a panic carried.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

/// Runs one batch and answers its callers; when the forward pass panics, returns them
/// unanswered with the panic's message.
fn run_batch(
    model: &LoadedClassifier,
    batch: Vec<Work>,
    limits: BatchLimits,
    threads: &rayon::ThreadPool,
) -> Result<(), (Vec<Work>, String)> {
    let started = Instant::now();
    let live: Vec<Work> = batch.into_iter().filter(|w| !w.reply.is_closed()).collect();
    if live.is_empty() {
        return Ok(());
    }
    let all: Vec<Vec<u32>> = live.iter().flat_map(|w| w.seqs.iter().cloned()).collect();
    let types: Vec<Vec<u32>> = live.iter().flat_map(|w| (0..w.seqs.len()).map(|i| w.types.get(i).cloned().unwrap_or_default())).collect();
    let adapters: Vec<Option<Arc<LoadedAdapter>>> = live.iter().flat_map(|w| w.seqs.iter().map(|_| w.adapter.clone())).collect();
    let forward = || {
        if adapters.iter().all(Option::is_none) {
            model.logits_typed(&all, &types, limits.max_batch_size)
        } else {
            model.logits_mixed_typed(&all, &types, &adapters, limits.max_batch_size)
        }
    };
    // Installed per batch, not for the thread's life: the pool is shared by every model.
    // A panic in the pool comes back here through `install`.
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| threads.install(forward))) {
        Ok(result) => result,
        Err(payload) => return Err((live, panic_message(payload.as_ref()))),
    };
    let inference = started.elapsed();
    // Once per batch: the callers' timings would count a batch once per request in it.
    metrics::histogram!(crate::monitoring::PREDICT_BATCH_SIZE).record(all.len() as f64);
    metrics::histogram!(crate::monitoring::PREDICT_INFERENCE_SECONDS).record(inference.as_secs_f64());
    match result {
        Ok(rows) => {
            let mut rows = rows.into_iter();
            for w in live {
                let mine: Vec<Vec<f32>> = rows.by_ref().take(w.seqs.len()).collect();
                let t = Timings { queue: started - w.enqueued, inference, batch_size: all.len() };
                let _ = w.reply.send(Ok((mine, t)));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            for w in live {
                let _ = w.reply.send(Err(anyhow::anyhow!("{msg}")));
            }
        }
    }
    Ok(())
}
