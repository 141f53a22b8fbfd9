//! Logging: `RUST_LOG`-style filtering, text or JSON lines.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (`format`: `text` or `json`). Safe to call twice.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}
