//! The `blobs` table: one row per content-addressed file in the store, with the state machine
//! that makes garbage collection safe against concurrent ingest (see the first migration):
//! `pending → valid` when an ingest claims and then records a digest, `valid → deleted` when
//! GC marks an unreferenced one, `deleted → pending` when an ingest of the same content
//! resurrects it before GC removed the file.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{FromRow, SqliteConnection};

use super::connection::{finish, now_secs, Db};
use crate::error::Result;

/// State of a blob row, stored as its snake-case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
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
    /// Where the row is in its life cycle.
    pub state: BlobState,
    /// XXH3-128 of the content (hex), when recorded.
    pub checksum: Option<String>,
}

/// Marks a claimed blob `valid` inside the transaction that records the row referencing it.
pub(super) async fn mark_valid(conn: &mut SqliteConnection, digest: &str) -> Result<()> {
    sqlx::query(
        "UPDATE blobs SET state = ?, changed_at = ?, claims = max(claims - 1, 0) WHERE digest = ?",
    )
    .bind(BlobState::Valid)
    .bind(now_secs())
    .bind(digest)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// Claims a digest for an ingest about to publish (or reuse) its file: the row becomes
    /// `pending` with a fresh timestamp, whatever its state was. Must happen before the file
    /// is published or found present, so that GC cannot remove it in between.
    /// `checksum` is the content's XXH3-128 (hex), kept for fast verified reads.
    pub async fn claim_blob(&self, digest: &str, size: u64, checksum: Option<&str>) -> Result<()> {
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query(
            "INSERT INTO blobs (digest, size, state, changed_at, checksum, claims) \
             VALUES (?, ?, ?, ?, ?, 1) \
             ON CONFLICT (digest) DO UPDATE SET state = excluded.state, \
               changed_at = excluded.changed_at, \
               checksum = coalesce(excluded.checksum, blobs.checksum), \
               claims = blobs.claims + 1",
        )
        .bind(digest)
        .bind(size as i64)
        .bind(BlobState::Pending)
        .bind(now_secs())
        .bind(checksum)
        .execute(&mut *conn)
        .await;
        finish(&mut conn, result.map(|_| ()).map_err(Into::into)).await
    }

    /// Gives back a claim taken by [`claim_blob`](Self::claim_blob) whose ingest did not
    /// record a row (refused, lost a race, failed): when no other claim and no row holds the
    /// blob, its row is marked `deleted` and `delete_file` removes the file in the same write
    /// transaction (as GC does), so a refused ingest leaves nothing behind. A blob that rows
    /// still reference goes back to `valid`. Returns whether the blob was removed.
    pub async fn release_claim(
        &self,
        digest: &str,
        delete_file: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let row: Option<(BlobState, i64, bool)> = sqlx::query_as(
                "SELECT state, claims, \
                   EXISTS (SELECT 1 FROM blob_references r WHERE r.digest = blobs.digest) \
                 FROM blobs WHERE digest = ?",
            )
            .bind(digest)
            .fetch_optional(&mut *conn)
            .await?;
            let Some((state, claims, referenced)) = row else {
                return Ok(false);
            };
            let claims = (claims - 1).max(0);
            if referenced {
                sqlx::query("UPDATE blobs SET claims = ?, state = ? WHERE digest = ?")
                    .bind(claims)
                    .bind(BlobState::Valid)
                    .bind(digest)
                    .execute(&mut *conn)
                    .await?;
                return Ok(false);
            }
            if claims > 0 || state != BlobState::Pending {
                sqlx::query("UPDATE blobs SET claims = ? WHERE digest = ?")
                    .bind(claims)
                    .bind(digest)
                    .execute(&mut *conn)
                    .await?;
                return Ok(false);
            }
            delete_file()?;
            sqlx::query("DELETE FROM blobs WHERE digest = ?")
                .bind(digest)
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Start-up recovery of claims whose ingest died (`pending` rows unchanged for longer
    /// than `grace`): a claim on a blob some row references becomes `valid` again; the
    /// others are marked `deleted` for the sweep that follows (their files, if published,
    /// are removed). Returns how many rows were restored and marked.
    pub async fn recover_claims(&self, grace: Duration) -> Result<(u64, u64)> {
        let cutoff = now_secs() - grace.as_secs() as i64;
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let restored = sqlx::query(
                "UPDATE blobs SET state = ?, claims = 0 \
                 WHERE state = ? AND changed_at <= ? \
                   AND EXISTS (SELECT 1 FROM blob_references r WHERE r.digest = blobs.digest)",
            )
            .bind(BlobState::Valid)
            .bind(BlobState::Pending)
            .bind(cutoff)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            let marked = sqlx::query(
                "UPDATE blobs SET state = ?, claims = 0, changed_at = ? \
                 WHERE state = ? AND changed_at <= ?",
            )
            .bind(BlobState::Deleted)
            .bind(now_secs())
            .bind(BlobState::Pending)
            .bind(cutoff)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok((restored, marked))
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Every blob row with whether a row of the index refers to it (for `verify`).
    pub async fn blobs_with_references(&self) -> Result<Vec<(BlobRow, bool, i64)>> {
        let rows: Vec<(String, i64, BlobState, Option<String>, bool, i64)> = sqlx::query_as(
            "SELECT digest, size, state, checksum, \
               EXISTS (SELECT 1 FROM blob_references r WHERE r.digest = blobs.digest), \
               changed_at \
             FROM blobs ORDER BY digest",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(digest, size, state, checksum, referenced, changed_at)| {
                (
                    BlobRow {
                        digest,
                        size,
                        state,
                        checksum,
                    },
                    referenced,
                    changed_at,
                )
            })
            .collect())
    }

    /// The recorded checksums (XXH3-128 hex) of `digests`, in order; `None` where a blob has
    /// none recorded (written before checksums were kept) or no row.
    pub async fn blob_checksums(&self, digests: &[String]) -> Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(digests.len());
        let mut conn = self.pool().acquire().await?;
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
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// GC phase 1: marks `deleted` every blob that no row references (the `blob_references`
    /// view: snapshots, reconstructions, reference statistics, sweep points and batches)
    /// and that is either `valid` or `pending` for longer than `grace` (an ingest that died).
    /// Returns their digests.
    pub async fn gc_mark(&self, grace: Duration) -> Result<Vec<String>> {
        let cutoff = now_secs() - grace.as_secs() as i64;
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query_scalar::<_, String>(
            "UPDATE blobs SET state = ?, changed_at = ? \
             WHERE NOT EXISTS (SELECT 1 FROM blob_references r WHERE r.digest = blobs.digest) \
               AND (state = ? OR (state = ? AND changed_at < ?)) \
             RETURNING digest",
        )
        .bind(BlobState::Deleted)
        .bind(now_secs())
        .bind(BlobState::Valid)
        .bind(BlobState::Pending)
        .bind(cutoff)
        .fetch_all(&mut *conn)
        .await;
        finish(&mut conn, result.map_err(Into::into)).await
    }

    /// Digests of rows marked `deleted`.
    pub async fn deleted_blobs(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT digest FROM blobs WHERE state = ? ORDER BY digest",
        )
        .bind(BlobState::Deleted)
        .fetch_all(self.pool())
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
            let state: Option<BlobState> =
                sqlx::query_scalar("SELECT state FROM blobs WHERE digest = ?")
                    .bind(digest)
                    .fetch_optional(&mut *conn)
                    .await?;
            if state != Some(BlobState::Deleted) {
                return Ok(false);
            }
            delete_file()?;
            sqlx::query("DELETE FROM blobs WHERE digest = ? AND state = ?")
                .bind(digest)
                .bind(BlobState::Deleted)
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
        .fetch_all(self.pool())
        .await?)
    }

    /// The state of one blob row.
    pub async fn blob_state(&self, digest: &str) -> Result<Option<BlobState>> {
        Ok(
            sqlx::query_scalar("SELECT state FROM blobs WHERE digest = ?")
                .bind(digest)
                .fetch_optional(self.pool())
                .await?,
        )
    }
}
