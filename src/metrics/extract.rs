//! Features of image sets: the Inception network with the identity of its weights, run over a
//! dataset or over generated images in batches.

use std::path::Path;

use super::inception::{Inception, Preprocess, FEATURES};
use super::stats::FeatureStats;
use super::weights::{load, locate};
use crate::datasets::Dataset;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The feature network, ready to run, with what identifies its features.
pub struct FeatureExtractor {
    net: Inception,
    /// BLAKE3 of the weights file (features from other weights are never compared).
    pub digest: String,
    /// The weights file.
    pub source: String,
}

impl FeatureExtractor {
    /// Finds (see [`locate`]) and loads the weights, and builds the network on the CPU.
    ///
    /// Also keeps freed memory in the process ([`crate::model::keep_freed_memory`]): the
    /// network allocates large activations per batch, which the allocator would otherwise
    /// return to the kernel and fault in again every time.
    pub fn open(weights: Option<&Path>) -> Result<Self> {
        crate::model::keep_freed_memory();
        let path = locate(weights)?;
        let weights = load(&path)?;
        Ok(Self {
            net: Inception::new(
                &weights.tensors,
                weights.preprocess,
                &crate::model::default_device(),
            )?,
            digest: weights.digest,
            source: weights.source,
        })
    }

    /// The preprocessing pipeline the weights call for: `nvidia` or `pytorch-fid`.
    pub fn preprocess_name(&self) -> &'static str {
        match self.net.preprocess() {
            Preprocess::Nvidia => "nvidia",
            Preprocess::PytorchFid => "pytorch-fid",
        }
    }

    /// A short name of the feature network and its weights: `inception-2015-12-05 (nvidia,
    /// <first 12 hex of the digest>)`.
    pub fn identity(&self) -> String {
        format!(
            "inception-2015-12-05 ({}, {})",
            self.preprocess_name(),
            &self.digest[..12]
        )
    }

    /// Features `[n, 2048]` (row-major f32) of `n` images of 8-bit pixels `[C, H, W]` each.
    pub fn features(
        &self,
        pixels: &[u8],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        let values: Vec<f32> = pixels.iter().map(|&v| v as f32).collect();
        let t = self.net.features(&values, n, c, h, w)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Features of the first `limit` images of `dataset` (all when `None`), `batch` at a
    /// time; `progress` counts images.
    pub fn dataset_features(
        &self,
        dataset: &Dataset,
        limit: Option<usize>,
        batch: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<f32>> {
        let n = limit.map_or(dataset.len(), |l| l.min(dataset.len()));
        if n == 0 {
            return Err(Error::invalid("dataset", "holds no images"));
        }
        let (c, r) = (dataset.channels(), dataset.resolution());
        progress.set_length(n as u64);
        let mut out = Vec::with_capacity(n * FEATURES);
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(n);
            let pixels: Vec<u8> = (start..end).flat_map(|i| dataset.pixels(i)).collect();
            out.extend(self.features(&pixels, end - start, c, r, r)?);
            progress.inc((end - start) as u64);
        }
        Ok(out)
    }
}

/// Statistics of features `[n, d]` (row-major).
pub fn statistics(features: &[f32], d: usize) -> Result<FeatureStats> {
    let mut stats = FeatureStats::new(d);
    stats.add(features)?;
    Ok(stats)
}
