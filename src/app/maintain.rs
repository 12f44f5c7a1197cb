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
}

impl VerifyReport {
    /// No problem was found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Re-hashes every blob the index lists (except rows GC has marked deleted) against its
/// BLAKE3 name. For an intact blob, the fast read checksum (XXH3-128) is recorded when the
/// index has none (blobs stored by older versions) and corrected when it disagrees (it would
/// otherwise fail every reconstruction reading the blob). `progress` counts bytes.
pub async fn verify(data: &DataDir, progress: &dyn Progress) -> Result<VerifyReport> {
    let rows = data.db.blobs().await?;
    let bytes: u64 = rows.iter().map(|r| r.size.max(0) as u64).sum();
    progress.set_length(bytes);
    let mut report = VerifyReport {
        blobs: rows.len(),
        bytes,
        ..Default::default()
    };
    for row in rows.iter().filter(|r| r.state != BlobState::Deleted) {
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
    Ok(GcReport {
        unreferenced: marked.len(),
        removed,
        temp_files,
    })
}
