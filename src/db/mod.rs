//! The SQLite index (sqlx, runtime queries, migrations in `migrations/`): runs, their tensor
//! manifests, snapshots, reconstructions, and the blob rows whose states make garbage
//! collection safe. One file per table family: [`runs`](Db::run), snapshots and manifests,
//! blobs, reconstructions.
//!
//! All SQL lives here. The database runs in WAL mode with `synchronous = FULL` (a committed
//! snapshot row survives power loss), foreign keys on, and a busy timeout so that the server
//! and command-line tools can share it. Rows are plain data: JSON columns come back as
//! [`serde_json::Value`], states as enums; how they look on the wire is the server's business.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::Result;

mod blobs;
mod reconstructions;
mod runs;
mod snapshots;

pub use blobs::{BlobRow, BlobState};
pub use reconstructions::{NewReconstruction, ReconstructionRow};
pub use runs::{check_run_name, Run, RunSummary};
pub use snapshots::{
    describe_differences, manifest_differences, ManifestEntry, NewSnapshot, Recorded, SnapshotRow,
};

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

    /// The connection pool (for later modules' queries).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A connection inside `BEGIN IMMEDIATE` (the write lock taken up front, so two writers
    /// never deadlock upgrading read transactions). End it with [`finish`].
    async fn begin_immediate(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        Ok(conn)
    }
}

/// Commits on success, rolls back on failure, and returns the result.
async fn finish<T>(
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
fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A JSON column's text for an insert (the schema checks `json_valid`).
fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}
