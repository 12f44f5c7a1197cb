//! The connection to the index: opening it (pragmas, migrations) and the transaction helpers
//! every table's file uses.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::Result;

/// Handle to the index.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating if missing) the SQLite database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!().run(&pool).await?;
        Ok(Self { pool })
    }

    /// SQLite's `quick_check` of the whole file: `None` when it finds nothing wrong, else its
    /// first findings (a few milliseconds per megabyte of index).
    pub async fn quick_check(&self) -> Result<Option<String>> {
        let lines: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(5)")
            .fetch_all(&self.pool)
            .await?;
        Ok((lines.len() != 1 || lines[0] != "ok").then(|| lines.join("; ")))
    }

    /// The connection pool (for later modules' queries).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A connection inside `BEGIN IMMEDIATE` (the write lock taken up front, so two writers
    /// never deadlock upgrading read transactions). End it with [`finish`].
    pub(super) async fn begin_immediate(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        Ok(conn)
    }
}

/// Commits on success, rolls back on failure, and returns the result.
pub(super) async fn finish<T>(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
    result: Result<T>,
) -> Result<T> {
    match result {
        Ok(v) => {
            sqlx::query("COMMIT").execute(&mut **conn).await?;
            Ok(v)
        }
        Err(e) => {
            // Report the real error; a connection whose rollback failed is not reused.
            if sqlx::query("ROLLBACK").execute(&mut **conn).await.is_err() {
                conn.close_on_drop();
            }
            Err(e)
        }
    }
}

/// Unix seconds now (blob state changes; GC's grace periods).
pub(super) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A JSON column's text for an insert (the schema checks `json_valid`).
pub(super) fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}
