//! `config.json` of a Hugging Face BERT-family checkpoint, keeping every field we do not use.

use super::arch::Arch;
use crate::model::ops::layers::Act;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The architecture fields we read; all other keys of `config.json` are kept in `extra`
/// so that a saved model carries them unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}
fn default_model_type() -> String {
    "bert".into()
}

impl EncoderConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::from_json(&text)
    }

    /// Reads and checks the text of a `config.json`, in the field names of its `model_type`
    /// (DistilBERT's are read as BERT's).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let mut map: Map<String, Value> = serde_json::from_str(text)?;
        match map.get("model_type").and_then(Value::as_str) {
            Some("distilbert") => super::distilbert::config_to_bert(&mut map)?,
            Some("modernbert") => super::modernbert::config::config_to_bert(&mut map)?,
            _ => {}
        }
        let cfg: Self = serde_json::from_value(Value::Object(map))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` transformers reads for this model, in its `model_type`'s field names.
    pub fn to_json(&self) -> anyhow::Result<Vec<u8>> {
        if !matches!(self.arch(), Arch::DistilBert | Arch::ModernBert) {
            return Ok(serde_json::to_vec_pretty(self)?);
        }
        let Value::Object(mut map) = serde_json::to_value(self)? else { anyhow::bail!("a config serialises to an object") };
        match self.arch() {
            Arch::DistilBert => super::distilbert::config_from_bert(&mut map),
            _ => super::modernbert::config::config_from_bert(&mut map),
        }
        Ok(serde_json::to_vec_pretty(&map)?)
    }

    /// Refuses configurations our BERT cannot run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            Arch::of(&self.model_type).is_some(),
            "model_type {:?} is not supported (supported: {})",
            self.model_type,
            Arch::supported_types().join(", ")
        );
        anyhow::ensure!(Act::parse(&self.hidden_act).is_some(), "hidden_act {:?} is not supported", self.hidden_act);
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size must be a multiple of num_attention_heads"
        );
        if self.arch() == Arch::Deberta {
            super::deberta::DebertaConfig::of(self)?;
        }
        if let Some(p) = self.extra.get("position_embedding_type").and_then(Value::as_str) {
            anyhow::ensure!(p == "absolute", "position_embedding_type {p:?} is not supported");
        }
        Ok(())
    }

    /// The feed-forward activation (GELU for a `hidden_act` [`EncoderConfig::validate`] refused).
    pub fn act(&self) -> Act {
        Act::parse(&self.hidden_act).unwrap_or(Act::Gelu)
    }

    /// The architecture `model_type` names (BERT for a type [`EncoderConfig::validate`] refused).
    pub fn arch(&self) -> Arch {
        Arch::of(&self.model_type).unwrap_or(Arch::Bert)
    }

    /// The width of the embeddings: ELECTRA's `embedding_size`, projected to the hidden size
    /// after the embeddings' LayerNorm when it differs; the hidden size elsewhere.
    pub fn embedding_size(&self) -> usize {
        self.extra.get("embedding_size").and_then(Value::as_u64).map_or(self.hidden_size, |e| e as usize)
    }

    /// Why masked-LM pre-training cannot start from this checkpoint, if it cannot (an ELECTRA
    /// discriminator: its masked LM is the generator, a model of its own).
    pub fn pretraining_refusal(&self) -> Option<String> {
        if let Some(why) = self.arch().refusal("mlm", "full") {
            return Some(why);
        }
        (!self.arch().pretrains()).then(|| {
            format!(
                "masked-LM pre-training of a {} checkpoint needs its generator (ELECTRA's masked LM), which this discriminator checkpoint does not hold",
                self.model_type
            )
        })
    }

    /// The position id of a text's first token (see [`Arch::position_offset`]).
    pub fn position_offset(&self) -> usize {
        self.arch().position_offset(self.pad_token_id)
    }

    /// The longest sequence the position table holds, special tokens included (RoBERTa's 514
    /// rows hold 512 tokens).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }

    /// Dropout before the classification head, as transformers resolves it.
    pub fn classifier_dropout_prob(&self) -> f64 {
        // DeBERTa's is `cls_dropout`.
        let deberta = self.extra.get("cls_dropout").and_then(Value::as_f64);
        self.classifier_dropout.or(deberta).unwrap_or(self.hidden_dropout_prob)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The `architectures` list, if any.
    pub fn architectures(&self) -> Vec<String> {
        self.extra
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// Labels by id from `id2label`, if the config has them.
    pub fn id2label(&self) -> Option<Vec<String>> {
        let map = self.extra.get("id2label")?.as_object()?;
        let mut pairs: Vec<(usize, String)> = map.iter().filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string()))).collect();
        pairs.sort();
        let ordered = pairs.iter().enumerate().all(|(i, (k, _))| i == *k);
        (ordered && !pairs.is_empty()).then(|| pairs.into_iter().map(|(_, v)| v).collect())
    }

    /// `problem_type`, if set.
    pub fn problem_type(&self) -> Option<String> {
        self.extra.get("problem_type").and_then(Value::as_str).map(String::from)
    }

    /// Sets the fields that make this a `BertForSequenceClassification` config.
    pub fn set_classifier(&mut self, labels: &[String], problem_type: Option<&str>, pooling: &str) {
        let id2label: Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (i.to_string(), Value::from(l.clone()))).collect();
        let label2id: Map<String, Value> = labels.iter().enumerate().map(|(i, l)| (l.clone(), Value::from(i))).collect();
        self.extra.insert("architectures".into(), Value::from(vec![Arch::class_name(&self.model_type, "ForSequenceClassification")]));
        self.extra.insert("id2label".into(), Value::Object(id2label));
        self.extra.insert("label2id".into(), Value::Object(label2id));
        match problem_type {
            Some(p) => self.extra.insert("problem_type".into(), Value::from(p)),
            None => self.extra.remove("problem_type"),
        };
        self.extra.insert("finetuned_pooling".into(), Value::from(pooling));
        if self.arch() == Arch::ModernBert && matches!(pooling, "cls" | "mean") {
            // transformers' ModernBertForSequenceClassification pools as this field says.
            self.extra.insert("classifier_pooling".into(), Value::from(pooling));
        }
    }

    /// Makes this the config of a token classifier (`…ForTokenClassification`) of `tags`.
    pub fn set_token_classifier(&mut self, tags: &[String]) {
        self.set_classifier(tags, None, "token");
        self.extra.insert("architectures".into(), Value::from(vec![Arch::class_name(&self.model_type, "ForTokenClassification")]));
        self.extra.insert("finetuned_task".into(), Value::from("token_classification"));
    }

    /// Whether this is the config of a token classifier.
    pub fn is_token_classifier(&self) -> bool {
        self.architectures().iter().any(|a| a.ends_with("ForTokenClassification"))
    }

    /// Marks a one-output classifier as a cross-encoder reranker: its score is the sigmoid of
    /// its logit, for us and for sentence-transformers' `CrossEncoder`.
    pub fn set_reranker(&mut self) {
        self.extra.insert("finetuned_task".into(), Value::from("rerank"));
        self.extra.insert("sentence_transformers".into(), serde_json::json!({"activation_fn": "torch.nn.modules.activation.Sigmoid"}));
    }

    /// What a classifier's head was trained for: `token_classification`, `regression`, `rerank`,
    /// `multi_label_classification` or `classification`. A one-output head with no `problem_type` is a reranker, as
    /// text-embeddings-inference and sentence-transformers take it.
    pub fn head_task(&self) -> &'static str {
        let problem = self.extra.get("problem_type").and_then(Value::as_str);
        let outputs = self.extra.get("id2label").and_then(Value::as_object).map_or(0, |m| m.len());
        if self.is_token_classifier() {
            return "token_classification";
        }
        match problem {
            Some("multi_label_classification") => "multi_label_classification",
            Some("regression") => "regression",
            _ if self.extra.get("finetuned_task").and_then(Value::as_str) == Some("rerank") => "rerank",
            None if outputs == 1 => "rerank",
            _ => "classification",
        }
    }

    /// Makes this the config of a masked LM (`…ForMaskedLM`), without a classifier's fields.
    pub fn set_masked_lm(&mut self) {
        for key in ["id2label", "label2id", "problem_type", "finetuned_pooling", "finetuned_task", "sentence_transformers"] {
            self.extra.remove(key);
        }
        self.extra.insert("architectures".into(), Value::from(vec![Arch::class_name(&self.model_type, "ForMaskedLM")]));
    }

    /// The pooling a classifier was trained with (`cls` unless we recorded otherwise).
    pub fn pooling(&self) -> Option<String> {
        let ours = self.extra.get("finetuned_pooling");
        // A ModernBERT classifier pools as its `classifier_pooling` says, whoever trained it.
        let modern = (self.arch() == Arch::ModernBert).then(|| self.extra.get("classifier_pooling")).flatten();
        ours.or(modern).and_then(Value::as_str).map(String::from)
    }

    /// Records a multi-label classifier's decision threshold per label (tuned on validation).
    pub fn set_thresholds(&mut self, labels: &[String], thresholds: &[f32]) {
        let map: Map<String, Value> = labels.iter().zip(thresholds).map(|(l, &t)| (l.clone(), Value::from(t as f64))).collect();
        self.extra.insert("finetuned_thresholds".into(), Value::Object(map));
    }

    /// Records the temperature that calibrates the classifier's probabilities (fitted on
    /// validation; [`crate::train::calibration`]).
    pub fn set_temperature(&mut self, temperature: f32) {
        self.extra.insert("finetuned_temperature".into(), Value::from(temperature as f64));
    }

    /// The recorded calibration temperature; 1 (none) when the config records none.
    pub fn temperature(&self) -> f32 {
        self.extra.get("finetuned_temperature").and_then(Value::as_f64).filter(|t| t.is_finite() && *t > 0.0).map_or(1.0, |t| t as f32)
    }

    /// The recorded threshold of each of `labels` (0.5 for one not recorded); `None` when the
    /// config records none.
    pub fn thresholds(&self, labels: &[String]) -> Option<Vec<f32>> {
        let map = self.extra.get("finetuned_thresholds")?.as_object()?;
        Some(labels.iter().map(|l| map.get(l).and_then(Value::as_f64).map_or(0.5, |t| t.clamp(0.0, 1.0) as f32)).collect())
    }
}
