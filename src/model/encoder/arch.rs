//! The encoder architectures we run, chosen by `config.json`'s `model_type`, and what differs
//! between them at the edges: the names of their tensors in a checkpoint, where position ids
//! start, and the transformers classes a saved model names. Inside the crate every tensor has
//! its BERT name (`encoder.layer.0.attention.self.query.weight`, `pooler.dense.weight`,
//! `classifier.weight`, `cls.predictions.…`); the names are translated here, on load and on save.

/// An architecture of the encoder family this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// BERT: learned absolute positions from 0, token types, a pooler.
    Bert,
    /// RoBERTa and the models that share its layout (XLM-RoBERTa, CamemBERT): positions counted
    /// from `pad_token_id + 1`, one token type, a classification head of dense → tanh → out_proj
    /// on `<s>`, an `lm_head`.
    Roberta,
}

/// Every `model_type` we run, and the transformers class prefix of each.
const TYPES: [(&str, Arch, &str); 4] = [
    ("bert", Arch::Bert, "Bert"),
    ("roberta", Arch::Roberta, "Roberta"),
    ("xlm-roberta", Arch::Roberta, "XLMRoberta"),
    ("camembert", Arch::Roberta, "Camembert"),
];

/// RoBERTa's names of our BERT-named head tensors: (our prefix, theirs).
const ROBERTA_HEADS: [(&str, &str); 5] = [
    ("pooler.dense.", "classifier.dense."),
    ("classifier.", "classifier.out_proj."),
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("cls.predictions.bias", "lm_head.bias"),
];

impl Arch {
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

    /// The prefix of the encoder's tensors in a checkpoint.
    fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert.",
            Arch::Roberta => "roberta.",
        }
    }

    /// Our name for a checkpoint's tensor; `None` for a tensor we do not keep (RoBERTa's
    /// masked-LM decoder, tied to the word embeddings, and its copy of the output bias).
    pub fn to_ours(self, name: &str) -> Option<String> {
        if let Some(encoder) = name.strip_prefix(self.prefix()) {
            return Some(encoder.to_string());
        }
        match self {
            Arch::Bert => Some(name.to_string()),
            Arch::Roberta => {
                if name.starts_with("lm_head.decoder.") {
                    return None;
                }
                Some(match ROBERTA_HEADS.iter().find(|(_, theirs)| name.starts_with(theirs)) {
                    Some((ours, theirs)) => format!("{ours}{}", &name[theirs.len()..]),
                    None => name.to_string(),
                })
            }
        }
    }

    /// The checkpoint's name for one of our tensors: the inverse of [`Arch::to_ours`].
    pub fn to_hf(self, name: &str) -> String {
        if self == Arch::Roberta {
            if let Some((ours, theirs)) = ROBERTA_HEADS.iter().find(|(ours, _)| name.starts_with(ours)) {
                return format!("{theirs}{}", &name[ours.len()..]);
            }
        }
        if name.starts_with("classifier.") || name.starts_with("cls.") {
            name.to_string()
        } else {
            format!("{}{name}", self.prefix())
        }
    }

    /// The position id of a text's first token (its `[CLS]`/`<s>`): RoBERTa counts positions
    /// from `pad_token_id + 1`, as transformers' `create_position_ids_from_input_ids` does for
    /// right-padded batches.
    pub fn position_offset(self, pad_token_id: usize) -> usize {
        match self {
            Arch::Bert => 0,
            Arch::Roberta => pad_token_id + 1,
        }
    }

    /// Whether the classification head drops out its input before the dense layer (RoBERTa's
    /// `RobertaClassificationHead`; BERT's pooler reads `[CLS]` as it is).
    pub fn dropout_before_pooler(self) -> bool {
        self == Arch::Roberta
    }

    /// Whether what we call the pooler is part of the classification head (RoBERTa's
    /// `classifier.dense`): peft then trains and saves it with the head (`modules_to_save`),
    /// where BERT's pooler stays frozen in a LoRA job.
    pub fn pooler_in_head(self) -> bool {
        self == Arch::Roberta
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
        assert_eq!(Arch::class_name("xlm-roberta", "ForSequenceClassification"), "XLMRobertaForSequenceClassification");
        assert_eq!(Arch::Roberta.position_offset(1), 2);
    }
}
