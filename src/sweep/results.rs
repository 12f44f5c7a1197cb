//! A point's result: metrics per seed set, their mean and spread, and where the time went;
//! and the best point of a sweep.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::labels::MetricInfo;
use crate::db::PointRow;
use crate::error::Result;
use crate::metrics::{frechet_distance_of, kid, FeatureStats, Metric, FEATURES};

/// One metric over a point's seed sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    /// Mean over seed sets.
    pub mean: f64,
    /// Sample standard deviation over seed sets (`None` with one set).
    pub std: Option<f64>,
    /// One value per seed set.
    pub values: Vec<f64>,
    /// KID only: each value's standard error over its subsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std_errors: Option<Vec<f64>>,
}

impl MetricSummary {
    /// Mean and sample standard deviation of `values`.
    pub fn of(values: Vec<f64>, std_errors: Option<Vec<f64>>) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.len() > 1)
            .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        Self {
            mean,
            std,
            values,
            std_errors,
        }
    }
}

/// Seconds spent on a point (sent to clients as `PointResult.timings`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// Solving and materializing the weights (0 when they were stored already).
    pub reconstruct_s: f64,
    /// Sampling, features and storing, over every batch (across resumptions).
    pub batches_s: f64,
    /// Of which sampling.
    #[serde(default)]
    #[schema(required)]
    pub sample_s: f64,
    /// Of which Inception features.
    #[serde(default)]
    #[schema(required)]
    pub features_s: f64,
    /// Statistics, FID and KID.
    pub metrics_s: f64,
    /// Images per second over the batches.
    pub images_per_s: f64,
}

/// What a finished point records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// FID, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<MetricSummary>,
    /// KID, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<MetricSummary>,
    /// Images per seed set.
    pub num_images: usize,
    /// Seed sets.
    pub seed_sets: usize,
    /// KID subsets and features per subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid_subsets: Option<(usize, usize)>,
    /// The reconstruction sampled.
    pub reconstruction: String,
    /// Times.
    pub timings: Timings,
    /// User metrics an external evaluator reported, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user: BTreeMap<String, MetricSummary>,
    /// Who computed the images' Inception features: `server`, `client` or `mixed` (none:
    /// no images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<String>,
}

impl PointResult {
    /// The value of `metric` (its mean over seed sets), if computed.
    pub fn value(&self, metric: Metric) -> Option<&MetricSummary> {
        match metric {
            Metric::Fid => self.fid.as_ref(),
            Metric::Kid => self.kid.as_ref(),
        }
    }

    /// The metric named `name` (`fid`, `kid` or a user metric's), if recorded.
    pub fn named(&self, name: &str) -> Option<&MetricSummary> {
        match name.parse::<Metric>() {
            Ok(m) => self.value(m),
            Err(_) => self.user.get(name),
        }
    }

    /// Every metric recorded, by name: the server's, then the user's.
    pub fn all(&self) -> Vec<(String, &MetricSummary)> {
        Metric::ALL
            .iter()
            .filter_map(|&m| Some((m.as_str().to_owned(), self.value(m)?)))
            .chain(self.user.iter().map(|(k, v)| (k.clone(), v)))
            .collect()
    }
}

/// Metrics of one seed set's features `[n, 2048]` against the reference.
pub struct SetMetrics {
    /// The set's statistics.
    pub stats: FeatureStats,
    /// FID, if asked.
    pub fid: Option<f64>,
    /// KID mean and standard error, if asked.
    pub kid: Option<(f64, f64)>,
}

/// Computes the metrics of one seed set. `kid_params` = (subsets, subset size); KID's
/// subsets are drawn with a seed fixed per set, so a result never depends on who computed it.
pub fn set_metrics(
    features: &[f32],
    metrics: &[Metric],
    reference: &FeatureStats,
    reference_features: Option<&[f32]>,
    kid_params: (usize, usize),
    set: usize,
) -> Result<SetMetrics> {
    let mut stats = FeatureStats::new(FEATURES);
    stats.add(features)?;
    let fid = if metrics.contains(&Metric::Fid) {
        Some(frechet_distance_of(&stats, reference)?)
    } else {
        None
    };
    let kid = match (metrics.contains(&Metric::Kid), reference_features) {
        (true, Some(r)) => {
            let k = kid(
                features,
                r,
                FEATURES,
                kid_params.0,
                kid_params.1,
                set as u64,
            )?;
            Some((k.mean, k.std_error))
        }
        _ => None,
    };
    Ok(SetMetrics { stats, fid, kid })
}

/// The best finished point by `metric` (the lowest mean, or the highest when higher is
/// better), if any, with its summary.
pub fn best_point<'a>(
    points: &'a [PointRow],
    metric: &MetricInfo,
) -> Option<(&'a PointRow, MetricSummary)> {
    points
        .iter()
        .filter_map(|p| {
            let r: PointResult = serde_json::from_value(p.result.clone()?).ok()?;
            let v = r.named(&metric.metric)?.clone();
            Some((p, v))
        })
        .filter(|(_, v)| v.mean.is_finite())
        .reduce(|a, b| {
            if metric.better(b.1.mean, a.1.mean) {
                b
            } else {
                a
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_mean_and_sample_std() {
        let s = MetricSummary::of(vec![1.0, 2.0, 3.0], None);
        assert_eq!(s.mean, 2.0);
        assert!((s.std.unwrap() - 1.0).abs() < 1e-15);
        assert_eq!(MetricSummary::of(vec![4.0], None).std, None);
    }
}
