//! Hugging Face model directories: checking them, loading their weights, and writing
//! trained classifiers atomically.

use crate::model::encoder::arch::Arch;
use crate::model::encoder::classifier::HEAD_NAMES;
use crate::model::encoder::config::EncoderConfig;
use anyhow::{bail, ensure, Context};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const CONFIG: &str = "config.json";
pub use super::tokenize::TOKENIZER;
pub const WEIGHTS: &str = "model.safetensors";
/// Tokenizer side files copied along when present, so transformers' `AutoTokenizer` loads too.
const TOKENIZER_EXTRAS: &[&str] = &["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"];

/// sentence-transformers' description of a checkpoint (its pooling above all): a model made from
/// one carries them, so `pooling: auto` resolves the same for the child as for its parent.
const SENTENCE_FILES: &[&str] =
    &["modules.json", "1_Pooling/config.json", "config_sentence_transformers.json", "sentence_bert_config.json"];

/// What a model directory holds, once checked.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub config: EncoderConfig,
    /// `Some(labels)` when the config names a sequence-classification architecture with `id2label`.
    pub labels: Option<Vec<String>>,
    pub problem_type: Option<String>,
    /// The pooling sentence-transformers recorded for this checkpoint (`modules.json`), if any.
    pub sentence_pooling: Option<String>,
}

impl ModelInfo {
    /// What `pooling: auto` means when fine-tuning from this model: the pooling it records, else
    /// the one sentence-transformers trained it with, else `cls`.
    pub fn auto_pooling(&self) -> String {
        self.config.pooling().or_else(|| self.sentence_pooling.clone()).unwrap_or_else(|| "cls".into())
    }
}

/// Checks that `dir` is a checkpoint we can load: config parses and names an architecture we run, the tokenizer
/// and weights exist, and the safetensors header is sound. Reads no tensor data.
pub fn inspect(dir: &Path) -> anyhow::Result<ModelInfo> {
    open(dir).map(|(info, _)| info)
}

/// [`inspect`], also handing on the tokenizer it checked (loaded as [`super::tokenize::load_tokenizer`]
/// does), so a loader need not parse `tokenizer.json` a second time (XLM-R's is 17 MB).
pub fn open(dir: &Path) -> anyhow::Result<(ModelInfo, tokenizers::Tokenizer)> {
    let config = EncoderConfig::from_file(&dir.join(CONFIG)).context("config.json")?;
    ensure!(dir.join(TOKENIZER).is_file(), "no tokenizer.json");
    let weights = dir.join(WEIGHTS);
    if !weights.is_file() {
        if dir.join("pytorch_model.bin").is_file() {
            bail!("only pytorch_model.bin: convert it to model.safetensors");
        }
        bail!("no model.safetensors");
    }
    let header = super::weights::check_header(&weights).context("model.safetensors")?;
    check_encoder(&header, &config).context("model.safetensors")?;
    let tokenizer = check_vocabulary(dir, &config)?;
    let is_classifier =
        config.architectures().iter().any(|a| a.ends_with("ForSequenceClassification") || a.ends_with("ForTokenClassification"));
    let labels = if is_classifier { config.id2label() } else { None };
    if let Some(labels) = &labels {
        check_head(&header, config.arch(), labels.len(), config.hidden_size)?;
    }
    let problem_type = config.problem_type();
    Ok((ModelInfo { labels, problem_type, sentence_pooling: sentence_pooling(dir), config }, tokenizer))
}

/// Refuses a classifier whose `id2label` does not name one label per output of its head
/// (predict would give scores without a label, or look labels up past the end), or whose head
/// does not read `hidden` inputs. A head that is missing is left to loading to report.
fn check_head(header: &HashMap<String, serde_json::Value>, arch: Arch, labels: usize, hidden: usize) -> anyhow::Result<()> {
    for (name, info) in header {
        let Some(ours) = arch.to_ours(name) else { continue };
        if !HEAD_NAMES.contains(&ours.as_str()) {
            continue;
        }
        let dim = |i: usize| info.get("shape").and_then(|s| s.get(i)).and_then(serde_json::Value::as_u64);
        ensure!(
            dim(0) == Some(labels as u64),
            "config.json's id2label names {labels} labels but the classifier head's {name} has {} outputs",
            dim(0).map_or_else(|| "no".to_string(), |n| n.to_string())
        );
        if ours == HEAD_NAMES[0] {
            ensure!(dim(1) == Some(hidden as u64), "the classifier head's {name} does not take hidden_size ({hidden}) inputs");
        }
    }
    Ok(())
}

