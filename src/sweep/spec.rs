//! What a sweep computes: the request as a client states it, its validation against the
//! index (run, reference statistics, training times), and the normalised specification that
//! is stored with the sweep and that workers follow.

use serde::{Deserialize, Serialize};

use crate::app::{references, DataDir};
use crate::db::{ReferenceRow, Run};
use crate::error::{Error, Result};
use crate::materialize::OutDtype;
use crate::metrics::{Metric, FEATURES};
use crate::model::sampler::SamplerConfig;
use crate::model::Edm2Config;
use crate::phema::check_nimg;
use crate::phema::profile::check_sigma_rel;
use crate::phema::request::TargetSpec;
use crate::reconstruction;

/// Settings a deployment caps sweeps with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepLimits {
    /// Most images per seed set (EDM2 uses 50 000 for its FIDs).
    pub max_images: usize,
    /// Most points (σ_rel × nimg) in one sweep.
    pub max_points: usize,
    /// Most seed sets.
    pub max_seed_sets: usize,
    /// Most images per batch.
    pub max_batch: usize,
    /// Most unfinished (queued or running) sweeps of one run; more are refused until some
    /// finish or are cancelled.
    pub max_unfinished_per_run: usize,
    /// Most unfinished sweeps in all.
    pub max_unfinished: usize,
}

impl Default for SweepLimits {
    fn default() -> Self {
        Self {
            max_images: 50_000,
            max_points: 256,
            max_seed_sets: 16,
            max_batch: 512,
            max_unfinished_per_run: 32,
            max_unfinished: 256,
        }
    }
}

/// EDM's Heun sampler settings (EDM, Karras et al. 2022, eq. 5 and Algorithm 1; EDM2
/// `generate_images.py` defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplerSettings {
    /// Steps (denoiser evaluations are `2 · steps − 1`).
    #[serde(default = "default_steps")]
    #[schema(required)]
    pub steps: usize,
    /// Lowest noise level.
    #[serde(default = "default_sigma_min")]
    #[schema(required)]
    pub sigma_min: f64,
    /// Highest noise level.
    #[serde(default = "default_sigma_max")]
    #[schema(required)]
    pub sigma_max: f64,
    /// Time-step exponent ρ.
    #[serde(default = "default_rho")]
    #[schema(required)]
    pub rho: f64,
}

fn default_steps() -> usize {
    32
}
fn default_sigma_min() -> f64 {
    0.002
}
fn default_sigma_max() -> f64 {
    80.0
}
fn default_rho() -> f64 {
    7.0
}

impl Default for SamplerSettings {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            sigma_min: default_sigma_min(),
            sigma_max: default_sigma_max(),
            rho: default_rho(),
        }
    }
}

impl SamplerSettings {
    /// The sampler's configuration.
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            num_steps: self.steps,
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            rho: self.rho,
        }
    }

    fn check(&self) -> Result<()> {
        if !(2..=1000).contains(&self.steps) {
            return Err(Error::invalid(
                "sampler.steps",
                format!("{} steps; between 2 and 1000", self.steps),
            ));
        }
        // EDM's defaults are 0.002, 80 and 7; the bounds keep the schedule meaningful.
        let within = |v: f64, lo: f64, hi: f64| v.is_finite() && v >= lo && v <= hi;
        if !within(self.sigma_min, 1e-6, 1e4) {
            return Err(Error::invalid(
                "sampler.sigma_min",
                format!("{}: between 1e-6 and 1e4", self.sigma_min),
            ));
        }
        if !within(self.sigma_max, 1e-6, 1e4) || self.sigma_max <= self.sigma_min {
            return Err(Error::invalid(
                "sampler.sigma_max",
                format!(
                    "{}: between 1e-6 and 1e4, above sigma_min ({})",
                    self.sigma_max, self.sigma_min
                ),
            ));
        }
        if !within(self.rho, 0.1, 100.0) {
            return Err(Error::invalid(
                "sampler.rho",
                format!("{}: between 0.1 and 100", self.rho),
            ));
        }
        Ok(())
    }
}

