//! Wire types of the external-evaluator protocol (`/evaluations/...`, `docs/EVALUATORS.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::sweep::external::{BatchReceipt, LeaseState, AUDIT_TOLERANCE, MIN_AUDIT_IMAGES};
use crate::sweep::MetricInfo;

/// The body of `POST /evaluations/claim`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationClaim {
    /// The evaluator's name, shown on the sweep's page: 1 to 100 printable characters.
    pub worker: String,
    /// Claim only points of this sweep.
    #[serde(default)]
    pub sweep: Option<i64>,
    /// Claim only points of this run's sweeps.
    #[serde(default)]
    pub run: Option<String>,
}

/// The sweep a lease belongs to.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LeaseSweep {
    /// Its id.
    pub id: i64,
    /// Its run.
    pub run: String,
    /// `GET` it here.
    pub url: String,
}

/// The point a lease holds.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LeasePoint {
    /// Its index in the sweep.
    pub idx: i64,
    /// The EMA width σ_rel to evaluate.
    pub sigma_rel: f64,
    /// The training time, images.
    pub nimg: i64,
    /// Claims of the point so far, this one included.
    pub attempts: i64,
}

/// The weights to evaluate: the point's reconstruction (float32 safetensors).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LeaseReconstruction {
    /// The reconstruction's id.
    pub id: String,
    /// BLAKE3 (hex) of the file: check the download against it.
    pub digest: String,
    /// Download it here.
    pub url: String,
    /// Element type of its floating-point tensors (`f32`).
    pub dtype: String,
    /// The file's size, bytes.
    pub byte_size: i64,
}

/// One seed set of a point: its images come from seeds `first_seed … end_seed − 1`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SeedSet {
    /// Its number.
    pub set: u64,
    /// The first seed.
    pub first_seed: u64,
    /// One past the last seed.
    pub end_seed: u64,
}

/// What uploaded images must be.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ImageGeometry {
    /// Their side, pixels (the reference images'; null: not recorded, any square size).
    pub resolution: Option<i64>,
    /// The reference images' channels (1 or 3; null: not recorded). Grey images are
    /// replicated to RGB for Inception either way.
    pub channels: Option<i64>,
}

/// Whether and how the server takes features the evaluator computed.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FeatureTerms {
    /// Features are taken (false: the reference's are the fallback pixel projection's;
    /// upload images).
    pub accepted: bool,
    /// The feature network (`inception-2015-12-05 pool3 (2048-d)`).
    pub network: String,
    /// Feature dimension.
    pub dims: u64,
    /// BLAKE3 of the weights the reference's features came from (null: imported).
    pub weights_digest: Option<String>,
    /// Fewest of a batch's images that come with its features, for the audit.
    pub min_audit_images: u64,
    /// Largest relative L2 difference `‖f_client − f_server‖ / ‖f_server‖` an audit image
    /// may show.
    pub audit_tolerance: f64,
}

/// Where a lease's writes go.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LeaseUrls {
    /// `POST`: extend the lease.
    pub heartbeat: String,
    /// `POST {"message"}`: give the point up.
    pub fail: String,
    /// `POST` batch `{k}`'s images or features (replace `{k}`).
    pub batch: String,
    /// `POST {"name": value}`: user metrics.
    pub metrics: String,
    /// `POST`: record the point.
    pub finish: String,
}

/// A lease on one point of an external sweep: what to evaluate and how to report it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Lease {
    /// The lease's id: every later write names it.
    pub lease_id: String,
    /// The evaluator holding it.
    pub worker: String,
    /// RFC 3339 UTC: it runs out then unless a heartbeat or write extends it.
    pub expires_at: String,
    /// How long each heartbeat or write extends it, seconds.
    pub lease_seconds: f64,
    /// The sweep.
    pub sweep: LeaseSweep,
    /// The point.
    pub point: LeasePoint,
    /// Its weights.
    pub reconstruction: LeaseReconstruction,
    /// Images per seed set (0: no image metric).
    pub num_images: u64,
    /// Images per batch.
    pub batch: u64,
    /// Batches of the point (0: no image metric): batch k is seeds
    /// `k·batch … min((k+1)·batch, num_images·seed_sets) − 1`.
    pub batches: u64,
    /// Batches recorded already (by an earlier lease): upload only the others.
    pub batches_done: Vec<i64>,
    /// The seed sets.
    pub seed_sets: Vec<SeedSet>,
    /// What uploaded images must be.
    pub images: ImageGeometry,
    /// Whether features are taken, and their audit.
    pub features: FeatureTerms,
    /// The sweep's `sampler` object, as the user gave it.
    pub sampler: serde_json::Value,
    /// Every metric of the sweep (`kind` `user`: the evaluator reports it).
    pub metrics: Vec<MetricInfo>,
    /// User metrics recorded under this lease, one value per seed set or one for the point.
    pub metrics_recorded: BTreeMap<String, Vec<f64>>,
    /// Where the writes go.
    pub urls: LeaseUrls,
}

