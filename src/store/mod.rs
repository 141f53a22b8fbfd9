//! All SQL: the database pool (SQLite or Postgres) and one module per table group.

pub mod datasets;
pub mod idempotency;
pub mod job_metadata;
pub mod job_types;
pub mod jobs;
pub mod models;
pub mod tx;
pub mod webhooks;

use serde::de::DeserializeOwned;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Executor, Row};
use std::path::Path;
use std::time::Duration;
pub use tx::Tx;

/// The database: SQLite in the data dir (the embedded default) or Postgres (`--database-url`),
/// through sqlx's `Any` driver; every query here is written for both.
pub type Pool = sqlx::AnyPool;

/// How long a request waits for a database connection before it is answered 503: a database
/// that is down gets a quick answer, never a hang.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens the database and applies its migrations: Postgres when `database_url` is given
/// (`postgres://…`), else SQLite in `data_dir` (created if needed, in WAL mode).
pub async fn connect(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Pool> {
    sqlx::any::install_default_drivers();
    if let Some(url) = database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!("--database-url must be a postgres:// URL (SQLite, the default, lives in the data dir)");
        }
        let pool = AnyPoolOptions::new().max_connections(16).acquire_timeout(ACQUIRE_TIMEOUT).connect(url).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        return Ok(pool);
    }
    let path = std::fs::canonicalize(data_dir)?.join("finetuned.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // What SqliteConnectOptions would set: WAL, a 10 s wait on a lock, foreign keys.
                for pragma in
                    ["pragma busy_timeout = 10000", "pragma journal_mode = wal", "pragma synchronous = normal", "pragma foreign_keys = on"]
                {
                    conn.execute(pragma).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await?;
    sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
    Ok(pool)
}

/// Whether `pool` is a Postgres database.
pub fn is_postgres(pool: &Pool) -> bool {
    pool.connect_options().database_url.scheme().starts_with("postgres")
}

/// Whether the database answers.
pub async fn ping(pool: &Pool) -> bool {
    sqlx::query("select 1").execute(pool).await.is_ok()
}

fn decode_error(column: &str, e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: column.into(), source: Box::new(e) }
}

/// A JSON column (stored as text on both engines), decoded.
fn json_column<T: DeserializeOwned>(row: &AnyRow, column: &str) -> sqlx::Result<T> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| decode_error(column, e))
}

/// A nullable JSON column, decoded.
fn json_column_opt<T: DeserializeOwned>(row: &AnyRow, column: &str) -> sqlx::Result<Option<T>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| decode_error(column, e))).transpose()
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A new opaque id with the given prefix (`ds`, `job`, …).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}