/// A sweep as a client asks for it (`POST /sweeps`, `hindsight sweep`). Lists are parsed
/// already; `None` takes the default.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRequest {
    /// The run's name.
    pub run: String,
    /// EMA widths, each in `(0, sqrt(1/12))`.
    pub sigma_rels: Vec<f64>,
    /// Training times to reconstruct at (a 2-D sweep); default: the run's last snapshot.
    pub nimgs: Option<Vec<u64>>,
    /// Metrics; default FID, and KID when the reference keeps its features.
    pub metrics: Option<Vec<Metric>>,
    /// Images per seed set; default 50 000 (or the deployment's cap, if lower).
    pub num_images: Option<usize>,
    /// Seed sets: set `k` samples seeds `k·N … (k+1)·N − 1`; default 1.
    pub seed_sets: Option<usize>,
    /// Sampler settings.
    pub sampler: SamplerSettings,
    /// Reference statistics, by id or name.
    pub reference: String,
    /// Images per batch (sampling and features); default 32.
    pub batch: Option<usize>,
    /// KID: subsets averaged (default 100, as StyleGAN/EDM).
    pub kid_subsets: Option<usize>,
    /// KID: most features per subset (default 1000).
    pub kid_subset_size: Option<usize>,
}

/// The validated sweep, stored with it (`sweeps.request`), followed by workers and sent to
/// clients as `Sweep.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SweepSpec {
    /// The run's name.
    pub run: String,
    /// EMA widths.
    pub sigma_rels: Vec<f64>,
    /// Training times.
    pub nimgs: Vec<u64>,
    /// Metrics.
    pub metrics: Vec<Metric>,
    /// Images per seed set.
    pub num_images: usize,
    /// Seed sets.
    pub seed_sets: usize,
    /// Sampler settings.
    pub sampler: SamplerSettings,
    /// Reference statistics' id.
    pub reference_id: i64,
    /// Their name (as it was when the sweep was made).
    pub reference_name: String,
    /// Their feature network: [`crate::metrics::INCEPTION_NETWORK`] (FID and KID proper) or
    /// [`crate::metrics::PIXEL_PROJECTION_NETWORK`] (the fallback: the numbers are not FID).
    #[serde(default = "inception_network")]
    #[schema(required)]
    pub feature_network: String,
    /// Images per batch.
    pub batch: usize,
    /// KID subsets.
    pub kid_subsets: usize,
    /// KID subset size.
    pub kid_subset_size: usize,
    /// Things the client should know (e.g. reference images of another size).
    #[serde(default)]
    #[schema(required)]
    pub warnings: Vec<String>,
}

fn inception_network() -> String {
    crate::metrics::INCEPTION_NETWORK.to_owned()
}

impl SweepSpec {
    /// Whether the metrics are the fallback's (Fréchet distance and KID on pixel
    /// projections), not FID and KID.
    pub fn is_fallback(&self) -> bool {
        self.feature_network == crate::metrics::PIXEL_PROJECTION_NETWORK
    }

    /// How `metric` is named, scaled and compared for this sweep (the fallback's names when
    /// its features are the pixel projection's).
    pub fn metric_info(&self, metric: Metric) -> super::labels::MetricInfo {
        super::labels::MetricInfo::new(metric, self.is_fallback())
    }

    /// The presentation of every metric of the sweep, in its order.
    pub fn metric_infos(&self) -> Vec<super::labels::MetricInfo> {
        self.metrics.iter().map(|&m| self.metric_info(m)).collect()
    }

    /// Images a point samples: `num_images × seed_sets`.
    pub fn images_per_point(&self) -> usize {
        self.num_images * self.seed_sets
    }

    /// Batches per point.
    pub fn batches_per_point(&self) -> usize {
        self.images_per_point().div_ceil(self.batch)
    }

    /// The images (seeds) of batch `b`.
    pub fn batch_seeds(&self, b: usize) -> std::ops::Range<u64> {
        let start = b * self.batch;
        let end = (start + self.batch).min(self.images_per_point());
        start as u64..end as u64
    }

    /// The points, σ_rel fastest: `(sigma_rel, nimg)`.
    pub fn points(&self) -> Vec<(f64, u64)> {
        self.nimgs
            .iter()
            .flat_map(|&n| self.sigma_rels.iter().map(move |&s| (s, n)))
            .collect()
    }

    /// Whether KID is among the metrics.
    pub fn wants(&self, metric: Metric) -> bool {
        self.metrics.contains(&metric)
    }
}

/// The specification stored with a sweep.
pub fn spec_of(sweep: &crate::db::SweepRow) -> Result<SweepSpec> {
    serde_json::from_value(sweep.spec.clone())
        .map_err(|e| Error::Index(format!("sweep {} has an unreadable spec: {e}", sweep.id)))
}

