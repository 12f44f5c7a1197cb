//! What a sweep computes: the request as a client states it, its validation against the
//! index (run, reference statistics, training times), and the normalised specification that
//! is stored with the sweep and that workers follow.

use serde::{Deserialize, Serialize};

use super::labels::UserMetric;
use crate::app::{references, DataDir};
use crate::db::{Evaluator, ReferenceRow, Run};
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

/// Most user metrics in a sweep.
pub const MAX_USER_METRICS: usize = 16;

/// Largest external `sampler` object, bytes of JSON.
pub const MAX_SAMPLER_BYTES: usize = 64 << 10;

/// A metric as a request names it: one of the server's (`fid`, `kid`) or the user's.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricRequest {
    /// FID or KID, computed by the server from the points' images.
    Image(Metric),
    /// A user metric, reported by an external evaluator.
    User(UserMetric),
}

/// The sampler settings of a request: typed (the command line) or the JSON object a client
/// sent (checked against the builtin sampler's fields, or passed through for external
/// evaluators).
#[derive(Clone, Debug, PartialEq)]
pub enum SamplerRequest {
    /// Builtin settings.
    Settings(SamplerSettings),
    /// A JSON object.
    Object(serde_json::Map<String, serde_json::Value>),
}

impl Default for SamplerRequest {
    fn default() -> Self {
        SamplerRequest::Object(serde_json::Map::new())
    }
}

/// A sweep's sampler: EDM's Heun settings for the builtin evaluator, the user's own object
/// (stored and handed to evaluators untouched) for external ones.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SamplerSpec {
    /// Builtin: EDM's Heun sampler.
    Builtin(SamplerSettings),
    /// External: whatever the user's sampler takes.
    External(serde_json::Map<String, serde_json::Value>),
}

impl SamplerSpec {
    /// The builtin sampler's settings (external sweeps: the defaults, unused).
    pub fn settings(&self) -> SamplerSettings {
        match self {
            SamplerSpec::Builtin(s) => *s,
            SamplerSpec::External(_) => SamplerSettings::default(),
        }
    }

    /// As the JSON object the sweep shows and evaluators receive.
    pub fn to_object(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
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
    /// Who evaluates the points; default builtin for runs with a network configuration,
    /// else external.
    pub evaluator: Option<Evaluator>,
    /// Metrics; default FID, and KID when the reference keeps its features.
    pub metrics: Option<Vec<MetricRequest>>,
    /// Images per seed set; default 50 000 (or the deployment's cap, if lower).
    pub num_images: Option<usize>,
    /// Seed sets: set `k` samples seeds `k·N … (k+1)·N − 1`; default 1.
    pub seed_sets: Option<usize>,
    /// Sampler settings.
    pub sampler: SamplerRequest,
    /// Reference statistics, by id or name (needed for FID and KID).
    pub reference: Option<String>,
    /// Images per batch (sampling and features); default 32.
    pub batch: Option<usize>,
    /// KID: subsets averaged (default 100, as StyleGAN/EDM).
    pub kid_subsets: Option<usize>,
    /// KID: most features per subset (default 1000).
    pub kid_subset_size: Option<usize>,
    /// Sweep even when the reference statistics come from another dataset than the one the
    /// run records it was trained on ([`dataset_mismatch`]); default false.
    pub allow_dataset_mismatch: bool,
}

/// The validated sweep, stored with it (`sweeps.request`), followed by workers and sent to
/// clients as `Sweep.spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "StoredSpec")]
pub struct SweepSpec {
    /// The run's name.
    pub run: String,
    /// Who evaluates the points.
    #[schema(required)]
    pub evaluator: Evaluator,
    /// EMA widths.
    pub sigma_rels: Vec<f64>,
    /// Training times.
    pub nimgs: Vec<u64>,
    /// The server's metrics (FID, KID), computed from the points' images.
    pub metrics: Vec<Metric>,
    /// Metrics the external evaluator reports, in the order declared.
    #[schema(required)]
    pub user_metrics: Vec<UserMetric>,
    /// Images per seed set (0: the sweep computes no image metric).
    pub num_images: usize,
    /// Seed sets.
    pub seed_sets: usize,
    /// Builtin: EDM's Heun settings. External: the user's object, untouched.
    pub sampler: SamplerSpec,
    /// Reference statistics' id (null: none, an external sweep of user metrics only).
    pub reference_id: Option<i64>,
    /// Their name (as it was when the sweep was made).
    pub reference_name: Option<String>,
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

/// [`SweepSpec`] as stored: the sampler is read as the evaluator says (a builtin sweep's
/// settings, an external sweep's object untouched). Specs stored before external sweeps
/// existed read as builtin ones.
#[derive(Deserialize)]
struct StoredSpec {
    run: String,
    #[serde(default)]
    evaluator: Evaluator,
    sigma_rels: Vec<f64>,
    nimgs: Vec<u64>,
    metrics: Vec<Metric>,
    #[serde(default)]
    user_metrics: Vec<UserMetric>,
    num_images: usize,
    seed_sets: usize,
    sampler: serde_json::Value,
    reference_id: Option<i64>,
    reference_name: Option<String>,
    #[serde(default = "inception_network")]
    feature_network: String,
    batch: usize,
    kid_subsets: usize,
    kid_subset_size: usize,
    #[serde(default)]
    warnings: Vec<String>,
}

impl TryFrom<StoredSpec> for SweepSpec {
    type Error = String;

