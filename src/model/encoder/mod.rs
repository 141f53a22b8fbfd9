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
pub mod distilbert;
pub mod mlm;
pub mod modernbert;
pub mod params;
pub mod post_norm;

pub use config::EncoderConfig;
pub use post_norm::{encoder_param_names, encoder_params, Encoder, Getter};
