//! The monitoring assets in deploy/ name only metrics that the server exports, so a renamed
//! metric breaks this test rather than a dashboard panel or an alert that silently never fires.

use crate::common::toy_jsonl;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

const DASHBOARD: &str = include_str!("../../deploy/grafana/finetuned.json");
const RULES: &str = include_str!("../../deploy/prometheus/finetuned-rules.yml");

/// Exported only by a worker training on a GPU; the dashboard shows it, and no test here has one.
const GPU_ONLY: &[&str] = &["finetuned_training_gpu_memory_peak_mib"];

/// Latencies and sizes that operators add up across replicas, which a summary cannot do.
const HISTOGRAMS: [&str; 6] = [
    "finetuned_http_request_duration_seconds",
    "finetuned_predict_queue_seconds",
    "finetuned_predict_inference_seconds",
    "finetuned_predict_batch_size",
    "finetuned_job_queue_wait_seconds",
    "finetuned_training_step_seconds",
];

/// Every `finetuned_[a-z0-9_]+` in `text`: in queries, and in the annotations and descriptions
/// that point an operator at a metric. Recording rules (`finetuned:…`) are not metrics we export.
fn referenced(text: &str) -> BTreeSet<&str> {
    let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("finetuned_") {
        if text[..at].ends_with(|c: char| ident(c) || c == ':') {
            continue;
        }
        let rest = &text[at..];
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        if !rest[end..].starts_with(':') {
            names.insert(&rest[..end]);
        }
    }
    names
}

/// Each metric family's type, from the `# TYPE name type` lines of the exposition.
fn families(exposition: &str) -> BTreeMap<&str, &str> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name, kind.trim()))
        .collect()
}

/// Why `name` is not on /metrics, or None when it is.
fn missing(name: &str, types: &BTreeMap<&str, &str>) -> Option<String> {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return match types.get(base) {
                Some(&"histogram") => None,
                Some(kind) => Some(format!("{name} ({base} is a {kind}, not a histogram)")),
                None => Some(format!("{name} (no histogram {base})")),
            };
        }
    }
    (!types.contains_key(name)).then(|| name.to_string())
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let app = spawn_app().await;
    // Train and predict once, so that each part of the service has recorded something.
    let ds = app.upload_ok(toy_jsonl(32)).await;
    let job = app
        .create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "watched", "hyperparameters": tiny_hp(2)}))
        .await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let r = app.predict("watched", &json!({"inputs": ["a great film", "bad"]})).await;
    assert_eq!(r.status(), StatusCode::OK);

    let r = app.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    let exposition = r.text().await.unwrap();
    let types = families(&exposition);

    let not_histograms: Vec<_> = HISTOGRAMS.iter().filter(|h| types.get(*h) != Some(&"histogram")).collect();
    assert!(not_histograms.is_empty(), "not exported as `# TYPE … histogram`: {not_histograms:?}\n{exposition}");

    let mut used = referenced(DASHBOARD);
    used.extend(referenced(RULES));
    assert!(used.len() >= 10, "the scan found too few names, so it is probably broken: {used:?}");
    let absent: Vec<String> = used.iter().filter(|n| !GPU_ONLY.contains(n)).filter_map(|n| missing(n, &types)).collect();
    assert!(absent.is_empty(), "deploy/ uses metrics that /metrics lacks: {absent:?}\n{exposition}");
}
