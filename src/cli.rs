//! The command line (`Cli`), and `finetuned train`: offline fine-tuning with the flags and
//! JSON report of the PyTorch reference (`finetune_ref.py`), sharing all training code with
//! the service.

use crate::config::ServeConfig;
use crate::dataset::Row;
use crate::train::hyper::{EpochsInput, HyperparametersInput, JobKind};
use crate::train::objective::Task;
use crate::train::trainer::{self, Event, Observer, Outcome, TrainRequest};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// finetuned: fine-tune BERT text classifiers over a REST API and serve them.
#[derive(Debug, Parser)]
#[command(name = "finetuned", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up; boxing the server's config would only add noise at its uses.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the HTTP server and the training worker.
    Serve(ServeConfig),
    /// Fine-tune offline from the command line (same flags and report as `finetune_ref.py`).
    Train(TrainArgs),
    /// Load generator: N concurrent clients call predict on a running server for T seconds.
    BenchServe(crate::bench::BenchArgs),
}

/// Options of `finetuned train` (names and defaults as `finetune_ref.py`).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model directory (config.json, tokenizer.json, model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset directory with train.jsonl, validation.jsonl and (optionally) test.jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// A number of epochs, or `auto`: until early stopping's patience runs out, within a cap
    /// from the data.
    #[arg(long, default_value = "1")]
    pub epochs: String,
    #[arg(long, default_value_t = 32)]
    pub batch_size: u64,
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// The peak learning rate; without it, the method's default (as the API's).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 128)]
    pub max_len: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep the first N training rows (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_train: usize,
    /// `auto` (token classification for tagged words; multi-label for lists of labels;
    /// regression when every label is a number and one is not whole, as `finetune_ref.py --task
    /// auto`), `classification`, `multi_label_classification`, `regression`, `rerank` or
    /// `token_classification`.
    #[arg(long, default_value = "auto")]
    pub task: String,
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Batch examples of similar length together.
    #[arg(long)]
    pub group_by_length: bool,
    /// `auto`, `cls` (transformers' BertForSequenceClassification) or `mean`.
    #[arg(long, default_value = "auto")]
    pub pooling: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long)]
    pub device: Option<String>,
    /// What training computes in: `auto` (bf16 on a GPU, f32 on the CPU), `f32`, `bf16`, `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Results JSON path.
    #[arg(long)]
    pub out: PathBuf,
    /// Directory to save the fine-tuned model in (Hugging Face layout).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Log the loss every N steps.
    #[arg(long, default_value_t = 25)]
    pub log_every: usize,
    /// Which weights train: `full`, `lora` or `head` (as the `method` hyperparameter).
    #[arg(long, default_value = "full")]
    pub method: String,
    /// LoRA's rank, scale numerator, dropout and target modules (comma-separated), as
    /// `bench/lora_ref.py` takes them (defaults: the API's).
    #[arg(long)]
    pub lora_r: Option<u64>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
}

/// Rows of `DIR/split.jsonl`, and the task `auto` picks for them.
fn read_split(dir: &Path, split: &str, required: bool) -> anyhow::Result<Option<(Vec<Row>, Task)>> {
    let path = dir.join(format!("{split}.jsonl"));
    if !path.is_file() {
        if required {
            bail!("{} is missing", path.display());
        }
        return Ok(None);
    }
    let bytes = std::fs::read(&path)?;
    let parsed =
        crate::dataset::parse(&bytes, crate::dataset::Format::Jsonl, "text", "label").with_context(|| format!("{}", path.display()))?;
    let fractional = |r: &Row| r.labels().iter().any(|l| l.parse::<f64>().is_ok_and(|v| v.fract() != 0.0));
    let task = if parsed.tokens {
        Task::Tokens
    } else if parsed.multi_label {
        Task::MultiLabel
    } else if parsed.text_label_line.is_none() && parsed.rows.iter().any(fractional) {
        Task::Regression
    } else {
        Task::SingleLabel
    };
    Ok(Some((parsed.rows, task)))
}

