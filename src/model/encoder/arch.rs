//! The encoder architectures we run, chosen by `config.json`'s `model_type`, and what differs
//! between them at the edges: the names of their tensors in a checkpoint, where position ids
//! start, and the transformers classes a saved model names. Inside the crate every tensor has
//! its BERT name (`encoder.layer.0.attention.self.query.weight`, `pooler.dense.weight`,
//! `classifier.weight`, `cls.predictions.…`); the names are translated here, on load and on save.

use super::adapters::Target;
use super::distilbert;

/// An architecture of the encoder family this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// BERT: learned absolute positions from 0, token types, a pooler.
    Bert,
    /// RoBERTa and the models that share its layout (XLM-RoBERTa, CamemBERT): positions counted
    /// from `pad_token_id + 1`, one token type, a classification head of dense → tanh → out_proj
    /// on `<s>`, an `lm_head`.
    Roberta,
    /// ELECTRA's discriminator: BERT's layer names, word embeddings of their own width
    /// (`embedding_size`) projected to the hidden size, no pooler, a classification head of
    /// dense → GELU → out_proj on `[CLS]`.
    Electra,
    /// DistilBERT: BERT's layers under its own names (see [`super::distilbert`]), no token
    /// types, a head of `pre_classifier` → ReLU → `classifier` on `[CLS]`.
    DistilBert,
    /// ModernBERT: pre-norm layers with rotary positions and local attention (see
    /// [`super::modernbert`]), no token types, a head of `head.dense` → GELU → `head.norm` →
    /// `classifier`. Its tensors keep their own names (under `model.` in a checkpoint with a head).
    ModernBert,
}

/// The activation after the pooler's (the head's first) dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolerAct {
    /// BERT's pooler and RoBERTa's head.
    Tanh,
    /// ELECTRA's head (exact GELU).
    Gelu,
    /// DistilBERT's `pre_classifier`.
    Relu,
}

/// Every `model_type` we run, and the transformers class prefix of each.
const TYPES: [(&str, Arch, &str); 7] = [
    ("bert", Arch::Bert, "Bert"),
    ("roberta", Arch::Roberta, "Roberta"),
    ("xlm-roberta", Arch::Roberta, "XLMRoberta"),
    ("camembert", Arch::Roberta, "Camembert"),
    ("electra", Arch::Electra, "Electra"),
    ("distilbert", Arch::DistilBert, "DistilBert"),
    ("modernbert", Arch::ModernBert, "ModernBert"),
];

/// The dense layers LoRA adapts: each with peft's module name in BERT's layout (RoBERTa's and
/// ELECTRA's too) and in DistilBERT's.
const LORA_MODULES: [(Target, &str, &str); 6] = [
    (Target::Query, "query", "q_lin"),
    (Target::Key, "key", "k_lin"),
    (Target::Value, "value", "v_lin"),
    (Target::AttnOut, "attention.output.dense", "out_lin"),
    (Target::Intermediate, "intermediate.dense", "lin1"),
    (Target::Output, "output.dense", "lin2"),
];

/// ModernBERT's names of our head tensors: (our prefix, theirs).
const MODERNBERT_HEADS: [(&str, &str); 2] = [("pooler.dense.", "head.dense."), ("pooler.norm.", "head.norm.")];

/// RoBERTa's names of our BERT-named head tensors: (our prefix, theirs).
const ROBERTA_HEADS: [(&str, &str); 5] = [
    ("pooler.dense.", "classifier.dense."),
    ("classifier.", "classifier.out_proj."),
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("cls.predictions.bias", "lm_head.bias"),
];

