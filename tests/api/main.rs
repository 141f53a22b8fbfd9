//! Integration tests: the real server on port 0 with a temporary data dir.

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod anchor;
mod architectures;
mod datasets;
mod disk_full;
mod faults;
mod hub;
mod idempotency;
mod job_metadata;
mod jobs;
mod lora;
mod lora_jobs;
mod monitoring;
mod multilabel;
mod ner;
mod one_output;
mod pairs;
mod predict;
mod predict_limits;
mod pretrain;
mod tei;
mod webhooks;