    fn try_from(s: StoredSpec) -> std::result::Result<Self, String> {
        let sampler = match (s.evaluator, s.sampler) {
            (Evaluator::Builtin, v) => SamplerSpec::Builtin(
                serde_json::from_value(v).map_err(|e| format!("sampler: {e}"))?,
            ),
            (Evaluator::External, serde_json::Value::Object(map)) => SamplerSpec::External(map),
            (Evaluator::External, other) => {
                return Err(format!("sampler: {other} is not an object"));
            }
        };
        Ok(SweepSpec {
            run: s.run,
            evaluator: s.evaluator,
            sigma_rels: s.sigma_rels,
            nimgs: s.nimgs,
            metrics: s.metrics,
            user_metrics: s.user_metrics,
            num_images: s.num_images,
            seed_sets: s.seed_sets,
            sampler,
            reference_id: s.reference_id,
            reference_name: s.reference_name,
            feature_network: s.feature_network,
            batch: s.batch,
            kid_subsets: s.kid_subsets,
            kid_subset_size: s.kid_subset_size,
            warnings: s.warnings,
        })
    }
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

    /// The presentation of every metric of the sweep: the server's, then the user's.
    pub fn metric_infos(&self) -> Vec<super::labels::MetricInfo> {
        self.metrics
            .iter()
            .map(|&m| self.metric_info(m))
            .chain(
                self.user_metrics
                    .iter()
                    .map(super::labels::MetricInfo::user),
            )
            .collect()
    }

    /// The presentation of the metric named `name`, if the sweep has it.
    pub fn metric_named(&self, name: &str) -> Option<super::labels::MetricInfo> {
        self.metric_infos().into_iter().find(|m| m.metric == name)
    }

    /// Whether the points' images are sampled and scored (FID or KID asked for).
    pub fn has_images(&self) -> bool {
        !self.metrics.is_empty() && self.num_images > 0
    }

    /// Images a point samples: `num_images × seed_sets` (0 without image metrics).
    pub fn images_per_point(&self) -> usize {
        if self.has_images() {
            self.num_images * self.seed_sets
        } else {
            0
        }
    }

    /// Batches per point.
    pub fn batches_per_point(&self) -> usize {
        self.images_per_point().div_ceil(self.batch.max(1))
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

    /// What a sweep's metric values can be compared on, as people read it: sweeps whose
    /// values may share one chart (overlays) have the same key. FID and KID depend on the
    /// reference statistics (by id: another data set, or the same one summarised again, is
    /// another yardstick), on the feature network (Inception or the pixel-projection
    /// fallback), on the images per seed set (FID is biased by `1/N`) and on the seed sets
    /// (set `k` samples seeds `k·N … (k+1)·N − 1`, so equal `N` and sets mean equal seeds).
    /// The sampler is left out: comparing its settings is what overlays are for.
    pub fn comparison_key(&self) -> String {
        let sets = if self.seed_sets == 1 {
            "1 seed set".to_owned()
        } else {
            format!("{} seed sets", self.seed_sets)
        };
        match self.reference_id {
            Some(id) if self.has_images() => format!(
                "reference #{id}{}, {}, {} images × {sets}",
                self.reference_name
                    .as_deref()
                    .map(|n| format!(" “{n}”"))
                    .unwrap_or_default(),
                self.feature_network,
                self.num_images,
            ),
            _ => format!("no images (user metrics), {sets}"),
        }
    }

    /// Whether KID is among the metrics.
    pub fn wants(&self, metric: Metric) -> bool {
        self.metrics.contains(&metric)
    }

    /// The seeds of seed set `set`: `set·num_images … (set+1)·num_images − 1`.
    pub fn set_seeds(&self, set: usize) -> std::ops::Range<u64> {
        (set * self.num_images) as u64..((set + 1) * self.num_images) as u64
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
                "run {:?} records no network configuration (metadata.network), so hindsight's \
                 builtin evaluator cannot sample it: evaluate it with your own code (\"evaluator\": \
                 \"external\", then the Python client's Client.evaluate); runs made by \
                 `hindsight train` have one",
                run.name
            ),
        )
    })
}

