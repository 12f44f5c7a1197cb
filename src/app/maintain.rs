//! Keeping a data directory healthy: [`verify`] re-hashes every blob the index knows (and
//! repairs the read checksums it records), [`gc`] removes what nothing references.

use std::time::Duration;

use super::data_dir::DataDir;
use crate::db::BlobState;
use crate::error::{blocking, Result};
use crate::progress::Progress;
use crate::store::{BlobStatus, Digest, JournalRecord};

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
        crate::Error::NotFound(format!("run {:?} has no snapshot {id}", run.name))
    })?;
    // The index's digests are the store's (the blob was removed by it above); `nimg` is
    // checked non-negative by the schema.
    let record = deleted
        .snapshot
        .digest
        .parse()
        .map(|digest| JournalRecord::Delete {
            run: run.name.clone(),
            digest,
            nimg: deleted.snapshot.nimg as u64,
            sigma_rel: deleted.snapshot.sigma_rel,
        });
    if let Err(e) = record.and_then(|r| data.store.append_journal(&r)) {
        tracing::warn!(error = %e.chain_text(), "appending a delete to the store's journal");
    }
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
