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
        migrate(options.clone()).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
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
    /// never deadlock upgrading read transactions). End it with [`finish`]; dropped
    /// unfinished (its future cancelled: an aborted task, a client that hung up) the
    /// connection is closed, which rolls the transaction back, instead of going back to the
    /// pool still holding the write lock.
    pub(super) async fn begin_immediate(&self) -> Result<WriteTx> {
        let conn = self.pool.acquire().await?;
        let mut tx = WriteTx { conn, open: true };
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await {
            // No transaction was begun (e.g. the lock stayed busy): the connection is fine.
            tx.open = false;
            return Err(e.into());
        }
        Ok(tx)
    }
}

/// A pooled connection inside a write transaction begun by [`Db::begin_immediate`]; derefs
/// to the connection. Until [`finish`] ends the transaction, dropping it closes the
/// connection (SQLite rolls back an open transaction on close) rather than returning it to
/// the pool: sqlx does not track transactions begun with plain SQL, and a connection handed
/// back mid-transaction would keep the database's write lock, so that every later write
/// fails with "database is locked".
pub(super) struct WriteTx {
    conn: sqlx::pool::PoolConnection<sqlx::Sqlite>,
    open: bool,
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::SqliteConnection;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// Applies the migrations on a connection of its own with foreign keys off — a migration
/// that rebuilds a table (SQLite's way to change a column's constraints) drops the old one,
/// which must not cascade to the rows that refer to it — then checks every foreign key.
async fn migrate(options: SqliteConnectOptions) -> Result<()> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options.foreign_keys(false))
        .await?;
    sqlx::migrate!().run(&pool).await?;
    let broken: Vec<(String, Option<i64>, String)> =
        sqlx::query_as("SELECT \"table\", rowid, parent FROM pragma_foreign_key_check")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    if let Some((table, row, parent)) = broken.first() {
        return Err(crate::error::Error::Index(format!(
            "after migrating, {} row(s) refer to rows that do not exist (first: {table} row \
             {row:?} → {parent})",
            broken.len()
        )));
    }
    Ok(())
}

/// Commits on success, rolls back on failure, and returns the result.
pub(super) async fn finish<T>(tx: &mut WriteTx, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            // A failed commit leaves `open` set: the connection is closed, not reused.
            sqlx::query("COMMIT").execute(&mut **tx).await?;
            tx.open = false;
            Ok(v)
        }
        Err(e) => {
            // Report the real error; a connection whose rollback failed is not reused.
            if sqlx::query("ROLLBACK").execute(&mut **tx).await.is_ok() {
                tx.open = false;
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

#[cfg(test)]
mod tests {
    /// What sqlx recorded for each migration when it was applied (SHA-384 of the file). A
    /// database refuses to open ("migration N was previously applied but has been modified")
    /// once an applied file changes, comments included: a schema change is a new file, added
    /// here with its checksum; what the schema means is told in `migrations/README.md`.
    const LANDED: [(i64, &str); 7] = [
        (20261126000001, "b2abea195eeae4dfd999c215db5431da9756d4e1893577f9af86ebdd87b1046393d2bfb71e832e3c1e0bd5278e62e891"),
        (20261126000002, "6750a53ef2e4094bb861dc8d0afe95b9ec9584be6150ae151cd626bfe74ae40f389a89fbc9ca8d3cb738d2508cb63e9a"),
        (20261126000003, "e2f76302e759fe62fa37ca65010a5dbc5552f539c9e53bb6c563b5ba1616f3b0864a912c30abd0ae31a9a9c635785b01"),
        (20261130000004, "a985e60401070bd6a28c78d83cac0261c1c9c6f603aa028759d8c338b40209668f8f164a3daec0373b57690116ee1762"),
        (20261130000005, "c19e1faf1ee75396b7b3e775aba494b58cbcdefa4f63db44626e7ebbf9f60ff81b6559a8b1ec5471999fa38a78756162"),
        (20261201000006, "d841277387a3f301ae75d8d91b43c9c04545b38c4393063d6faeb069947fcb5a33dc9d3793af0660617a7fd4ae7b625b"),
        (20261206000007, "9769994622566baf20fab4abd8875278a84c48482008a8523e564a903c0548d439d2ce3f57bea6bf112a294ec3c78c03"),
    ];

    #[test]
    fn landed_migrations_are_never_edited() {
        let migrator = sqlx::migrate!();
        let found: Vec<(i64, String)> = migrator
            .iter()
            .map(|m| {
                let hex: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
                (m.version, hex)
            })
            .collect();
        for (version, checksum) in LANDED {
            let now = found.iter().find(|(v, _)| *v == version);
            assert_eq!(
                now.map(|(_, c)| c.as_str()),
                Some(checksum),
                "migration {version} was removed or edited: existing data directories would \
                 refuse to open; put the change in a new migration instead"
            );
        }
    }
}

#[cfg(test)]
mod upgrade_tests {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::str::FromStr;

    /// Rebuilding `sweeps` (migration 7, nullable `reference_id`) keeps every sweep, point and
    /// batch of a data directory made before it: dropping the old table must not cascade.
    #[test]
    fn the_sweeps_rebuild_keeps_existing_sweeps_and_their_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let options = SqliteConnectOptions::from_str("sqlite://")
                .unwrap()
                .filename(&path)
                .create_if_missing(true)
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .unwrap();
            let mut before = sqlx::migrate!();
            before.migrations = std::borrow::Cow::Owned(
                before
                    .migrations
                    .iter()
                    .filter(|m| m.version < 20261206000007)
                    .cloned()
                    .collect(),
            );
            before.run(&pool).await.unwrap();
            for sql in [
                "INSERT INTO runs (id, name, metadata) VALUES (1, 'r', '{}')",
                "INSERT INTO blobs (digest, size, state, changed_at) VALUES (printf('%064d', 0), 1, 'valid', 0)",
                "INSERT INTO reference_stats (id, name, source, feature_network, dims, count, \
                 stats_digest) VALUES (1, 'ref', 's', 'n', 2048, 0, printf('%064d', 0))",
                "INSERT INTO sweeps (id, run_id, reference_id, request, status) \
                 VALUES (5, 1, 1, '{}', 'running')",
                "INSERT INTO sweep_points (sweep_id, idx, sigma_rel, nimg, status) \
                 VALUES (5, 0, 0.1, 10, 'done'), (5, 1, 0.2, 10, 'queued')",
                "INSERT INTO sweep_batches (sweep_id, point_idx, batch, reconstruction_id, \
                 images, features_digest, seconds) VALUES (5, 0, 0, 'x', 2, printf('%064d', 0), 1.0)",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
            let db = super::Db::open(&path).await.unwrap();
            let sweep = db.sweep(5).await.unwrap().unwrap();
            assert_eq!(sweep.reference_id, Some(1));
            assert_eq!(sweep.evaluator.as_str(), "builtin");
            assert_eq!(db.sweep_points(5).await.unwrap().len(), 2);
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sweep_batches")
                .fetch_one(db.pool())
                .await
                .unwrap();
            assert_eq!(n, 1);
            let fk: Vec<(String,)> = sqlx::query_as("PRAGMA foreign_key_check")
                .fetch_all(db.pool())
                .await
                .unwrap_or_default();
            assert!(fk.is_empty());
            // Foreign keys are on again: deleting the run removes its sweeps and points.
            sqlx::query("DELETE FROM runs WHERE id = 1")
                .execute(db.pool())
                .await
                .unwrap();
            assert!(db.sweep_points(5).await.unwrap().is_empty());
        });
    }
}