/// The metrics of a request, checked: the server's (each once) and the user's (names unique,
/// at most [`MAX_USER_METRICS`], external evaluators only). `None` when not given.
fn checked_metrics(
    metrics: Option<Vec<MetricRequest>>,
    evaluator: Evaluator,
) -> Result<Option<(Vec<Metric>, Vec<UserMetric>)>> {
    let Some(list) = metrics else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(Error::invalid("metrics", "give at least one"));
    }
    // Each with its position in the request, for messages naming a repeated one.
    let mut image: Vec<(usize, Metric)> = Vec::new();
    let mut user: Vec<(usize, UserMetric)> = Vec::new();
    for (i, m) in list.into_iter().enumerate() {
        let name = match &m {
            MetricRequest::Image(m) => m.as_str().to_owned(),
            MetricRequest::User(u) => u.name.clone(),
        };
        // A repeated metric would be computed and listed twice: refuse it, naming both.
        let first = image
            .iter()
            .find(|(_, x)| x.as_str() == name)
            .map(|(j, _)| *j)
            .or_else(|| user.iter().find(|(_, u)| u.name == name).map(|(j, _)| *j));
        if let Some(first) = first {
            return Err(Error::invalid(
                format!("metrics[{i}]"),
                format!("{name:?} is already metrics[{first}]; name each metric once"),
            ));
        }
        match m {
            MetricRequest::Image(m) => image.push((i, m)),
            MetricRequest::User(u) => {
                if evaluator == Evaluator::Builtin {
                    return Err(Error::invalid(
                        format!("metrics[{i}]"),
                        format!(
                            "{:?} is a user metric, which an external evaluator reports; the \
                             builtin evaluator computes fid and kid only (ask for \
                             \"evaluator\": \"external\")",
                            u.name
                        ),
                    ));
                }
                user.push((i, u.checked(&format!("metrics[{i}]"))?));
            }
        }
    }
    if user.len() > MAX_USER_METRICS {
        return Err(Error::invalid(
            "metrics",
            format!("{} user metrics; at most {MAX_USER_METRICS}", user.len()),
        ));
    }
    Ok(Some((
        image.into_iter().map(|(_, m)| m).collect(),
        user.into_iter().map(|(_, u)| u).collect(),
    )))
}

/// The sampler of a sweep: checked builtin settings, or the external evaluator's object.
fn checked_sampler(request: SamplerRequest, evaluator: Evaluator) -> Result<SamplerSpec> {
    match (evaluator, request) {
        (Evaluator::Builtin, SamplerRequest::Settings(s)) => {
            s.check()?;
            Ok(SamplerSpec::Builtin(s))
        }
        (Evaluator::Builtin, SamplerRequest::Object(map)) => {
            let s: SamplerSettings = serde_json::from_value(serde_json::Value::Object(map))
                .map_err(|e| {
                    Error::invalid(
                        "sampler",
                        format!(
                            "{e}: the builtin sampler takes steps, sigma_min, sigma_max and \
                             rho (an external evaluator's sampler takes any object)"
                        ),
                    )
                })?;
            s.check()?;
            Ok(SamplerSpec::Builtin(s))
        }
        (Evaluator::External, request) => {
            let map = match request {
                SamplerRequest::Object(map) => map,
                SamplerRequest::Settings(s) => match serde_json::to_value(s) {
                    Ok(serde_json::Value::Object(map)) => map,
                    _ => serde_json::Map::new(),
                },
            };
            let size = serde_json::to_string(&map).map(|t| t.len()).unwrap_or(0);
            if size > MAX_SAMPLER_BYTES {
                return Err(Error::invalid(
                    "sampler",
                    format!("{size} bytes of JSON; at most {MAX_SAMPLER_BYTES}"),
                ));
            }
            Ok(SamplerSpec::External(map))
        }
    }
}

