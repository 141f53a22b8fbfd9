//! DeBERTa-v2/v3's config fields beyond BERT's, and the encoder's tensor names.

use serde::{Deserialize, Deserializer};

/// The fields of a `deberta-v2` config that shape the encoder and its head.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Width of the word embeddings, projected to the hidden size where it differs.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    /// Absolute position embeddings added to the input (DeBERTa-v3 has none).
    #[serde(default = "yes")]
    pub position_biased_input: bool,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "minus_one")]
    pub position_buckets: i64,
    /// `c2p` (content to position) and `p2c` (position to content), as a list or `"p2c|c2p"`.
    #[serde(default, deserialize_with = "att_types")]
    pub pos_att_type: Vec<String>,
    /// The relative embeddings go through the layer's own query and key projections.
    #[serde(default)]
    pub share_att_key: bool,
    /// `"layer_norm"`: the relative embeddings are normalised (`encoder.LayerNorm`) first.
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    /// A convolution after the first layer (DeBERTa-v2 xlarge and up); not run here.
    #[serde(default)]
    pub conv_kernel_size: usize,
}

fn eps() -> f64 {
    1e-7
}

fn yes() -> bool {
    true
}

fn minus_one() -> i64 {
    -1
}

fn att_types<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Joined(String),
        None,
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::List(v)) => v.into_iter().map(|s| s.trim().to_lowercase()).collect(),
        Some(Either::Joined(s)) => s.split('|').map(|s| s.trim().to_lowercase()).filter(|s| !s.is_empty()).collect(),
        Some(Either::None) | None => vec![],
    })
}

impl DebertaConfig {
    /// The DeBERTa fields of a config read as [`crate::model::EncoderConfig`].
    pub fn of(cfg: &crate::model::EncoderConfig) -> anyhow::Result<Self> {
        let c: Self = serde_json::from_value(serde_json::to_value(cfg)?)?;
        anyhow::ensure!(
            c.conv_kernel_size == 0,
            "deberta-v2 checkpoints with a convolution layer (conv_kernel_size > 0) are not supported"
        );
        Ok(c)
    }

    /// Whether the attention adds the `kind` (`c2p`, `p2c`) term.
    pub fn has(&self, kind: &str) -> bool {
        self.relative_attention && self.pos_att_type.iter().any(|t| t == kind)
    }

    /// The largest relative distance the positions are bucketed within.
    pub fn max_relative(&self) -> i64 {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings as i64
        } else {
            self.max_relative_positions
        }
    }

    /// Half the rows of the relative embeddings (`att_span`).
    pub fn span(&self) -> usize {
        if self.position_buckets > 0 {
            self.position_buckets as usize
        } else {
            self.max_relative() as usize
        }
    }

    pub fn embedding_width(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    pub fn norm_rel(&self) -> bool {
        self.norm_rel_ebd.as_deref().is_some_and(|s| s.split('|').any(|p| p.trim() == "layer_norm"))
    }
}

