//! LoRA adapters in the layout Hugging Face `peft` writes and reads: `adapter_config.json` and
//! `adapter_model.safetensors` (the low-rank pairs and the fully trained head) over a base
//! model the config names. Served by merging: `W + scale · B·A` for each adapted layer.

use crate::model::encoder::adapters::{LowRankSet, Target};
use crate::model::encoder::arch::Arch;
use crate::model::encoder::classifier::HEAD_NAMES;
use crate::model::encoder::config::EncoderConfig;
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The fields of peft's `adapter_config.json` that decide what the adapter computes. Fields this
/// crate cannot honour are refused at load rather than ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (the last path component, e.g. `query`) or, as peft allows, a regex string.
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// Reads and checks `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).context(ADAPTER_CONFIG)?;
        let cfg: Self = serde_json::from_str(&text).context(ADAPTER_CONFIG)?;
        ensure!(cfg.peft_type == "LORA", "{ADAPTER_CONFIG}: peft_type {:?} is not supported (only LORA)", cfg.peft_type);
        ensure!(cfg.r > 0, "{ADAPTER_CONFIG}: r must be at least 1");
        ensure!(!cfg.use_dora, "{ADAPTER_CONFIG}: DoRA adapters (use_dora) are not supported");
        ensure!(!cfg.fan_in_fan_out, "{ADAPTER_CONFIG}: fan_in_fan_out is not supported (BERT's layers are not Conv1D)");
        ensure!(matches!(cfg.bias.as_deref(), None | Some("none")) && !cfg.lora_bias, "{ADAPTER_CONFIG}: trained biases are not supported");
        ensure!(
            cfg.rank_pattern.is_empty() && cfg.alpha_pattern.is_empty(),
            "{ADAPTER_CONFIG}: rank_pattern and alpha_pattern are not supported"
        );
        Ok(cfg)
    }

    /// The factor of `B·A`: `alpha / r`, or `alpha / √r` for rank-stabilised LoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// Does `dir` hold a peft adapter?
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// A loaded adapter: low-rank pairs keyed by the weight they change (our names, without
/// see `arch`), and the tensors it replaces whole (the head, any other `modules_to_save`).
pub struct Adapter {
    pub config: AdapterConfig,
    /// `weight name → (A [r, in], B [out, r])`.
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
    pub replaced: HashMap<String, Tensor>,
}

impl Adapter {
    /// Loads `dir`'s adapter as f32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let config = AdapterConfig::read(dir)?;
        let path = dir.join(ADAPTER_WEIGHTS);
        let raw = candle_core::safetensors::load(&path, device).with_context(|| format!("reading {}", path.display()))?;
        let (mut a, mut b, mut replaced) = (HashMap::new(), HashMap::new(), HashMap::new());
        // The encoder's prefix in the names says which architecture the adapter was made for.
        let arch = Arch::of_names(raw.keys().map(|n| n.strip_prefix("base_model.model.").unwrap_or(n)));
        for (name, t) in raw {
            let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
            let theirs = name.strip_prefix("base_model.model.").unwrap_or(&name);
            let Some(ours) = arch.to_ours(theirs) else { continue };
            let ours = ours.as_str();
            if let Some(module) = ours.strip_suffix(".lora_A.weight") {
                a.insert(format!("{module}.weight"), t);
            } else if let Some(module) = ours.strip_suffix(".lora_B.weight") {
                b.insert(format!("{module}.weight"), t);
            } else {
                ensure!(!ours.contains("lora_"), "{ADAPTER_WEIGHTS}: {name} is not a LoRA weight this crate reads");
                replaced.insert(ours.to_string(), t);
            }
        }
        let mut pairs = BTreeMap::new();
        for (weight, a) in a {
            let b = b.remove(&weight).with_context(|| format!("{ADAPTER_WEIGHTS}: {weight} has lora_A but no lora_B"))?;
            ensure!(
                a.dim(0)? == config.r && b.dim(1)? == config.r,
                "{ADAPTER_WEIGHTS}: {weight}'s pair is not of rank {} ({:?}, {:?})",
                config.r,
                a.dims(),
                b.dims()
            );
            pairs.insert(weight, (a, b));
        }
        if let Some(weight) = b.keys().next() {
            bail!("{ADAPTER_WEIGHTS}: {weight} has lora_B but no lora_A");
        }
        Ok(Self { config, pairs, replaced })
    }

    /// Outputs of the head the adapter carries (`classifier.weight`'s rows), if it has one.
    pub fn num_labels(&self) -> Option<usize> {
        self.replaced.get(HEAD_NAMES[0]).and_then(|w| w.dim(0).ok())
    }

    /// Applies the adapter to a base model's `weights` (our names): each adapted weight becomes
    /// `W + scale · B·A`, and the replaced tensors are put in.
    pub fn merge_into(&self, weights: &mut HashMap<String, Tensor>) -> anyhow::Result<()> {
        let scale = self.config.scale();
        for (name, (a, b)) in &self.pairs {
            let w = weights.get(name).with_context(|| format!("the adapter changes {name}, which the base does not have"))?;
            let delta = (b.matmul(a)? * scale)?;
            ensure!(delta.dims() == w.dims(), "the adapter's {name} is {:?}; the base's is {:?}", delta.dims(), w.dims());
            let merged = (w + delta)?;
            weights.insert(name.clone(), merged);
        }
        for (name, t) in &self.replaced {
            weights.insert(name.clone(), t.clone());
        }
        Ok(())
    }
}

