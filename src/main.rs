use clap::Parser;
use finetuned::cli::{Cli, Command};
use finetuned::startup::Application;

fn main() -> anyhow::Result<()> {
    finetuned::compute::init_process();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            finetuned::telemetry::init(&config.log_format);
            let app = Application::build(config).await?;
            let token = app.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                // Cancel first: the log line must not be able to hold up the stop.
                token.cancel();
                tracing::info!("stopping: finishing in-flight requests");
            });
            app.run_until_stopped().await
        }
        Command::BenchServe(args) => finetuned::bench::run(args).await,
        Command::Train(args) => {
            finetuned::telemetry::init("text");
            tokio::task::spawn_blocking(move || finetuned::cli::run_train(args)).await?
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
