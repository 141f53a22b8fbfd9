//! Idempotency keys of job creation (see `migrations/sqlite/0008_idempotency_keys.sql`).

use super::Pool;

/// How long a key is honoured, in seconds; after that it may name a new request.
pub const KEEP_SECS: i64 = 24 * 3600;

/// The request a key was first used for, and the job it queued.
#[derive(Debug, sqlx::FromRow)]
pub struct Seen {
    pub request_hash: String,
    pub job_id: String,
}

/// The request `key` was used for within [`KEEP_SECS`], if any.
pub async fn find(pool: &Pool, key: &str) -> sqlx::Result<Option<Seen>> {
    sqlx::query_as("select request_hash, job_id from idempotency_keys where key = $1 and created_at >= $2")
        .bind(key)
        .bind(super::now() - KEEP_SECS)
        .fetch_optional(pool)
        .await
}

/// Records `key` for the job being queued in `tx`; false when a concurrent request holds the
/// key already (its transaction wins; this one must roll back).
pub async fn record(tx: &mut crate::store::Tx, key: &str, request_hash: &str, job_id: &str) -> sqlx::Result<bool> {
    let now = super::now();
    // Keys past their time go (this one too, if it was last used more than a day ago).
    sqlx::query("delete from idempotency_keys where created_at < $1").bind(now - KEEP_SECS).execute(&mut **tx).await?;
    let done = sqlx::query(
        "insert into idempotency_keys (key, request_hash, job_id, created_at) values ($1, $2, $3, $4) on conflict (key) do nothing",
    )
    .bind(key)
    .bind(request_hash)
    .bind(job_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
