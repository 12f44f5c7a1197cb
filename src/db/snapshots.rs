//! The `snapshots` and `run_tensors` tables: stored EMA snapshots and each run's tensor
//! manifest (the names, dtypes and shapes every snapshot of the run has).

use serde::{Deserialize, Serialize};
use sqlx::{FromRow, SqliteConnection};

use super::connection::{finish, json_text, Db};
use crate::error::{Error, Result};

/// One tensor of a run's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    #[sqlx(json)]
    shape: Vec<u64>,
}

impl From<ManifestRow> for ManifestEntry {
    fn from(r: ManifestRow) -> Self {
        ManifestEntry {
            name: r.name,
            dtype: r.dtype,
            shape: r.shape,
        }
    }
}

/// A stored snapshot.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
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
    #[sqlx(json)]
    pub dtypes: serde_json::Value,
    /// JSON object: the file's `__metadata__`.
    #[sqlx(json)]
    pub metadata: serde_json::Value,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// JSON object: the EMA's update rule when it is not the power function of `sigma_rel`
    /// (`phema::RealisedProfile`); `None` for EDM2's rule.
    #[sqlx(json(nullable))]
    pub profile: Option<serde_json::Value>,
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
    /// JSON object: the EMA's update rule, when it is not EDM2's.
    pub profile: Option<serde_json::Value>,
}

/// Two EMA widths closer than this (relative to the larger σ_rel) are the same slot: one
/// snapshot, never two rows. Equivalent spellings land far inside it (σ_rel given as
/// `gamma` converts back with an error of about 1e-16); distinct EMAs a trainer keeps are
/// percents apart, and two widths within a millionth of each other could not be told apart
/// by the solver anyway (their Gram matrix rows agree to ~1e-12).
pub const SLOT_TOLERANCE: f64 = 1e-6;

/// Whether two σ_rel values name the same slot ([`SLOT_TOLERANCE`]).
pub fn same_width(a: f64, b: f64) -> bool {
    (a - b).abs() <= SLOT_TOLERANCE * a.abs().max(b.abs())
}

/// What [`Db::delete_snapshot`] removed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeletedSnapshot {
    /// The row that was removed.
    pub snapshot: SnapshotRow,
    /// Whether its file was removed from the store too (no other row referred to it).
    pub blob_removed: bool,
}

/// What [`Db::record_snapshot`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A new snapshot row.
    Inserted,
    /// The same (nimg, σ_rel) with the same content was already there: nothing changed.
    AlreadyPresent,
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

const SELECT_MANIFEST: &str =
    "SELECT name, dtype, shape FROM run_tensors WHERE run_id = ? ORDER BY name";

impl Db {
    /// The run's tensor manifest (empty before its first snapshot), by name.
    pub async fn manifest(&self, run_id: i64) -> Result<Vec<ManifestEntry>> {
        let rows = sqlx::query_as::<_, ManifestRow>(SELECT_MANIFEST)
            .bind(run_id)
            .fetch_all(self.pool())
            .await?;
        Ok(rows.into_iter().map(ManifestEntry::from).collect())
    }