/// Why `reference` was not made from the data `run` was trained on, or `None` when it may
/// have been. Compared: the dataset family ([`crate::datasets::family`]: the built-in
/// procedural images, Fashion-MNIST) where both sides name a known one, and the image
/// channels where both are recorded (grey images are replicated to RGB for Inception, so
/// grey would be compared with colour). A run records its data in `metadata.dataset`
/// (`hindsight train`), its network's channels in `metadata.network`; runs with neither (a
/// PyTorch trainer's) are not checked.
pub fn dataset_mismatch(run: &Run, reference: &ReferenceRow) -> Option<String> {
    let dataset = &run.metadata["dataset"];
    let source = dataset["source"]
        .as_str()
        .unwrap_or("as its network records");
    let run_family = dataset["source"].as_str().and_then(crate::datasets::family);
    let reference_family = crate::datasets::family(&reference.source);
    if let (Some(a), Some(b)) = (run_family, reference_family) {
        if a != b {
            let from = |family: &str, source: &str| {
                if family == source {
                    format!("{family} images")
                } else {
                    format!("{family} images ({source})")
                }
            };
            return Some(format!(
                "run {:?} was trained on {} but reference statistics {:?} come from {}",
                run.name,
                from(a, source),
                reference.name,
                from(b, &reference.source)
            ));
        }
    }
    let run_channels = dataset["channels"]
        .as_i64()
        .or_else(|| run.metadata["network"]["img_channels"].as_i64());
    if let (Some(a), Some(b)) = (run_channels, reference.channels) {
        if a != b {
            return Some(format!(
                "run {:?} was trained on {a}-channel images ({source}) but reference \
                 statistics {:?} come from {b}-channel images ({})",
                run.name, reference.name, reference.source
            ));
        }
    }
    None
}

/// A warning when `run` records its dataset but `reference` says nothing [`dataset_mismatch`]
/// can compare with it (imported statistics: no known source, no channels), so that a sweep
/// against them is not taken as checked.
pub fn dataset_unchecked(run: &Run, reference: &ReferenceRow) -> Option<String> {
    let source = run.metadata["dataset"]["source"].as_str()?;
    if crate::datasets::family(&reference.source).is_some() || reference.channels.is_some() {
        return None;
    }
    Some(format!(
        "reference statistics {:?} ({}) record no dataset hindsight knows and no channels, so \
         whether they describe the data run {:?} was trained on ({source}) is not checked",
        reference.name, reference.source, run.name
    ))
}

