//! The trainable parameters of a model: named `Var`s, built from a checkpoint plus fresh
//! tensors for whatever the checkpoint lacks (a new head, a missing pooler).

use super::bert::encoder_param_names;
use super::classifier::{HEAD_NAMES, POOLER_NAMES};
use super::config::BertConfig;
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

impl Params {
    /// Parameters of a sequence classifier with `num_labels` outputs: the encoder and pooler
    /// from `weights` (names without `bert.`), the head (and anything missing from the pooler)
    /// initialised as transformers does: weights ~ N(0, initializer_range), biases 0.
    pub fn for_classifier(
        cfg: &BertConfig,
        weights: &HashMap<String, Tensor>,
        num_labels: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let mut names = encoder_param_names(cfg);
        for n in encoder_param_names(cfg) {
            anyhow::ensure!(weights.contains_key(&n), "checkpoint has no tensor {n:?}");
        }
        names.extend(POOLER_NAMES.iter().map(|s| s.to_string()));
        names.extend(HEAD_NAMES.iter().map(|s| s.to_string()));
        let h = cfg.hidden_size;
        let fresh = |name: &str| -> (Vec<usize>, bool) {
            match name {
                "pooler.dense.weight" => (vec![h, h], true),
                "pooler.dense.bias" => (vec![h], false),
                "classifier.weight" => (vec![num_labels, h], true),
                _ => (vec![num_labels], false),
            }
        };
        let mut vars = Vec::with_capacity(names.len());
        for name in &names {
            let from_ckpt = weights.get(name).filter(|_| !name.starts_with("classifier."));
            let t = match from_ckpt {
                Some(t) => t.to_dtype(DType::F32)?.to_device(device)?,
                None => {
                    let (shape, is_weight) = fresh(name);
                    let n: usize = shape.iter().product();
                    let data = if is_weight { normal(rng, n, cfg.initializer_range) } else { vec![0f32; n] };
                    Tensor::from_vec(data, shape, device)?
                }
            };
            vars.push(Var::from_tensor(&t)?);
        }
        Ok(Self::new(names, vars))
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

    fn get(&self, name: &str) -> Result<&Var> {
        self.index
            .get(name)
            .map(|&i| &self.vars[i])
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter named {name}")))
    }

    /// A deep copy of every parameter (for keeping the best epoch).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.names.iter().zip(&self.vars).map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach()))).collect()
    }

    /// Whether weight decay applies: not to biases nor LayerNorm weights (transformers' rule).
    pub fn decays(name: &str) -> bool {
        !(name.ends_with(".bias") || name.contains("LayerNorm"))
    }

    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}
