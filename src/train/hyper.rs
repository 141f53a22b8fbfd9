//! Job hyperparameters: what a request may set, the defaults, and their checks; and the
//! architecture of a pre-training job from scratch.

use crate::model::EncoderConfig;
use serde::{Deserialize, Serialize};

/// Hyperparameters as a client sends them: every field optional, unknown fields refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperparametersInput {
    pub epochs: Option<EpochsInput>,
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
    /// Token classification: every sub-word carries its word's tag (a `B-` becoming `I-` after
    /// the first), not only the first.
    pub label_all_tokens: Option<bool>,
    pub method: Option<String>,
    pub lora_r: Option<u64>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub lora_target_modules: Option<Vec<String>>,
    pub mlm_head_warmup_steps: Option<u64>,
    pub mlm_anchor_weight: Option<f64>,
}

/// `epochs` as a request gives it: a count, or `"auto"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EpochsInput {
    Count(u64),
    Word(String),
}

impl From<u64> for EpochsInput {
    fn from(n: u64) -> Self {
        Self::Count(n)
    }
}

/// The most epochs `"epochs": "auto"` runs for `n_train` examples of `n_labels` classes: enough
/// passes that each class is seen about 2,000 times in all (classes with few examples need
/// more passes for the head to separate them) and that training sees at least 40,000 examples
/// (about 1,250 steps of 32, what fine-tuning a BERT usually takes to settle); at least 3 so
/// early stopping has epochs to compare, at most 10 to bound the cost. The cap is a bound, not
/// the choice: early stopping usually ends the run sooner, and the best epoch is kept.
pub fn auto_epochs_cap(n_train: usize, n_labels: usize) -> usize {
    (2000 * n_labels).max(AUTO_MIN_EXAMPLES).div_ceil(n_train.max(1)).clamp(3, 10)
}

/// The fewest examples (over all epochs) that `"epochs": "auto"` plans for.
const AUTO_MIN_EXAMPLES: usize = 40_000;

/// Early stopping's patience when `"epochs": "auto"` and none is given.
pub const AUTO_PATIENCE: usize = 2;

/// Every hyperparameter resolved (defaults filled in), as stored and shown on the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    /// The number of epochs; with `auto_epochs`, the most that may run (set when the job starts,
    /// from the data: see [`auto_epochs_cap`]; 0 until then).
    pub epochs: usize,
    /// `"epochs": "auto"`: train until early stopping's patience runs out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_epochs: bool,
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
    /// Token classification: every sub-word is tagged and scored in the loss, not only each
    /// word's first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub label_all_tokens: bool,
    /// Which weights train: every one (`full`), low-rank adapters and the head (`lora`), or
    /// the pooler and head over a frozen encoder (`head`). Jobs stored before methods existed
    /// read as `full`.
    #[serde(default)]
    pub method: Method,
    /// The adapters' settings, for `lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    /// Masked-LM jobs: steps that train only the prediction head, the encoder held, before
    /// everything trains. `None`: chosen by the job (see `train::mlm::head_warmup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm_head_warmup_steps: Option<usize>,
    /// Masked-LM jobs: the weight of the term that keeps each text's sentence embedding (the
    /// base's own pooling) where the base put it. `None`: chosen by the job (see
    /// `train::anchor::default_weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm_anchor_weight: Option<f64>,
}

/// Which weights a fine-tuning job trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Full,
    Lora,
    Head,
}

/// Low-rank adapter settings, with peft's meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// peft's module names: `query`, `key`, `value`, `attention.output.dense`,
    /// `intermediate.dense`, `output.dense` (which, as in peft, matches `attention.output.dense`
    /// too).
    pub target_modules: Vec<String>,
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

/// What a job does, as far as its hyperparameters care: the rules that tie a hyperparameter to
/// a kind of job are checked where the defaults are filled in, so that the API and `finetuned
/// train` refuse the same things with the same words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Fine-tuning a classifier (one label or several per text).
    FineTune,
    /// Masked-LM pre-training; `from_config`: from random weights of a given architecture.
    Pretrain { from_config: bool },
}

impl Method {
    /// The learning rate a job of this method gets when it names none. LoRA and head-only
    /// training move few weights from where the base put them and need a far higher rate than
    /// full fine-tuning: measured on sst2, trec6 and banking77 (BENCHMARKS.md §5c).
    pub fn default_learning_rate(self) -> f64 {
        match self {
            Method::Full => 5e-5,
            Method::Lora => 2e-3,
            Method::Head => 1e-2,
        }
    }
}

