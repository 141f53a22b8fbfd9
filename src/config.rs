//! The server's configuration (the options of `finetuned serve`, each also from its
//! environment variable) and the device choice.

use clap::Args;
use std::path::PathBuf;

/// Options of `finetuned serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (the log line `listening on http://ADDR` names it).
    #[arg(long, env = "FINETUNED_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,

    /// Directory for the SQLite database, uploaded datasets and trained models.
    #[arg(long, env = "FINETUNED_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The database for jobs, datasets and models: a `postgres://user:password@host/db` URL, so
    /// that several API and worker processes share one queue; default: SQLite in the data dir.
    #[arg(long, env = "FINETUNED_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where datasets, checkpoints and trained models are kept so that every process sees
    /// them: an object-store URL (`s3://bucket/prefix`; S3-compatible servers through
    /// `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true`; credentials from the usual `AWS_*`
    /// variables; `gs://`, `az://` and `file://` too). The data dir is then a local cache.
    /// Default: the data dir alone.
    #[arg(long, env = "FINETUNED_OBJECT_STORE")]
    pub object_store: Option<String>,

    /// Directory of base models: each sub-directory holding config.json, tokenizer.json and
    /// model.safetensors is a model whose id is the directory's name.
    #[arg(long, env = "FINETUNED_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,

    /// When set, every /v1 request needs `Authorization: Bearer <key>`.
    #[arg(long, env = "FINETUNED_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// `cpu`, `cuda` or `cuda:N`; default: CUDA when built with it and present, else CPU.
    #[arg(long, env = "FINETUNED_DEVICE")]
    pub device: Option<String>,

    /// What training computes in: `auto` (bf16 on a GPU, f32 on the CPU), `f32`, `bf16` or
    /// `f16` (with dynamic loss scaling). Weights are kept, evaluated and saved in f32.
    #[arg(long, env = "FINETUNED_DTYPE", default_value = "auto")]
    pub dtype: String,

    /// What predict computes the encoder's dense layers in: `f32` (logits match
    /// transformers') or `bf16` (on a CPU with AVX512-BF16: about 1.7× faster for a short
    /// text, logits within ~1e-2; elsewhere it falls back to f32 with a warning).
    #[arg(long, env = "FINETUNED_PREDICT_DTYPE", default_value = "f32")]
    pub predict_dtype: String,

    /// The model that the text-embeddings-inference routes (`POST /predict`, `GET /info`,
    /// `POST /tokenize`) serve when a request names none in its `X-Model` header.
    #[arg(long, env = "FINETUNED_DEFAULT_MODEL")]
    pub default_model: Option<String>,

    /// Largest dataset upload in bytes; a larger body gets 413.
    #[arg(long, env = "FINETUNED_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_upload_bytes: usize,

    /// Largest predict request body in bytes; a larger body gets 413. Predict has its own
    /// limit: `--max-upload-bytes` is sized for datasets.
    #[arg(long, env = "FINETUNED_MAX_PREDICT_BODY_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_predict_body_bytes: usize,

    /// Most characters (Unicode scalar values) in one predict input, checked before
    /// tokenization; a longer input gets 422 naming it.
    #[arg(long, env = "FINETUNED_MAX_INPUT_CHARS", default_value_t = 32_768,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_input_chars: usize,

    /// Most texts in one predict request.
    #[arg(long, env = "FINETUNED_MAX_BATCH_INPUTS", default_value_t = 256)]
    pub max_batch_inputs: usize,

    /// Predict requests allowed in flight at once; past it a request gets 429.
    #[arg(long, env = "FINETUNED_MAX_CONCURRENT_PREDICTS", default_value_t = 64)]
    pub max_concurrent_predicts: usize,

    /// After a forward pass that answered several callers, how long (ms) the next one waits
    /// for them to send their next requests, so that clients sending one request after
    /// another share full batches (0: never wait; at most 1000).
    #[arg(long, env = "FINETUNED_BATCH_REJOIN_WAIT_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub batch_rejoin_wait_ms: u64,

    /// Trained models kept loaded for predict (least recently used are unloaded first).
    #[arg(long, env = "FINETUNED_MODEL_CACHE_SIZE", default_value_t = 8)]
    pub model_cache_size: usize,

    /// Memory budget of loaded models in MiB: past it, the least recently used are unloaded.
    #[arg(long, env = "FINETUNED_MODEL_CACHE_MIB", default_value_t = 4096)]
    pub model_cache_mib: usize,

    /// Memory budget in MiB of LoRA adapters loaded to run over a shared base (their low-rank
    /// pairs and heads; the bases count against `--model-cache-mib`).
    #[arg(long, env = "FINETUNED_ADAPTER_CACHE_MIB", default_value_t = 512)]
    pub adapter_cache_mib: usize,

    /// Threads for training jobs (0 = one per core). With `--predict-threads`, splits the
    /// cores so that a running job cannot starve predict.
    #[arg(long, env = "FINETUNED_TRAIN_THREADS", default_value_t = 0)]
    pub train_threads: usize,

    /// Threads for inference, shared by every loaded model (0 = one per core).
    #[arg(long, env = "FINETUNED_PREDICT_THREADS", default_value_t = 0)]
    pub predict_threads: usize,

    /// Hugging Face hub address for `base_model: "owner/name"` (default huggingface.co).
    #[arg(long, env = "HF_ENDPOINT")]
    pub hf_endpoint: Option<String>,

    /// Hugging Face home: hub models are cached under its `hub/` (default: the data dir's `hub/`).
    #[arg(long, env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,

    /// Key of the HMAC-SHA256 that signs job webhooks (`X-Finetuned-Signature: sha256=…`);
    /// without it webhooks go unsigned.
    #[arg(long, env = "FINETUNED_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Seconds a webhook receiver has to answer one delivery; one that does not is retried as
    /// a failure. A slow receiver holds back only its own job's webhooks.
    #[arg(long, env = "FINETUNED_WEBHOOK_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_seconds: u64,

    /// Steps between checkpoints of a running fine-tuning job (0: only when the server stops).
    /// A job interrupted by a stop or a crash resumes from its newest checkpoint.
    #[arg(long, env = "FINETUNED_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: usize,

    /// Checkpoints kept per running job (the newest ones; all are removed when the job ends).
    #[arg(long, env = "FINETUNED_KEEP_CHECKPOINTS", default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub keep_checkpoints: usize,

    /// Log format: `text` or `json`.
    #[arg(long, env = "FINETUNED_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// What this process runs: `all` (the API and a worker), `api` (the API only: jobs wait for
    /// a worker process on the same database and data) or `worker` (trains jobs; serves only
    /// `/healthz`, `/readyz` and `/metrics`).
    #[arg(long, env = "FINETUNED_ROLE", default_value = "all", value_parser = ["all", "api", "worker"])]
    pub role: String,

    /// One worker per device named here (`cuda:0,cuda:1`), each training its own job; default:
    /// one worker on `--device`.
    #[arg(long, env = "FINETUNED_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,

    /// This process's name in the job queue (jobs record which worker runs them); a restarted
    /// process with the same name takes its interrupted jobs back at once. Default: the host
    /// name for `--role all`, host name and process id for `--role worker` (several worker
    /// processes may share a host); in Kubernetes, the pod's name.
    #[arg(long, env = "FINETUNED_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Seconds a worker's claim on a job holds without renewal. A worker renews it three times
    /// a lease while it trains; once a dead worker's lease runs out another worker takes the job
    /// and resumes it from its newest checkpoint.
    #[arg(long, env = "FINETUNED_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_seconds: u64,

    /// How often an idle worker looks for jobs queued by other processes, in milliseconds (jobs
    /// queued through its own process wake it at once).
    #[arg(long, env = "FINETUNED_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub poll_interval_ms: u64,
}