    /// The run's snapshots, by time then width.
    pub async fn snapshots(&self, run_id: i64) -> Result<Vec<SnapshotRow>> {
        Ok(sqlx::query_as::<_, SnapshotRow>(
            "SELECT id, nimg, sigma_rel, gamma, digest, byte_size, tensor_count, dtypes, \
                    metadata, created_at, profile \
             FROM snapshots WHERE run_id = ? ORDER BY nimg, sigma_rel",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// The snapshot of run `run_id` with row id `id`, if any.
    pub async fn snapshot(&self, run_id: i64, id: i64) -> Result<Option<SnapshotRow>> {
        Ok(sqlx::query_as::<_, SnapshotRow>(
            "SELECT id, nimg, sigma_rel, gamma, digest, byte_size, tensor_count, dtypes, \
                    metadata, created_at, profile \
             FROM snapshots WHERE run_id = ? AND id = ?",
        )
        .bind(run_id)
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Deletes snapshot `id` of run `run_id`, in one write transaction: the row goes, and
    /// when no other row (snapshot, reconstruction, sweep) refers to its blob, the blob's row
    /// is marked `deleted` and `delete_file` removes the file before the commit, as GC does
    /// (a crash in between leaves a `deleted` row whose file the next `gc` removes). The
    /// run's stored reconstructions stay: each is keyed by the snapshots it was computed
    /// from, so a request after the delete computes anew. When the run has no snapshot left,
    /// its manifest is cleared (the next snapshot sets it again). `None` when there is no
    /// such snapshot.
    pub async fn delete_snapshot(
        &self,
        run_id: i64,
        id: i64,
        delete_file: impl FnOnce(&str) -> Result<()>,
    ) -> Result<Option<DeletedSnapshot>> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let Some(row) = sqlx::query_as::<_, SnapshotRow>(
                "DELETE FROM snapshots WHERE run_id = ? AND id = ? \
                 RETURNING id, nimg, sigma_rel, gamma, digest, byte_size, tensor_count, dtypes, \
                           metadata, created_at, profile",
            )
            .bind(run_id)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            else {
                return Ok(None);
            };
            let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM snapshots WHERE run_id = ?")
                .bind(run_id)
                .fetch_one(&mut *conn)
                .await?;
            if left == 0 {
                sqlx::query("DELETE FROM run_tensors WHERE run_id = ?")
                    .bind(run_id)
                    .execute(&mut *conn)
                    .await?;
            }
            let unreferenced: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM blob_references WHERE digest = ?) \
                   AND EXISTS (SELECT 1 FROM blobs WHERE digest = ? AND claims = 0)",
            )
            .bind(&row.digest)
            .bind(&row.digest)
            .fetch_one(&mut *conn)
            .await?;
            if unreferenced {
                delete_file(&row.digest)?;
                sqlx::query("DELETE FROM blobs WHERE digest = ?")
                    .bind(&row.digest)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(Some(DeletedSnapshot {
                snapshot: row,
                blob_removed: unreferenced,
            }))
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Records a snapshot whose file is in the store under a claimed digest, in one
    /// transaction: checks (or, for a run's first snapshot, sets) the manifest, detects
    /// re-imports and conflicts, inserts the row, and marks the blob valid.
    pub async fn record_snapshot(&self, run_id: i64, new: &NewSnapshot) -> Result<Recorded> {
        let mut conn = self.begin_immediate().await?;
        let result = record_in(&mut conn, run_id, new).await;
        finish(&mut conn, result).await
    }
}

async fn record_in(
    conn: &mut SqliteConnection,
    run_id: i64,
    new: &NewSnapshot,
) -> Result<Recorded> {
    // Manifest: the first snapshot sets it; later ones must match it.
    let expected: Vec<ManifestEntry> = sqlx::query_as::<_, ManifestRow>(SELECT_MANIFEST)
        .bind(run_id)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(ManifestEntry::from)
        .collect();
    if expected.is_empty() {
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
    // Same (nimg, σ_rel) already stored? Widths compare within SLOT_TOLERANCE.
    let at_time: Vec<(String, Option<String>, f64)> = sqlx::query_as(
        "SELECT digest, profile, sigma_rel FROM snapshots WHERE run_id = ? AND nimg = ?",
    )
    .bind(run_id)
    .bind(new.nimg as i64)
    .fetch_all(&mut *conn)
    .await?;
    let existing = at_time
        .into_iter()
        .find(|(_, _, s)| same_width(*s, new.sigma_rel));
    let outcome = match existing {
        Some((d, profile, _)) if d == new.digest => {
            let stored: Option<serde_json::Value> = profile
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| Error::Index(format!("a snapshot's profile: {e}")))?;
            if stored != new.profile {
                return Err(Error::Conflict(format!(
                    "the snapshot at nimg {} sigma_rel {} is already stored with another \
                     update rule ({}); this one says {}",
                    new.nimg,
                    new.sigma_rel,
                    stored.map_or("EDM2's".to_owned(), |p| p.to_string()),
                    new.profile
                        .as_ref()
                        .map_or("EDM2's".to_owned(), |p| p.to_string())
                )));
            }
            Recorded::AlreadyPresent
        }
        Some((d, _, stored)) => {
            return Err(Error::Conflict(format!(
                "a different snapshot is already stored at nimg {} sigma_rel {stored} (digest \
                 {d}, this file {}); delete it first to replace it",
                new.nimg, new.digest
            )));
        }
        None => {
            sqlx::query(
                "INSERT INTO snapshots (run_id, nimg, sigma_rel, gamma, digest, byte_size, \
                 tensor_count, dtypes, metadata, profile) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(run_id)
            .bind(new.nimg as i64)
            .bind(new.sigma_rel)
            .bind(new.gamma)
            .bind(&new.digest)
            .bind(new.byte_size as i64)
            .bind(new.manifest.len() as i64)
            .bind(json_text(&new.dtypes))
            .bind(json_text(&new.metadata))
            .bind(new.profile.as_ref().map(json_text))
            .execute(&mut *conn)
            .await?;
            Recorded::Inserted
        }
    };
    super::blobs::mark_valid(conn, &new.digest).await?;
    Ok(outcome)
}
