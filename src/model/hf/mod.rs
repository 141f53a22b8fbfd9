//! Hugging Face files: checkpoint directories, peft LoRA adapters and tokenizers.

pub mod artifacts;
pub mod lora;
pub mod tokenize;
pub mod weights;
pub mod words;
