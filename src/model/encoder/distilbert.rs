//! DistilBERT as transformers writes it: BERT's post-norm layers under names of its own
//! (`transformer.layer.N.attention.q_lin`, `sa_layer_norm`, `ffn.lin1`…), a config with its own
//! field names (`dim`, `n_layers`, `hidden_dim`…), no token types, a head of
//! `pre_classifier` → ReLU → `classifier`, and a masked-LM head of `vocab_transform` →
//! `vocab_layer_norm` → `vocab_projector` (tied to the word embeddings).

use serde_json::{Map, Value};

/// DistilBERT's config fields and the BERT fields they are read as, with transformers'
/// defaults for a field a config leaves out.
const CONFIG: [(&str, &str, f64); 8] = [
    ("dim", "hidden_size", 768.0),
    ("n_layers", "num_hidden_layers", 6.0),
    ("n_heads", "num_attention_heads", 12.0),
    ("hidden_dim", "intermediate_size", 3072.0),
    ("dropout", "hidden_dropout_prob", 0.1),
    ("attention_dropout", "attention_probs_dropout_prob", 0.1),
    ("seq_classif_dropout", "classifier_dropout", 0.2),
    ("activation", "hidden_act", f64::NAN),
];

/// Fields we add to read the config as BERT's, removed again on save.
const ADDED: [&str; 2] = ["type_vocab_size", "layer_norm_eps"];

/// Rewrites a DistilBERT `config.json` into BERT's field names (no token types; LayerNorm's
/// epsilon fixed at 1e-12 as DistilBERT's modules have it).
pub fn config_to_bert(map: &mut Map<String, Value>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !map.get("sinusoidal_pos_embds").and_then(Value::as_bool).unwrap_or(false),
        "sinusoidal_pos_embds is not supported (DistilBERT with fixed sinusoidal positions)"
    );
    for (theirs, ours, default) in CONFIG {
        let value = match map.remove(theirs) {
            Some(v) => v,
            None if theirs == "activation" => Value::from("gelu"),
            None => serde_json::Number::from_f64(default).map(Value::Number).unwrap_or(Value::Null),
        };
        let value = match (ours, value.as_f64()) {
            // Sizes are integers in BERT's config.
            ("hidden_size" | "num_hidden_layers" | "num_attention_heads" | "intermediate_size", Some(x)) => Value::from(x as u64),
            _ => value,
        };
        map.insert(ours.to_string(), value);
    }
    map.insert("type_vocab_size".into(), Value::from(0));
    map.insert("layer_norm_eps".into(), Value::from(1e-12));
    Ok(())
}

/// The inverse of [`config_to_bert`]: the config as transformers' `DistilBertConfig` reads it.
pub fn config_from_bert(map: &mut Map<String, Value>) {
    for (theirs, ours, _) in CONFIG {
        if let Some(v) = map.remove(ours) {
            let v = if theirs == "seq_classif_dropout" && v.is_null() { Value::from(0.2) } else { v };
            map.insert(theirs.to_string(), v);
        }
    }
    for added in ADDED {
        map.remove(added);
    }
}

/// Our names of an encoder layer's tensors (after `encoder.layer.N.`) and DistilBERT's (after
/// `transformer.layer.N.`).
const LAYER: [(&str, &str); 8] = [
    ("attention.self.query.", "attention.q_lin."),
    ("attention.self.key.", "attention.k_lin."),
    ("attention.self.value.", "attention.v_lin."),
    ("attention.output.dense.", "attention.out_lin."),
    ("attention.output.LayerNorm.", "sa_layer_norm."),
    ("intermediate.dense.", "ffn.lin1."),
    ("output.dense.", "ffn.lin2."),
    ("output.LayerNorm.", "output_layer_norm."),
];

/// The head tensors: (our prefix, DistilBERT's).
pub const HEADS: [(&str, &str); 4] = [
    ("pooler.dense.", "pre_classifier."),
    ("cls.predictions.transform.dense.", "vocab_transform."),
    ("cls.predictions.transform.LayerNorm.", "vocab_layer_norm."),
    ("cls.predictions.bias", "vocab_projector.bias"),
];

/// Swaps a layer tensor's name between the two namings: `from` and `to` are the layers'
/// prefixes, and `to_ours` says which way [`LAYER`] is read.
fn swap_layer(name: &str, from: &str, to: &str, to_ours: bool) -> Option<String> {
    let rest = name.strip_prefix(from)?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    LAYER.iter().find_map(|(ours, theirs)| {
        let (matched, put) = if to_ours { (theirs, ours) } else { (ours, theirs) };
        part.strip_prefix(matched).map(|tail| format!("{to}{layer}.{put}{tail}"))
    })
}

/// Our name of an encoder tensor (the part after `distilbert.`).
pub fn encoder_to_ours(name: &str) -> String {
    swap_layer(name, "transformer.layer.", "encoder.layer.", true).unwrap_or_else(|| name.to_string())
}

/// DistilBERT's name of one of our encoder tensors (without `distilbert.`).
pub fn encoder_to_hf(name: &str) -> String {
    swap_layer(name, "encoder.layer.", "transformer.layer.", false).unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_go_both_ways() {
        for (ours, theirs) in [
            ("encoder.layer.3.attention.self.query.weight", "transformer.layer.3.attention.q_lin.weight"),
            ("encoder.layer.0.attention.output.dense.bias", "transformer.layer.0.attention.out_lin.bias"),
            ("encoder.layer.0.output.dense.weight", "transformer.layer.0.ffn.lin2.weight"),
            ("encoder.layer.11.output.LayerNorm.bias", "transformer.layer.11.output_layer_norm.bias"),
            ("encoder.layer.1.attention.self.value.lora_A.weight", "transformer.layer.1.attention.v_lin.lora_A.weight"),
            ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.weight"),
        ] {
            assert_eq!(encoder_to_hf(ours), theirs);
            assert_eq!(encoder_to_ours(theirs), ours);
        }
    }

    #[test]
    fn the_config_reads_as_berts_and_saves_as_it_was() {
        let text = r#"{"model_type":"distilbert","dim":32,"n_layers":2,"n_heads":4,"hidden_dim":64,"dropout":0.1,
            "attention_dropout":0.1,"seq_classif_dropout":0.2,"activation":"gelu","vocab_size":100,"qa_dropout":0.1}"#;
        let original: Map<String, Value> = serde_json::from_str(text).unwrap();
        let mut map = original.clone();
        config_to_bert(&mut map).unwrap();
        assert_eq!(map["hidden_size"], 32);
        assert_eq!(map["type_vocab_size"], 0);
        config_from_bert(&mut map);
        assert_eq!(map, original);
        let mut sinusoidal = original.clone();
        sinusoidal.insert("sinusoidal_pos_embds".into(), Value::from(true));
        assert!(config_to_bert(&mut sinusoidal).unwrap_err().to_string().contains("sinusoidal_pos_embds"));
    }
}
