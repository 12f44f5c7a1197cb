//! Scoring a point's images: the feature networks (loaded once, when the first point needs
//! them), reference statistics (loaded once per reference), and FID/KID per seed set from a
//! point's recorded batch features. Shared by the builtin worker and by the server's side of
//! the external-evaluator protocol, so that a point's metrics are computed the same way
//! whoever sampled its images.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Mutex, OnceCell};

use super::results::{set_metrics, MetricSummary, PointResult, Timings};
use super::spec::SweepSpec;
use crate::app::{references, DataDir};
use crate::db::{BatchRow, ReferenceRow};
use crate::error::{blocking, Error, Result};
use crate::metrics::{npy, FeatureExtractor, FeatureStats, Metric, FEATURES};

/// Reference statistics loaded for metrics.
pub struct LoadedReference {
    /// The row.
    pub row: ReferenceRow,
    /// Mean and covariance.
    pub stats: FeatureStats,
    /// The features `[count, 2048]` (KID), when kept.
    pub features: Option<Vec<f32>>,
}

/// Feature networks and reference statistics, loaded on first use and kept.
pub struct Scorer {
    data: DataDir,
    weights: Option<PathBuf>,
    extractor: OnceCell<Arc<FeatureExtractor>>,
    /// The fallback feature network, for references computed with it.
    pixel_projection: OnceCell<Arc<FeatureExtractor>>,
    references: Mutex<HashMap<i64, Arc<LoadedReference>>>,
}

impl Scorer {
    /// A scorer over `data`; `weights`: the Inception weights (default: found as
    /// `metrics::locate_weights` finds them).
    pub fn new(data: DataDir, weights: Option<PathBuf>) -> Self {
        Self {
            data,
            weights,
            extractor: OnceCell::new(),
            pixel_projection: OnceCell::new(),
            references: Mutex::new(HashMap::new()),
        }
    }

    /// The feature network `reference` was computed with: the Inception network (loaded once,
    /// when the first point needs it), or the fallback pixel projection. Errors when the
    /// reference records other Inception weights than this server's.
    pub async fn extractor_for(
        &self,
        reference: &LoadedReference,
    ) -> Result<Arc<FeatureExtractor>> {
        if reference.row.feature_network == crate::metrics::PIXEL_PROJECTION_NETWORK {
            return self
                .pixel_projection
                .get_or_try_init(|| async {
                    blocking("building the pixel projection", || {
                        Ok(Arc::new(FeatureExtractor::pixel_projection()))
                    })
                    .await
                })
                .await
                .cloned();
        }
        let extractor = self.extractor().await?;
        if let Some(d) = &reference.row.weights_digest {
            if *d != extractor.digest {
                return Err(Error::invalid(
                    "reference",
                    format!(
                        "reference statistics {:?} come from feature weights {} and this \
                         server has {} ({}): features of two networks are not comparable",
                        reference.row.name,
                        &d[..12.min(d.len())],
                        &extractor.digest[..12.min(extractor.digest.len())],
                        extractor.source
                    ),
                ));
            }
        }
        Ok(extractor)
    }

    /// NVIDIA's Inception network, loaded once.
    pub async fn extractor(&self) -> Result<Arc<FeatureExtractor>> {
        self.extractor
            .get_or_try_init(|| async {
                let weights = self.weights.clone();
                blocking("loading the Inception weights", move || {
                    Ok(Arc::new(FeatureExtractor::open(weights.as_deref())?))
                })
                .await
            })
            .await
            .cloned()
    }

    /// Reference statistics `id`, loaded once.
    pub async fn reference(&self, id: i64) -> Result<Arc<LoadedReference>> {
        let mut cache = self.references.lock().await;
        if let Some(r) = cache.get(&id) {
            return Ok(r.clone());
        }
        let row =
            self.data.db.reference(id).await?.ok_or_else(|| {
                Error::NotFound(format!("reference statistics {id} no longer exist"))
            })?;
        let loaded = Arc::new(LoadedReference {
            stats: references::stats(&self.data, &row).await?,
            features: references::features(&self.data, &row).await?,
            row,
        });
        cache.insert(id, loaded.clone());
        Ok(loaded)
    }

