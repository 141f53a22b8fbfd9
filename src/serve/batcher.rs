//! Dynamic batching: one inference thread per loaded model gathers the sequences of
//! concurrent requests into shared forward passes (bounded by a token budget and a batch
//! size, after waiting at most `max_wait` for company), then hands each caller its rows.

use crate::model::predictor::LoadedClassifier;
use std::sync::mpsc::{self, Receiver, Sender};
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
}

impl Default for BatchLimits {
    fn default() -> Self {
        // No waiting for company by default: requests that arrive while a forward pass runs
        // queue up and form the next batch, so batching costs a lone request nothing.
        Self { max_batch_tokens: 16_384, max_batch_size: 64, max_wait: Duration::ZERO }
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
    reply: Reply,
    enqueued: Instant,
}

/// A handle on a model's inference thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Work>,
}

impl Batcher {
    /// Starts the inference thread of `model`; its forward passes run on `threads`.
    pub fn spawn(model: Arc<LoadedClassifier>, name: &str, limits: BatchLimits, threads: Arc<rayon::ThreadPool>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name(format!("infer-{name}")).spawn(move || run(model, rx, limits, threads))?;
        Ok(Self { tx })
    }

    /// Raw logits for `seqs`, computed together with whatever else is queued.
    pub async fn logits(&self, seqs: Vec<Vec<u32>>) -> anyhow::Result<(Vec<Vec<f32>>, Timings)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Work { seqs, reply, enqueued: Instant::now() }).map_err(|_| anyhow::anyhow!("inference thread stopped"))?;
        rx.await.map_err(|_| anyhow::anyhow!("inference thread stopped"))?
    }
}

fn padded_tokens(lens: &mut Vec<usize>) -> usize {
    lens.sort_unstable();
    // Batches are cut by length inside `logits`; the longest sequence bounds the padding.
    lens.last().copied().unwrap_or(0) * lens.len()
}

fn run(model: Arc<LoadedClassifier>, rx: Receiver<Work>, limits: BatchLimits, threads: Arc<rayon::ThreadPool>) {
    let mut pending: Option<Work> = None;
    loop {
        let first = match pending.take() {
            Some(w) => w,
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
        };
        let deadline = first.enqueued + limits.max_wait;
        let mut lens: Vec<usize> = first.seqs.iter().map(Vec::len).collect();
        let mut batch = vec![first];
        loop {
            let now = Instant::now();
            let next = if now >= deadline { rx.try_recv().map_err(|_| ()) } else { rx.recv_timeout(deadline - now).map_err(|_| ()) };
            let Ok(w) = next else { break };
            let mut with: Vec<usize> = lens.iter().copied().chain(w.seqs.iter().map(Vec::len)).collect();
            if with.len() > limits.max_batch_size || padded_tokens(&mut with) > limits.max_batch_tokens {
                pending = Some(w);
                break;
            }
            lens = with;
            batch.push(w);
        }
        run_batch(&model, batch, limits, &threads);
    }
}

fn run_batch(model: &LoadedClassifier, batch: Vec<Work>, limits: BatchLimits, threads: &rayon::ThreadPool) {
    let started = Instant::now();
    let live: Vec<Work> = batch.into_iter().filter(|w| !w.reply.is_closed()).collect();
    if live.is_empty() {
        return;
    }
    let all: Vec<Vec<u32>> = live.iter().flat_map(|w| w.seqs.iter().cloned()).collect();
    // Installed per batch, not for the thread's life: the pool is shared by every model.
    let result = threads.install(|| model.logits(&all, limits.max_batch_size));
    let inference = started.elapsed();
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
}
