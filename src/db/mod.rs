//! The SQLite index (sqlx, runtime queries, migrations in `migrations/`): runs, their tensor
//! manifests, snapshots, and the blob rows whose states make garbage collection safe.
//!
//! All SQL lives here. The database runs in WAL mode with `synchronous = FULL` (a committed
//! snapshot row survives power loss), foreign keys on, and a busy timeout so that the server
//! and command-line tools can share it.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, SqliteConnection};

use crate::error::{Error, Result};

mod reconstructions;
pub use reconstructions::{NewReconstruction, ReconstructionRow};

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Database(format!("migrating the index: {e}"))
    }
}

/// A training run.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Run {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// JSON object (training and network configuration, …), as text.
    pub metadata: String,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// A run with totals, for listings.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Number of snapshots.
    pub snapshots: i64,
    /// Total bytes of the snapshots' files.
    pub bytes: i64,
    /// Earliest snapshot time.
    pub first_nimg: Option<i64>,
    /// Latest snapshot time.
    pub last_nimg: Option<i64>,
}

/// One tensor of a run's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestEntry {
    /// State-dict key.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

#[derive(FromRow)]
struct ManifestRow {
    name: String,
    dtype: String,
    shape: String,
}

/// A stored snapshot.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotRow {
    /// Row id.
    pub id: i64,
    /// Training time in images.
    pub nimg: i64,
    /// EMA width.
    pub sigma_rel: f64,
    /// EMA exponent.
    pub gamma: f64,
    /// BLAKE3 digest of the file (hex).
    pub digest: String,
    /// File size.
    pub byte_size: i64,
    /// Number of tensors.
    pub tensor_count: i64,
    /// JSON object: elements per dtype.
    pub dtypes: String,
    /// JSON object: the file's `__metadata__`.
    pub metadata: String,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// A snapshot about to be recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct NewSnapshot {
    /// Training time in images.
    pub nimg: u64,
    /// EMA width.
    pub sigma_rel: f64,
    /// EMA exponent.
    pub gamma: f64,
    /// Digest of the (already stored) file.
    pub digest: String,
    /// File size.
    pub byte_size: u64,
    /// The file's tensors.
    pub manifest: Vec<ManifestEntry>,
    /// JSON object: elements per dtype.
    pub dtypes: serde_json::Value,
    /// JSON object: the file's `__metadata__`.
    pub metadata: serde_json::Value,
}

/// What [`Db::record_snapshot`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A new snapshot row.
    Inserted,
    /// The same (nimg, σ_rel) with the same content was already there: nothing changed.
    AlreadyPresent,
}

/// State of a blob row; see the migration for the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobState {
    /// Claimed by an ingest in progress (or abandoned by a crashed one).
    Pending,
    /// Referenced, or was when last checked.
    Valid,
    /// Marked for deletion by GC.
    Deleted,
}

/// A blob row.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct BlobRow {
    /// BLAKE3 digest (hex).
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// `pending`, `valid` or `deleted`.
    pub state: String,
    /// XXH3-128 of the content (hex), when recorded.
    pub checksum: Option<String>,
}

