//! The seam between the architectures and everything above them. [`Encoder`] is what a
//! checkpoint's `model_type` loads ([`arch::Arch`] says which, and what differs at the edges:
//! tensor names, position ids, heads, LoRA target names); the heads (sequence classification,
//! masked LM) sit over any encoder, and `train/` and `serve/` see only these types. The BERT
//! family (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT) runs on one post-norm
//! stack ([`post_norm`]); an architecture with other layers adds its own module beside it.

pub mod adapters;
pub mod arch;
pub mod classifier;
pub mod config;
pub mod deberta;
pub mod distilbert;
pub mod mlm;
pub mod modernbert;
pub mod params;
pub mod post_norm;

pub use config::EncoderConfig;
pub use post_norm::{encoder_param_names, encoder_params, Getter};

use crate::model::ops::layers::Mode;
use adapters::LowRank;
use candle_core::{Result, Tensor};

/// An encoder (embeddings + transformer layers), without pooler or head: what `model_type`
/// loads, under every head.
pub enum Encoder {
    /// The BERT family's post-norm stack.
    PostNorm(post_norm::PostNorm),
    /// ModernBERT's pre-norm stack with rotary positions and local attention.
    Modern(modernbert::ModernBert),
    /// DeBERTa-v2/v3's post-norm stack with disentangled attention.
    Deberta(deberta::Deberta),
}

impl Encoder {
    /// Builds the encoder `cfg.model_type` names from named tensors (our names).
    pub fn load(get: &Getter, cfg: &EncoderConfig) -> Result<Self> {
        if cfg.arch() == arch::Arch::ModernBert {
            let err = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
            let m = modernbert::ModernBertConfig::of(cfg).map_err(err)?;
            return Ok(Self::Modern(modernbert::ModernBert::load(get, &m).map_err(err)?));
        }
        if cfg.arch() == arch::Arch::Deberta {
            let d = deberta::DebertaConfig::of(cfg).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
            return Ok(Self::Deberta(deberta::Deberta::load(get, &d, &cfg.hidden_act)?));
        }
        Ok(Self::PostNorm(post_norm::PostNorm::load(get, cfg)?))
    }

    /// Prepares the weights for CPU inference (transposed, packed; see `PostNorm`).
    pub fn prepare_for_inference(&mut self, bf16: bool) -> Result<()> {
        match self {
            Self::PostNorm(e) => e.prepare_for_inference(bf16),
            Self::Modern(e) => e.prepare_for_inference(bf16),
            Self::Deberta(e) => e.prepare_for_inference(bf16),
        }
    }

    /// The device its weights are on.
    pub fn device(&self) -> candle_core::Device {
        match self {
            Self::PostNorm(e) => e.device(),
            Self::Modern(e) => e.device(),
            Self::Deberta(e) => e.device(),
        }
    }

    /// Bytes of the encoder's weights as held now.
    pub fn bytes(&self) -> usize {
        match self {
            Self::PostNorm(e) => e.bytes(),
            Self::Modern(e) => e.bytes(),
            Self::Deberta(e) => e.bytes(),
        }
    }

    /// Last hidden states `[batch, seq, hidden]` (token types are read only where the model has them).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.forward_low_rank(ids, type_ids, mask, mode, false, &LowRank::default())
    }

    /// [`Encoder::forward`] (only the first token's state, `[batch, 1, hidden]`, when
    /// `first_only`) with each row's adapter terms added to the layers they change.
    pub fn forward_low_rank(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        mode: &mut Mode,
        first_only: bool,
        lr: &LowRank,
    ) -> Result<Tensor> {
        match self {
            Self::PostNorm(e) => e.forward_low_rank(ids, type_ids, mask, mode, first_only, lr),
            Self::Modern(e) => {
                let h = e.forward_low_rank(ids, mask, mode, lr)?;
                if first_only {
                    h.narrow(1, 0, 1)
                } else {
                    Ok(h)
                }
            }
            Self::Deberta(e) => {
                let h = e.forward_low_rank(ids, type_ids, mask, mode, lr)?;
                if first_only {
                    h.narrow(1, 0, 1)
                } else {
                    Ok(h)
                }
            }
        }
    }

    /// The last hidden state of the first token only, `[batch, 1, hidden]`.
    pub fn forward_first_token(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        self.forward_low_rank(ids, type_ids, mask, mode, true, &LowRank::default())
    }
}
