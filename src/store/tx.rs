//! Transactions that never leave a connection half-way through one.
//!
//! When COMMIT fails (a full disk answers SQLITE_FULL), SQLite may keep the transaction open,
//! and a connection handed back to the pool in that state shows its uncommitted rows to the next
//! reader and holds the write lock. sqlx's `Transaction` returns the connection to the pool after
//! a failed commit; `Tx` closes it instead, so its uncommitted work is rolled back with it.

use super::Pool;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use std::ops::{Deref, DerefMut};

/// A transaction on a pooled connection of its own. Dropped without `commit` or `rollback`
/// (an error, a cancelled request), its connection is closed rather than reused.
pub struct Tx {
    conn: PoolConnection<Any>,
    ended: bool,
    postgres: bool,
}

impl Tx {
    /// Takes a connection from the pool and begins a (deferred) transaction on it.
    pub async fn begin(pool: &Pool) -> sqlx::Result<Self> {
        let mut conn = pool.acquire().await?;
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        Ok(Self { conn, ended: false, postgres: super::is_postgres(pool) })
    }

    /// Serialises this transaction with every other that locks one of `keys` (`dataset:<id>`,
    /// `model:<id>`), until it ends. SQLite runs one writer at a time, so there it is a no-op;
    /// on Postgres, where a check such as "no job uses this dataset" and a write that would
    /// break it can otherwise pass at once in two transactions, it takes advisory locks.
    pub async fn lock(&mut self, keys: &[&str]) -> sqlx::Result<()> {
        if !self.postgres {
            return Ok(());
        }
        let mut keys = keys.to_vec();
        // One order for everyone: no deadlock between two transactions locking the same keys.
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            sqlx::query("select pg_advisory_xact_lock(hashtext($1))::text").bind(key).execute(&mut *self.conn).await?;
        }
        Ok(())
    }

    /// Commits; on failure the connection is closed, which rolls the transaction back.
    pub async fn commit(mut self) -> sqlx::Result<()> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }

    /// Rolls back, keeping the connection when that succeeds.
    pub async fn rollback(mut self) -> sqlx::Result<()> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.ended = true;
        Ok(())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool() -> (Pool, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::store::connect(dir.path(), None).await.unwrap();
        sqlx::query("create table t (x integer)").execute(&pool).await.unwrap();
        (pool, dir)
    }

    async fn count(pool: &Pool) -> i64 {
        sqlx::query_scalar("select count(*) from t").fetch_one(pool).await.unwrap()
    }

    #[tokio::test]
    async fn committed_rows_stay_and_dropped_or_rolled_back_rows_vanish() {
        let (pool, _dir) = pool().await;
        let mut tx = Tx::begin(&pool).await.unwrap();
        sqlx::query("insert into t values (1)").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = Tx::begin(&pool).await.unwrap();
        sqlx::query("insert into t values (2)").execute(&mut *tx).await.unwrap();
        drop(tx);
        let mut tx = Tx::begin(&pool).await.unwrap();
        sqlx::query("insert into t values (3)").execute(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(count(&pool).await, 1);
        // Every connection is usable afterwards: none is left inside a transaction.
        let mut tx = Tx::begin(&pool).await.unwrap();
        sqlx::query("insert into t values (4)").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count(&pool).await, 2);
    }
}
