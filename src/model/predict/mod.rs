//! Inference loaders: a classifier ready to run, and LoRA adapters served over a shared base.

pub mod adapter_serving;
pub mod predictor;
