//! The BERT model, its heads, and Hugging Face model directories.

pub mod adapter_serving;
pub mod adapter_terms;
pub mod adapters;
pub mod artifacts;
pub mod attention;
pub mod bert;
pub mod classifier;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device_ops;
mod fastmath;
pub mod frozen_ffn;
pub mod kernels;
pub mod layers;
pub mod linear;
pub mod lora;
pub mod lora_linear;
pub mod mlm;
pub mod packed;
pub mod params;
pub mod predictor;
pub mod rng;
mod simd;
pub mod tokenize;

pub use classifier::{Classifier, Pooling};
pub use config::BertConfig;

/// Device memory in use now (MiB) on a CUDA device, as its driver reports it (candle's pool
/// keeps freed blocks, so this is the high-water mark of what the run reserved, as
/// `nvidia-smi` shows); `None` on the CPU.
pub fn device_memory_mib(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::memory_used_mib();
    }
    let _ = device;
    None
}