/// Refuses a checkpoint whose encoder tensors are not all there in the shapes its config
/// gives, naming the first tensor that is missing or of another shape.
fn check_encoder(header: &HashMap<String, serde_json::Value>, config: &EncoderConfig) -> anyhow::Result<()> {
    let arch = config.arch();
    let shape = |info: &serde_json::Value| -> Option<Vec<usize>> {
        info.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect()
    };
    let held: HashMap<String, (&str, Option<Vec<usize>>)> =
        header.iter().filter_map(|(name, info)| Some((arch.to_ours(name)?, (name.as_str(), shape(info))))).collect();
    // A bare encoder (`BertModel`) names its tensors without the architecture's prefix.
    let prefixed = header.keys().any(|n| n.starts_with(arch.prefix()));
    for (name, want) in crate::model::encoder::post_norm::encoder_params(config) {
        match held.get(&name) {
            None => {
                let hf = arch.to_hf(&name);
                let hf = if prefixed { hf.as_str() } else { hf.strip_prefix(arch.prefix()).unwrap_or(&hf) };
                bail!("tensor {hf:?} is missing (config.json's {} model has it)", config.model_type)
            }
            Some((theirs, got)) if got.as_deref() != Some(want.as_slice()) => {
                let got = got.as_ref().map_or_else(|| "unreadable".to_string(), |g| format!("{g:?}"));
                bail!("tensor {theirs:?} has shape {got}; config.json says {want:?}")
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Loads the tokenizer, refusing one whose ids run past the word embeddings' rows.
fn check_vocabulary(dir: &Path, config: &EncoderConfig) -> anyhow::Result<tokenizers::Tokenizer> {
    let tok = super::tokenize::load_tokenizer(dir).context(TOKENIZER)?;
    let n = tok.get_vocab_size(true);
    ensure!(
        n <= config.vocab_size,
        "{TOKENIZER}: its vocabulary of {n} tokens does not fit the word embeddings' {} rows (config.json's vocab_size)",
        config.vocab_size
    );
    Ok(tok)
}

/// `mean` or `cls` when sentence-transformers files say how the checkpoint was trained.
fn sentence_pooling(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("1_Pooling").join("config.json")).ok()?;
    dir.join("modules.json").is_file().then_some(())?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("pooling_mode_mean_tokens").and_then(|b| b.as_bool()) == Some(true) {
        Some("mean".into())
    } else if v.get("pooling_mode_cls_token").and_then(|b| b.as_bool()) == Some(true) {
        Some("cls".into())
    } else {
        None
    }
}

/// Why a job of `task` with `method` cannot run on the checkpoint in `dir` (see
/// [`Arch::refusal`]); `None` when it can, or when its config cannot be read.
pub fn job_refusal(dir: &Path, task: &str, method: &str) -> Option<String> {
    EncoderConfig::from_file(&dir.join(CONFIG)).ok()?.arch().refusal(task, method)
}

/// The `model_type` that `dir/config.json` names, if it can be read.
pub fn model_type(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONFIG)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_type")?.as_str().map(String::from)
}

/// The longest input the model in `dir` takes (its position table's rows), if its config reads.
pub fn max_tokens(dir: &Path) -> Option<usize> {
    EncoderConfig::from_file(&dir.join(CONFIG)).ok().map(|c| c.max_tokens())
}

/// Why masked-LM pre-training cannot start from the checkpoint in `dir`, if it cannot (see
/// [`EncoderConfig::pretraining_refusal`]); `None` too when its config cannot be read (the job
/// then fails saying why).
pub fn pretraining_refusal(dir: &Path) -> Option<String> {
    EncoderConfig::from_file(&dir.join(CONFIG)).ok()?.pretraining_refusal()
}

/// All tensors of a checkpoint as f32 on `device`, under our (BERT) names: see
/// [`Arch::to_ours`]; the architecture is the one `config.json` names.
pub fn load_weights(dir: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let arch = EncoderConfig::from_file(&dir.join(CONFIG)).context("config.json")?.arch();
    // A classifier's head wins over a pooler that the same file also carries.
    super::weights::read_f32(&dir.join(WEIGHTS), device, |name| arch.to_ours(name), |ours, name| arch.to_hf(ours) == name)
        .with_context(|| format!("reading {}", dir.join(WEIGHTS).display()))
}

/// Writes a complete model directory to `dest`: built in a sibling temp dir, synced, then
/// renamed into place so that a crash never leaves half a model behind.
pub fn write_model_dir(dest: &Path, config: &EncoderConfig, tensors: &HashMap<String, Tensor>, tokenizer_dir: &Path) -> anyhow::Result<()> {
    write_atomically(dest, |tmp| {
        std::fs::write(tmp.join(CONFIG), config.to_json()?)?;
        let arch = config.arch();
        // A token classifier's head is one linear layer named `classifier` in every architecture.
        let token = config.is_token_classifier();
        let hf_name = |n: &str| if token && n.starts_with("classifier.") { n.to_string() } else { arch.to_hf(n) };
        let named: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| Ok((hf_name(n), t.contiguous()?))).collect::<anyhow::Result<_>>()?;
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(named, metadata, &tmp.join(WEIGHTS))?;
        std::fs::copy(tokenizer_dir.join(TOKENIZER), tmp.join(TOKENIZER))?;
        // A reranker or a tagger is no sentence embedder: sentence-transformers' files would
        // make its loaders take it for one.
        let embedder = config.head_task() != "rerank" && !config.is_token_classifier();
        let sentence: &[&str] = if embedder { SENTENCE_FILES } else { &[] };
        for extra in TOKENIZER_EXTRAS.iter().chain(sentence) {
            if tokenizer_dir.join(extra).is_file() {
                if let Some(parent) = Path::new(extra).parent() {
                    std::fs::create_dir_all(tmp.join(parent))?;
                }
                std::fs::copy(tokenizer_dir.join(extra), tmp.join(extra))?;
            }
        }
        Ok(())
    })
}

/// Makes directory `dest` whole or not at all: `fill` writes into a sibling temp dir, whose
/// files are synced before it is renamed into place (replacing any `dest`).
pub fn write_atomically(dest: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let parent = dest.parent().context("model path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let name = dest.file_name().context("model path has no name")?.to_string_lossy();
    let tmp = parent.join(format!(".tmp-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> anyhow::Result<()> {
        fill(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        if dest.exists() {
            std::fs::remove_dir_all(dest)?;
        }
        std::fs::rename(&tmp, dest)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
