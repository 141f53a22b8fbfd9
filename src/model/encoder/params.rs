//! The trainable parameters of a model: named `Var`s, taken from a checkpoint where it has
//! them and freshly initialised (as transformers does) where it does not.

use super::config::EncoderConfig;
use super::post_norm::encoder_params;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Named trainable parameters, in a fixed order.
pub struct Params {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    index: HashMap<String, usize>,
}

/// Normal(0, std) samples from a seeded generator (Box–Muller).
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// How a parameter missing from the checkpoint starts: transformers' rules.
fn init(name: &str, shape: &[usize], cfg: &EncoderConfig, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("lora_B.weight") {
        // peft's start: B at zero, so the adapted model begins as its base.
        vec![0.0; n]
    } else if name.ends_with("lora_A.weight") {
        // peft's start for A: uniform within ±1/√fan_in (kaiming_uniform with a = √5).
        let bound = 1.0 / (shape[1] as f64).sqrt();
        (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
    } else if name.contains("LayerNorm.weight") || name.ends_with("norm.weight") {
        vec![1.0; n]
    } else if name.ends_with(".bias") || name.contains("LayerNorm") || name == "cls.predictions.bias" {
        vec![0.0; n]
    } else if cfg.arch() == super::arch::Arch::ModernBert {
        // transformers' ModernBERT: normal within ±2σ, σ the range over √(2·layers) for the head's
        // dense layer and 1/√hidden for the output layer.
        let std = match name {
            "classifier.weight" => (cfg.hidden_size as f64).powf(-0.5),
            _ => cfg.initializer_range / (2.0 * cfg.num_hidden_layers as f64).sqrt(),
        };
        normal(rng, n, std).into_iter().map(|x| x.clamp(-2.0 * std as f32, 2.0 * std as f32)).collect()
    } else {
        let mut w = normal(rng, n, cfg.initializer_range);
        if name.ends_with("embeddings.weight") && name.contains("word_embeddings") {
            // The padding row of the word embeddings starts at zero.
            let h = shape[1];
            w[cfg.pad_token_id * h..(cfg.pad_token_id + 1) * h].iter_mut().for_each(|x| *x = 0.0);
        }
        w
    }
}

/// The tensors a new classifier starts afresh, whatever its base holds: the output layer, and
/// the pooler's dense layer where it belongs to the head (RoBERTa's `classifier.dense`, which
/// transformers initialises anew even where the base carries a pooler; ELECTRA's; DistilBERT's
/// `pre_classifier`). BERT's pooler is pre-trained with the encoder and is kept, and so is
/// ModernBERT's `head`: its masked-LM checkpoints carry the head under the very names the
/// classifiers read, and transformers loads it from there.
pub fn fresh_head(cfg: &EncoderConfig) -> Vec<&'static str> {
    let mut fresh = vec!["classifier.weight", "classifier.bias"];
    if cfg.arch().pooler_in_head() && cfg.arch() != super::arch::Arch::ModernBert {
        fresh.extend(cfg.arch().pooler_names());
    }
    fresh
}

impl Params {
    /// Builds `spec` (name, shape): from `weights` when the checkpoint has the name with that
    /// shape and the name is not in `fresh`, else initialised from `rng`.
    pub fn build(
        cfg: &EncoderConfig,
        spec: &[(String, Vec<usize>)],
        weights: &HashMap<String, Tensor>,
        fresh: &[&str],
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut vars = Vec::with_capacity(spec.len());
        for (name, shape) in spec {
            let from_ckpt = weights.get(name).filter(|t| t.dims() == shape.as_slice() && !fresh.contains(&name.as_str()));
            let t = match from_ckpt {
                Some(t) => t.to_dtype(DType::F32)?.to_device(device)?,
                None => Tensor::from_vec(init(name, shape, cfg, rng), shape.clone(), device)?,
            };
            vars.push(Var::from_tensor(&t)?);
        }
        Ok(Self::new(spec.iter().map(|(n, _)| n.clone()).collect(), vars))
    }

    /// Parameters of a sequence classifier with `num_labels` outputs: the encoder (which the
    /// checkpoint must have) and BERT's pooler from `weights`, a fresh head (see [`fresh_head`]).
    pub fn for_classifier(
        cfg: &EncoderConfig,
        weights: &HashMap<String, Tensor>,
        num_labels: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::for_classifier_with(cfg, weights, num_labels, &fresh_head(cfg), rng, device)
    }

    /// [`Params::for_classifier`] with the tensors in `fresh` made new (none: the checkpoint's
    /// head is kept where its shapes fit).
    pub fn for_classifier_with(
        cfg: &EncoderConfig,
        weights: &HashMap<String, Tensor>,
        num_labels: usize,
        fresh: &[&str],
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut spec = encoder_params(cfg);
        for (n, shape) in &spec {
            match weights.get(n) {
                None => anyhow::bail!("checkpoint has no tensor {n:?}"),
                Some(t) if t.dims() != shape.as_slice() => anyhow::bail!("tensor {n:?} has shape {:?}, config says {shape:?}", t.dims()),
                _ => {}
            }
        }
        let h = cfg.hidden_size;
        let [dense, second] = cfg.arch().pooler_names();
        spec.push((dense.into(), vec![h, h]));
        spec.push((second.into(), vec![h]));
        spec.push(("classifier.weight".into(), vec![num_labels, h]));
        spec.push(("classifier.bias".into(), vec![num_labels]));
        Self::build(cfg, &spec, weights, fresh, rng, device)
    }

    pub fn new(names: Vec<String>, vars: Vec<Var>) -> Self {
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Self { names, vars, index }
    }

    /// The tracked tensor of a parameter (gradients flow into it).
    pub fn tracked(&self, name: &str) -> Result<Tensor> {
        self.get(name).map(|v| v.as_tensor().clone())
    }

    /// The same storage, detached from the graph: cheap forward passes for evaluation.
    pub fn detached(&self, name: &str) -> Result<Tensor> {
        self.get(name).map(|v| v.as_detached_tensor())
    }

    /// Overwrites a parameter's values (same shape).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        self.get(name)?.set(value)
    }

    fn get(&self, name: &str) -> Result<&Var> {
        self.index.get(name).map(|&i| &self.vars[i]).ok_or_else(|| candle_core::Error::Msg(format!("no parameter named {name}")))
    }

    /// A deep copy of every parameter (for keeping the best epoch).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.names.iter().zip(&self.vars).map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach()))).collect()
    }

    /// Whether weight decay applies: not to biases nor LayerNorm weights (transformers' rule).
    pub fn decays(name: &str) -> bool {
        // ModernBERT's norms are `…norm.weight`; BERT's `…LayerNorm.weight`.
        !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("norm.") || name == "cls.predictions.bias")
    }

    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}