impl HyperparametersInput {
    /// Checks ranges, fills defaults (the learning rate by `method`) and checks the rules of
    /// `kind`. `auto_pooling` is what `pooling: auto` means for the chosen base model.
    pub fn resolve(&self, auto_pooling: &str, kind: JobKind) -> Result<Hyperparameters, InvalidParam> {
        let hp = self.resolve_ranges(auto_pooling)?;
        match kind {
            JobKind::FineTune if hp.mlm_head_warmup_steps.is_some() => {
                return bad("mlm_head_warmup_steps", "applies only to masked-LM jobs (\"task\": \"mlm\")")
            }
            JobKind::FineTune if hp.mlm_anchor_weight.is_some() => {
                return bad("mlm_anchor_weight", "applies only to masked-LM jobs (\"task\": \"mlm\")")
            }
            JobKind::Pretrain { from_config: true } if hp.mlm_anchor_weight.is_some_and(|w| w > 0.0) => {
                let msg = "a job from config starts from random weights: there are no sentence embeddings to keep";
                return bad("mlm_anchor_weight", msg);
            }
            JobKind::Pretrain { .. } if hp.method != Method::Full => {
                return bad("method", "masked-LM pre-training trains every weight: method must be \"full\"")
            }
            _ => {}
        }
        Ok(hp)
    }

    fn resolve_ranges(&self, auto_pooling: &str) -> Result<Hyperparameters, InvalidParam> {
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
        let method = match self.method.as_deref().unwrap_or("full") {
            "full" => Method::Full,
            "lora" => Method::Lora,
            "head" => Method::Head,
            _ => return bad("method", "must be \"full\", \"lora\" or \"head\""),
        };
        let lora = self.lora_settings(method)?;
        Ok(Hyperparameters {
            method,
            lora,
            epochs: match &self.epochs {
                Some(EpochsInput::Word(w)) if w == "auto" => 0,
                Some(EpochsInput::Word(_)) => return bad("epochs", "must be a whole number from 1 to 100, or \"auto\""),
                Some(EpochsInput::Count(n)) => int_in("epochs", Some(*n), 3, 1, 100)?,
                None => 3,
            },
            auto_epochs: matches!(&self.epochs, Some(EpochsInput::Word(w)) if w == "auto"),
            batch_size: int_in("batch_size", self.batch_size, 32, 1, 1024)?,
            learning_rate: float_in("learning_rate", self.learning_rate, method.default_learning_rate(), 0.0, 1.0, true)?,
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
            label_all_tokens: self.label_all_tokens.unwrap_or(false),
            mlm_head_warmup_steps: match self.mlm_head_warmup_steps {
                None => None,
                Some(n) => Some(int_in("mlm_head_warmup_steps", Some(n), 0, 0, 1_000_000)?),
            },
            mlm_anchor_weight: match self.mlm_anchor_weight {
                None => None,
                w => Some(float_in("mlm_anchor_weight", w, 0.0, 0.0, 1000.0, false)?),
            },
        })
    }
}

impl HyperparametersInput {
    fn lora_settings(&self, method: Method) -> Result<Option<LoraSettings>, InvalidParam> {
        if method != Method::Lora {
            let given = [
                ("lora_r", self.lora_r.is_some()),
                ("lora_alpha", self.lora_alpha.is_some()),
                ("lora_dropout", self.lora_dropout.is_some()),
                ("lora_target_modules", self.lora_target_modules.is_some()),
            ];
            if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
                return bad(name, "applies only with \"method\": \"lora\"");
            }
            return Ok(None);
        }
        let r = int_in("lora_r", self.lora_r, 8, 1, 256)?;
        let alpha = float_in("lora_alpha", self.lora_alpha, 2.0 * r as f64, 0.0, 4096.0, true)?;
        let dropout = float_in("lora_dropout", self.lora_dropout, 0.1, 0.0, 0.9, false)?;
        let targets = self.lora_target_modules.clone().unwrap_or_else(|| vec!["query".into(), "key".into(), "value".into()]);
        if targets.is_empty() {
            return bad("lora_target_modules", "must name at least one module");
        }
        let known = crate::model::encoder::arch::Arch::lora_names();
        if let Some(t) = targets.iter().find(|t| !known.contains(&t.as_str())) {
            return bad("lora_target_modules", format!("{t:?} is not a module LoRA can adapt here; use any of {}", known.join(", ")));
        }
        Ok(Some(LoraSettings { r, alpha, dropout, target_modules: targets }))
    }
}

