//! The encoder architectures we run, chosen by `config.json`'s `model_type`, and what differs
//! between them at the edges: the names of their tensors in a checkpoint, where position ids
//! start, and the transformers classes a saved model names. Inside the crate every tensor has
//! its BERT name (`encoder.layer.0.attention.self.query.weight`, `pooler.dense.weight`,
//! `classifier.weight`, `cls.predictions.…`); the names are translated here, on load and on save.

use super::adapters::{Layout, Target};
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
    /// DeBERTa-v2/v3: BERT's post-norm layers with disentangled attention over relative
    /// positions (see [`super::deberta`]), a `ContextPooler` head (dense → GELU on `[CLS]`).
    /// Its tensors keep their own names (under `deberta.` in a checkpoint with a head).
    Deberta,
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
const TYPES: [(&str, Arch, &str); 8] = [
    ("bert", Arch::Bert, "Bert"),
    ("roberta", Arch::Roberta, "Roberta"),
    ("xlm-roberta", Arch::Roberta, "XLMRoberta"),
    ("camembert", Arch::Roberta, "Camembert"),
    ("electra", Arch::Electra, "Electra"),
    ("distilbert", Arch::DistilBert, "DistilBert"),
    ("modernbert", Arch::ModernBert, "ModernBert"),
    ("deberta-v2", Arch::Deberta, "DebertaV2"),
];

/// The dense layers LoRA adapts: each with peft's module name in BERT's layout (RoBERTa's and
/// ELECTRA's too), in DistilBERT's, in ModernBERT's (whose `Wqkv` is the query, key and
/// value projections in one module) and in DeBERTa's.
const LORA_MODULES: [(Target, &str, &str, &str, &str); 6] = [
    (Target::Query, "query", "q_lin", "Wqkv", "query_proj"),
    (Target::Key, "key", "k_lin", "Wqkv", "key_proj"),
    (Target::Value, "value", "v_lin", "Wqkv", "value_proj"),
    (Target::AttnOut, "attention.output.dense", "out_lin", "attn.Wo", "attention.output.dense"),
    (Target::Intermediate, "intermediate.dense", "lin1", "Wi", "intermediate.dense"),
    (Target::Output, "output.dense", "lin2", "mlp.Wo", "output.dense"),
];

