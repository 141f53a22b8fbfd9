//! finetuned: fine-tune BERT-family text classifiers over a REST API and serve them.

/// HTTP handlers, one router per resource.
pub mod api;
/// The `bench-serve` load generator.
pub mod bench;
/// Every model the service knows: the models dir and trained models.
pub mod catalog;
/// The offline `train` command.
pub mod cli;
/// Thread pools for training and inference.
pub mod compute;
/// Command-line and environment options.
pub mod config;
/// Dataset parsing and validation.
pub mod dataset;
/// The error envelope of the API.
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
/// Base models fetched from the Hugging Face hub.
pub mod hub;
/// Our BERT, its heads, and Hugging Face model directories.
pub mod model;
/// The Prometheus metrics: names, help texts and histogram buckets.
pub mod monitoring;
/// Datasets, checkpoints and models in an object store (`--object-store`).
pub mod objects;
/// Space held back in the data dir for recording how jobs end on a full disk.
pub mod reserve;
/// Loaded models and inference for predict.
pub mod serve;
/// Building and running the server.
pub mod startup;
/// All SQL.
pub mod store;
/// Logging set-up.
pub mod telemetry;
/// How a test skips: a failure under CI unless allowed (used by unit and integration tests).
#[doc(hidden)]
pub mod testing;
/// Fine-tuning: trainer, data, optimiser, metrics and the job worker.
pub mod train;
/// Job webhooks: signed POSTs on state changes, delivered from a durable outbox.
pub mod webhooks;