#[cfg(test)]
mod cancellation_tests {
    use std::time::Duration;

    /// A write whose future is dropped inside its transaction (a task aborted between
    /// `BEGIN IMMEDIATE` and `COMMIT`) must not hand the write lock back to the pool: every
    /// later write would wait out the busy timeout and fail. Seen in CI: the sweep worker
    /// aborted its lease heartbeat while the heartbeat's `BEGIN IMMEDIATE` waited for the
    /// point's final write; the statement then succeeded on the connection's thread, the
    /// connection went back to the pool inside its transaction, and the server claimed and
    /// renewed nothing again. With the guard the connection is closed (rolled back).
    #[test]
    fn a_write_cancelled_mid_transaction_releases_the_lock_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let db = super::Db::open(&dir.path().join("index.sqlite"))
                .await
                .unwrap();
            for round in 0..8 {
                let writer = db.clone();
                let (began, wait) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(async move {
                    let mut tx = writer.begin_immediate().await.unwrap();
                    sqlx::query("INSERT INTO runs (name, metadata) VALUES ('cancelled', '{}')")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    began.send(()).unwrap();
                    std::future::pending::<()>().await;
                });
                wait.await.unwrap();
                task.abort();
                let _ = task.await;
                // The next writes (more than the pool has connections) commit within a
                // second; the cancelled insert is not there.
                for i in 0..6 {
                    let mut tx =
                        tokio::time::timeout(Duration::from_secs(10), db.begin_immediate())
                            .await
                            .unwrap_or_else(|_| {
                                panic!("round {round}: the write lock was not released")
                            })
                            .unwrap();
                    let name = format!("r{round}-{i}");
                    let r = sqlx::query("INSERT INTO runs (name, metadata) VALUES (?, '{}')")
                        .bind(&name)
                        .execute(&mut *tx)
                        .await
                        .map(|_| ())
                        .map_err(Into::into);
                    super::finish(&mut tx, r).await.unwrap();
                }
            }
            let names: Vec<String> = sqlx::query_scalar("SELECT name FROM runs ORDER BY id")
                .fetch_all(db.pool())
                .await
                .unwrap();
            assert_eq!(names.len(), 48, "{names:?}");
            assert!(!names.iter().any(|n| n == "cancelled"), "{names:?}");
        });
    }
}
