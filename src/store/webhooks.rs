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
    /// Unix milliseconds of the attempt this row was due for (see [`claim`]).
    pub next_attempt_at: i64,
    pub url: String,
    /// The body sent at the first attempt; every retry sends it again unchanged.
    pub body: Option<String>,
}

/// The oldest undelivered change of each job whose retry time has come (later changes of a
/// job wait behind its oldest, so each receiver sees them in order).
pub async fn due(pool: &Pool, now_ms: i64, limit: i64) -> sqlx::Result<Vec<Pending>> {
    sqlx::query_as(
        r#"select o.id, o.job_id, o.status, o.attempts, o.next_attempt_at, j.webhook_url as url, o.body
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

/// Takes a due change for one attempt by moving its next attempt to `until_ms`, so that the
/// other servers sharing the database leave it alone while this one sends it (and retry it
/// after `until_ms` if this one dies meanwhile). False when another server took it first.
pub async fn claim(pool: &Pool, row: &Pending, until_ms: i64) -> sqlx::Result<bool> {
    let r = sqlx::query("update webhook_outbox set next_attempt_at = $1 where id = $2 and next_attempt_at = $3")
        .bind(until_ms)
        .bind(row.id)
        .bind(row.next_attempt_at)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Fixes the body of a change before its first attempt is sent and returns the body fixed
/// (one fixed earlier, by this server or another sharing the database, stays).
pub async fn fix_body(pool: &Pool, id: i64, body: &str) -> sqlx::Result<String> {
    sqlx::query("update webhook_outbox set body = $1 where id = $2 and body is null").bind(body).bind(id).execute(pool).await?;
    sqlx::query_scalar("select body from webhook_outbox where id = $1").bind(id).fetch_one(pool).await
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
