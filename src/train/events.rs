//! What a training run tells its caller as it goes (events, through an [`Observer`]) and how
//! it ends (an [`Outcome`] or a [`TrainError`]). Fine-tuning, pre-training and checkpoints
//! all speak these types, so none of them depends on another.

use super::metrics::ClassificationReport;
use serde::{Deserialize, Serialize};

/// Timing and size figures of one epoch.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_seconds: f64,
    /// Process CPU seconds during the epoch's training loop (≈ cores busy × seconds).
    pub train_cpu_seconds: f64,
    pub examples_per_s: f64,
    pub real_tokens: usize,
    pub padded_tokens: usize,
    pub train_loss: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    /// Regression only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_pearson: Option<f64>,
    /// Regression only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_spearman: Option<f64>,
    /// Reranking only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_ndcg_at_10: Option<f64>,
    /// Token classification only: entity F1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_f1: Option<f64>,
    pub eval_seconds: f64,
    /// Peak device memory so far (GPU runs only), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mib: Option<u64>,
}

/// Figures of a whole run, for reports and benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    pub load_seconds: f64,
    pub tokenize_seconds: f64,
    pub train_seconds: f64,
    pub n_train: usize,
    pub n_validation: usize,
    pub num_parameters: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub epochs: Vec<EpochStats>,
    /// The most epochs the run could take.
    pub max_epochs: usize,
    /// Why training ended: `"max_epochs"` (every epoch ran) or `"early_stopping"` (patience
    /// ran out).
    pub stop_reason: &'static str,
}

/// Results on the test rows.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    pub loss: f64,
    pub seconds: f64,
    #[serde(flatten)]
    pub report: ClassificationReport,
}

/// A finished run: the epoch whose weights were kept, and the figures.
pub struct Finished {
    pub best: EpochReport,
    pub labels: Vec<String>,
    pub stats: RunStats,
    pub test: Option<TestReport>,
    /// Multi-label runs: each label's threshold, fitted on validation (saved with the model).
    pub tuned: Option<super::thresholds::Tuned>,
    /// Multi-label runs: the test scores at the tuned thresholds (`test` is at 0.5).
    pub test_tuned: Option<TestReport>,
    /// The temperature fitted on validation (saved with the model), and what it did there.
    pub calibration: super::calibration::Calibration,
    /// The expected calibration error on the test rows, uncalibrated and calibrated.
    pub test_ece: Option<(f64, f64)>,
    /// Regression runs: (true, predicted) of up to [`SCATTER_POINTS`] validation rows, with the
    /// kept weights.
    pub validation_scatter: Option<Vec<[f32; 2]>>,
}

/// The most (true, predicted) points a regression keeps for its plot.
pub const SCATTER_POINTS: usize = 500;

/// Progress after one optimisation step.
#[derive(Debug, Clone, Serialize)]
pub struct StepInfo {
    pub epoch: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub examples_per_second: f64,
    /// This step's wall time: forward, backward and update.
    pub seconds: f64,
}

/// Validation results after one epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub loss: f64,
    pub labels: Vec<String>,
    #[serde(flatten)]
    pub report: ClassificationReport,
    /// Peak device memory of the run so far (GPU runs only), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mib: Option<u64>,
}

/// What the trainer tells its caller as it goes.
pub enum Event {
    Message(String),
    /// Something the user should look at; the job goes on.
    Warning(String),
    Step(StepInfo),
    Epoch(Box<EpochReport>),
    /// Held-out masked-LM loss (pre-training jobs).
    Pretrain(MlmReport),
}

/// Receives events and says when to stop (checked before every step).
pub trait Observer {
    fn on_event(&mut self, event: Event);
    fn should_stop(&self) -> bool;
    /// Whether a stop is the server shutting down (checkpoint, to resume later) rather than a cancel.
    fn shutting_down(&self) -> bool {
        false
    }
    /// Returns once every event so far is recorded where the observer keeps them. Called before a
    /// checkpoint is saved: a job resumed from it must find the steps before it recorded, even
    /// when the process that saved it died right after.
    fn wait_recorded(&mut self) {}
}

/// How a run ended, when it did not fail.
pub enum Outcome {
    /// The model was written (when asked); see [`Finished`].
    Finished(Box<Finished>),
    /// A pre-training run wrote its base model: held-out loss before, and after the last epoch.
    Pretrained {
        before: f64,
        last: MlmReport,
    },
    Cancelled,
}

/// Why a run failed; `code` is the job's error code.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    InvalidData(String),
    #[error("cannot load the base model: {0}")]
    BaseModel(String),
    #[error("training diverged: the loss became {0} at step {1}")]
    Diverged(f64, usize),
    /// The data dir could not be written (full, read-only, removed).
    #[error("could not write to the data dir: {0}")]
    Storage(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Internal(e.into())
    }
}

impl TrainError {
    pub fn code(&self) -> &'static str {
        match self {
            TrainError::InvalidData(_) => "invalid_training_data",
            TrainError::BaseModel(_) => "base_model_unavailable",
            TrainError::Diverged(..) => "training_diverged",
            TrainError::Storage(_) => "storage_error",
            TrainError::Internal(e) if is_out_of_memory(e) => "device_out_of_memory",
            TrainError::Internal(_) => "internal_error",
        }
    }
}

/// Whether an error is the device running out of memory (CUDA reports it as an error value,
/// which candle passes up): the job fails with a code that says so instead of a bare 500-ish one.
fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("OUT_OF_MEMORY") || text.contains("out of memory")
}

/// Held-out loss after an epoch (epoch 0: before training).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MlmReport {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: Option<f64>,
    pub loss: f64,
    pub perplexity: f64,
    /// Mean cosine similarity between the held-out texts' sentence embeddings now and under
    /// the base (1 before training); for a base whose sentence-transformers files name its pooling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_similarity: Option<f64>,
}

impl MlmReport {
    /// The held-out figures as a job's metrics show them.
    pub fn validation_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"loss": self.loss, "perplexity": self.perplexity});
        if let Some(s) = self.embedding_similarity {
            v["embedding_similarity"] = serde_json::json!(s);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_error_gets_its_own_code() {
        let oom = TrainError::Internal(anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"));
        assert_eq!(oom.code(), "device_out_of_memory");
        assert_eq!(TrainError::Internal(anyhow::anyhow!("shape mismatch")).code(), "internal_error");
    }
}
