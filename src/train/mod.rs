//! Training: the fine-tuning loop, its data, optimiser and metrics, and the job worker.

pub mod data;
pub mod hyper;
pub mod metrics;
pub mod optim;
pub mod trainer;
pub mod worker;
