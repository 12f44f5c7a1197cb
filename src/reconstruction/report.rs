//! The quality report stored with every reconstruction and sent with it over HTTP: the
//! solver's figures for the target (EDM2 post-hoc EMA, arXiv 2312.02696, Alg. 3 and
//! App. C.2), the snapshots it weighs, and what was clamped to fit the output type.
//!
//! One Rust type for the index column (`reconstructions.report`, JSON), the API
//! (`Reconstruction.report`, `GET /runs/{run}/preview`) and the command line; its schema is
//! in `/openapi.json` as `QualityReport`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::phema::Warning;

/// How good one reconstruction is, by the solver's own measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QualityReport {
    /// The target's σ_rel (relative standard deviation of the EMA profile).
    pub sigma_rel: f64,
    /// The target's power-function exponent γ (EDM2 eq. 3), equivalent to `sigma_rel`.
    pub gamma: f64,
    /// Training time reconstructed at, in training images.
    pub nimg: u64,
    /// Snapshots that took part (`0 < nimg_k ≤ nimg`, less the dependent ones).
    pub used_snapshots: u64,
    /// `‖p_target − Σ_k w_k p_k‖ / ‖p_target‖`: how far the reconstructed EMA profile is from
    /// the target's (L2 over training time; 0 is exact).
    pub relative_error: f64,
    /// `Σ_k |w_k|`: 1 for a pure average, larger when the weights cancel.
    pub coefficient_l1: f64,
    /// `sqrt(Σ_k w_k²)`: the factor by which independent per-snapshot noise is scaled.
    pub noise_gain: f64,
    /// 2-norm condition number of the Gram matrix of the used snapshots (≥ 1).
    pub condition_number: f64,
    /// Digests of snapshots left out because their profiles are linear combinations of
    /// earlier ones (weight 0).
    #[serde(default)]
    #[schema(required)]
    pub dependent_snapshots: Vec<String>,
    /// What deserves a second look (empty when every figure is within the solver's bounds).
    #[serde(default)]
    #[schema(required)]
    pub warnings: Vec<Warning>,
    /// The snapshots with a non-zero weight, in the solver's order.
    #[serde(default)]
    #[schema(required)]
    pub inputs: Vec<ReportInput>,
    /// Tensors whose values were clamped to the output type's largest finite value (asked for
    /// with `clamp_out_of_range`); absent when nothing was clamped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clamped: Vec<ClampedTensor>,
}

/// One snapshot a reconstruction weighs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportInput {
    /// The snapshot's digest (BLAKE3, 64 hex digits).
    pub digest: String,
    /// Its training time, in training images.
    pub nimg: u64,
    /// Its EMA's σ_rel.
    pub sigma_rel: f64,
    /// Its weight in the least-squares combination (the weights sum to 1).
    pub weight: f64,
}

/// A tensor whose values were clamped to fit the output type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClampedTensor {
    /// The tensor's name.
    pub tensor: String,
    /// How many elements were beyond the type's range.
    pub elements: u64,
    /// The largest magnitude among them (before clamping).
    pub max_abs: f64,
}
