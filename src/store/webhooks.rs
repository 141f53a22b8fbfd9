//! The webhook outbox (filled by triggers on `jobs`, see `migrations/sqlite/0003_webhooks.sql`).

use super::job_types::JobStatus;
use super::Pool;

/// A state change waiting to be delivered.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub id: i64,
    pub job_id: String,
    #[sqlx(try_from = "String")]
    pub status: JobStatus,
    pub attempts: i64,
    pub url: String,
}

/// The oldest undelivered change of each job whose retry time has come (later changes of a
/// job wait behind its oldest, so each receiver sees them in order).
pub async fn due(pool: &Pool, now_ms: i64, limit: i64) -> sqlx::Result<Vec<Pending>> {
    sqlx::query_as(
        r#"select o.id, o.job_id, o.status, o.attempts, j.webhook_url as url
           from webhook_outbox o join jobs j on j.id = o.job_id
           where o.id = (select min(id) from webhook_outbox where job_id = o.job_id)
             and o.next_attempt_at <= $1 and j.webhook_url is not null
           order by o.id limit $2"#,
    )
    .bind(now_ms)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Removes a delivered (or abandoned) change.
pub async fn done(pool: &Pool, id: i64) -> sqlx::Result<()> {
    sqlx::query("delete from webhook_outbox where id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// Records a failed attempt and when to try again.
pub async fn retry_at(pool: &Pool, id: i64, next_ms: i64) -> sqlx::Result<()> {
    sqlx::query("update webhook_outbox set attempts = attempts + 1, next_attempt_at = $1 where id = $2")
        .bind(next_ms)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}