impl ServeConfig {
    /// Defaults for tests: port 0 and the given directories.
    pub fn for_test(data_dir: PathBuf, models_dir: PathBuf) -> Self {
        Self {
            addr: "127.0.0.1:0".into(),
            data_dir,
            models_dir,
            api_key: None,
            database_url: None,
            object_store: None,
            device: Some("cpu".into()),
            dtype: "auto".into(),
            predict_dtype: "f32".into(),
            default_model: None,
            max_upload_bytes: 512 * 1024 * 1024,
            max_predict_body_bytes: 4 * 1024 * 1024,
            max_input_chars: 32_768,
            max_batch_inputs: 256,
            max_concurrent_predicts: 64,
            batch_rejoin_wait_ms: 5,
            model_cache_size: 8,
            model_cache_mib: 4096,
            adapter_cache_mib: 512,
            train_threads: 0,
            hf_endpoint: None,
            webhook_secret: None,
            webhook_timeout_seconds: 10,
            hf_home: None,
            predict_threads: 0,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            log_format: "text".into(),
            role: "all".into(),
            devices: vec![],
            worker_id: None,
            lease_seconds: 30,
            poll_interval_ms: 1000,
        }
    }
}

impl ServeConfig {
    /// Whether this process serves the API.
    pub fn runs_api(&self) -> bool {
        self.role != "worker"
    }

    /// Whether this process trains jobs.
    pub fn runs_worker(&self) -> bool {
        self.role != "api"
    }

    /// The devices to run a worker on (see `--devices`).
    pub fn worker_devices(&self) -> Vec<Option<String>> {
        if self.devices.is_empty() {
            vec![self.device.clone()]
        } else {
            self.devices.iter().map(|d| Some(d.trim().to_string())).collect()
        }
    }

    /// This process's worker name (see `--worker-id`).
    pub fn worker_name(&self) -> String {
        if let Some(id) = &self.worker_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into());
        if self.role == "worker" {
            format!("{host}-{}", std::process::id())
        } else {
            host
        }
    }
}

/// The candle device named by `--device`.
pub fn device(spec: Option<&str>) -> anyhow::Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        // `cuda_is_available` only says the build has CUDA: try the GPU, and fall back to the
        // CPU when there is none (no driver, no device).
        None if candle_core::utils::cuda_is_available() => Ok(Device::new_cuda(0).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "built with CUDA but no GPU could be opened; using the CPU");
            Device::Cpu
        })),
        None => Ok(Device::Cpu),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Ok(Device::new_cuda(0)?),
        Some(s) => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::new_cuda(n)?),
            None => anyhow::bail!("--device must be cpu, cuda or cuda:N, not {s:?}"),
        },
    }
}