impl Lease {
    /// The wire form of a lease's state.
    pub fn new(s: &LeaseState, lease_seconds: f64) -> Self {
        let spec = &s.spec;
        let id = &s.lease.lease_id;
        let base = format!("/evaluations/{id}");
        Lease {
            lease_id: id.clone(),
            worker: s.lease.worker.clone(),
            expires_at: crate::db::ms_to_rfc3339(s.lease.expires_ms),
            lease_seconds,
            sweep: LeaseSweep {
                id: s.sweep.id,
                run: s.sweep.run.clone(),
                url: format!("/sweeps/{}", s.sweep.id),
            },
            point: LeasePoint {
                idx: s.point.idx,
                sigma_rel: s.point.sigma_rel,
                nimg: s.point.nimg,
                attempts: s.point.attempts,
            },
            reconstruction: LeaseReconstruction {
                id: s.reconstruction.id.clone(),
                digest: s.reconstruction.digest.clone(),
                url: format!("/reconstructions/{}/weights", s.reconstruction.id),
                dtype: s.reconstruction.dtype.clone(),
                byte_size: s.reconstruction.byte_size,
            },
            num_images: spec.num_images as u64,
            batch: spec.batch as u64,
            batches: spec.batches_per_point() as u64,
            batches_done: s.batches_done.clone(),
            seed_sets: (0..spec.seed_sets)
                .map(|k| {
                    let seeds = spec.set_seeds(k);
                    SeedSet {
                        set: k as u64,
                        first_seed: seeds.start,
                        end_seed: seeds.end,
                    }
                })
                .collect(),
            images: ImageGeometry {
                resolution: s.reference.as_ref().and_then(|r| r.resolution),
                channels: s.reference.as_ref().and_then(|r| r.channels),
            },
            features: FeatureTerms {
                accepted: s.features_accepted(),
                network: crate::metrics::Metric::Fid.feature_network().to_owned(),
                dims: crate::metrics::FEATURES as u64,
                weights_digest: s.reference.as_ref().and_then(|r| r.weights_digest.clone()),
                min_audit_images: MIN_AUDIT_IMAGES as u64,
                audit_tolerance: AUDIT_TOLERANCE,
            },
            sampler: spec.sampler.to_object(),
            metrics: spec.metric_infos(),
            metrics_recorded: s.metrics_recorded.iter().cloned().collect(),
            urls: LeaseUrls {
                heartbeat: format!("{base}/heartbeat"),
                fail: format!("{base}/fail"),
                batch: format!("{base}/batches/{{k}}"),
                metrics: format!("{base}/metrics"),
                finish: format!("{base}/finish"),
            },
        }
    }
}

/// The body of `POST /evaluations/{lease}/fail`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailReport {
    /// Why (an exception and its message); at most 4000 characters are kept.
    pub message: String,
}

/// The answer to a failure report.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FailRecorded {
    /// The lease, now ended.
    pub lease_id: String,
    /// The point goes back to the queue (false: it failed for good, after its attempts).
    pub retry: bool,
}

/// An audit of uploaded features.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AuditResult {
    /// Audit images checked.
    pub images: u64,
    /// The largest relative L2 difference found.
    pub max_relative_difference: f64,
}

/// The answer to a batch upload.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BatchRecorded {
    /// The batch.
    pub batch: u64,
    /// Its images.
    pub images: u64,
    /// Recorded now (false: the same upload was recorded before; nothing changed).
    pub recorded: bool,
    /// Who computed its features: `server` (images uploaded) or `client`.
    pub features_by: String,
    /// The audit, for uploaded features.
    pub audit: Option<AuditResult>,
    /// Server seconds spent on it (parsing, features, audit, storing).
    pub server_seconds: f64,
}

impl From<BatchReceipt> for BatchRecorded {
    fn from(r: BatchReceipt) -> Self {
        BatchRecorded {
            batch: r.batch as u64,
            images: r.images as u64,
            recorded: r.recorded,
            features_by: r.features_by.to_owned(),
            audit: r.audit.map(|a| AuditResult {
                images: a.images as u64,
                max_relative_difference: a.max_relative_difference,
            }),
            server_seconds: r.seconds,
        }
    }
}

/// The answer to a metrics report.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MetricsRecorded {
    /// Every user metric recorded under the lease so far.
    pub metrics_recorded: BTreeMap<String, Vec<f64>>,
    /// User metrics of the sweep not reported yet.
    pub missing: Vec<String>,
}

/// A user metric's value: one number for the point, or one per seed set.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum MetricValue {
    /// For the whole point.
    One(f64),
    /// One per seed set, in order.
    PerSet(Vec<f64>),
}

/// The body of `POST /evaluations/{lease}/metrics`: user metrics by name (finite numbers).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct MetricsReport(pub BTreeMap<String, MetricValue>);
