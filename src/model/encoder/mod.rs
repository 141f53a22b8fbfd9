//! The BERT encoder and its heads (sequence classification, masked LM), its config and parameters, and its adapters' low-rank terms.

pub mod adapters;
pub mod bert;
pub mod classifier;
pub mod config;
pub mod mlm;
pub mod params;
