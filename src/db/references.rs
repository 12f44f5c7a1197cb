//! The `reference_stats` table: reference statistics of image sets, by name.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::connection::{finish, Db};
use crate::error::{Error, Result};

/// Stored reference statistics.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct ReferenceRow {
    /// Row id (what sweeps refer to).
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// What they were computed from (a dataset) or imported from (a file).
    pub source: String,
    /// The feature network, e.g. `inception-2015-12-05 pool3`.
    pub feature_network: String,
    /// BLAKE3 of the weights file the features came from; `None` when imported.
    pub weights_digest: Option<String>,
    /// The preprocessing pipeline (`nvidia`, `pytorch-fid`); `None` when imported.
    pub preprocess: Option<String>,
    /// Feature dimension.
    pub dims: i64,
    /// Images summarised (0 when an imported file does not say).
    pub count: i64,
    /// Digest of the `.npz` (mu, sigma).
    pub stats_digest: String,
    /// Digest of the `.npy` features (f32 `[count, dims]`), for KID; `None` when imported.
    pub features_digest: Option<String>,
    /// Image side of the reference set, when known.
    pub resolution: Option<i64>,
    /// Image channels of the reference set, when known.
    pub channels: Option<i64>,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// Reference statistics about to be recorded; their blobs are in the store under claimed
/// digests.
#[derive(Clone, Debug, PartialEq)]
pub struct NewReference {
    /// Unique name.
    pub name: String,
    /// Dataset or file.
    pub source: String,
    /// Feature network.
    pub feature_network: String,
    /// Weights digest, if computed here.
    pub weights_digest: Option<String>,
    /// Preprocessing pipeline, if computed here.
    pub preprocess: Option<String>,
    /// Feature dimension.
    pub dims: usize,
    /// Images.
    pub count: u64,
    /// `.npz` blob.
    pub stats_digest: String,
    /// `.npy` features blob.
    pub features_digest: Option<String>,
    /// Image side.
    pub resolution: Option<usize>,
    /// Image channels.
    pub channels: Option<usize>,
}

const SELECT: &str = "SELECT id, name, source, feature_network, weights_digest, preprocess, dims, \
     count, stats_digest, features_digest, resolution, channels, created_at FROM reference_stats";

impl Db {
    /// Records reference statistics and marks their blobs valid. A name already taken is
    /// [`Error::Conflict`].
    pub async fn record_reference(&self, new: &NewReference) -> Result<ReferenceRow> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let taken: Option<i64> =
                sqlx::query_scalar("SELECT id FROM reference_stats WHERE name = ?")
                    .bind(&new.name)
                    .fetch_optional(&mut *conn)
                    .await?;
            if taken.is_some() {
                return Err(Error::Conflict(format!(
                    "reference statistics named {:?} exist already",
                    new.name
                )));
            }
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO reference_stats (name, source, feature_network, weights_digest, \
                 preprocess, dims, count, stats_digest, features_digest, resolution, channels) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(&new.name)
            .bind(&new.source)
            .bind(&new.feature_network)
            .bind(&new.weights_digest)
            .bind(&new.preprocess)
            .bind(new.dims as i64)
            .bind(new.count as i64)
            .bind(&new.stats_digest)
            .bind(&new.features_digest)
            .bind(new.resolution.map(|r| r as i64))
            .bind(new.channels.map(|c| c as i64))
            .fetch_one(&mut *conn)
            .await?;
            super::blobs::mark_valid(&mut conn, &new.stats_digest).await?;
            if let Some(f) = &new.features_digest {
                super::blobs::mark_valid(&mut conn, f).await?;
            }
            Ok(id)
        }
        .await;
        let id = finish(&mut conn, result).await?;
        self.reference(id)
            .await?
            .ok_or_else(|| Error::Index(format!("reference statistics {id} vanished")))
    }

    /// Reference statistics by id.
    pub async fn reference(&self, id: i64) -> Result<Option<ReferenceRow>> {
        Ok(
            sqlx::query_as::<_, ReferenceRow>(&format!("{SELECT} WHERE id = ?"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Reference statistics by name.
    pub async fn reference_named(&self, name: &str) -> Result<Option<ReferenceRow>> {
        Ok(
            sqlx::query_as::<_, ReferenceRow>(&format!("{SELECT} WHERE name = ?"))
                .bind(name)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Every stored reference, by name.
    pub async fn references(&self) -> Result<Vec<ReferenceRow>> {
        Ok(
            sqlx::query_as::<_, ReferenceRow>(&format!("{SELECT} ORDER BY name"))
                .fetch_all(self.pool())
                .await?,
        )
    }
}
