//! The encoders (BERT, and RoBERTa's family by BERT's layout) and their heads (sequence classification, masked LM), its config and parameters, and its adapters' low-rank terms.

pub mod adapters;
pub mod arch;
pub mod bert;
pub mod classifier;
pub mod config;
pub mod distilbert;
pub mod mlm;
pub mod params;