/// The task `--task` names, or the one `auto` found in the data.
fn task_of(arg: &str, found: Task) -> anyhow::Result<Task> {
    Ok(match arg {
        "auto" => found,
        "classification" => Task::SingleLabel,
        "multi_label_classification" => Task::MultiLabel,
        "regression" => Task::Regression,
        "rerank" => Task::Rerank,
        "token_classification" => Task::Tokens,
        other => {
            bail!("--task {other:?}: use auto, classification, multi_label_classification, regression, rerank or token_classification")
        }
    })
}

struct CliObserver {
    bar: Option<ProgressBar>,
    log_every: usize,
    window: (Instant, usize, f64, usize),
    loss_log: Vec<serde_json::Value>,
    batch_size: usize,
}

impl Observer for CliObserver {
    fn on_event(&mut self, e: Event) {
        match e {
            Event::Warning(m) => tracing::warn!("{m}"),
            Event::Message(m) => match &self.bar {
                Some(b) => b.println(m),
                None => tracing::info!("{m}"),
            },
            Event::Step(s) => {
                if let Some(b) = &self.bar {
                    b.set_length(s.total_steps as u64);
                    b.set_position(s.step as u64);
                    b.set_message(format!("loss {:.4}", s.loss));
                }
                let (t0, n0, sum, count) = &mut self.window;
                *sum += s.loss;
                *count += 1;
                if s.step % self.log_every == 0 || s.step == s.total_steps {
                    let secs = t0.elapsed().as_secs_f64();
                    let rate = (*count * self.batch_size) as f64 / secs.max(1e-9);
                    let entry = json!({"step": s.step, "epoch": s.epoch, "loss": *sum / *count as f64,
                                       "learning_rate": s.learning_rate, "interval_examples_per_s": rate});
                    if self.bar.is_none() {
                        tracing::info!(
                            "step {}/{} loss {:.4} lr {:.2e} {:.1} ex/s",
                            s.step,
                            s.total_steps,
                            *sum / *count as f64,
                            s.learning_rate,
                            rate
                        );
                    }
                    self.loss_log.push(entry);
                    *t0 = Instant::now();
                    *n0 = s.step;
                    *sum = 0.0;
                    *count = 0;
                }
            }
            Event::Pretrain(r) => tracing::info!("epoch {}: validation MLM loss {:.4}", r.epoch, r.loss),
            Event::Epoch(r) => {
                let m = format!("epoch {}: validation {}", r.epoch, r.report.headline_text());
                match &self.bar {
                    Some(b) => b.println(m),
                    None => tracing::info!("{m}"),
                }
            }
        }
    }
    fn should_stop(&self) -> bool {
        false
    }
}