/// Run names appear in URLs and file names: 1 to 200 characters, no slashes, backslashes or
/// control characters, and not `.` or `..`.
pub fn check_run_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::invalid("run", format!("{name:?}: {reason}")));
    if name.is_empty() || name.chars().count() > 200 {
        return bad("a run name has 1 to 200 characters");
    }
    if name == "." || name == ".." {
        return bad("not a usable run name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return bad("a run name may not contain slashes, backslashes or control characters");
    }
    Ok(())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The differences between a run's manifest and a file's tensors, one line each (empty when
/// they agree).
pub fn manifest_differences(expected: &[ManifestEntry], actual: &[ManifestEntry]) -> Vec<String> {
    use std::collections::BTreeMap;
    let want: BTreeMap<&str, &ManifestEntry> =
        expected.iter().map(|e| (e.name.as_str(), e)).collect();
    let got: BTreeMap<&str, &ManifestEntry> = actual.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut out = Vec::new();
    for (name, w) in &want {
        match got.get(name) {
            None => out.push(format!("missing tensor {name}")),
            Some(g) if g.dtype != w.dtype || g.shape != w.shape => out.push(format!(
                "{name}: {} {:?} where the run has {} {:?}",
                g.dtype, g.shape, w.dtype, w.shape
            )),
            Some(_) => {}
        }
    }
    for name in got.keys() {
        if !want.contains_key(name) {
            out.push(format!("unexpected tensor {name}"));
        }
    }
    out
}

/// The first ten differences joined into one line, with a count of the rest.
pub fn describe_differences(diff: &[String]) -> String {
    let shown: Vec<&str> = diff.iter().take(10).map(String::as_str).collect();
    let more = if diff.len() > 10 {
        format!(" (and {} more)", diff.len() - 10)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join("; "))
}

/// Handle to the index.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating if missing) the SQLite database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(Error::from)?
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

    /// Creates a run; an existing name is a conflict.
    pub async fn create_run(
        &self,
        name: &str,
        description: &str,
        metadata: &serde_json::Value,
    ) -> Result<Run> {
        if !metadata.is_object() {
            return Err(Error::invalid("metadata", "must be a JSON object"));
        }
        check_run_name(name)?;
        let result = sqlx::query_as::<_, Run>(
            "INSERT INTO runs (name, description, metadata) VALUES (?, ?, ?) \
             RETURNING id, name, description, metadata, created_at",
        )
        .bind(name)
        .bind(description)
        .bind(metadata.to_string())
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok(run) => Ok(run),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(Error::Conflict(format!("run {name:?} already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The run with this name, if any.
    pub async fn run(&self, name: &str) -> Result<Option<Run>> {
        Ok(sqlx::query_as::<_, Run>(
            "SELECT id, name, description, metadata, created_at FROM runs WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The run with this name, created empty if it does not exist.
    pub async fn run_or_create(&self, name: &str) -> Result<Run> {
        if let Some(run) = self.run(name).await? {
            return Ok(run);
        }
        match self.create_run(name, "", &serde_json::json!({})).await {
            Ok(run) => Ok(run),
            // Created concurrently by someone else: fine.
            Err(Error::Conflict(_)) => self
                .run(name)
                .await?
                .ok_or_else(|| Error::Database(format!("run {name:?} vanished"))),
            Err(e) => Err(e),
        }
    }

    /// Deletes a run that has no snapshots and no reconstructions (one an ingest created and
    /// then failed to fill); returns whether it did.
    pub async fn delete_run_if_empty(&self, run_id: i64) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query(
            "DELETE FROM runs WHERE id = ? \
               AND NOT EXISTS (SELECT 1 FROM snapshots WHERE run_id = runs.id) \
               AND NOT EXISTS (SELECT 1 FROM reconstructions WHERE run_id = runs.id)",
        )
        .bind(run_id)
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected() > 0)
        .map_err(Error::from);
        finish(&mut conn, result).await
    }

    /// Every run with its totals, by name.
    pub async fn runs(&self) -> Result<Vec<RunSummary>> {
        Ok(sqlx::query_as::<_, RunSummary>(
            "SELECT r.name, r.description, r.created_at, \
                    COUNT(s.id) AS snapshots, COALESCE(SUM(s.byte_size), 0) AS bytes, \
                    MIN(s.nimg) AS first_nimg, MAX(s.nimg) AS last_nimg \
             FROM runs r LEFT JOIN snapshots s ON s.run_id = r.id \
             GROUP BY r.id ORDER BY r.name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The run's tensor manifest (empty before its first snapshot), by name.
    pub async fn manifest(&self, run_id: i64) -> Result<Vec<ManifestEntry>> {
        let rows = sqlx::query_as::<_, ManifestRow>(
            "SELECT name, dtype, shape FROM run_tensors WHERE run_id = ? ORDER BY name",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ManifestEntry {
                    shape: serde_json::from_str(&r.shape)
                        .map_err(|e| Error::Database(format!("bad shape of {}: {e}", r.name)))?,
                    name: r.name,
                    dtype: r.dtype,
                })
            })
            .collect()
    }

    /// The run's snapshots, by time then width.
    pub async fn snapshots(&self, run_id: i64) -> Result<Vec<SnapshotRow>> {
        Ok(sqlx::query_as::<_, SnapshotRow>(
            "SELECT id, nimg, sigma_rel, gamma, digest, byte_size, tensor_count, dtypes, \
                    metadata, created_at \
             FROM snapshots WHERE run_id = ? ORDER BY nimg, sigma_rel",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn begin_immediate(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        Ok(conn)
    }

    /// Claims a digest for an ingest about to publish (or reuse) its file: the row becomes
    /// `pending` with a fresh timestamp, whatever its state was. Must happen before the file
    /// is published or found present, so that GC cannot remove it in between.
    /// `checksum` is the content's XXH3-128 (hex), kept for fast verified reads.
    pub async fn claim_blob(&self, digest: &str, size: u64, checksum: Option<&str>) -> Result<()> {
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query(
            "INSERT INTO blobs (digest, size, state, changed_at, checksum) \
             VALUES (?, ?, 'pending', ?, ?) \
             ON CONFLICT (digest) DO UPDATE SET state = 'pending', \
               changed_at = excluded.changed_at, \
               checksum = coalesce(excluded.checksum, blobs.checksum)",
        )
        .bind(digest)
        .bind(size as i64)
        .bind(now_secs())
        .bind(checksum)
        .execute(&mut *conn)
        .await;
        finish(&mut conn, result.map(|_| ()).map_err(Error::from)).await
    }

    /// The recorded checksums (XXH3-128 hex) of `digests`, in order; `None` where a blob has
    /// none recorded (written before checksums were kept) or no row.
    pub async fn blob_checksums(&self, digests: &[String]) -> Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(digests.len());
        let mut conn = self.pool.acquire().await?;
        for d in digests {
            let row: Option<Option<String>> =
                sqlx::query_scalar("SELECT checksum FROM blobs WHERE digest = ?")
                    .bind(d)
                    .fetch_optional(&mut *conn)
                    .await?;
            out.push(row.flatten());
        }
        Ok(out)
    }

    /// Records the checksum of a blob, computed in a full read that found its digest intact.
    pub async fn set_blob_checksum(&self, digest: &str, checksum: &str) -> Result<()> {
        sqlx::query("UPDATE blobs SET checksum = ? WHERE digest = ?")
            .bind(checksum)
            .bind(digest)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a snapshot whose file is in the store under a claimed digest, in one
    /// transaction: checks (or, for a run's first snapshot, sets) the manifest, detects
    /// re-imports and conflicts, inserts the row, and marks the blob valid.
    pub async fn record_snapshot(&self, run_id: i64, new: &NewSnapshot) -> Result<Recorded> {
        let mut conn = self.begin_immediate().await?;
        let result = record_in(&mut conn, run_id, new).await;
        finish(&mut conn, result).await
    }

    /// GC phase 1: marks `deleted` every blob that no snapshot references and that is either
    /// `valid` or `pending` for longer than `grace` (an ingest that died). Returns their digests.
    pub async fn gc_mark(&self, grace: Duration) -> Result<Vec<String>> {
        let cutoff = now_secs() - grace.as_secs() as i64;
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query_scalar::<_, String>(
            "UPDATE blobs SET state = 'deleted', changed_at = ? \
             WHERE NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.digest = blobs.digest) \
               AND NOT EXISTS (SELECT 1 FROM reconstructions r WHERE r.digest = blobs.digest) \
               AND (state = 'valid' OR (state = 'pending' AND changed_at < ?)) \
             RETURNING digest",
        )
        .bind(now_secs())
        .bind(cutoff)
        .fetch_all(&mut *conn)
        .await;
        finish(&mut conn, result.map_err(Error::from)).await
    }

    /// Digests of rows marked `deleted`.
    pub async fn deleted_blobs(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT digest FROM blobs WHERE state = 'deleted' ORDER BY digest",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// GC phase 2, for one blob: inside a write transaction, re-checks that the row is still
    /// `deleted` (an ingest may have claimed it since), runs `delete_file`, and drops the row.
    /// Returns whether the blob was removed.
    pub async fn gc_sweep(
        &self,
        digest: &str,
        delete_file: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM blobs WHERE digest = ?")
                    .bind(digest)
                    .fetch_optional(&mut *conn)
                    .await?;
            if state.as_deref() != Some("deleted") {
                return Ok(false);
            }
            delete_file()?;
            sqlx::query("DELETE FROM blobs WHERE digest = ? AND state = 'deleted'")
                .bind(digest)
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Every blob row, by digest.
    pub async fn blobs(&self) -> Result<Vec<BlobRow>> {
        Ok(sqlx::query_as::<_, BlobRow>(
            "SELECT digest, size, state, checksum FROM blobs ORDER BY digest",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The state of one blob row.
    pub async fn blob_state(&self, digest: &str) -> Result<Option<BlobState>> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM blobs WHERE digest = ?")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        Ok(state.map(|s| match s.as_str() {
            "pending" => BlobState::Pending,
            "valid" => BlobState::Valid,
            _ => BlobState::Deleted,
        }))
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

async fn record_in(
    conn: &mut SqliteConnection,
    run_id: i64,
    new: &NewSnapshot,
) -> Result<Recorded> {
    // Manifest: the first snapshot sets it; later ones must match it.
    let rows = sqlx::query_as::<_, ManifestRow>(
        "SELECT name, dtype, shape FROM run_tensors WHERE run_id = ? ORDER BY name",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        for t in &new.manifest {
            sqlx::query("INSERT INTO run_tensors (run_id, name, dtype, shape) VALUES (?, ?, ?, ?)")
                .bind(run_id)
                .bind(&t.name)
                .bind(&t.dtype)
                .bind(serde_json::to_string(&t.shape).expect("shapes serialise"))
                .execute(&mut *conn)
                .await?;
        }
    } else {
        let expected: Vec<ManifestEntry> = rows
            .into_iter()
            .map(|r| ManifestEntry {
                shape: serde_json::from_str(&r.shape).unwrap_or_default(),
                name: r.name,
                dtype: r.dtype,
            })
            .collect();
        let diff = manifest_differences(&expected, &new.manifest);
        if !diff.is_empty() {
            return Err(Error::invalid(
                "tensors",
                format!(
                    "the file's tensors differ from the run's manifest: {}",
                    describe_differences(&diff)
                ),
            ));
        }
    }
    // Same (nimg, σ_rel) already stored?
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT digest FROM snapshots WHERE run_id = ? AND nimg = ? AND sigma_rel = ?",
    )
    .bind(run_id)
    .bind(new.nimg as i64)
    .bind(new.sigma_rel)
    .fetch_optional(&mut *conn)
    .await?;
    let outcome = match existing {
        Some(d) if d == new.digest => Recorded::AlreadyPresent,
        Some(d) => {
            return Err(Error::Conflict(format!(
                "a different snapshot is already stored at nimg {} sigma_rel {} (digest {d}, \
                 this file {})",
                new.nimg, new.sigma_rel, new.digest
            )));
        }
        None => {
            sqlx::query(
                "INSERT INTO snapshots (run_id, nimg, sigma_rel, gamma, digest, byte_size, \
                 tensor_count, dtypes, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(run_id)
            .bind(new.nimg as i64)
            .bind(new.sigma_rel)
            .bind(new.gamma)
            .bind(&new.digest)
            .bind(new.byte_size as i64)
            .bind(new.manifest.len() as i64)
            .bind(new.dtypes.to_string())
            .bind(new.metadata.to_string())
            .execute(&mut *conn)
            .await?;
            Recorded::Inserted
        }
    };
    sqlx::query("UPDATE blobs SET state = 'valid', changed_at = ? WHERE digest = ?")
        .bind(now_secs())
        .bind(&new.digest)
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}