/// The architecture of a model trained from scratch (the `config` of an `mlm` job).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchSpec {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
}

impl ScratchSpec {
    /// Checks the ranges; returns the offending field and why.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: &str| Err((format!("config.{f}"), m.to_string()));
        if !(1..=24).contains(&self.num_hidden_layers) {
            return bad("num_hidden_layers", "must be from 1 to 24");
        }
        if !(1..=32).contains(&self.num_attention_heads) {
            return bad("num_attention_heads", "must be from 1 to 32");
        }
        if !(8..=2048).contains(&self.hidden_size) || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad("hidden_size", "must be from 8 to 2048 and a multiple of num_attention_heads");
        }
        if self.intermediate_size.is_some_and(|i| !(8..=8192).contains(&i)) {
            return bad("intermediate_size", "must be from 8 to 8192");
        }
        if self.max_position_embeddings.is_some_and(|m| !(8..=2048).contains(&m)) {
            return bad("max_position_embeddings", "must be from 8 to 2048");
        }
        Ok(())
    }

    /// A BERT config of this shape for a tokenizer of `vocab_size` tokens.
    pub fn config(&self, vocab_size: usize, pad_token_id: usize) -> EncoderConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size.unwrap_or(4 * self.hidden_size),
            "max_position_embeddings": self.max_position_embeddings.unwrap_or(512),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": pad_token_id,
            "position_embedding_type": "absolute"
        }))
        .expect("a valid config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auto_cap_grows_with_classes_and_shrinks_with_rows() {
        // TREC-6's 4,952 rows: 40,000 examples need 9 passes; SST-2's first 8,000: 5.
        assert_eq!(auto_epochs_cap(4_952, 6), 9);
        assert_eq!(auto_epochs_cap(8_000, 2), 5);
        // banking77: 77 classes × 2,000 over 9,003 rows is 18 passes, held to 10.
        assert_eq!(auto_epochs_cap(9_003, 77), 10);
        // Large sets get the floor, tiny ones the ceiling.
        assert_eq!(auto_epochs_cap(67_349, 2), 3);
        assert_eq!(auto_epochs_cap(64, 2), 10);
    }

    fn with(method: &str) -> HyperparametersInput {
        HyperparametersInput { method: Some(method.into()), ..Default::default() }
    }

    #[test]
    fn each_method_has_its_own_default_rate_and_a_given_rate_wins() {
        let rate = |m: &str| with(m).resolve("cls", JobKind::FineTune).unwrap().learning_rate;
        assert_eq!((rate("full"), rate("lora"), rate("head")), (5e-5, 2e-3, 1e-2));
        let given = HyperparametersInput { learning_rate: Some(1e-4), ..with("lora") };
        assert_eq!(given.resolve("cls", JobKind::FineTune).unwrap().learning_rate, 1e-4);
    }

    #[test]
    fn the_rules_of_a_kind_of_job_are_checked_where_defaults_are_filled() {
        let refused = |hp: HyperparametersInput, kind| hp.resolve("cls", kind).unwrap_err().to_string();
        let warmup = HyperparametersInput { mlm_head_warmup_steps: Some(10), ..Default::default() };
        assert_eq!(
            refused(warmup.clone(), JobKind::FineTune),
            "hyperparameters.mlm_head_warmup_steps: applies only to masked-LM jobs (\"task\": \"mlm\")"
        );
        assert!(warmup.resolve("cls", JobKind::Pretrain { from_config: false }).is_ok());
        let anchor = HyperparametersInput { mlm_anchor_weight: Some(1.0), ..Default::default() };
        assert!(refused(anchor.clone(), JobKind::FineTune).starts_with("hyperparameters.mlm_anchor_weight: applies only"));
        assert!(refused(anchor.clone(), JobKind::Pretrain { from_config: true }).contains("starts from random weights"));
        assert!(anchor.resolve("cls", JobKind::Pretrain { from_config: false }).is_ok());
        assert_eq!(
            refused(with("lora"), JobKind::Pretrain { from_config: false }),
            "hyperparameters.method: masked-LM pre-training trains every weight: method must be \"full\""
        );
    }
}
