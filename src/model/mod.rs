//! The models: fused ops, the encoder and its heads, Hugging Face files, and inference loaders.

pub mod encoder;
pub mod hf;
pub mod ops;
pub mod predict;

pub use encoder::classifier::{Classifier, Pooling};
pub use encoder::config::EncoderConfig;

/// Device memory in use now (MiB) on a CUDA device, as its driver reports it (candle's pool
/// keeps freed blocks, so this is the high-water mark of what the run reserved, as
/// `nvidia-smi` shows); `None` on the CPU.
pub fn device_memory_mib(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return ops::cuda::memory_used_mib();
    }
    let _ = device;
    None
}
