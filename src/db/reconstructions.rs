//! The `reconstructions` table: stored outputs of the materializer, keyed by what determines
//! their bytes.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::connection::{finish, json_text, Db};
use crate::error::Result;
use crate::reconstruction::report::QualityReport;

/// A stored reconstruction.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct ReconstructionRow {
    /// The cache key (64 hex digits), also the id clients use.
    pub id: String,
    /// Name of the run.
    pub run: String,
    /// Training time reconstructed at.
    pub nimg: i64,
    /// Target width.
    pub sigma_rel: f64,
    /// Target exponent.
    pub gamma: f64,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Digest of the safetensors blob.
    pub digest: String,
    /// Its size.
    pub byte_size: i64,
    /// The quality report and the weighted snapshots (a JSON column).
    #[sqlx(json)]
    pub report: QualityReport,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// A reconstruction about to be recorded; its blob is in the store under a claimed digest.
#[derive(Clone, Debug, PartialEq)]
pub struct NewReconstruction {
    /// Cache key.
    pub id: String,
    /// Run row id.
    pub run_id: i64,
    /// Training time.
    pub nimg: u64,
    /// Target width.
    pub sigma_rel: f64,
    /// Target exponent.
    pub gamma: f64,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub byte_size: u64,
    /// The quality report.
    pub report: QualityReport,
}

const SELECT: &str = "SELECT r.id, runs.name AS run, r.nimg, r.sigma_rel, r.gamma, r.dtype, \
     r.digest, r.byte_size, r.report, r.created_at \
     FROM reconstructions r JOIN runs ON runs.id = r.run_id";

impl Db {
    /// The reconstruction with this id, if stored.
    pub async fn reconstruction(&self, id: &str) -> Result<Option<ReconstructionRow>> {
        Ok(
            sqlx::query_as::<_, ReconstructionRow>(&format!("{SELECT} WHERE r.id = ?"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// A run's stored reconstructions, newest first.
    pub async fn reconstructions(&self, run_id: i64) -> Result<Vec<ReconstructionRow>> {
        Ok(sqlx::query_as::<_, ReconstructionRow>(&format!(
            "{SELECT} WHERE r.run_id = ? ORDER BY r.created_at DESC, r.nimg, r.sigma_rel"
        ))
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Forgets a run's stored reconstructions (rows only: their blobs become unreferenced,
    /// and `gc` removes them). Returns how many rows went.
    pub async fn forget_reconstructions(&self, run_id: i64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM reconstructions WHERE run_id = ?")
            .bind(run_id)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    /// Records reconstructions in one transaction and marks their blobs valid. A row whose id
    /// is already stored is pointed at the new blob (a recomputation, e.g. after the old blob
    /// was lost; the old blob, if unreferenced now, is left to GC).
    pub async fn record_reconstructions(&self, new: &[NewReconstruction]) -> Result<()> {
        let mut conn = self.begin_immediate().await?;
        let mut result = Ok(());
        for r in new {
            let step = async {
                sqlx::query(
                    "INSERT INTO reconstructions (id, run_id, nimg, sigma_rel, gamma, dtype, \
                     digest, byte_size, report) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (id) DO UPDATE SET digest = excluded.digest, \
                     byte_size = excluded.byte_size, report = excluded.report",
                )
                .bind(&r.id)
                .bind(r.run_id)
                .bind(r.nimg as i64)
                .bind(r.sigma_rel)
                .bind(r.gamma)
                .bind(&r.dtype)
                .bind(&r.digest)
                .bind(r.byte_size as i64)
                .bind(json_text(&serde_json::to_value(&r.report).map_err(
                    |e| crate::Error::Index(format!("a quality report does not serialize: {e}")),
                )?))
                .execute(&mut *conn)
                .await?;
                super::blobs::mark_valid(&mut conn, &r.digest).await
            }
            .await;
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        finish(&mut conn, result).await
    }
}