/// Runs `finetuned train` and writes the JSON report.
pub fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    // candle's CPU kernels size their thread pools from RAYON_NUM_THREADS.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let device = crate::config::device(a.device.as_deref().or(Some("cpu")))?;
    let (mut train, found) = read_split(&a.data, "train", true)?.unwrap_or((vec![], Task::SingleLabel));
    let task = task_of(&a.task, found)?;
    let multi_label = task == Task::MultiLabel;
    let n_train_in_file = train.len();
    if a.max_train > 0 {
        train.truncate(a.max_train);
    }
    let validation = read_split(&a.data, "validation", false)?.map(|(rows, _)| rows);
    let test = read_split(&a.data, "test", false)?.map(|(rows, _)| rows);
    let info = crate::model::hf::artifacts::inspect(&a.model)?;
    let hp = HyperparametersInput {
        epochs: Some(a.epochs.parse::<u64>().map_or_else(|_| EpochsInput::Word(a.epochs.clone()), EpochsInput::Count)),
        batch_size: Some(a.batch_size),
        learning_rate: a.lr,
        max_seq_len: Some(a.max_len),
        warmup_ratio: Some(a.warmup_ratio),
        weight_decay: Some(a.weight_decay),
        seed: Some(a.seed),
        pooling: Some(a.pooling.clone()),
        group_by_length: Some(a.group_by_length),
        method: Some(a.method.clone()),
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        lora_target_modules: a.lora_targets.clone(),
        ..Default::default()
    }
    .resolve(&info.auto_pooling(), JobKind::FineTune)
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let precision = crate::train::precision::Precision::parse(&a.dtype, &device).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let mut req = TrainRequest::new(a.model.clone(), train, validation, hp.clone(), device);
    req.precision = precision;
    req.test_rows = test;
    req.out_dir = a.save.clone();
    req.max_grad_norm = a.max_grad_norm;
    req.eval_batch_size = a.eval_batch_size;
    req.task = task;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps {per_sec} eta {eta} {msg}").expect("valid template"));
        b
    });
    let mut obs = CliObserver {
        bar,
        log_every: a.log_every.max(1),
        window: (Instant::now(), 0, 0.0, 0),
        loss_log: vec![],
        batch_size: a.batch_size as usize,
    };
    // The step runs on a thread of the pool its kernels use, as a served job's does: each
    // parallel op then wakes one thread, not two while the caller sleeps on a latch.
    let threads = crate::compute::pool("train", a.threads)?;
    let outcome = threads.install(|| trainer::run(req, &mut obs)).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    if let Some(b) = &obs.bar {
        b.finish_and_clear();
    }
    let Outcome::Finished(done) = outcome else { bail!("training stopped early") };
    let (_, peak) = crate::train::process_usage();
    let st = &done.stats;
    let train_cpu: f64 = st.epochs.iter().map(|e| e.train_cpu_seconds).sum();
    let mut rates: Vec<f64> = obs.loss_log.iter().filter_map(|e| e["interval_examples_per_s"].as_f64()).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied();
    let report = json!({
        "script": "finetuned train",
        "args": {"model": a.model, "data": a.data, "epochs": a.epochs.parse::<u64>().map_or_else(|_| json!(a.epochs), |n| json!(n)), "batch_size": a.batch_size, "lr": hp.learning_rate,
                 "max_len": a.max_len, "seed": a.seed, "max_train": a.max_train, "threads": a.threads,
                 "group_by_length": a.group_by_length, "pooling": hp.pooling, "weight_decay": a.weight_decay,
                 "warmup_ratio": a.warmup_ratio, "max_grad_norm": a.max_grad_norm, "eval_batch_size": a.eval_batch_size,
                 "method": hp.method, "lora": hp.lora},
        "argv": std::env::args().skip(1).collect::<Vec<_>>(),
        "env": {"finetuned": env!("CARGO_PKG_VERSION"), "threads": a.threads, "device": a.device.clone().unwrap_or_else(|| "cpu".into()), "dtype": precision.as_str()},
        "model": {"num_parameters": st.num_parameters},
        "data": {"labels": done.labels, "n_train": st.n_train, "n_train_in_file": n_train_in_file, "n_validation": st.n_validation},
        "schedule": {"steps_per_epoch": st.steps_per_epoch, "total_steps": st.total_steps, "warmup_steps": st.warmup_steps},
        "stopped": {"reason": st.stop_reason, "epochs_run": st.epochs.last().map_or(0, |e| e.epoch), "max_epochs": st.max_epochs},
        "timing": {"load_seconds": st.load_seconds, "tokenize_seconds": st.tokenize_seconds, "train_seconds": st.train_seconds,
                   "train_cpu_seconds": train_cpu, "train_cpu_cores_busy": train_cpu / st.train_seconds.max(1e-9),
                   "test_eval_seconds": done.test.as_ref().map(|t| t.seconds), "total_wall_seconds": t0.elapsed().as_secs_f64()},
        "train_examples_per_s": (st.n_train * st.epochs.len()) as f64 / st.train_seconds.max(1e-9),
        "train_examples_per_s_median_interval": median,
        "epochs": st.epochs,
        "val_accuracy_per_epoch": st.epochs.iter().map(|e| e.val_accuracy).collect::<Vec<_>>(),
        "best_epoch": done.best.epoch,
        "test_accuracy": done.test.as_ref().map(|t| t.report.accuracy),
        "test_macro_f1": done.test.as_ref().map(|t| t.report.macro_f1),
        "multi_label": multi_label,
        "task": format!("{task:?}"),
        "test_pearson": done.test.as_ref().and_then(|t| t.report.pearson),
        "test_spearman": done.test.as_ref().and_then(|t| t.report.spearman),
        "test_mse": done.test.as_ref().and_then(|t| t.report.mse),
        "test_mrr_at_10": done.test.as_ref().and_then(|t| t.report.mrr_at_10),
        "test_ndcg_at_10": done.test.as_ref().and_then(|t| t.report.ndcg_at_10),
        "test_f1": done.test.as_ref().and_then(|t| t.report.f1),
        "test_precision": done.test.as_ref().and_then(|t| t.report.precision),
        "test_recall": done.test.as_ref().and_then(|t| t.report.recall),
        "test_token_accuracy": done.test.as_ref().filter(|_| task == Task::Tokens).map(|t| t.report.accuracy),
        "test_f1_per_type": done.test.as_ref().filter(|_| task == Task::Tokens)
            .map(|t| t.report.per_class.iter().map(|(k, v)| (k.clone(), v.f1)).collect::<std::collections::BTreeMap<_, _>>()),
        "test_micro_f1": done.test.as_ref().and_then(|t| t.report.micro_f1),
        "thresholds": done.tuned.as_ref().map(|t| done.labels.iter().cloned().zip(t.thresholds.iter().copied()).collect::<std::collections::BTreeMap<_, _>>()),
        "calibration": {"temperature": done.calibration.temperature,
                        "validation_ece_before": done.calibration.validation_ece_before,
                        "validation_ece_after": done.calibration.validation_ece_after,
                        "test_ece_before": done.test_ece.map(|e| e.0), "test_ece_after": done.test_ece.map(|e| e.1)},
        "test_tuned": done.test_tuned.as_ref().map(|t| json!({"macro_f1": t.report.macro_f1, "micro_f1": t.report.micro_f1,
                                                             "exact_match": t.report.accuracy})),
        "loss_log": obs.loss_log,
        "peak_rss_mib": peak,
        "peak_gpu_mib": st.epochs.iter().filter_map(|e| e.peak_gpu_mib).max(),
    });
    std::fs::write(&a.out, serde_json::to_vec_pretty(&report)?)?;
    eprintln!(
        "[finetuned] train {:.1} ex/s, test {}, peak RSS {:.0} MiB -> {}",
        report["train_examples_per_s"].as_f64().unwrap_or(0.0),
        done.test.as_ref().map_or("-".into(), |t| t.report.headline_text()),
        peak,
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rejoin_wait_is_refused_past_a_second() {
        let parse = |v: &str| Cli::try_parse_from(["finetuned", "serve", "--batch-rejoin-wait-ms", v]);
        assert!(matches!(parse("0").unwrap().command, Command::Serve(c) if c.batch_rejoin_wait_ms == 0));
        assert!(matches!(parse("1000").unwrap().command, Command::Serve(c) if c.batch_rejoin_wait_ms == 1000));
        let err = parse("1001").unwrap_err().to_string();
        assert!(err.contains("--batch-rejoin-wait-ms"), "{err}");
        assert!(parse("-1").is_err());
    }

    #[test]
    fn predict_has_its_own_body_limit_and_a_per_input_character_cap() {
        let Command::Serve(c) = Cli::try_parse_from(["finetuned", "serve"]).unwrap().command else { unreachable!() };
        assert_eq!((c.max_predict_body_bytes, c.max_input_chars, c.max_upload_bytes), (4 << 20, 32_768, 512 << 20));
        assert!(Cli::try_parse_from(["finetuned", "serve", "--max-input-chars", "0"]).is_err());
        assert!(Cli::try_parse_from(["finetuned", "serve", "--max-predict-body-bytes", "0"]).is_err());
    }
}
