//! What a fine-tuning method trains: every weight (`full`), low-rank adapters on the encoder's
//! dense layers and the head (`lora`), or the pooler and head over a frozen encoder (`head`).
//! Frozen weights are plain tensors: no gradient is computed or kept for them, and the
//! optimizer holds no state for them.

use super::hyper::{LoraSettings, Method};
use crate::model::encoder::adapters::{Layout, LowRankSet, Target};
use crate::model::encoder::arch::Arch;
use crate::model::encoder::classifier::{Classifier, Pooling};
use crate::model::encoder::params::{fresh_head, Params};
use crate::model::encoder::post_norm::{encoder_params, Getter};
use crate::model::EncoderConfig;
use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// The trainable parameters of a fine-tuning job and the frozen weights beside them.
pub struct Trainable {
    pub method: Method,
    pub lora: Option<LoraSettings>,
    pub params: Params,
    pub frozen: HashMap<String, Tensor>,
    /// The frozen weights cast to the dtype the steps compute in (bf16, f16), made once: they
    /// never change, so casting them again each step would be wasted work.
    frozen_cast: std::sync::Mutex<Option<(candle_core::DType, HashMap<String, Tensor>)>>,
}

/// The encoder layers and targets a LoRA job adapts. A name means what it means to peft, which
/// matches module names by suffix: `output.dense` adapts `attention.output.dense` too. Each
/// module is adapted once however many names match it.
fn lora_targets(cfg: &EncoderConfig, lora: &LoraSettings) -> Vec<(usize, Target)> {
    let layout = cfg.arch().layout();
    let mut targets: Vec<Target> = Vec::new();
    for t in &lora.target_modules {
        for m in Arch::lora_targets_named(t).into_iter().map(|m| m.in_layout(layout)) {
            if !targets.contains(&m) {
                targets.push(m);
            }
        }
    }
    (0..cfg.num_hidden_layers).flat_map(|l| targets.iter().map(move |t| (l, *t))).collect()
}

/// Our names of a LoRA pair: `(….lora_A.weight, ….lora_B.weight)`.
fn pair_names(layer: usize, target: Target, layout: Layout) -> (String, String) {
    let module = target.weight_name(layer, layout);
    let module = module.trim_end_matches(".weight");
    (format!("{module}.lora_A.weight"), format!("{module}.lora_B.weight"))
}

