//! `finetuned bench-serve`: drives a running server's predict route with N concurrent
//! clients for T seconds and prints texts/s, latency percentiles and the count of each status.

use clap::Args;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `finetuned bench-serve`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model id to call.
    #[arg(long)]
    pub model: String,
    /// JSONL file whose `text` fields are sent, in order, round robin.
    #[arg(long)]
    pub texts: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seconds to run (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Requests sent first and not counted.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Milliseconds each client waits after an answer before it sends its next request: the
    /// time a real caller spends elsewhere (its network, its own work).
    #[arg(long, default_value_t = 0.0)]
    pub think_ms: f64,
    /// Per-request timeout in seconds (a timed-out request counts as status "timeout").
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    #[arg(long)]
    pub api_key: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the load and prints the report.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let texts: Vec<String> = std::fs::read_to_string(&a.texts)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("text")?.as_str().map(String::from))
        .collect();
    anyhow::ensure!(!texts.is_empty(), "no texts in {}", a.texts.display());
    let texts = Arc::new(texts);
    let client = reqwest::Client::builder().timeout(Duration::from_secs_f64(a.timeout)).pool_max_idle_per_host(a.clients).build()?;
    let url = format!("{}/v1/models/{}/predict", a.url.trim_end_matches('/'), a.model);
    let send = |i: usize| {
        let batch: Vec<&String> = (0..a.batch).map(|j| &texts[(i * a.batch + j) % texts.len()]).collect();
        let mut req = client.post(&url).json(&json!({"inputs": batch}));
        if let Some(k) = &a.api_key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    for i in 0..a.warmup {
        send(i).await?.bytes().await?;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        tasks.push(async move {
            let (mut lat, mut statuses) = (Vec::new(), BTreeMap::<String, usize>::new());
            let mut server: Vec<[f64; 4]> = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let status = match send(i).await {
                    Ok(r) => {
                        let s = r.status().as_u16().to_string();
                        let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                        if let (Some(q), Some(t), Some(i), Some(b)) =
                            (header("x-queue-time"), header("x-tokenization-time"), header("x-inference-time"), header("x-batch-size"))
                        {
                            server.push([q, t, i, b]);
                        }
                        let _ = r.bytes().await;
                        s
                    }
                    Err(e) if e.is_timeout() => "timeout".into(),
                    Err(_) => "error".into(),
                };
                if status == "200" {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                *statuses.entry(status).or_default() += 1;
                i += a.clients;
                if a.think_ms > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(a.think_ms / 1e3)).await;
                }
            }
            (lat, statuses, server)
        });
    }
    let results = futures::future::join_all(tasks).await;
    let wall = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().flat_map(|(l, _, _)| l.iter().copied()).collect();
    lat.sort_by(f64::total_cmp);
    let mut statuses = BTreeMap::<String, usize>::new();
    let server = |k: usize| {
        let mut v: Vec<f64> = results.iter().flat_map(|(_, _, s)| s.iter().map(move |t| t[k])).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let server_p50 = |k: usize| percentile(&server(k), 0.5);
    let batch_sizes = server(3);
    for (_, s, _) in &results {
        for (k, v) in s {
            *statuses.entry(k.clone()).or_default() += v;
        }
    }
    let ok = statuses.get("200").copied().unwrap_or(0);
    let report = json!({
        "clients": a.clients, "batch": a.batch, "think_ms": a.think_ms, "seconds": wall,
        "requests": statuses.values().sum::<usize>(), "statuses": statuses,
        "texts_per_s": (ok * a.batch) as f64 / wall,
        "latency_ms": {"p50": percentile(&lat, 0.5), "p95": percentile(&lat, 0.95), "p99": percentile(&lat, 0.99),
                       "min": lat.first(), "max": lat.last()},
        // Medians of what the server reports in its timing headers: the rest of a request's
        // latency is HTTP, JSON and the client.
        "server_ms_p50": {"queue": server_p50(0), "tokenization": server_p50(1), "inference": server_p50(2)},
        // Texts in the forward passes each request shared, as the server reports them.
        "batch_size": {"mean": batch_sizes.iter().sum::<f64>() / batch_sizes.len().max(1) as f64,
                       "p50": percentile(&batch_sizes, 0.5)},
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