    /// Features of images `range` of a point, from its recorded batches.
    async fn features_of(
        &self,
        spec: &SweepSpec,
        batches: &[BatchRow],
        range: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(range.len() * FEATURES);
        for b in batches {
            let seeds = spec.batch_seeds(b.batch as usize);
            let (start, end) = (seeds.start as usize, seeds.end as usize);
            let (lo, hi) = (start.max(range.start), end.min(range.end));
            if lo >= hi {
                continue;
            }
            let bytes = self.data.read_blob(&b.features_digest).await?;
            let (shape, values) = npy::read_f32(&bytes, "a batch's features")?;
            if shape != [end - start, FEATURES] {
                return Err(Error::Index(format!(
                    "batch {} holds features of shape {shape:?}, not [{}, {FEATURES}]",
                    b.batch,
                    end - start
                )));
            }
            out.extend_from_slice(&values[(lo - start) * FEATURES..(hi - start) * FEATURES]);
        }
        if out.len() != range.len() * FEATURES {
            return Err(Error::Index(format!(
                "the recorded batches cover {} of images {}..{}",
                out.len() / FEATURES,
                range.start,
                range.end
            )));
        }
        Ok(out)
    }

    /// FID and KID per seed set from a point's recorded `batches`, and the statistics of all
    /// its images. Timings are left at zero, and `user`/`features` empty, for the caller.
    pub async fn metrics(
        &self,
        spec: &SweepSpec,
        batches: &[BatchRow],
        reference: &Arc<LoadedReference>,
        reconstruction_id: &str,
    ) -> Result<(PointResult, FeatureStats)> {
        let mut all = FeatureStats::new(FEATURES);
        let (mut fids, mut kids, mut kid_errors) = (Vec::new(), Vec::new(), Vec::new());
        let kid_size = spec
            .kid_subset_size
            .min(spec.num_images)
            .min(reference.row.count.max(0) as usize);
        for set in 0..spec.seed_sets {
            let range = set * spec.num_images..(set + 1) * spec.num_images;
            let features = self.features_of(spec, batches, range).await?;
            let (reference, metrics, kid_params) = (
                reference.clone(),
                spec.metrics.clone(),
                (spec.kid_subsets, kid_size),
            );
            let (m, features) = blocking("computing metrics", move || {
                let m = set_metrics(
                    &features,
                    &metrics,
                    &reference.stats,
                    reference.features.as_deref(),
                    kid_params,
                    set,
                )?;
                Ok((m, features))
            })
            .await?;
            if spec.seed_sets == 1 {
                all = m.stats;
            } else {
                all.add(&features)?;
            }
            fids.extend(m.fid);
            if let Some((mean, se)) = m.kid {
                kids.push(mean);
                kid_errors.push(se);
            }
        }
        let result = PointResult {
            fid: spec
                .wants(Metric::Fid)
                .then(|| MetricSummary::of(fids, None)),
            kid: spec
                .wants(Metric::Kid)
                .then(|| MetricSummary::of(kids, Some(kid_errors))),
            num_images: spec.num_images,
            seed_sets: spec.seed_sets,
            kid_subsets: spec
                .wants(Metric::Kid)
                .then_some((spec.kid_subsets, kid_size)),
            reconstruction: reconstruction_id.to_owned(),
            timings: Timings::default(),
            user: Default::default(),
            features: None,
        };
        Ok((result, all))
    }
}

/// Who computed a point's features, from its batches: `server`, `client` or `mixed`.
pub fn features_by(batches: &[BatchRow]) -> Option<String> {
    let server = batches.iter().any(|b| b.features_by == "server");
    let client = batches.iter().any(|b| b.features_by == "client");
    match (server, client) {
        (true, false) => Some("server".into()),
        (false, true) => Some("client".into()),
        (true, true) => Some("mixed".into()),
        (false, false) => None,
    }
}

/// The timings of a point from its batches.
pub fn batch_timings(batches: &[BatchRow], reconstruct_s: f64, metrics_s: f64) -> Timings {
    let images: i64 = batches.iter().map(|b| b.images).sum();
    let batches_s: f64 = batches.iter().map(|b| b.seconds).sum();
    Timings {
        reconstruct_s,
        batches_s,
        sample_s: batches.iter().map(|b| b.sample_seconds).sum(),
        features_s: batches.iter().map(|b| b.features_seconds).sum(),
        metrics_s,
        images_per_s: if batches_s > 0.0 {
            images as f64 / batches_s
        } else {
            0.0
        },
    }
}