impl LowRankSet {
    /// The pairs of a loaded peft adapter (those on the encoder's dense layers; an adapter of
    /// the pooler is not one this forward pass adds).
    pub fn from_adapter(adapter: &Adapter) -> Self {
        let pairs = adapter.pairs.iter().filter_map(|(name, ab)| Target::of_weight(name).map(|key| (key, ab.clone()))).collect();
        Self { pairs, scale: adapter.config.scale(), dropout: adapter.config.lora_dropout }
    }
}

/// Maps a base's id to its model dir, if it knows the id.
pub type BaseResolver = std::sync::Arc<dyn Fn(&str) -> Option<PathBuf> + Send + Sync>;

static BASE_RESOLVERS: std::sync::RwLock<Vec<BaseResolver>> = std::sync::RwLock::new(Vec::new());

/// Adds a way to find an adapter's base by the id it names (the service adds its catalog's
/// folders and its hub cache; see [`find_base`] for the order).
pub fn add_base_resolver(resolve: BaseResolver) {
    BASE_RESOLVERS.write().unwrap_or_else(|e| e.into_inner()).push(resolve);
}

/// Finds the base an adapter names: an absolute path to a model dir as it is; the entry of
/// that name in `search` (a folder of model dirs: the adapter's own); an id a resolver added
/// with [`add_base_resolver`] knows; else the entry of `search` whose name matches the last
/// component of the hub id or path, ignoring case (`sentence-transformers/all-MiniLM-L6-v2` →
/// `all-minilm-l6-v2`).
pub fn find_base(cfg: &AdapterConfig, search: &Path) -> anyhow::Result<PathBuf> {
    let named = cfg.base_model_name_or_path.as_deref().context("adapter_config.json names no base_model_name_or_path")?;
    let as_path = Path::new(named);
    if as_path.is_absolute() && as_path.join(super::artifacts::CONFIG).is_file() {
        return Ok(as_path.to_path_buf());
    }
    let is_base = |d: &Path| d.join(super::artifacts::CONFIG).is_file() && !is_adapter(d);
    if !named.is_empty() && is_base(&search.join(named)) {
        return Ok(search.join(named));
    }
    let resolvers = BASE_RESOLVERS.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(dir) = resolvers.iter().filter_map(|resolve| resolve(named)).find(|d| is_base(d)) {
        return Ok(dir);
    }
    let last = named.trim_end_matches('/').rsplit('/').next().unwrap_or(named);
    if !last.is_empty() && is_base(&search.join(last)) {
        return Ok(search.join(last));
    }
    for entry in std::fs::read_dir(search).into_iter().flatten().flatten() {
        let dir = entry.path();
        if entry.file_name().to_string_lossy().eq_ignore_ascii_case(last)
            && dir.join(super::artifacts::CONFIG).is_file()
            && !is_adapter(&dir)
        {
            return Ok(dir);
        }
    }
    bail!("the adapter's base {named:?} is not in {}", search.display())
}

/// An adapter directory, checked: the base it applies to, and the classifier it makes.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub config: AdapterConfig,
    pub base: PathBuf,
    /// The classifier the adapter makes: the base's config, or the adapter dir's own
    /// `config.json` where it has one (labels, pooling); labels `LABEL_i` otherwise, as
    /// transformers names them.
    pub info: super::artifacts::ModelInfo,
}

/// Checks the adapter in `dir` against its base (found in `dir`'s parent folder, see
/// [`find_base`]): it must carry a classifier head whose outputs match the labels.
pub fn inspect_adapter(dir: &Path) -> anyhow::Result<AdapterInfo> {
    check_adapter(dir).map(|(info, _)| info)
}

