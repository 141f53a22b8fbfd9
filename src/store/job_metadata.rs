//! Job metadata as rows of `job_metadata` (see `migrations/sqlite/0007_job_metadata.sql`), for
//! filtering the job list; the job object reads them from `jobs.metadata`.

use std::collections::BTreeMap;

/// Stores a new job's pairs, in the transaction that queues it.
pub async fn insert(tx: &mut crate::store::Tx, job_id: &str, pairs: &BTreeMap<String, String>) -> sqlx::Result<()> {
    for (key, value) in pairs {
        sqlx::query("insert into job_metadata (job_id, key, value) values ($1, $2, $3)")
            .bind(job_id)
            .bind(key)
            .bind(value)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The conditions `jobs` rows meet when they have every one of `n` pairs, whose keys and
/// values are bound as parameters `$first`, `$first + 1`, … (key, value, key, value…).
pub fn filter_sql(first: usize, n: usize) -> String {
    (0..n)
        .map(|i| {
            let (k, v) = (first + 2 * i, first + 2 * i + 1);
            format!(" and exists (select 1 from job_metadata m where m.job_id = jobs.id and m.key = ${k} and m.value = ${v})")
        })
        .collect()
}