impl Trainable {
    /// The parameters of a classifier with `num_labels` outputs over `weights` (the base) for
    /// `method`: the head is fresh unless `keep_head` (the base is already such a classifier,
    /// see [`super::objective::Task::continues_head`]); what else trains depends on the method.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: Method,
        lora: Option<LoraSettings>,
        cfg: &EncoderConfig,
        mut weights: HashMap<String, Tensor>,
        num_labels: usize,
        keep_head: bool,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let fresh_pooler = if keep_head { vec![] } else { fresh_head(cfg) };
        let fresh_classifier: &[&str] = if keep_head { &[] } else { &["classifier.weight", "classifier.bias"] };
        if method == Method::Full {
            let params = Params::for_classifier_with(cfg, &weights, num_labels, &fresh_pooler, rng, device)?;
            return Ok(Self { method, lora, params, frozen: HashMap::new(), frozen_cast: Default::default() });
        }
        // The encoder stays as the base has it, in f32 on the device, outside the parameters.
        let mut frozen = HashMap::new();
        for (name, shape) in encoder_params(cfg) {
            let t = weights.remove(&name).ok_or_else(|| anyhow::anyhow!("checkpoint has no tensor {name:?}"))?;
            anyhow::ensure!(t.dims() == shape.as_slice(), "tensor {name:?} has shape {:?}, config says {shape:?}", t.dims());
            frozen.insert(name, t.to_dtype(candle_core::DType::F32)?.to_device(device)?);
        }
        // The pooler as the base has it (freshly made where it has none): frozen for `lora`,
        // as in peft, where only the head is trained in full (unless the pooler is part of the
        // head, as RoBERTa's `classifier.dense`); trained for `head`.
        let h = cfg.hidden_size;
        let pooler_names = cfg.arch().pooler_names();
        let pooler_spec: Vec<(String, Vec<usize>)> = vec![(pooler_names[0].into(), vec![h, h]), (pooler_names[1].into(), vec![h])];
        let pooler = Params::build(cfg, &pooler_spec, &weights, &fresh_pooler, rng, device)?;
        let mut spec: Vec<(String, Vec<usize>)> = Vec::new();
        if method == Method::Lora && !cfg.arch().pooler_in_head() {
            for name in pooler_names {
                frozen.insert(name.to_string(), pooler.detached(name)?);
            }
        } else {
            for name in pooler_names {
                weights.insert(name.to_string(), pooler.detached(name)?);
            }
            spec.extend(pooler_spec);
        }
        if let (Method::Lora, Some(l)) = (&method, &lora) {
            for (layer, target) in lora_targets(cfg, l) {
                let layout = cfg.arch().layout();
                let (out, inp) = frozen[&target.weight_name(layer, layout)].dims2()?;
                let (a, b) = pair_names(layer, target, layout);
                spec.push((a, vec![l.r, inp]));
                spec.push((b, vec![out, l.r]));
            }
        }
        spec.push(("classifier.weight".into(), vec![num_labels, h]));
        spec.push(("classifier.bias".into(), vec![num_labels]));
        let params = Params::build(cfg, &spec, &weights, fresh_classifier, rng, device)?;
        Ok(Self { method, lora, params, frozen, frozen_cast: Default::default() })
    }

    /// The frozen weights in `dtype` (cast on first use, then kept).
    fn frozen_in(&self, dtype: candle_core::DType) -> Result<HashMap<String, Tensor>> {
        if self.frozen.values().all(|t| t.dtype() == dtype) {
            return Ok(self.frozen.clone());
        }
        let mut cache = self.frozen_cast.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, cast)) = cache.as_ref().filter(|(d, _)| *d == dtype) {
            return Ok(cast.clone());
        }
        let cast: HashMap<String, Tensor> = self.frozen.iter().map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?))).collect::<Result<_>>()?;
        *cache = Some((dtype, cast.clone()));
        Ok(cast)
    }

    /// The classifier over `weights` (the trainable parameters, tracked, detached or cast) and
    /// the frozen ones, with the adapter's low-rank terms for `lora`.
    pub fn model(&self, cfg: &EncoderConfig, pooling: Pooling, weights: &Getter) -> Result<Classifier> {
        let dtype = weights("classifier.weight")?.dtype();
        let cast = self.frozen_in(dtype)?;
        let get = |n: &str| match cast.get(n) {
            Some(t) => Ok(t.clone()),
            None => weights(n),
        };
        let model = Classifier::load(&get, cfg, pooling)?;
        let Some(l) = &self.lora else { return Ok(model) };
        let mut pairs = HashMap::new();
        for (layer, target) in lora_targets(cfg, l) {
            let (a, b) = pair_names(layer, target, cfg.arch().layout());
            pairs.insert((layer, target), (weights(&a)?, weights(&b)?));
        }
        Ok(model.with_low_rank(LowRankSet { pairs, scale: l.alpha / l.r as f64, dropout: l.dropout }))
    }

    /// Saves the trained classifier: a peft adapter directory for `lora` (over `base_dir`,
    /// named `base_id` where the base has an id a catalog resolves, else by its absolute path),
    /// a whole model directory otherwise.
    pub fn save(
        &self,
        out: &Path,
        cfg: &EncoderConfig,
        trained: &HashMap<String, Tensor>,
        base_dir: &Path,
        base_id: Option<&str>,
    ) -> anyhow::Result<()> {
        match &self.lora {
            Some(l) => {
                let base = match base_id {
                    Some(id) => id.to_string(),
                    None => base_dir.canonicalize().unwrap_or_else(|_| base_dir.to_path_buf()).to_string_lossy().into_owned(),
                };
                let targets = cfg.arch().peft_target_modules(&l.target_modules);
                let mut config = crate::model::hf::lora::AdapterConfig::for_classifier(&base, l.r, l.alpha, l.dropout, &targets);
                if cfg.is_token_classifier() {
                    config.task_type = Some("TOKEN_CLS".into());
                }
                crate::model::hf::lora::write_adapter_dir(out, cfg, trained, &config)
            }
            None => {
                let mut all = self.frozen.clone();
                all.extend(trained.iter().map(|(k, v)| (k.clone(), v.clone())));
                crate::model::hf::artifacts::write_model_dir(out, cfg, &all, base_dir)
            }
        }
    }
}