/// The network configuration a run records (`metadata.network`), which sampling needs.
pub fn run_network(run: &Run) -> Result<Edm2Config> {
    serde_json::from_value(run.metadata["network"].clone()).map_err(|_| {
        Error::invalid(
            "run",
            format!(
                "run {:?} records no network configuration (metadata.network), so its images \
                 cannot be sampled; runs made by `hindsight train` or the Python client with a \
                 network configuration have one",
                run.name
            ),
        )
    })
}

/// Validates `request` against the index and `limits`; returns the specification and the
/// rows it names. Errors name the request's field (`sigma_rels`, `nimgs`, `num_images`,
/// `reference`, …): unknown run or reference ([`Error::NotFound`]), values out of range, a
/// reference of another feature dimension, KID against a reference without features.
pub async fn validate(
    data: &DataDir,
    request: SweepRequest,
    limits: &SweepLimits,
) -> Result<(SweepSpec, Run, ReferenceRow)> {
    let run = data
        .db
        .run(&request.run)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run: {:?} does not exist", request.run)))?;
    let network = run_network(&run)?;
    if request.sigma_rels.is_empty() {
        return Err(Error::invalid("sigma_rels", "give at least one sigma_rel"));
    }
    for (i, &s) in request.sigma_rels.iter().enumerate() {
        check_sigma_rel(s, &format!("sigma_rels[{i}]"))?;
        if request.sigma_rels[..i].contains(&s) {
            return Err(Error::invalid(
                format!("sigma_rels[{i}]"),
                format!("{s} is listed twice"),
            ));
        }
    }
    let snapshots = data.db.snapshots(run.id).await?;
    let last =
        snapshots.iter().map(|s| s.nimg).max().ok_or_else(|| {
            Error::invalid("run", format!("run {:?} has no snapshots yet", run.name))
        })? as u64;
    let nimgs = match request.nimgs {
        None => vec![last],
        Some(list) if list.is_empty() => {
            return Err(Error::invalid("nimgs", "give at least one training time"))
        }
        Some(list) => list,
    };
    for (i, &n) in nimgs.iter().enumerate() {
        check_nimg(n, &format!("nimgs[{i}]"))?;
        if nimgs[..i].contains(&n) {
            return Err(Error::invalid(
                format!("nimgs[{i}]"),
                format!("{n} is listed twice"),
            ));
        }
        if n == 0 || n > last {
            return Err(Error::invalid(
                format!("nimgs[{i}]"),
                format!(
                    "nimg {n} is outside the run: its snapshots reach {last} images \
                     (reconstructions need 0 < nimg <= {last})"
                ),
            ));
        }
    }
    let points = request.sigma_rels.len() * nimgs.len();
    if points > limits.max_points {
        return Err(Error::invalid(
            "sigma_rels",
            format!(
                "{points} points (sigma_rels × nimgs); at most {}",
                limits.max_points
            ),
        ));
    }
    let num_images = request.num_images.unwrap_or(limits.max_images.min(50_000));
    if num_images < 2 || num_images > limits.max_images {
        return Err(Error::invalid(
            "num_images",
            format!(
                "{num_images} images; between 2 and {} (the configured cap)",
                limits.max_images
            ),
        ));
    }
    let seed_sets = request.seed_sets.unwrap_or(1);
    if seed_sets == 0 || seed_sets > limits.max_seed_sets {
        return Err(Error::invalid(
            "seed_sets",
            format!("{seed_sets}; between 1 and {}", limits.max_seed_sets),
        ));
    }
    let batch = request.batch.unwrap_or(32);
    if batch == 0 || batch > limits.max_batch {
        return Err(Error::invalid(
            "batch",
            format!(
                "{batch} images per batch; between 1 and {}",
                limits.max_batch
            ),
        ));
    }
    request.sampler.check()?;
    let reference = references::find(data, &request.reference)
        .await
        .map_err(|e| match e {
            Error::NotFound(m) => Error::NotFound(format!("reference: {m}")),
            other => other,
        })?;
    if reference.dims as usize != FEATURES {
        return Err(Error::invalid(
            "reference",
            format!(
                "{:?} holds {}-d statistics; FID and KID here use {FEATURES}-d \
                 inception-2015-12-05 features",
                reference.name, reference.dims
            ),
        ));
    }
    let metrics = match request.metrics {
        Some(m) if m.is_empty() => return Err(Error::invalid("metrics", "give at least one")),
        Some(m) => {
            // A repeated metric would be computed and listed twice: refuse it, naming both.
            for (i, metric) in m.iter().enumerate() {
                if let Some(first) = m[..i].iter().position(|x| x == metric) {
                    return Err(Error::invalid(
                        format!("metrics[{i}]"),
                        format!(
                            "{:?} is already metrics[{first}]; name each metric once",
                            metric.as_str()
                        ),
                    ));
                }
            }
            m
        }
        None if reference.features_digest.is_some() => vec![Metric::Fid, Metric::Kid],
        None => vec![Metric::Fid],
    };
    if metrics.contains(&Metric::Kid) && reference.features_digest.is_none() {
        return Err(Error::invalid(
            "metrics",
            format!(
                "KID needs the reference's features, and {:?} has none (imported statistics \
                 keep only mu and sigma): ask for fid alone, or use reference statistics \
                 computed from images",
                reference.name
            ),
        ));
    }
    let kid_subsets = request.kid_subsets.unwrap_or(100);
    if kid_subsets == 0 || kid_subsets > 10_000 {
        return Err(Error::invalid(
            "kid_subsets",
            format!("{kid_subsets}; between 1 and 10000"),
        ));
    }
    let kid_subset_size = request.kid_subset_size.unwrap_or(1000);
    if kid_subset_size < 2 {
        return Err(Error::invalid("kid_subset_size", "at least 2"));
    }
    // Every target must solve (a σ_rel the snapshots cannot reach is refused here, not
    // after hours of sampling).
    let targets = nimgs
        .iter()
        .flat_map(|&n| {
            request.sigma_rels.iter().map(move |&s| TargetSpec {
                sigma_rel: Some(s),
                gamma: None,
                nimg: Some(n),
            })
        })
        .collect::<Vec<_>>();
    let mut warnings = Vec::new();
    // Targets the snapshots reach only roughly are kept but named: their points are not the
    // EMA the axis says (the solver's profile error and noise gain, EDM2 eq. 7's fit).
    let mut rough = Vec::new();
    for chunk in targets.chunks(reconstruction::MAX_TARGETS) {
        let plan = reconstruction::plan(&data.db, &run.name, chunk.to_vec(), OutDtype::F32).await?;
        for t in &plan.targets {
            let sol = &t.solution;
            if !sol.warnings.is_empty() {
                rough.push(format!(
                    "σ_rel {} at nimg {}: profile error {:.1} %, noise gain {:.1}",
                    sol.sigma_rel,
                    sol.nimg,
                    sol.relative_error * 100.0,
                    sol.noise_gain
                ));
            }
        }
    }
    if !rough.is_empty() {
        warnings.push(format!(
            "the snapshots reach {} of the {} points only roughly, so those points are not the \
             EMA length they are plotted at: {} (more frequent snapshots reach further; each \
             target's quality report says how far it is from its profile)",
            rough.len(),
            targets.len(),
            rough.join("; ")
        ));
    }
    if let Some(r) = reference.resolution {
        if r as usize != network.img_resolution {
            warnings.push(format!(
                "the reference images are {r}×{r} and the run's {0}×{0}: FID compares them \
                 after resizing both to 299×299, which is not the same as comparing images \
                 of one size",
                network.img_resolution
            ));
        }
    }
    if let Some(c) = reference.channels {
        if c as usize != network.img_channels {
            warnings.push(format!(
                "the reference images have {c} channel(s) and the run's {}: grey images are \
                 replicated to RGB for Inception, so grey is compared with colour",
                network.img_channels
            ));
        }
    }
    if reference.feature_network == crate::metrics::PIXEL_PROJECTION_NETWORK {
        warnings.push(format!(
            "{:?} holds features of the fallback pixel projection, not Inception: the \
             numbers rank this sweep's points but are not FID or KID (statistics computed \
             with NVIDIA's Inception weights give FID and KID)",
            reference.name
        ));
    }
    if num_images < 10_000 {
        let fd = if reference.feature_network == crate::metrics::PIXEL_PROJECTION_NETWORK {
            "The Fréchet distance"
        } else {
            "FID"
        };
        warnings.push(format!(
            "{fd} is biased upwards at {num_images} images (EDM2 uses 50 000): compare points \
             of this sweep with each other, not with published figures; KID is unbiased"
        ));
    }
    let spec = SweepSpec {
        run: run.name.clone(),
        sigma_rels: request.sigma_rels,
        nimgs,
        metrics,
        num_images,
        seed_sets,
        sampler: request.sampler,
        reference_id: reference.id,
        reference_name: reference.name.clone(),
        feature_network: reference.feature_network.clone(),
        batch,
        kid_subsets,
        kid_subset_size,
        warnings,
    };
    Ok((spec, run, reference))
}