impl Arch {
    /// The architecture whose encoder prefix `names` use (BERT's when none of the others').
    pub fn of_names<'a>(mut names: impl Iterator<Item = &'a str>) -> Self {
        let others = [Arch::Roberta, Arch::Electra, Arch::DistilBert, Arch::ModernBert];
        names.find_map(|n| others.into_iter().find(|a| n.starts_with(a.prefix()))).unwrap_or(Arch::Bert)
    }

    /// The `model_type`s this crate runs.
    pub fn supported_types() -> Vec<&'static str> {
        TYPES.iter().map(|(t, _, _)| *t).collect()
    }

    /// The architecture of `model_type`, if we run it.
    pub fn of(model_type: &str) -> Option<Self> {
        TYPES.iter().find(|(t, _, _)| *t == model_type).map(|(_, a, _)| *a)
    }

    /// The transformers class of `model_type` for `task` (`ForSequenceClassification`,
    /// `ForMaskedLM`, `Model`).
    pub fn class_name(model_type: &str, task: &str) -> String {
        let prefix = TYPES.iter().find(|(t, _, _)| *t == model_type).map_or("Bert", |(_, _, p)| p);
        format!("{prefix}{task}")
    }

    /// The head tensors whose names differ from BERT's: (our prefix, theirs). ELECTRA's
    /// masked LM lives in its generator, a model of its own, so only the classification head
    /// is renamed.
    fn heads(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Arch::Bert => &[],
            Arch::Roberta => &ROBERTA_HEADS,
            Arch::Electra => &ROBERTA_HEADS[..2],
            Arch::DistilBert => &distilbert::HEADS,
            Arch::ModernBert => &MODERNBERT_HEADS,
        }
    }

    /// The prefix of the encoder's tensors in a checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert.",
            Arch::Roberta => "roberta.",
            Arch::Electra => "electra.",
            Arch::DistilBert => "distilbert.",
            Arch::ModernBert => "model.",
        }
    }

    /// Our name for a checkpoint's tensor; `None` for a tensor we do not keep (RoBERTa's
    /// masked-LM decoder, tied to the word embeddings, and its copy of the output bias).
    pub fn to_ours(self, name: &str) -> Option<String> {
        if let Some(encoder) = name.strip_prefix(self.prefix()) {
            return Some(match self {
                Arch::DistilBert => distilbert::encoder_to_ours(encoder),
                _ => encoder.to_string(),
            });
        }
        if self == Arch::Bert {
            return Some(name.to_string());
        }
        if self == Arch::DistilBert && name.starts_with("transformer.") {
            // A bare `DistilBertModel` saves its encoder without the prefix.
            return Some(distilbert::encoder_to_ours(name));
        }
        if name.starts_with("lm_head.decoder.")
            || name == "vocab_projector.weight"
            || (self == Arch::ModernBert && name.starts_with("decoder."))
        {
            return None;
        }
        Some(match self.heads().iter().find(|(_, theirs)| name.starts_with(theirs)) {
            Some((ours, theirs)) => format!("{ours}{}", &name[theirs.len()..]),
            None => name.to_string(),
        })
    }

    /// The checkpoint's name for one of our tensors: the inverse of [`Arch::to_ours`].
    pub fn to_hf(self, name: &str) -> String {
        if let Some((ours, theirs)) = self.heads().iter().find(|(ours, _)| name.starts_with(ours)) {
            return format!("{theirs}{}", &name[ours.len()..]);
        }
        if name.starts_with("classifier.") || name.starts_with("cls.") {
            name.to_string()
        } else if self == Arch::DistilBert {
            format!("{}{}", self.prefix(), distilbert::encoder_to_hf(name))
        } else {
            format!("{}{name}", self.prefix())
        }
    }

    /// The modules LoRA adapts for a name of `lora_target_modules`: BERT's names (`query`,
    /// `attention.output.dense`…, matched by suffix as peft matches them, so `output.dense`
    /// is both output projections) or DistilBERT's (`q_lin`, `out_lin`, `lin1`…), whichever
    /// the architecture.
    pub fn lora_targets_named(name: &str) -> Vec<Target> {
        if name == "output.dense" {
            return vec![Target::AttnOut, Target::Output];
        }
        LORA_MODULES.iter().filter(|(_, bert, distil)| *bert == name || *distil == name).map(|(t, _, _)| *t).collect()
    }

    /// Every name [`Arch::lora_targets_named`] knows.
    pub fn lora_names() -> Vec<&'static str> {
        LORA_MODULES.iter().map(|(_, bert, _)| *bert).chain(LORA_MODULES.iter().map(|(_, _, distil)| *distil)).collect()
    }

    /// The `target_modules` peft's `adapter_config.json` lists for the `lora_target_modules`
    /// `names` on this architecture: a name of its own as it is, one of the other naming
    /// (`q_lin` on BERT, `query` on DistilBERT) as its modules' names here.
    pub fn peft_target_modules(self, names: &[String]) -> Vec<String> {
        let distil = self == Arch::DistilBert;
        let own = |t: Target| LORA_MODULES.iter().find(|(m, _, _)| *m == t).map_or("", |(_, b, d)| if distil { d } else { b });
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let targets = Self::lora_targets_named(name);
            let mine = targets.iter().any(|&t| own(t) == name) || (name == "output.dense" && !distil);
            let put: Vec<String> = if mine { vec![name.clone()] } else { targets.iter().map(|&t| own(t).to_string()).collect() };
            for p in put {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// The position id of a text's first token (its `[CLS]`/`<s>`): RoBERTa counts positions
    /// from `pad_token_id + 1`, as transformers' `create_position_ids_from_input_ids` does for
    /// right-padded batches.
    pub fn position_offset(self, pad_token_id: usize) -> usize {
        match self {
            Arch::Bert | Arch::Electra | Arch::DistilBert | Arch::ModernBert => 0,
            Arch::Roberta => pad_token_id + 1,
        }
    }

    /// Whether the classification head drops out its input before the dense layer (RoBERTa's
    /// `RobertaClassificationHead`; BERT's pooler and DistilBERT's `pre_classifier` read
    /// `[CLS]` as it is).
    pub fn dropout_before_pooler(self) -> bool {
        !matches!(self, Arch::Bert | Arch::DistilBert | Arch::ModernBert)
    }

    /// Whether the attention block drops out its output projection before the residual sum
    /// (DistilBERT's does not).
    pub fn attention_output_dropout(self) -> bool {
        self != Arch::DistilBert
    }

    /// The activation of the pooler (the head's first dense layer).
    pub fn pooler_act(self) -> PoolerAct {
        match self {
            Arch::Electra | Arch::ModernBert => PoolerAct::Gelu,
            Arch::DistilBert => PoolerAct::Relu,
            _ => PoolerAct::Tanh,
        }
    }

    /// Whether masked-LM pre-training runs on a checkpoint of this architecture (ELECTRA's
    /// masked LM is its generator, which a discriminator checkpoint does not hold).
    pub fn pretrains(self) -> bool {
        !matches!(self, Arch::Electra | Arch::ModernBert)
    }

    /// Our names of the pooler's (the head's first layer's) two tensors: BERT's dense weight and
    /// bias, or ModernBERT's dense weight (it has no bias) and its norm's weight.
    pub fn pooler_names(self) -> [&'static str; 2] {
        match self {
            Arch::ModernBert => ["pooler.dense.weight", "pooler.norm.weight"],
            _ => ["pooler.dense.weight", "pooler.dense.bias"],
        }
    }

    /// Why a job of `task` (`token_classification`, `mlm`…) with `method` cannot run on this
    /// architecture yet, if it cannot.
    pub fn refusal(self, task: &str, method: &str) -> Option<String> {
        if self != Arch::ModernBert {
            return None;
        }
        let what = match (task, method) {
            ("token_classification", _) => "token classification",
            ("mlm", _) => "masked-LM pre-training",
            (_, "lora") => "the lora method",
            _ => return None,
        };
        Some(format!(
            "{what} is not yet supported on modernbert checkpoints (classification, pairs, regression and rerank with full or head are)"
        ))
    }

    /// Whether what we call the pooler is part of the classification head (RoBERTa's
    /// `classifier.dense`, DistilBERT's `pre_classifier`): peft then trains and saves it with
    /// the head (`modules_to_save`), where BERT's pooler stays frozen in a LoRA job.
    pub fn pooler_in_head(self) -> bool {
        self != Arch::Bert
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn names_go_to_ours_and_back() {
        for (arch, hf, ours) in [
            (Arch::Bert, "bert.encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.weight"),
            (Arch::Bert, "bert.pooler.dense.bias", "pooler.dense.bias"),
            (Arch::Bert, "classifier.weight", "classifier.weight"),
            (Arch::Bert, "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.weight"),
            (Arch::Roberta, "roberta.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
            (Arch::Roberta, "classifier.dense.weight", "pooler.dense.weight"),
            (Arch::Roberta, "classifier.out_proj.bias", "classifier.bias"),
            (Arch::Roberta, "lm_head.layer_norm.weight", "cls.predictions.transform.LayerNorm.weight"),
            (Arch::Roberta, "lm_head.bias", "cls.predictions.bias"),
        ] {
            assert_eq!(arch.to_ours(hf).as_deref(), Some(ours), "{hf}");
            assert_eq!(arch.to_hf(ours), hf, "{ours}");
        }
        assert_eq!(Arch::Roberta.to_ours("lm_head.decoder.weight"), None);
        assert_eq!(Arch::Electra.to_ours("electra.embeddings_project.weight").as_deref(), Some("embeddings_project.weight"));
        assert_eq!(Arch::Electra.to_hf("pooler.dense.weight"), "classifier.dense.weight");
        assert_eq!(Arch::Electra.to_hf("classifier.bias"), "classifier.out_proj.bias");
        assert_eq!(Arch::class_name("xlm-roberta", "ForSequenceClassification"), "XLMRobertaForSequenceClassification");
        assert_eq!(Arch::Roberta.position_offset(1), 2);
        for (hf, ours) in [
            ("distilbert.transformer.layer.1.attention.q_lin.weight", "encoder.layer.1.attention.self.query.weight"),
            ("distilbert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
            ("pre_classifier.bias", "pooler.dense.bias"),
            ("classifier.weight", "classifier.weight"),
            ("vocab_layer_norm.weight", "cls.predictions.transform.LayerNorm.weight"),
            ("vocab_projector.bias", "cls.predictions.bias"),
        ] {
            assert_eq!(Arch::DistilBert.to_ours(hf).as_deref(), Some(ours), "{hf}");
            assert_eq!(Arch::DistilBert.to_hf(ours), hf, "{ours}");
        }
        assert_eq!(Arch::DistilBert.to_ours("vocab_projector.weight"), None);
    }

    #[test]
    fn lora_targets_are_written_in_the_architectures_own_names() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Arch::DistilBert.peft_target_modules(&names(&["query", "value", "lin1"])), names(&["q_lin", "v_lin", "lin1"]));
        assert_eq!(Arch::DistilBert.peft_target_modules(&names(&["output.dense"])), names(&["out_lin", "lin2"]));
        assert_eq!(Arch::Bert.peft_target_modules(&names(&["query", "output.dense"])), names(&["query", "output.dense"]));
        assert_eq!(Arch::Roberta.peft_target_modules(&names(&["q_lin", "lin2"])), names(&["query", "output.dense"]));
    }
}
