//! ModernBERT's `config.json`: its own field names (old and new), what it means for the layers, and
//! the same config read as BERT's fields for the rest of the crate.

use serde::Deserialize;
use serde_json::{Map, Value};

/// ModernBERT's config fields read as BERT's (theirs, ours, transformers' default).
const AS_BERT: [(&str, &str, f64); 5] = [
    ("hidden_activation", "hidden_act", f64::NAN),
    ("norm_eps", "layer_norm_eps", 1e-5),
    ("mlp_dropout", "hidden_dropout_prob", 0.0),
    ("attention_dropout", "attention_probs_dropout_prob", 0.0),
    ("max_position_embeddings", "max_position_embeddings", 8192.0),
];

/// Marks the BERT fields [`config_to_bert`] added, so that saving drops them again.
const ADDED: &str = "_bert_fields_added";

/// Adds BERT's names for ModernBERT's fields to its `config.json` (no token types; the original
/// fields stay, for [`ModernBertConfig`]), after checking that it is a ModernBERT we run.
pub fn config_to_bert(map: &mut Map<String, Value>) -> anyhow::Result<()> {
    let cfg: ModernBertConfig = serde_json::from_value(Value::Object(map.clone()))?;
    cfg.check()?;
    let mut added = Vec::new();
    for (theirs, ours, default) in AS_BERT {
        let value = map.get(theirs).cloned().unwrap_or_else(|| match theirs {
            "hidden_activation" => Value::from("gelu"),
            _ => serde_json::Number::from_f64(default).map(Value::Number).unwrap_or(Value::Null),
        });
        if theirs != ours {
            map.insert(ours.to_string(), value);
            added.push(Value::from(ours));
        } else {
            map.entry(ours).or_insert(value);
        }
    }
    map.insert("type_vocab_size".into(), Value::from(0));
    added.push(Value::from("type_vocab_size"));
    // transformers' default; BERT's field of the same name defaults to 0.
    map.entry("pad_token_id").or_insert(Value::from(50283));
    map.insert(ADDED.into(), Value::Array(added));
    Ok(())
}

/// The inverse of [`config_to_bert`]: the config as transformers' `ModernBertConfig` reads it.
pub fn config_from_bert(map: &mut Map<String, Value>) {
    if let Some(Value::Array(added)) = map.remove(ADDED) {
        for name in added.iter().filter_map(Value::as_str) {
            map.remove(name);
        }
    }
}

/// Every encoder parameter of a ModernBERT (our name, shape), in checkpoint order: its own names,
/// without the `model.` a checkpoint with a head puts before them.
pub fn encoder_params(cfg: &ModernBertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut out: Vec<(String, Vec<usize>)> = vec![("embeddings.tok_embeddings.weight".into(), vec![v, h])];
    let norm = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        out.push((format!("{p}.weight"), vec![h]));
        if cfg.norm_bias {
            out.push((format!("{p}.bias"), vec![h]));
        }
    };
    let dense = |out: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, n: usize, bias: bool| {
        out.push((format!("{p}.weight"), vec![o, n]));
        if bias {
            out.push((format!("{p}.bias"), vec![o]));
        }
    };
    norm(&mut out, "embeddings.norm");
    for l in 0..cfg.num_hidden_layers {
        if l > 0 {
            norm(&mut out, &format!("layers.{l}.attn_norm"));
        }
        dense(&mut out, &format!("layers.{l}.attn.Wqkv"), 3 * h, h, cfg.attention_bias);
        dense(&mut out, &format!("layers.{l}.attn.Wo"), h, h, cfg.attention_bias);
        norm(&mut out, &format!("layers.{l}.mlp_norm"));
        dense(&mut out, &format!("layers.{l}.mlp.Wi"), 2 * i, h, cfg.mlp_bias);
        dense(&mut out, &format!("layers.{l}.mlp.Wo"), h, i, cfg.mlp_bias);
    }
    norm(&mut out, "final_norm");
    out
}

