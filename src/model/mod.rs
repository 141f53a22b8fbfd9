//! The BERT model, its heads, and Hugging Face model directories.

pub mod artifacts;
pub mod attention;
pub mod bert;
pub mod packed;
pub mod classifier;
pub mod config;
mod fastmath;
pub mod kernels;
pub mod layers;
pub mod linear;
pub mod mlm;
pub mod params;
pub mod predictor;
mod simd;
pub mod tokenize;

pub use classifier::{Classifier, Pooling};
pub use config::BertConfig;
