//! The Prometheus metrics the service exports: their names, help texts, and the buckets of each
//! histogram. Latencies and sizes are histograms, not summaries, so that an operator can add
//! them up across replicas (`histogram_quantile(0.99, sum by (le) (rate(…_bucket[5m])))`).
//! `deploy/grafana/` and `deploy/prometheus/` read these names; `tests/api/monitoring.rs`
//! checks that every name they use is exported.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// One HTTP request, from the router's first look to the response's head.
pub const HTTP_REQUEST_SECONDS: &str = "finetuned_http_request_duration_seconds";
/// Requests by route, method and status.
pub const HTTP_REQUESTS: &str = "finetuned_http_requests_total";
/// The time an input waited in the dynamic batcher before its batch ran.
pub const PREDICT_QUEUE_SECONDS: &str = "finetuned_predict_queue_seconds";
/// One batch's forward pass.
pub const PREDICT_INFERENCE_SECONDS: &str = "finetuned_predict_inference_seconds";
/// Inputs in one predict batch.
pub const PREDICT_BATCH_SIZE: &str = "finetuned_predict_batch_size";
/// A job's wait from its creation to a worker's claim. A job that a stop put back in the queue
/// is counted again from its creation when it is claimed again (the database keeps no time of
/// the re-queue); a lease taken over from a dead worker is not counted.
pub const JOB_QUEUE_WAIT_SECONDS: &str = "finetuned_job_queue_wait_seconds";
/// One optimizer step: forward, backward and update.
pub const TRAINING_STEP_SECONDS: &str = "finetuned_training_step_seconds";
/// Lease renewals by the workers of this process, by result (`held`, `cancelled`, `lost`, `error`).
pub const LEASE_RENEWALS: &str = "finetuned_worker_lease_renewals_total";
/// Forward passes that panicked.
pub const INFERENCE_PANICS: &str = "finetuned_inference_panics_total";
/// Models unloaded from the predict cache.
pub const MODEL_CACHE_EVICTIONS: &str = "finetuned_model_cache_evictions_total";
/// Adapters unloaded from the adapter cache.
pub const ADAPTER_CACHE_EVICTIONS: &str = "finetuned_adapter_cache_evictions_total";
/// Jobs by status (a database count: every process exports the same value).
pub const JOBS: &str = "finetuned_jobs";
/// The age of the oldest queued job (0 when none is queued; from the database).
pub const OLDEST_QUEUED_AGE: &str = "finetuned_jobs_oldest_queued_age_seconds";
/// Running jobs whose lease has run out: their worker stopped renewing it (from the database).
pub const LEASE_EXPIRED: &str = "finetuned_jobs_lease_expired";

/// Each histogram with its buckets, chosen for the range it spans: HTTP requests from a
/// millisecond (a cached predict) to a minute (a large upload); the batcher's queue in
/// sub-milliseconds (its wait is a few ms); a job's queue wait from seconds to a day.
const HISTOGRAMS: [(&str, &[f64]); 6] = [
    (HTTP_REQUEST_SECONDS, &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
    (PREDICT_QUEUE_SECONDS, &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
    (PREDICT_INFERENCE_SECONDS, &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
    (PREDICT_BATCH_SIZE, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
    (JOB_QUEUE_WAIT_SECONDS, &[1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0]),
    (TRAINING_STEP_SECONDS, &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
];

/// The process-wide Prometheus recorder, installed once and shared by every app in a process.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in HISTOGRAMS {
                builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets).expect("buckets are not empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a test harness): metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Help texts and units; the unlabeled histograms are registered so that they are exported
/// (with zero counts) before their first observation, and dashboards show 0, not "no data".
fn describe() {
    describe_histogram!(HTTP_REQUEST_SECONDS, Unit::Seconds, "HTTP request duration by route and method");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route, method and status");
    describe_histogram!(PREDICT_QUEUE_SECONDS, Unit::Seconds, "Time an input waited in the predict batcher");
    describe_histogram!(PREDICT_INFERENCE_SECONDS, Unit::Seconds, "Forward pass of one predict batch");
    describe_histogram!(PREDICT_BATCH_SIZE, Unit::Count, "Inputs per predict batch");
    describe_histogram!(
        JOB_QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "A job's wait from creation to a worker's claim (a re-queued job counts from its creation)"
    );
    describe_histogram!(TRAINING_STEP_SECONDS, Unit::Seconds, "One training step: forward, backward and update");
    describe_counter!(LEASE_RENEWALS, "Job lease renewals by this process's workers, by result");
    describe_gauge!(JOBS, "Jobs by status (from the database)");
    describe_gauge!(OLDEST_QUEUED_AGE, Unit::Seconds, "Age of the oldest queued job, 0 when none (from the database)");
    describe_gauge!(LEASE_EXPIRED, "Running jobs whose lease ran out: their worker stopped renewing (from the database)");
    for (name, _) in &HISTOGRAMS[1..] {
        let _ = metrics::histogram!(*name);
    }
    for result in ["held", "cancelled", "lost", "error"] {
        metrics::counter!(LEASE_RENEWALS, "result" => result).absolute(0);
    }
    // Rare events: exported from the start, so that the first one is an increase and alerts see it.
    for (name, help) in [
        (INFERENCE_PANICS, "Forward passes that panicked (the model is unloaded and loaded again)"),
        (MODEL_CACHE_EVICTIONS, "Models unloaded from the predict cache (count or memory budget)"),
        (ADAPTER_CACHE_EVICTIONS, "LoRA adapters unloaded from the adapter cache (memory budget)"),
    ] {
        describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
}
