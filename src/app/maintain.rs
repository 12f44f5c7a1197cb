//! Keeping a data directory healthy: [`verify`] re-hashes every blob the index knows (and
//! repairs the read checksums it records), [`gc`] removes what nothing references.

use std::time::Duration;

use super::data_dir::DataDir;
use crate::db::BlobState;
use crate::error::{blocking, Result};
use crate::progress::Progress;
use crate::store::{BlobStatus, Digest};

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    /// Blob rows looked at (every row the index has).
    pub blobs: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// One line per problem: `missing: <digest>`, `corrupt: <digest> (content hashes to …)`,
    /// `checksum record wrong (corrected): <digest>`.
    pub problems: Vec<String>,
    /// Blobs stored before read checksums were kept, whose checksum is now recorded.
    pub checksums_filled: usize,
    /// Claims of ingests in progress, or abandoned by ingests that died (`pending` rows no
    /// row refers to): not data, so not problems. Abandoned ones (older than
    /// [`CLAIM_GRACE`]) are recovered the next time the data directory is opened.
    pub pending_claims: usize,
}

impl VerifyReport {
    /// No problem was found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Re-hashes every blob the index lists that holds data (valid rows, and any row something
/// refers to; not rows GC marked deleted, nor claims of ingests that never recorded
/// anything, which are counted in `pending_claims`) against its BLAKE3 name. For an intact blob, the fast read checksum (XXH3-128) is recorded when the
/// index has none (blobs stored by older versions) and corrected when it disagrees (it would
/// otherwise fail every reconstruction reading the blob). `progress` counts bytes.
pub async fn verify(data: &DataDir, progress: &dyn Progress) -> Result<VerifyReport> {
    let all = data.db.blobs_with_references().await?;
    let pending_claims = all
        .iter()
        .filter(|(r, referenced, _)| r.state == BlobState::Pending && !referenced)
        .count();
    let rows: Vec<_> = all
        .into_iter()
        .filter(|(r, referenced, _)| r.state == BlobState::Valid || *referenced)
        .map(|(r, _, _)| r)
        .collect();
    let bytes: u64 = rows.iter().map(|r| r.size.max(0) as u64).sum();
    progress.set_length(bytes);
    let mut report = VerifyReport {
        blobs: rows.len(),
        bytes,
        pending_claims,
        ..Default::default()
    };
    for row in &rows {
        let digest: Digest = row.digest.parse()?;
        let store = data.store.clone();
        let (status, checksum) = blocking("verifying a blob", move || {
            store.verify_with_checksum(&digest)
        })
        .await?;
        progress.inc(row.size.max(0) as u64);
        match status {
            BlobStatus::Intact => {
                let computed = checksum
                    .expect("intact blobs come with a checksum")
                    .to_hex();
                match &row.checksum {
                    Some(recorded) if *recorded == computed => {}
                    recorded => {
                        if recorded.is_some() {
                            report
                                .problems
                                .push(format!("checksum record wrong (corrected): {}", row.digest));
                        } else {
                            report.checksums_filled += 1;
                        }
                        data.db.set_blob_checksum(&row.digest, &computed).await?;
                    }
                }
            }
            BlobStatus::Missing => report.problems.push(format!("missing: {}", row.digest)),
            BlobStatus::Corrupt { actual } => report.problems.push(format!(
                "corrupt: {} (content hashes to {actual})",
                row.digest
            )),
        }
    }
    Ok(report)
}

/// What [`gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs found unreferenced (marked for deletion) in this pass.
    pub unreferenced: usize,
    /// Blob files removed (marked now or by an earlier, interrupted pass).
    pub removed: usize,
    /// Orphaned temporary files removed from the store's staging directory.
    pub temp_files: usize,
    /// Blob files the index has no row for (published by a writer that died before
    /// recording them) removed.
    pub unindexed: usize,
}

/// Garbage collection, mark and sweep: marks every blob no snapshot or reconstruction
/// references (pending claims only once older than `grace`, so ingests in progress keep
/// theirs), removes each marked file inside a write transaction that re-checks its row, and
/// removes staging files older than `grace`.
pub async fn gc(data: &DataDir, grace: Duration) -> Result<GcReport> {
    let marked = data.db.gc_mark(grace).await?;
    let mut removed = 0;
    for digest in data.db.deleted_blobs().await? {
        let d: Digest = digest.parse()?;
        let store = data.store.clone();
        if data
            .db
            .gc_sweep(&digest, move || store.remove(&d).map(|_| ()))
            .await?
        {
            removed += 1;
        }
    }
    let store = data.store.clone();
    let temp_files = blocking("removing staging files", move || store.clean_temp(grace)).await?;
    let unindexed = remove_unindexed(data, grace).await?;
    Ok(GcReport {
        unreferenced: marked.len(),
        removed,
        temp_files,
        unindexed,
    })
}