/// `config.json` of a ModernBERT checkpoint, as transformers writes it (older configs'
/// `global_rope_theta`/`local_rope_theta`, newer ones' `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "default_act")]
    pub classifier_activation: String,
    #[serde(default = "default_pooling")]
    pub classifier_pooling: String,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_local")]
    pub local_attention: usize,
    pub global_rope_theta: Option<f64>,
    /// 10,000 when the key is absent; an explicit `null` means the global theta, as transformers reads it.
    #[serde(default = "default_local_theta")]
    pub local_rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub mlp_dropout: f64,
    #[serde(default)]
    pub classifier_dropout: f64,
    #[serde(default = "default_true")]
    pub decoder_bias: bool,
}

fn default_true() -> bool {
    true
}

fn default_local_theta() -> Option<f64> {
    Some(10_000.0)
}
fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_pooling() -> String {
    "cls".into()
}
fn default_every() -> usize {
    3
}
fn default_local() -> usize {
    128
}

impl ModernBertConfig {
    /// Whether layer `i` attends globally (else over a sliding window): `layer_types` where the
    /// config has them, else every `global_attn_every_n_layers`-th layer from the first.
    pub fn is_global(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_none_or(|t| t == "full_attention"),
            None => i.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    /// The rotary base of global (`true`) or local layers.
    pub fn rope_theta(&self, global: bool) -> f64 {
        let key = if global { "full_attention" } else { "sliding_attention" };
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get(key)?.get("rope_theta")?.as_f64());
        let global_theta = || self.global_rope_theta.unwrap_or(160_000.0);
        match (nested, global) {
            (Some(theta), _) => theta,
            (None, true) => global_theta(),
            (None, false) => self.local_rope_theta.unwrap_or_else(global_theta),
        }
    }

    /// How far a local layer sees to each side: half of `local_attention`.
    pub fn window(&self) -> usize {
        self.local_attention / 2
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim().is_multiple_of(2),
            "hidden_size {} does not split into {} heads of an even size",
            self.hidden_size,
            self.num_attention_heads
        );
        for act in [&self.hidden_activation, &self.classifier_activation] {
            anyhow::ensure!(act == "gelu", "activation {act:?} is not one we run (gelu)");
        }
        anyhow::ensure!(["cls", "mean"].contains(&self.classifier_pooling.as_str()), "classifier_pooling {:?}", self.classifier_pooling);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ModernBertConfig;

    fn config(extra: &str) -> ModernBertConfig {
        let base = r#""vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 6, "num_attention_heads": 4"#;
        serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap()
    }

    #[test]
    fn older_configs_name_the_thetas_and_the_global_layers_directly() {
        let c =
            config(r#", "global_rope_theta": 80000.0, "local_rope_theta": 5000.0, "global_attn_every_n_layers": 3, "local_attention": 64"#);
        assert_eq!((c.rope_theta(true), c.rope_theta(false), c.window()), (80_000.0, 5_000.0, 32));
        // An explicit null local theta is the global one.
        let n = config(r#", "global_rope_theta": 80000.0, "local_rope_theta": null"#);
        assert_eq!(n.rope_theta(false), 80_000.0);
        assert_eq!((0..6).map(|i| c.is_global(i)).collect::<Vec<_>>(), [true, false, false, true, false, false]);
    }

    #[test]
    fn newer_configs_give_rope_parameters_and_layer_types() {
        let c = config(
            r#", "rope_parameters": {"full_attention": {"rope_theta": 1.6e5}, "sliding_attention": {"rope_theta": 1e4}},
               "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]"#,
        );
        assert_eq!((c.rope_theta(true), c.rope_theta(false)), (160_000.0, 10_000.0));
        assert_eq!((0..6).map(|i| c.is_global(i)).collect::<Vec<_>>(), [true, false, true, false, false, true]);
        // Defaults as transformers' ModernBertConfig: 128-token local windows, thetas 160k and 10k.
        let d = config("");
        assert_eq!((d.window(), d.rope_theta(true), d.rope_theta(false), d.norm_eps), (64, 160_000.0, 10_000.0, 1e-5));
    }
}
