//! How each metric of a sweep is shown to people — name, short name, display scale, which
//! way is better, whether it is the fallback feature network's — and the error bar a point
//! gets. Decided here, once: the web UI, the command line, the SVG plot and the Python
//! client all read it (the server sends it with every sweep as `Sweep.metrics` and each
//! point's `error_bar`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::results::MetricSummary;
use super::spec::{Goal, UserMetric};
use crate::metrics::Metric;

/// What computes a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// FID, computed by the server from the images' Inception features.
    Fid,
    /// KID, computed by the server from the images' Inception features.
    Kid,
    /// A user metric, reported by the external evaluator.
    User,
}

/// How one metric of a sweep is named, scaled and compared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MetricInfo {
    /// The metric's name as requests and results (`PointResult.metrics`) write it: `fid`,
    /// `kid`, or a user metric's name.
    pub metric: String,
    /// What computes it.
    pub kind: MetricKind,
    /// Its full name: `FID`, `KID`, or for the fallback feature network
    /// `FD (pixel projection, not FID)`, `KID (pixel projection, not Inception)`.
    pub label: String,
    /// A column heading: `FID`, `KID`, `FD-pixels`, `KID-pixels`.
    pub short_label: String,
    /// Displays show `value × scale` (KID is shown ×10³, as in StyleGAN and EDM papers); the
    /// values on the wire are never scaled.
    pub scale: f64,
    /// The axis or column title including the scale: `FID`, `KID ×10³`, `KID-pixels ×10³`.
    pub axis_label: String,
    /// Lower values are better (FID, KID, and user metrics whose goal is `min`).
    pub lower_is_better: bool,
    /// The numbers come from the fallback pixel projection, not NVIDIA's Inception: they are
    /// not comparable with published FID or KID.
    pub fallback: bool,
}

impl MetricInfo {
    /// The metric's presentation; `fallback`: its features are the pixel projection's.
    pub fn new(metric: Metric, fallback: bool) -> Self {
        let (label, short_label, scale) = match (fallback, metric) {
            (false, Metric::Fid) => ("FID", "FID", 1.0),
            (false, Metric::Kid) => ("KID", "KID", 1e3),
            (true, Metric::Fid) => ("FD (pixel projection, not FID)", "FD-pixels", 1.0),
            (true, Metric::Kid) => ("KID (pixel projection, not Inception)", "KID-pixels", 1e3),
        };
        let axis_label = if scale == 1e3 {
            format!("{short_label} ×10³")
        } else {
            short_label.to_owned()
        };
        MetricInfo {
            metric: metric.as_str().to_owned(),
            kind: match metric {
                Metric::Fid => MetricKind::Fid,
                Metric::Kid => MetricKind::Kid,
            },
            label: label.to_owned(),
            short_label: short_label.to_owned(),
            scale,
            axis_label,
            lower_is_better: true,
            fallback,
        }
    }

    /// A user metric's presentation: its label, unscaled, better by its goal.
    pub fn user(m: &UserMetric) -> Self {
        MetricInfo {
            metric: m.name.clone(),
            kind: MetricKind::User,
            label: m.label.clone(),
            short_label: m.name.clone(),
            scale: 1.0,
            axis_label: m.label.clone(),
            lower_is_better: m.goal == Goal::Min,
            fallback: false,
        }
    }

    /// `value` as displays show it: scaled; three decimals for the server's metrics, four
    /// significant digits for user metrics (whose scale is theirs).
    pub fn format(&self, value: f64) -> String {
        let v = value * self.scale;
        if self.kind != MetricKind::User || v == 0.0 || !v.is_finite() {
            return format!("{v:.3}");
        }
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
        if v.abs() >= 1e6 || v.abs() < 1e-4 {
            format!("{v:.3e}")
        } else {
            format!("{v:.digits$}")
        }
    }

    /// `summary` as a table cell: `mean ± error bar`, scaled, or the mean alone.
    pub fn format_summary(&self, summary: &MetricSummary) -> String {
        match error_bar(summary) {
            Some(bar) => format!("{} ± {}", self.format(summary.mean), self.format(bar)),
            None => self.format(summary.mean),
        }
    }

    /// Whether `a` is better than `b` by this metric.
    pub fn better(&self, a: f64, b: f64) -> bool {
        if self.lower_is_better {
            a < b
        } else {
            a > b
        }
    }
}

/// The half-height of the error bar a point's metric gets, in the metric's units: the
/// standard deviation over seed sets when there are several, else KID's standard error over
/// its subsets (one seed set), else none (FID of one seed set has no spread to show).
pub fn error_bar(summary: &MetricSummary) -> Option<f64> {
    summary.std.or_else(|| {
        summary
            .std_errors
            .as_ref()
            .and_then(|e| (e.len() == 1).then(|| e[0]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_scales_and_error_bars_are_decided_here() {
        let kid = MetricInfo::new(Metric::Kid, false);
        assert_eq!((kid.label.as_str(), kid.scale), ("KID", 1e3));
        assert_eq!(kid.axis_label, "KID ×10³");
        let fd = MetricInfo::new(Metric::Fid, true);
        assert_eq!(fd.short_label, "FD-pixels");
        assert!(fd.fallback && fd.lower_is_better);
        let one_set = MetricSummary::of(vec![0.002], Some(vec![0.0005]));
        assert_eq!(error_bar(&one_set), Some(0.0005));
        assert_eq!(kid.format_summary(&one_set), "2.000 ± 0.500");
        let sets = MetricSummary::of(vec![1.0, 3.0], None);
        assert_eq!(error_bar(&sets), Some(2f64.sqrt()));
        assert_eq!(error_bar(&MetricSummary::of(vec![5.0], None)), None);
        assert!(kid.better(1.0, 2.0));
        let acc = MetricInfo::user(&UserMetric {
            name: "acc".into(),
            goal: Goal::Max,
            label: "accuracy".into(),
        });
        assert!(acc.better(0.9, 0.8) && !acc.lower_is_better);
        assert_eq!(
            (acc.format(0.91234), acc.format(123.456)),
            ("0.9123".into(), "123.5".into())
        );
    }
}
