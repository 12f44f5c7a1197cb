//! Start-up recovery: what crashed writers leave in a data directory (staging files,
//! abandoned claims, empty runs), removed when it is opened.

use std::time::Duration;

use crate::db::Db;
use crate::error::{blocking, Result};
use crate::store::{BlobStore, Digest};

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
pub async fn recover(db: &Db, store: &BlobStore, claim_grace: Duration) -> Result<RecoveryReport> {
    let staging = store.clone();
    let temp_files = blocking("removing abandoned staging files", move || {
        staging.clean_temp(Duration::from_secs(1))
    })
    .await?;
    let (claims_restored, marked) = db.recover_claims(claim_grace).await?;
    let mut claims_removed = 0;
    if marked > 0 {
        for digest in db.deleted_blobs().await? {
            let d: Digest = digest.parse()?;
            let store = store.clone();
            if db
                .gc_sweep(&digest, move || store.remove(&d).map(|_| ()))
                .await?
            {
                claims_removed += 1;
            }
        }
    }
    let empty_runs = db.remove_abandoned_runs(claim_grace).await?;
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
            store.root().display()
        );
    }
    Ok(report)
}
