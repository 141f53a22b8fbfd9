//! What one fine-tuning run needs: the base, the rows, the hyperparameters, the device, where the
//! model and checkpoints go. Classification, regression and reranking ([`super::trainer`]) and
//! token classification ([`super::tagger`]) all take it.

use super::checkpoint::CheckpointPlan;
use super::hyper::Hyperparameters;
use super::objective::Task;
use super::precision::Precision;
use crate::dataset::Row;
use candle_core::Device;
use std::path::PathBuf;

/// The name of a regression's or a reranker's one output (its `id2label`).
pub const ONE_OUTPUT: &str = "score";

/// Everything one fine-tuning run needs.
pub struct TrainRequest {
    pub base_dir: PathBuf,
    /// How a saved LoRA adapter names its base: the catalog's id for the base (`None`: the
    /// base dir's absolute path, for runs outside the service).
    pub base_id: Option<String>,
    pub train_rows: Vec<Row>,
    pub validation_rows: Option<Vec<Row>>,
    pub hp: Hyperparameters,
    /// Scored with the kept weights after training, when given.
    pub test_rows: Option<Vec<Row>>,
    pub device: Device,
    /// Where the finished model directory goes (written atomically), if anywhere.
    pub out_dir: Option<PathBuf>,
    /// Global L2 norm gradients are clipped to.
    pub max_grad_norm: f64,
    pub eval_batch_size: usize,
    pub task: Task,
    /// Where to checkpoint, and resume from the newest checkpoint found there.
    pub checkpoints: Option<CheckpointPlan>,
    /// What the training steps compute in (evaluation and the saved weights are f32).
    pub precision: Precision,
}

impl TrainRequest {
    /// A request with the usual defaults (clipping at 1.0, evaluation batches of 64).
    pub fn new(base_dir: PathBuf, train_rows: Vec<Row>, validation_rows: Option<Vec<Row>>, hp: Hyperparameters, device: Device) -> Self {
        Self {
            base_dir,
            base_id: None,
            train_rows,
            validation_rows,
            hp,
            test_rows: None,
            device,
            out_dir: None,
            max_grad_norm: 1.0,
            eval_batch_size: 64,
            task: Task::SingleLabel,
            checkpoints: None,
            precision: Precision::F32,
        }
    }
}