/// [`inspect_adapter`], also handing on the tokenizer to use: the adapter's own
/// `tokenizer.json` where it has one, else the base's that inspecting it loaded.
pub fn open_adapter(dir: &Path) -> anyhow::Result<(AdapterInfo, tokenizers::Tokenizer)> {
    let (info, base_tokenizer) = check_adapter(dir)?;
    let tokenizer = match dir.join(super::artifacts::TOKENIZER).is_file() {
        true => super::tokenize::load_tokenizer(dir)?,
        false => base_tokenizer,
    };
    Ok((info, tokenizer))
}

/// The adapter checked against its base, and the base's tokenizer.
fn check_adapter(dir: &Path) -> anyhow::Result<(AdapterInfo, tokenizers::Tokenizer)> {
    let adapter = Adapter::load(dir, &Device::Cpu)?;
    let search = dir.parent().context("an adapter dir has a parent")?;
    let base = find_base(&adapter.config, search)?;
    let (base_info, base_tokenizer) = super::artifacts::open(&base).with_context(|| format!("the adapter's base {}", base.display()))?;
    let n = adapter.num_labels().context("the adapter carries no classifier head (classifier in modules_to_save)")?;
    let own = dir.join(super::artifacts::CONFIG);
    let mut info = base_info;
    if own.is_file() {
        info.config = EncoderConfig::from_file(&own).context("the adapter's config.json")?;
        info.problem_type = info.config.problem_type();
    } else {
        info.problem_type = None;
    }
    let labels = info.config.id2label().unwrap_or_else(|| (0..n).map(|i| format!("LABEL_{i}")).collect());
    ensure!(labels.len() == n, "the adapter's id2label names {} labels but its head has {n} outputs", labels.len());
    info.labels = Some(labels);
    Ok((AdapterInfo { config: adapter.config, base, info }, base_tokenizer))
}

/// Writes a LoRA classifier as an adapter directory peft loads (`PeftModel.from_pretrained`
/// over `base`): `adapter_config.json`, `adapter_model.safetensors` with the pairs and the
/// head under peft's names, and the classifier's `config.json` (its labels and pooling, which
/// peft ignores and this crate reads). `tensors` are ours: `….lora_A.weight`,
/// `….lora_B.weight` and `classifier.*`.
pub fn write_adapter_dir(
    dest: &Path,
    classifier: &EncoderConfig,
    tensors: &HashMap<String, Tensor>,
    config: &AdapterConfig,
) -> anyhow::Result<()> {
    super::artifacts::write_atomically(dest, |tmp| {
        std::fs::write(tmp.join(ADAPTER_CONFIG), serde_json::to_vec_pretty(config)?)?;
        std::fs::write(tmp.join(super::artifacts::CONFIG), classifier.to_json()?)?;
        let named: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| {
                // A token classifier's head is one linear layer named `classifier` in every architecture.
                let hf =
                    if classifier.is_token_classifier() && n.starts_with("classifier.") { n.clone() } else { classifier.arch().to_hf(n) };
                Ok((format!("base_model.model.{hf}"), t.contiguous()?))
            })
            .collect::<anyhow::Result<_>>()?;
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(named, metadata, &tmp.join(ADAPTER_WEIGHTS))?;
        Ok(())
    })
}

impl AdapterConfig {
    /// The config peft writes for a sequence-classification LoRA over `base`.
    pub fn for_classifier(base: &str, r: usize, alpha: f64, dropout: f64, targets: &[String]) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("SEQ_CLS".into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: serde_json::json!(targets),
            base_model_name_or_path: Some(base.into()),
            modules_to_save: Some(vec!["classifier".into(), "score".into()]),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            bias: Some("none".into()),
            lora_bias: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// Writes to `dest` the whole Hugging Face classifier that the adapter in `dir` makes: its base
/// with every low-rank pair merged in and its head, the base's tokenizer, and the classifier's
/// config (labels, pooling). transformers loads it without peft.
pub fn write_merged(dir: &Path, dest: &Path) -> anyhow::Result<()> {
    let info = inspect_adapter(dir)?;
    let mut weights = super::artifacts::load_weights(&info.base, &Device::Cpu)?;
    Adapter::load(dir, &Device::Cpu)?.merge_into(&mut weights)?;
    let mut config = info.info.config.clone();
    let labels = info.info.labels.clone().unwrap_or_default();
    // A one-output head without a problem type is a reranker, which keeps having none.
    let problem_type = info.info.problem_type.clone().or_else(|| (labels.len() != 1).then(|| "single_label_classification".into()));
    let pooling = config.pooling().unwrap_or_else(|| "cls".into());
    if config.is_token_classifier() {
        config.set_token_classifier(&labels);
    } else {
        config.set_classifier(&labels, problem_type.as_deref(), &pooling);
    }
    super::artifacts::write_model_dir(dest, &config, &weights, &info.base)
}