/// Removes blob files older than `grace` that have no row in the index. Every writer claims
/// its row before it publishes a file, so such a file is a leftover; each is re-checked
/// against the index just before it goes.
async fn remove_unindexed(data: &DataDir, grace: Duration) -> Result<usize> {
    let known: std::collections::HashSet<String> = data
        .db
        .blobs()
        .await?
        .into_iter()
        .map(|r| r.digest)
        .collect();
    let store = data.store.clone();
    let found = blocking("listing the store", move || store.unindexed(&known, grace)).await?;
    let mut removed = 0;
    for digest in found {
        if data.db.blob_state(&digest.to_hex()).await?.is_none() && data.store.remove(&digest)? {
            tracing::info!(digest = %digest, "removed a blob file the index has no row for");
            removed += 1;
        }
    }
    Ok(removed)
}

/// How long a claim (a `pending` blob row) or an empty run made by an ingest may sit before
/// start-up recovery takes it for abandoned: far longer than the moments between an
/// ingest's claim and its record, or between a run's creation and its first snapshot.
pub const CLAIM_GRACE: Duration = Duration::from_secs(15 * 60);

/// What [`recover`] cleaned up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Abandoned claims on blobs that rows refer to, made `valid` again.
    pub claims_restored: u64,
    /// Abandoned claims on blobs nothing refers to, removed with their files.
    pub claims_removed: u64,
    /// Empty runs left by ingests that died, removed.
    pub empty_runs: u64,
    /// Staging files of writers that died, removed.
    pub temp_files: usize,
}

impl RecoveryReport {
    /// Whether anything was recovered.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Start-up recovery, run when a data directory is opened (by `serve` and every command):
/// removes what crashed writers left. Staging files no live writer holds (they are locked
/// while written; a second's grace covers the microseconds between a file's creation and
/// its lock), claims unchanged
/// for longer than `claim_grace` (restored when a row refers to the blob, else removed with
/// the blob's file), and runs that an ingest created and that stayed empty for longer than
/// `claim_grace` (no snapshot, reconstruction or sweep, no description or metadata). Each
/// kind is logged with its count.
pub async fn recover(data: &DataDir, claim_grace: Duration) -> Result<RecoveryReport> {
    let store = data.store.clone();
    let temp_files = blocking("removing abandoned staging files", move || {
        store.clean_temp(Duration::from_secs(1))
    })
    .await?;
    let (claims_restored, marked) = data.db.recover_claims(claim_grace).await?;
    let mut claims_removed = 0;
    if marked > 0 {
        for digest in data.db.deleted_blobs().await? {
            let d: Digest = digest.parse()?;
            let store = data.store.clone();
            if data
                .db
                .gc_sweep(&digest, move || store.remove(&d).map(|_| ()))
                .await?
            {
                claims_removed += 1;
            }
        }
    }
    let empty_runs = data.db.remove_abandoned_runs(claim_grace).await?;
    let report = RecoveryReport {
        claims_restored,
        claims_removed,
        empty_runs,
        temp_files,
    };
    if !report.is_empty() {
        tracing::warn!(
            staging_files = report.temp_files,
            claims_restored = report.claims_restored,
            claims_removed = report.claims_removed,
            empty_runs = report.empty_runs,
            "recovered what interrupted writers left in {}",
            data.path.display()
        );
    }
    Ok(report)
}

/// Deletes snapshot `id` (its row id, as `hindsight snapshots` and `GET
/// /runs/{run}/snapshots` list it) of run `run`; its blob is removed in the same transaction
/// when nothing else refers to it (see [`crate::db::Db::delete_snapshot`]).
///
/// Errors: [`crate::Error::NotFound`] for an unknown run or snapshot.
pub async fn delete_snapshot(
    data: &DataDir,
    run: &str,
    id: i64,
) -> Result<crate::db::DeletedSnapshot> {
    let run = data.existing_run(run).await?;
    let store = data.store.clone();
    let deleted = data
        .db
        .delete_snapshot(run.id, id, move |digest| {
            store.remove(&digest.parse()?).map(|_| ())
        })
        .await?;
    let deleted = deleted.ok_or_else(|| {
        crate::Error::NotFound(format!(
            "run {:?} has no snapshot {id} (see `hindsight snapshots {}`)",
            run.name, run.name
        ))
    })?;
    tracing::info!(
        run = %run.name,
        snapshot = id,
        nimg = deleted.snapshot.nimg,
        sigma_rel = deleted.snapshot.sigma_rel,
        blob_removed = deleted.blob_removed,
        "snapshot deleted"
    );
    Ok(deleted)
}