/// Names that match two output projections by suffix, as peft matches them: BERT's
/// `output.dense` (`attention.output.dense` too) and ModernBERT's `Wo` (`attn.Wo`, `mlp.Wo`).
const BOTH_OUTPUTS: [&str; 2] = ["output.dense", "Wo"];

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
        let others = [Arch::Roberta, Arch::Electra, Arch::DistilBert, Arch::ModernBert, Arch::Deberta];
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
            // The `ContextPooler` and `classifier` sit at the top level, under our own names.
            Arch::Deberta => &[("pooler.", "pooler."), ("classifier.", "classifier.")],
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
            Arch::Deberta => "deberta.",
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
        if self == Arch::ModernBert && name == "decoder.bias" {
            // The masked LM's decoder is tied to the embeddings; its bias is BERT's.
            return Some("cls.predictions.bias".into());
        }
        if name.starts_with("lm_head.decoder.")
            || name == "vocab_projector.weight"
            || (self == Arch::ModernBert && name.starts_with("decoder."))
            || (self == Arch::Deberta && name.starts_with("lm_predictions."))
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
        if self == Arch::ModernBert && name == "cls.predictions.bias" {
            return "decoder.bias".into();
        }
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
    /// is both output projections), DistilBERT's (`q_lin`, `out_lin`, `lin1`…) or ModernBERT's
    /// (`Wqkv`, `Wo`, `Wi`…), whichever the architecture.
    pub fn lora_targets_named(name: &str) -> Vec<Target> {
        if BOTH_OUTPUTS.contains(&name) {
            return vec![Target::AttnOut, Target::Output];
        }
        LORA_MODULES.iter().filter(|(_, b, d, m, e)| [b, d, m, e].contains(&&name)).map(|(t, ..)| *t).collect()
    }

    /// Every name [`Arch::lora_targets_named`] knows.
    pub fn lora_names() -> Vec<&'static str> {
        let mut names: Vec<&str> = LORA_MODULES.iter().flat_map(|(_, b, d, m, e)| [*b, *d, *m, *e]).chain(BOTH_OUTPUTS).collect();
        names.sort();
        names.dedup();
        names
    }

    /// How this architecture names its layers' dense weights inside the crate.
    pub fn layout(self) -> Layout {
        match self {
            Arch::ModernBert => Layout::Modern,
            Arch::Deberta => Layout::Deberta,
            _ => Layout::Bert,
        }
    }

    /// peft's name of `target`'s module in this architecture.
    fn lora_module(self, target: Target) -> &'static str {
        let (_, bert, distil, modern, deberta) = LORA_MODULES.iter().find(|(m, ..)| *m == target).expect("every target is listed");
        match self {
            Arch::DistilBert => distil,
            Arch::ModernBert => modern,
            Arch::Deberta => deberta,
            _ => bert,
        }
    }

    /// The `target_modules` peft's `adapter_config.json` lists for the `lora_target_modules`
    /// `names` on this architecture: a name of its own as it is, one of another naming
    /// (`q_lin` on BERT, `query` on DistilBERT or ModernBERT) as its modules' names here.
    pub fn peft_target_modules(self, names: &[String]) -> Vec<String> {
        let own_both = match self {
            Arch::DistilBert => None,
            Arch::ModernBert => Some("Wo"),
            _ => Some("output.dense"),
        };
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let targets = Self::lora_targets_named(name);
            let mine = targets.iter().any(|&t| self.lora_module(t) == name) || own_both == Some(name.as_str());
            let put: Vec<String> =
                if mine { vec![name.clone()] } else { targets.iter().map(|&t| self.lora_module(t).to_string()).collect() };
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
            Arch::Bert | Arch::Electra | Arch::DistilBert | Arch::ModernBert | Arch::Deberta => 0,
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
            Arch::Electra | Arch::ModernBert | Arch::Deberta => PoolerAct::Gelu,
            Arch::DistilBert => PoolerAct::Relu,
            _ => PoolerAct::Tanh,
        }
    }

    /// Whether masked-LM pre-training runs on a checkpoint of this architecture (ELECTRA's
    /// masked LM is its generator, which a discriminator checkpoint does not hold).
    pub fn pretrains(self) -> bool {
        self != Arch::Electra
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
    /// architecture yet, if it cannot: where a newly added architecture says so. Every one
    /// listed here runs every task and method.
    pub fn refusal(self, _task: &str, _method: &str) -> Option<String> {
        None
    }

    /// Whether what we call the pooler is part of the classification head (RoBERTa's
    /// `classifier.dense`, DistilBERT's `pre_classifier`): peft then trains and saves it with
    /// the head (`modules_to_save`), where BERT's pooler stays frozen in a LoRA job.
    pub fn pooler_in_head(self) -> bool {
        self != Arch::Bert
    }

    /// Whether a token classifier keeps what we call the pooler: ModernBERT's
    /// `…ForTokenClassification` runs its `head` on every token; the others have no pooler.
    pub fn token_head_has_pooler(self) -> bool {
        self == Arch::ModernBert
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
        // ModernBERT's query, key and value are one module.
        assert_eq!(Arch::ModernBert.peft_target_modules(&names(&["query", "key", "value"])), names(&["Wqkv"]));
        assert_eq!(Arch::ModernBert.peft_target_modules(&names(&["Wqkv", "Wo", "Wi"])), names(&["Wqkv", "Wo", "Wi"]));
        assert_eq!(Arch::ModernBert.peft_target_modules(&names(&["output.dense", "lin1"])), names(&["attn.Wo", "mlp.Wo", "Wi"]));
        let deberta = Arch::Deberta.peft_target_modules(&names(&["query", "value", "output.dense"]));
        assert_eq!(deberta, names(&["query_proj", "value_proj", "output.dense"]));
        assert_eq!(
            Arch::Bert.peft_target_modules(&names(&["Wqkv", "Wo"])),
            names(&["query", "key", "value", "attention.output.dense", "output.dense"])
        );
    }
}