/// Validates `request` against the index and `limits`; returns the specification and the
/// rows it names. Errors name the request's field (`sigma_rels`, `nimgs`, `num_images`,
/// `reference`, `metrics[2].name`, …): unknown run or reference ([`Error::NotFound`]),
/// values out of range, a reference of another feature dimension, KID against a reference
/// without features, a builtin sweep of a run without a network configuration.
pub async fn validate(
    data: &DataDir,
    request: SweepRequest,
    limits: &SweepLimits,
) -> Result<(SweepSpec, Run, Option<ReferenceRow>)> {
    let run = data
        .db
        .run(&request.run)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run: {:?} does not exist", request.run)))?;
    let has_network = run_network(&run).is_ok();
    let evaluator = request.evaluator.unwrap_or(if has_network {
        Evaluator::Builtin
    } else {
        Evaluator::External
    });
    let network = match evaluator {
        Evaluator::Builtin => Some(run_network(&run)?),
        Evaluator::External => None,
    };
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
    let requested = checked_metrics(request.metrics, evaluator)?;
    let wants_images = match &requested {
        Some((image, _)) => !image.is_empty(),
        None => true,
    };
    let num_images = if !wants_images {
        if let Some(n) = request.num_images {
            return Err(Error::invalid(
                "num_images",
                format!(
                    "{n}: the sweep computes no FID or KID, so the server takes no images \
                     (leave num_images out)"
                ),
            ));
        }
        0
    } else {
        let n = request.num_images.unwrap_or(limits.max_images.min(50_000));
        if n < 2 || n > limits.max_images {
            return Err(Error::invalid(
                "num_images",
                format!(
                    "{n} images; between 2 and {} (the configured cap)",
                    limits.max_images
                ),
            ));
        }
        n
    };
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
    let sampler = checked_sampler(request.sampler, evaluator)?;
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
    let mut warnings = Vec::new();
    let reference = match (&request.reference, wants_images) {
        (Some(key), true) => Some(references::find(data, key).await.map_err(|e| match e {
            Error::NotFound(m) => Error::NotFound(format!("reference: {m}")),
            other => other,
        })?),
        (None, true) => {
            return Err(Error::invalid(
                if requested.is_some() {
                    "reference"
                } else {
                    "metrics"
                },
                match evaluator {
                    Evaluator::Builtin => "FID and KID need reference statistics: give \
                                           `reference` (see GET /references)"
                        .to_owned(),
                    Evaluator::External => "FID and KID need reference statistics: give \
                                            `reference` (see GET /references), or declare only \
                                            user metrics, e.g. {\"name\": \"val_loss\", \
                                            \"goal\": \"min\"}"
                        .to_owned(),
                },
            ))
        }
        (Some(_), false) => {
            return Err(Error::invalid(
                "reference",
                "the sweep computes no FID or KID, so it takes no reference statistics",
            ))
        }
        (None, false) => None,
    };
    if let Some(reference) = &reference {
        if let Some(warning) = dataset_unchecked(&run, reference) {
            warnings.push(warning);
        }
        if let Some(why) = dataset_mismatch(&run, reference) {
            if request.allow_dataset_mismatch {
                warnings.push(format!("allowed by allow_dataset_mismatch: {why}"));
            } else {
                return Err(Error::invalid(
                    "reference",
                    format!(
                        "{why}: FID and KID against them would measure the difference between the \
                         datasets, not the EMA length. Use reference statistics of the run's \
                         dataset (hindsight ref-stats), or set allow_dataset_mismatch \
                         (--allow-dataset-mismatch) to sweep anyway"
                    ),
                ));
            }
        }
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
    }
    let (metrics, user_metrics) = match requested {
        Some(m) => m,
        None => match &reference {
            Some(r) if r.features_digest.is_some() => (vec![Metric::Fid, Metric::Kid], vec![]),
            _ => (vec![Metric::Fid], vec![]),
        },
    };
    if let Some(reference) = &reference {
        if metrics.contains(&Metric::Kid) && reference.features_digest.is_none() {
            return Err(Error::invalid(
                "metrics",
                format!(
                    "KID needs the reference's features, and {:?} has none (imported \
                     statistics keep only mu and sigma): ask for fid alone, or use reference \
                     statistics computed from images",
                    reference.name
                ),
            ));
        }
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
    if let (Some(reference), Some(network)) = (&reference, &network) {
        if let Some(r) = reference.resolution {
            if r as usize != network.img_resolution {
                warnings.push(format!(
                    "the reference images are {r}×{r} and the run's {0}×{0}: FID compares \
                     them after resizing both to 299×299, which is not the same as comparing \
                     images of one size",
                    network.img_resolution
                ));
            }
        }
    }
    let fallback = reference
        .as_ref()
        .is_some_and(|r| r.feature_network == crate::metrics::PIXEL_PROJECTION_NETWORK);
    if let (Some(reference), true) = (&reference, fallback) {
        warnings.push(format!(
            "{:?} holds features of the fallback pixel projection, not Inception: the \
             numbers rank this sweep's points but are not FID or KID (statistics computed \
             with NVIDIA's Inception weights give FID and KID)",
            reference.name
        ));
    }
    if metrics.contains(&Metric::Fid) && num_images < 10_000 {
        let fd = if fallback {
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
        evaluator,
        sigma_rels: request.sigma_rels,
        nimgs,
        metrics,
        user_metrics,
        num_images,
        seed_sets,
        sampler,
        reference_id: reference.as_ref().map(|r| r.id),
        reference_name: reference.as_ref().map(|r| r.name.clone()),
        feature_network: reference
            .as_ref()
            .map_or_else(inception_network, |r| r.feature_network.clone()),
        batch,
        kid_subsets,
        kid_subset_size,
        warnings,
    };
    Ok((spec, run, reference))
}