/// Every encoder parameter (our name, shape): transformers' names under `deberta.`.
pub fn encoder_params(c: &DebertaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, e) = (c.hidden_size, c.intermediate_size, c.embedding_width());
    let mut out: Vec<(String, Vec<usize>)> = vec![("embeddings.word_embeddings.weight".into(), vec![c.vocab_size, e])];
    if c.position_biased_input {
        out.push(("embeddings.position_embeddings.weight".into(), vec![c.max_position_embeddings, e]));
    }
    if c.type_vocab_size > 0 {
        out.push(("embeddings.token_type_embeddings.weight".into(), vec![c.type_vocab_size, e]));
    }
    if e != h {
        out.push(("embeddings.embed_proj.weight".into(), vec![h, e]));
    }
    out.push(("embeddings.LayerNorm.weight".into(), vec![h]));
    out.push(("embeddings.LayerNorm.bias".into(), vec![h]));
    let mut dense = |name: String, o: usize, n: usize| {
        out.push((format!("{name}.weight"), vec![o, n]));
        out.push((format!("{name}.bias"), vec![o]));
    };
    for l in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for part in ["query_proj", "key_proj", "value_proj"] {
            dense(format!("{p}.attention.self.{part}"), h, h);
        }
        if c.relative_attention && !c.share_att_key {
            if c.has("c2p") {
                dense(format!("{p}.attention.self.pos_key_proj"), h, h);
            }
            if c.has("p2c") {
                dense(format!("{p}.attention.self.pos_query_proj"), h, h);
            }
        }
        dense(format!("{p}.attention.output.dense"), h, h);
        dense(format!("{p}.intermediate.dense"), i, h);
        dense(format!("{p}.output.dense"), h, i);
    }
    for l in 0..c.num_hidden_layers {
        // LayerNorms after the dense layers, in the order a checkpoint lists them.
        for part in ["attention.output.LayerNorm", "output.LayerNorm"] {
            out.push((format!("encoder.layer.{l}.{part}.weight"), vec![h]));
            out.push((format!("encoder.layer.{l}.{part}.bias"), vec![h]));
        }
    }
    if c.relative_attention {
        out.push(("encoder.rel_embeddings.weight".into(), vec![2 * c.span(), h]));
        if c.norm_rel() {
            out.push(("encoder.LayerNorm.weight".into(), vec![h]));
            out.push(("encoder.LayerNorm.bias".into(), vec![h]));
        }
    }
    out
}

/// transformers' `make_log_bucket_position` and `build_relative_position`: the relative
/// position of query `i` to key `j` (`i − j`), beyond `buckets / 2` on a log scale up to
/// `max_position`. Row-major `[s, s]`.
pub fn relative_positions(s: usize, buckets: i64, max_position: i64) -> Vec<i64> {
    let mut out = Vec::with_capacity(s * s);
    for i in 0..s as i64 {
        for j in 0..s as i64 {
            let rel = i - j;
            out.push(if buckets > 0 && max_position > 0 { log_bucket(rel, buckets, max_position) } else { rel });
        }
    }
    out
}

fn log_bucket(rel: i64, buckets: i64, max_position: i64) -> i64 {
    let mid = buckets / 2;
    let abs = if rel < mid && rel > -mid { mid - 1 } else { rel.abs() };
    if abs <= mid {
        return rel;
    }
    // In f32, as torch computes it on an int tensor's float view.
    let (abs, mid_f) = (abs as f32, mid as f32);
    let log_pos = ((abs / mid_f).ln() / (((max_position - 1) as f32) / mid_f).ln() * (mid - 1) as f32).ceil() + mid_f;
    (log_pos * rel.signum() as f32) as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_checkpoint_with_a_convolution_layer_is_refused_on_load_saying_so() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/golden/deberta-v2/base/config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(crate::model::EncoderConfig::from_json(&cfg.to_string()).is_ok());
        cfg["conv_kernel_size"] = 3.into();
        let err = crate::model::EncoderConfig::from_json(&cfg.to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("conv_kernel_size"), "{err:#}");
        // The list or the older `"p2c|c2p"` string of attention terms.
        cfg["conv_kernel_size"] = 0.into();
        cfg["pos_att_type"] = "p2c|c2p".into();
        let c = super::DebertaConfig::of(&crate::model::EncoderConfig::from_json(&cfg.to_string()).unwrap()).unwrap();
        assert!(c.has("p2c") && c.has("c2p"));
    }

    #[test]
    fn near_positions_stay_and_far_ones_fall_in_log_buckets() {
        // deberta-v3-base: 256 buckets over 512 positions.
        let row = |i: usize| super::relative_positions(600, 256, 512)[i * 600..(i + 1) * 600].to_vec();
        let r = row(300);
        assert_eq!((r[300], r[299], r[301], r[300 - 127], r[300 + 127]), (0, 1, -1, 127, -127));
        // Beyond 128 the buckets grow logarithmically, up to 255 at the largest distances.
        assert!(r[0] > 128 && r[0] <= 255 && r[599] < -128 && r[599] >= -255, "{} {}", r[0], r[599]);
        assert!(r[300 - 130] >= r[300 - 129] && r[300 - 129] >= 128);
    }
}
