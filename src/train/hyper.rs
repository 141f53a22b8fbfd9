//! Job hyperparameters: what a request may set, the defaults, and their checks.

use serde::{Deserialize, Serialize};

/// Hyperparameters as a client sends them: every field optional, unknown fields refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperparametersInput {
    pub epochs: Option<u64>,
    pub batch_size: Option<u64>,
    pub learning_rate: Option<f64>,
    pub max_seq_len: Option<u64>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<u64>,
    pub pooling: Option<String>,
    pub class_weights: Option<String>,
    pub early_stopping_patience: Option<u64>,
    pub group_by_length: Option<bool>,
}

/// Every hyperparameter resolved (defaults filled in), as stored and shown on the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub max_seq_len: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// `cls` or `mean` once resolved (a request may say `auto`).
    pub pooling: String,
    pub class_weights: Option<String>,
    pub early_stopping_patience: Option<usize>,
    /// Batch examples of similar length together (fewer padding tokens, faster).
    pub group_by_length: bool,
}

/// A hyperparameter out of range: the `param` path and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{param}: {message}")]
pub struct InvalidParam {
    pub param: String,
    pub message: String,
}

fn bad<T>(name: &str, message: impl Into<String>) -> Result<T, InvalidParam> {
    Err(InvalidParam { param: format!("hyperparameters.{name}"), message: message.into() })
}

fn int_in(name: &str, v: Option<u64>, default: u64, lo: u64, hi: u64) -> Result<usize, InvalidParam> {
    let v = v.unwrap_or(default);
    if v < lo || v > hi {
        return bad(name, format!("must be an integer from {lo} to {hi}"));
    }
    Ok(v as usize)
}

fn float_in(name: &str, v: Option<f64>, default: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f64, InvalidParam> {
    let v = v.unwrap_or(default);
    let low_ok = if lo_open { v > lo } else { v >= lo };
    if !v.is_finite() || !low_ok || v > hi {
        let open = if lo_open { "above" } else { "from" };
        return bad(name, format!("must be a number {open} {lo} up to {hi}"));
    }
    Ok(v)
}

impl HyperparametersInput {
    /// Checks ranges and fills defaults. `auto_pooling` is what `pooling: auto` means for
    /// the chosen base model.
    pub fn resolve(&self, auto_pooling: &str) -> Result<Hyperparameters, InvalidParam> {
        let pooling = match self.pooling.as_deref().unwrap_or("auto") {
            "auto" => auto_pooling.to_string(),
            p @ ("cls" | "mean") => p.to_string(),
            _ => return bad("pooling", "must be \"auto\", \"cls\" or \"mean\""),
        };
        let class_weights = match self.class_weights.as_deref() {
            None | Some("none") => None,
            Some("balanced") => Some("balanced".to_string()),
            Some(_) => return bad("class_weights", "must be \"balanced\" or null"),
        };
        let patience = match self.early_stopping_patience {
            None => None,
            Some(p) => Some(int_in("early_stopping_patience", Some(p), 1, 1, 100)?),
        };
        Ok(Hyperparameters {
            epochs: int_in("epochs", self.epochs, 3, 1, 100)?,
            batch_size: int_in("batch_size", self.batch_size, 32, 1, 1024)?,
            learning_rate: float_in("learning_rate", self.learning_rate, 5e-5, 0.0, 1.0, true)?,
            max_seq_len: int_in("max_seq_len", self.max_seq_len, 128, 8, 512)?,
            warmup_ratio: float_in("warmup_ratio", self.warmup_ratio, 0.06, 0.0, 1.0, false)?,
            weight_decay: float_in("weight_decay", self.weight_decay, 0.01, 0.0, 1.0, false)?,
            seed: match self.seed {
                Some(s) if s > i64::MAX as u64 => return bad("seed", "must be below 2^63"),
                s => s.unwrap_or(42),
            },
            pooling,
            class_weights,
            early_stopping_patience: patience,
            group_by_length: self.group_by_length.unwrap_or(false),
        })
    }
}
