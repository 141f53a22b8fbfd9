//! Architecture-free ops with their backward passes (CPU kernels, device-generic ops, CUDA launchers) and their shared CPU helpers.

pub mod adapter_terms;
pub mod attention;
mod attention_tasks;
mod buffers;
#[cfg(feature = "cuda")]
pub(super) mod cuda;
#[cfg(feature = "cuda")]
mod cuda_positional;
pub mod device_ops;
pub mod device_optim;
pub mod device_positional;
pub mod disentangled;
pub mod embedding;
mod fastmath;
pub mod frozen_ffn;
pub mod geglu;
pub mod infer;
pub mod kernels;
pub mod layers;
pub mod linear;
pub mod lora_linear;
pub mod packed;
pub mod rng;
pub mod rotary;
pub mod rotary_attention;
mod simd;
pub mod tape;
pub mod unpad;
pub mod varlen;
