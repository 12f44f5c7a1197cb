//! Wire types of sweeps and reference statistics.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use std::collections::BTreeMap;

use crate::db::{Evaluator, LeaseOutcome, LeaseRow, PointRow, ReferenceRow, SweepRow, SweepStatus};
use crate::metrics::Metric;
use crate::sweep::{
    best_point, error_bar, MetricInfo, MetricRequest, MetricSummary, PointResult, SamplerRequest,
    SweepRequest, SweepSpec, Timings, UserMetric,
};

use super::super::error::{ApiError, ApiResult, ErrorDetail};
use super::super::reconstruct::Widths;

/// One training time or several (the schema of `nimgs`; the body is read by hand so that
/// errors name the element).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Nimgs {
    /// One value.
    One(u64),
    /// Several values.
    Many(Vec<u64>),
}

/// Reference statistics by id or name.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ReferenceKey {
    /// The id.
    Id(i64),
    /// The name.
    Name(String),
}

/// A metric of a sweep request: `"fid"`, `"kid"`, or a user metric an external evaluator
/// reports.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum MetricName {
    /// `fid` or `kid`.
    Server(String),
    /// A user metric: `{"name": "val_loss", "goal": "min", "label": "validation loss"}`.
    User(UserMetric),
}

/// A sweep's sampler: EDM's Heun settings (builtin; every field optional), or any JSON
/// object for an external evaluator (stored and handed to it untouched).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SamplerRequestBody {
    /// Builtin.
    Builtin(SamplerBody),
    /// External: the user's own settings.
    External(serde_json::Map<String, serde_json::Value>),
}

/// Sampler settings of a sweep (EDM's Heun sampler); every field optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SweepSampler)]
pub struct SamplerBody {
    /// Steps (default 32; denoiser evaluations are 2·steps − 1).
    pub steps: Option<u64>,
    /// Lowest noise level (default 0.002).
    pub sigma_min: Option<f64>,
    /// Highest noise level (default 80).
    pub sigma_max: Option<f64>,
    /// Time-step exponent ρ (default 7).
    pub rho: Option<f64>,
}

/// The body of `POST /sweeps`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SweepRequest)]
pub struct SweepRequestBody {
    /// The run's name.
    pub run: String,
    /// `builtin` (hindsight's workers sample the run's EDM2 network) or `external` (the
    /// user's evaluators, `POST /evaluations/claim`). Default: builtin when the run records a
    /// network configuration, else external.
    #[serde(default)]
    pub evaluator: Option<Evaluator>,
    /// EMA widths: a number, a list, or EDM2's list syntax (`"0.02,0.03,...,0.25"`).
    #[schema(value_type = Widths)]
    pub sigma_rels: serde_json::Value,
    /// Training times to reconstruct at (a 2-D sweep); default: the run's last snapshot.
    #[serde(default)]
    #[schema(value_type = Option<Nimgs>)]
    pub nimgs: Option<serde_json::Value>,
    /// `fid`, `kid`, and (external sweeps) user metrics `{"name", "goal", "label"}`; default:
    /// FID, and KID when the reference keeps its features.
    #[serde(default)]
    #[schema(value_type = Option<Vec<MetricName>>)]
    pub metrics: Option<Vec<serde_json::Value>>,
    /// Images per seed set (default 50 000 or the server's cap, if lower).
    #[serde(default)]
    pub num_images: Option<u64>,
    /// Seed sets (default 1): set k samples seeds k·N … (k+1)·N − 1, and each metric is
    /// reported as mean ± std over the sets.
    #[serde(default)]
    pub seed_sets: Option<u64>,
    /// Sampler settings: the builtin sampler's, or (external) any object.
    #[serde(default)]
    #[schema(value_type = Option<SamplerRequestBody>)]
    pub sampler: Option<serde_json::Value>,
    /// Reference statistics, by id or name (see `GET /references`): needed for FID and KID.
    #[serde(default)]
    pub reference: Option<ReferenceKey>,
    /// Images per batch (default 32): the unit of progress and of resumption.
    #[serde(default)]
    pub batch: Option<u64>,
    /// KID: subsets averaged (default 100).
    #[serde(default)]
    pub kid_subsets: Option<u64>,
    /// KID: most features per subset (default 1000).
    #[serde(default)]
    pub kid_subset_size: Option<u64>,
    /// Sweep even when the reference statistics come from another dataset than the run
    /// records it was trained on (another dataset family, or grey against colour): refused
    /// with a 400 naming `reference` otherwise. Default false.
    #[serde(default)]
    pub allow_dataset_mismatch: bool,
}

/// `sigma_rels` as a number, a list of numbers or EDM2's list syntax, with errors naming the
/// element.
fn sigma_rels(v: &serde_json::Value) -> ApiResult<Vec<f64>> {
    use serde_json::Value;
    match v {
        Value::Number(n) => Ok(vec![n.as_f64().unwrap_or(f64::NAN)]),
        Value::String(text) => super::super::reconstruct::widths(
            &Widths::List(text.clone()),
            "sigma_rels",
            false,
            crate::phema::MAX_LIST_VALUES,
        ),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_f64().ok_or_else(|| {
                    ApiError::invalid(format!("sigma_rels[{i}]: {item} is not a number"))
                })
            })
            .collect(),
        other => Err(ApiError::invalid(format!(
            "sigma_rels: {other} is not a number, a list of numbers, or EDM2's list syntax \
             (\"0.05,0.10,...,0.25\")"
        ))),
    }
}

/// `nimgs` as a whole number of images or a list of them, with errors naming the element.
fn nimgs(v: &serde_json::Value) -> ApiResult<Vec<u64>> {
    let one = |item: &serde_json::Value, field: String| {
        item.as_u64().ok_or_else(|| {
            ApiError::invalid(format!(
                "{field}: {item} is not a whole number of training images"
            ))
        })
    };
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| one(item, format!("nimgs[{i}]")))
            .collect(),
        item => Ok(vec![one(item, "nimgs".to_owned())?]),
    }
}

fn size(v: Option<u64>) -> Option<usize> {
    v.map(|v| usize::try_from(v).unwrap_or(usize::MAX))
}

impl SweepRequestBody {
    /// The library's request; list syntax and metric names are checked here.
    pub fn into_request(self) -> ApiResult<SweepRequest> {
        let sigma_rels = sigma_rels(&self.sigma_rels)?;
        let metrics = match self.metrics {
            None => None,
            Some(items) => Some(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| metric_request(i, item))
                    .collect::<ApiResult<Vec<_>>>()?,
            ),
        };
        let sampler = match self.sampler {
            None | Some(serde_json::Value::Null) => SamplerRequest::default(),
            Some(serde_json::Value::Object(map)) => SamplerRequest::Object(map),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "sampler: {other} is not an object"
                )))
            }
        };
        Ok(SweepRequest {
            run: self.run,
            evaluator: self.evaluator,
            sigma_rels,
            nimgs: self.nimgs.as_ref().map(nimgs).transpose()?,
            metrics,
            num_images: size(self.num_images),
            seed_sets: size(self.seed_sets),
            sampler,
            reference: self.reference.map(|r| match r {
                ReferenceKey::Id(id) => id.to_string(),
                ReferenceKey::Name(n) => n,
            }),
            batch: size(self.batch),
            kid_subsets: size(self.kid_subsets),
            kid_subset_size: size(self.kid_subset_size),
            allow_dataset_mismatch: self.allow_dataset_mismatch,
        })
    }
}

/// `metrics[i]` of a request: `"fid"`, `"kid"`, or a user metric object.
fn metric_request(i: usize, item: serde_json::Value) -> ApiResult<MetricRequest> {
    match item {
        serde_json::Value::String(n) => {
            n.parse::<Metric>().map(MetricRequest::Image).map_err(|_| {
                ApiError::invalid(format!(
                    "metrics[{i}]: {n:?} is not one of fid, kid (a user metric is an object: \
                 {{\"name\": {n:?}, \"goal\": \"min\"}})"
                ))
            })
        }
        serde_json::Value::Object(_) => serde_json::from_value::<UserMetric>(item)
            .map(MetricRequest::User)
            .map_err(|e| {
                ApiError::invalid(format!(
                    "metrics[{i}]: {e} (a user metric is {{\"name\": \"val_loss\", \"goal\": \
                     \"min\" or \"max\", \"label\": \"…\"}})"
                ))
            }),
        other => Err(ApiError::invalid(format!(
            "metrics[{i}]: {other} is neither a metric's name nor a user metric object"
        ))),
    }
}

/// The state of a sweep or of one of its points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// A worker holds it (a sweep: at least one point has started).
    Running,
    /// Finished with results (a sweep: every point).
    Done,
    /// Finished without results (a point), or with some points failed (a sweep).
    Failed,
    /// Cancelled; points finished before stay.
    Cancelled,
}

impl From<SweepStatus> for Status {
    fn from(s: SweepStatus) -> Self {
        // Exhaustive: a state the index gains must be given a name on the wire here.
        match s {
            SweepStatus::Queued => Status::Queued,
            SweepStatus::Running => Status::Running,
            SweepStatus::Done => Status::Done,
            SweepStatus::Failed => Status::Failed,
            SweepStatus::Cancelled => Status::Cancelled,
        }
    }
}

/// One point of a sweep.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = SweepPoint)]
pub struct PointView {
    /// Position in the sweep (σ_rel fastest, then nimg).
    pub idx: i64,
    /// EMA width.
    pub sigma_rel: f64,
    /// Training time.
    pub nimg: i64,
    /// `queued`, `running`, `done`, `failed` or `cancelled`.
    pub status: Status,
    /// Images whose features are recorded.
    pub images_done: i64,
    /// Images the point samples in all.
    pub images_total: i64,
    /// Claims so far (more than one: it was resumed).
    pub attempts: i64,
    /// The reconstruction sampled, once known.
    pub reconstruction_id: Option<String>,
    /// FID / KID per seed set with mean, std and the error bar to draw, and timings, once
    /// done.
    pub result: Option<PointResultView>,
    /// Why it failed (or why its last attempt did).
    pub error: Option<String>,
    /// A PNG grid of its first images, once its first batch is recorded.
    pub grid_url: Option<String>,
    /// RFC 3339 UTC.
    pub started_at: Option<String>,
    /// RFC 3339 UTC.
    pub finished_at: Option<String>,
}

impl PointView {
    /// The view of `p` in a sweep of `images_total` images per point.
    pub fn new(p: &PointRow, images_total: usize) -> Self {
        PointView {
            idx: p.idx,
            sigma_rel: p.sigma_rel,
            nimg: p.nimg,
            status: p.status.into(),
            images_done: p.images_done,
            images_total: images_total as i64,
            attempts: p.attempts,
            reconstruction_id: p.reconstruction_id.clone(),
            result: p.result.as_ref().and_then(|r| PointResultView::of(p, r)),
            error: p.error.clone(),
            grid_url: p
                .grid_digest
                .as_ref()
                .map(|_| format!("/sweeps/{}/points/{}/grid.png", p.sweep_id, p.idx)),
            started_at: p.started_at.clone(),
            finished_at: p.finished_at.clone(),
        }
    }
}

/// The best finished point by a metric.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BestPoint {
    /// The metric's name (`fid`, `kid`, a user metric's).
    pub metric: String,
    /// The point's index.
    pub idx: i64,
    /// Its σ_rel.
    pub sigma_rel: f64,
    /// Its training time.
    pub nimg: i64,
    /// The metric's mean over seed sets.
    pub value: f64,
    /// Its std over seed sets (with more than one).
    pub std: Option<f64>,
    /// Half-height of its error bar ([`crate::sweep::error_bar`]; null: none).
    pub error_bar: Option<f64>,
}

/// A sweep: status, what it computes, its points so far, and the best of them.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Sweep)]
pub struct SweepView {
    /// Id.
    pub id: i64,
    /// The run's name.
    pub run: String,
    /// `queued`, `running`, `done` (every point recorded), `failed` (some point failed) or
    /// `cancelled`.
    pub status: Status,
    /// The validated request: sigma_rels, nimgs, metrics, num_images, seed_sets, sampler,
    /// reference, batch, and warnings.
    pub spec: SweepSpec,
    /// How each of its metrics is named, scaled (KID ×10³) and compared, in `spec.metrics`
    /// order: what every display of the sweep shows.
    pub metrics: Vec<MetricInfo>,
    /// What its values can be compared on: sweeps with the same key (the same reference
    /// statistics and feature network, images per seed set and seed sets) may share a chart;
    /// others may not (FID from 128 images is not FID from 1000). Readable, e.g. `reference
    /// #1 “cifar10”, inception-2015-12-05 pool3, 1000 images × 1 seed set`.
    pub comparison_key: String,
    /// Points in all, done, failed.
    pub points_total: i64,
    /// Points done.
    pub points_done: i64,
    /// Points failed.
    pub points_failed: i64,
    /// Images recorded over all points, and in all.
    pub images_done: i64,
    /// Images in all.
    pub images_total: i64,
    /// The points (only in `GET /sweeps/{id}` and creation responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<PointView>>,
    /// Leases held now: who is working on which point (only in `GET /sweeps/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerView>>,
    /// Attempts that failed, were given back or ran out, oldest first (only in
    /// `GET /sweeps/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<AttemptView>>,
    /// Best point per metric computed so far.
    pub best: Vec<BestPoint>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub finished_at: Option<String>,
    /// This resource.
    pub url: String,
    /// Server-sent events of its progress.
    pub events_url: String,
    /// The curve (or heat map) as SVG: `?metric=fid|kid`.
    pub plot_url: String,
}

impl SweepView {
    /// The view of a sweep; `points` included when given. Errors when its stored
    /// specification is unreadable.
    pub fn new(s: &SweepRow, points: Option<&[PointRow]>) -> ApiResult<Self> {
        let spec = crate::sweep::spec_of(s)?;
        let per_point = spec.images_per_point();
        let best = match points {
            Some(points) => spec
                .metric_infos()
                .iter()
                .filter_map(|m| {
                    let (p, v) = best_point(points, m)?;
                    Some(BestPoint {
                        metric: m.metric.clone(),
                        idx: p.idx,
                        sigma_rel: p.sigma_rel,
                        nimg: p.nimg,
                        value: v.mean,
                        std: v.std,
                        error_bar: error_bar(&v),
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        Ok(SweepView {
            id: s.id,
            run: s.run.clone(),
            status: s.status.into(),
            metrics: spec.metric_infos(),
            comparison_key: spec.comparison_key(),
            spec,
            points_total: s.points,
            points_done: s.points_done,
            points_failed: s.points_failed,
            images_done: s.images_done,
            images_total: s.points * per_point as i64,
            points: points.map(|ps| ps.iter().map(|p| PointView::new(p, per_point)).collect()),
            workers: None,
            failures: None,
            best,
            created_at: s.created_at.clone(),
            finished_at: s.finished_at.clone(),
            url: format!("/sweeps/{}", s.id),
            events_url: format!("/sweeps/{}/events", s.id),
            plot_url: format!("/sweeps/{}/plot.svg", s.id),
        })
    }
}

impl SweepView {
    /// Adds the sweep's workers and failed attempts from its leases (oldest first), for the
    /// points in `points`.
    pub fn with_leases(mut self, leases: &[LeaseRow], points: &[PointRow], now_ms: i64) -> Self {
        let point = |idx: i64| points.iter().find(|p| p.idx == idx);
        self.workers = Some(
            leases
                .iter()
                .filter(|l| l.outcome.is_none())
                .filter_map(|l| {
                    let p = point(l.point_idx)?;
                    // A lease counts while its point is running under it.
                    (p.lease_owner.as_deref() == Some(l.lease_id.as_str())).then(|| WorkerView {
                        worker: l.worker.clone(),
                        evaluator: l.evaluator,
                        idx: l.point_idx,
                        sigma_rel: p.sigma_rel,
                        nimg: p.nimg,
                        claimed_at: l.claimed_at.clone(),
                        heartbeat_at: l.heartbeat_at.clone(),
                        expires_at: crate::db::ms_to_rfc3339(l.expires_ms),
                        expired: l.expires_ms < now_ms,
                    })
                })
                .collect(),
        );
        self.failures = Some(
            leases
                .iter()
                .filter_map(|l| {
                    let outcome = match l.outcome? {
                        LeaseOutcome::Failed => AttemptOutcome::Failed,
                        LeaseOutcome::Expired => AttemptOutcome::Expired,
                        LeaseOutcome::Released => AttemptOutcome::Released,
                        LeaseOutcome::Done | LeaseOutcome::Cancelled => return None,
                    };
                    let p = point(l.point_idx)?;
                    Some(AttemptView {
                        worker: l.worker.clone(),
                        evaluator: l.evaluator,
                        idx: l.point_idx,
                        sigma_rel: p.sigma_rel,
                        nimg: p.nimg,
                        claimed_at: l.claimed_at.clone(),
                        ended_at: l.ended_at.clone(),
                        outcome,
                        message: l.message.clone(),
                    })
                })
                .collect(),
        );
        self
    }
}

/// A worker holding a lease on a point now.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = SweepWorker)]
pub struct WorkerView {
    /// The worker's name (an external evaluator's `worker`, a builtin worker's id).
    pub worker: String,
    /// Builtin worker or external evaluator.
    pub evaluator: Evaluator,
    /// The point's index.
    pub idx: i64,
    /// Its σ_rel.
    pub sigma_rel: f64,
    /// Its training time.
    pub nimg: i64,
    /// RFC 3339 UTC: when it claimed the point.
    pub claimed_at: String,
    /// RFC 3339 UTC: its last heartbeat or recorded write.
    pub heartbeat_at: String,
    /// RFC 3339 UTC: when the lease runs out without a heartbeat.
    pub expires_at: String,
    /// The lease has run out (the worker is presumably dead; the next claim takes the point).
    pub expired: bool,
}

/// How a failed attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The worker reported a failure (its message says why).
    Failed,
    /// The lease ran out (the worker died or stalled) and another worker took the point.
    Expired,
    /// The worker stopped and gave the point back.
    Released,
}

/// An attempt on a point that did not finish it.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = SweepFailure)]
pub struct AttemptView {
    /// The worker's name.
    pub worker: String,
    /// Builtin worker or external evaluator.
    pub evaluator: Evaluator,
    /// The point's index.
    pub idx: i64,
    /// Its σ_rel.
    pub sigma_rel: f64,
    /// Its training time.
    pub nimg: i64,
    /// RFC 3339 UTC.
    pub claimed_at: String,
    /// RFC 3339 UTC.
    pub ended_at: Option<String>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The worker's message (a failure's reason).
    pub message: Option<String>,
}

/// One metric of a finished point, over its seed sets.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct MetricResult {
    /// The number to plot and rank by: the mean over seed sets.
    pub value: f64,
    /// Mean over seed sets (the same as `value`).
    pub mean: f64,
    /// Sample standard deviation over seed sets (null with one set).
    pub std: Option<f64>,
    /// One value per seed set.
    pub values: Vec<f64>,
    /// KID only: each set's standard error over its subsets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std_errors: Option<Vec<f64>>,
    /// Half-height of the error bar to draw, in the metric's units (unscaled): the std over
    /// seed sets, else KID's standard error with one set, else null.
    pub error_bar: Option<f64>,
}

impl From<&MetricSummary> for MetricResult {
    fn from(m: &MetricSummary) -> Self {
        MetricResult {
            value: m.mean,
            mean: m.mean,
            std: m.std,
            values: m.values.clone(),
            std_errors: m.std_errors.clone(),
            error_bar: error_bar(m),
        }
    }
}

/// What a finished point measured.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = PointResult)]
pub struct PointResultView {
    /// FID, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fid: Option<MetricResult>,
    /// KID, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<MetricResult>,
    /// Images per seed set.
    pub num_images: u64,
    /// Seed sets.
    pub seed_sets: u64,
    /// KID: subsets averaged and features per subset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid_subsets: Option<[u64; 2]>,
    /// The reconstruction sampled (its id).
    pub reconstruction: String,
    /// Where the time went.
    pub timings: Timings,
    /// Every metric recorded, by name (`fid`, `kid`, user metrics): what displays read.
    pub metrics: BTreeMap<String, MetricResult>,
    /// Who computed the images' Inception features: `server`, `client` or `mixed` (absent:
    /// no images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<String>,
}

impl PointResultView {
    /// The stored result of point `p`, or `None` (logged) when it cannot be read.
    fn of(p: &PointRow, stored: &serde_json::Value) -> Option<Self> {
        match serde_json::from_value::<PointResult>(stored.clone()) {
            Ok(r) => Some(PointResultView {
                fid: r.fid.as_ref().map(MetricResult::from),
                kid: r.kid.as_ref().map(MetricResult::from),
                num_images: r.num_images as u64,
                seed_sets: r.seed_sets as u64,
                kid_subsets: r.kid_subsets.map(|(n, m)| [n as u64, m as u64]),
                metrics: r
                    .all()
                    .into_iter()
                    .map(|(name, m)| (name, MetricResult::from(m)))
                    .collect(),
                features: r.features.clone(),
                reconstruction: r.reconstruction,
                timings: r.timings,
            }),
            Err(e) => {
                tracing::error!(sweep = p.sweep_id, point = p.idx, error = %e,
                    "a point's stored result is unreadable");
                None
            }
        }
    }
}

/// A point's progress, sent per batch on the event stream (`progress`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SweepProgress {
    /// The point's index.
    pub idx: i64,
    /// Its σ_rel.
    pub sigma_rel: f64,
    /// Its training time.
    pub nimg: i64,
    /// Its status (see `SweepPoint.status`).
    pub status: Status,
    /// Images of the point recorded so far.
    pub images_done: i64,
    /// Images the point samples in all.
    pub images_total: i64,
    /// Images recorded over the whole sweep.
    pub sweep_images_done: i64,
}

/// The server is stopping; the stream closes, the sweep goes on when it restarts.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ShutdownNotice {
    /// What to do.
    pub message: String,
}

/// One event of `GET /sweeps/{id}/events`: the SSE `event:` field is `event`, its `data:`
/// line is `data` as JSON.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum SweepEvent {
    /// The whole sweep with its points, first.
    Sweep(SweepView),
    /// A point's images so far (per batch).
    Progress(SweepProgress),
    /// A point finished, failed or was cancelled, with its result.
    Point(PointView),
    /// The sweep is finished (done, failed or cancelled); the stream closes.
    End(SweepView),
    /// The sweep could not be read (e.g. it was deleted); the stream closes.
    Error(ErrorDetail),
    /// The server is stopping; the stream closes.
    Shutdown(ShutdownNotice),
}

impl SweepEvent {
    /// The event's name (`sweep`, `progress`, …), its SSE `event:` field.
    pub fn name(&self) -> &'static str {
        match self {
            SweepEvent::Sweep(_) => "sweep",
            SweepEvent::Progress(_) => "progress",
            SweepEvent::Point(_) => "point",
            SweepEvent::End(_) => "end",
            SweepEvent::Error(_) => "error",
            SweepEvent::Shutdown(_) => "shutdown",
        }
    }

    /// The event's `data` as JSON (what the SSE `data:` line carries).
    pub fn data_json(&self) -> serde_json::Result<String> {
        match self {
            SweepEvent::Sweep(v) | SweepEvent::End(v) => serde_json::to_string(v),
            SweepEvent::Progress(v) => serde_json::to_string(v),
            SweepEvent::Point(v) => serde_json::to_string(v),
            SweepEvent::Error(v) => serde_json::to_string(v),
            SweepEvent::Shutdown(v) => serde_json::to_string(v),
        }
    }
}

/// A list of sweeps (without their points).
#[derive(Serialize, ToSchema)]
pub struct SweepList {
    /// Newest first.
    pub sweeps: Vec<SweepView>,
    /// When there are more: the `before` of the next page (`GET /sweeps?before=…`); absent
    /// on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<i64>,
}

/// How long a builtin sweep would take (`GET /runs/{run}/sweep-estimate`), from the timings
/// of finished points measured on this server; `seconds` is null when nothing was measured.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SweepEstimate {
    /// Points asked about.
    pub points: u64,
    /// Images sampled in all (points × images per seed set × seed sets).
    pub images: u64,
    /// Seconds for the whole sweep on one worker (null: no measurement yet).
    pub seconds: Option<f64>,
    /// Seconds per point (null: no measurement yet).
    pub point_seconds: Option<f64>,
    /// What the estimate was measured on (null: nothing).
    pub basis: Option<EstimateBasis>,
    /// The basis in words, or why there is no estimate: what the page shows beside it.
    pub note: String,
}

/// The finished points an estimate is scaled from.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EstimateBasis {
    /// The run measured.
    pub run: String,
    /// Whether it is the run asked about (else a run with the same network configuration).
    pub same_run: bool,
    /// The sweep measured.
    pub sweep: i64,
    /// Its finished points with timings.
    pub points: u64,
    /// Its sampler steps (sampling time is scaled by denoiser evaluations, 2·steps − 1).
    pub steps: u64,
    /// Images per second over its batches (sampling, features, storing).
    pub images_per_s: f64,
    /// Seconds of sampling per image, at its steps.
    pub sample_s_per_image: f64,
    /// Seconds of Inception features per image.
    pub features_s_per_image: f64,
    /// Seconds per image of the rest of a batch (storing).
    pub other_s_per_image: f64,
    /// Seconds per point reconstructing the weights (mean).
    pub reconstruct_s: f64,
    /// Seconds per point of statistics, FID and KID (mean).
    pub metrics_s: f64,
}

impl SweepEstimate {
    /// The estimate of `planned` from `measured`; without a measurement, `note` says why.
    pub fn new(
        planned: &crate::sweep::estimate::Planned,
        measured: Option<&crate::sweep::estimate::Measured>,
        no_measurement: &str,
    ) -> Self {
        let note = match measured {
            Some(m) => format!(
                "measured on {} point{} of sweep #{}{} at {} sampler steps ({:.1} images/s), \
                 one worker",
                m.points,
                if m.points == 1 { "" } else { "s" },
                m.sweep,
                if m.same_run {
                    String::new()
                } else {
                    format!(" of run “{}” (the same network)", m.run)
                },
                m.steps,
                m.images_per_s,
            ),
            None => no_measurement.to_owned(),
        };
        SweepEstimate {
            points: planned.points as u64,
            images: planned.images() as u64,
            seconds: measured.map(|m| m.seconds(planned)),
            point_seconds: measured.map(|m| m.point_seconds(planned)),
            basis: measured.map(|m| EstimateBasis {
                run: m.run.clone(),
                same_run: m.same_run,
                sweep: m.sweep,
                points: m.points as u64,
                steps: m.steps as u64,
                images_per_s: m.images_per_s,
                sample_s_per_image: m.sample_s_per_image,
                features_s_per_image: m.features_s_per_image,
                other_s_per_image: m.other_s_per_image,
                reconstruct_s: m.reconstruct_s,
                metrics_s: m.metrics_s,
            }),
            note,
        }
    }
}

/// Stored reference statistics.
#[derive(Serialize, ToSchema)]
#[schema(as = Reference)]
pub struct ReferenceView {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The dataset or imported file.
    pub source: String,
    /// The feature network.
    pub feature_network: String,
    /// BLAKE3 of the Inception weights file (null: imported, taken on trust).
    pub weights_digest: Option<String>,
    /// `nvidia` or `pytorch-fid` (null: imported).
    pub preprocess: Option<String>,
    /// Feature dimension.
    pub dims: i64,
    /// Images summarised (0: not recorded in an imported file).
    pub count: i64,
    /// Whether the features are kept (KID needs them).
    pub has_features: bool,
    /// Image side of the set, when known.
    pub resolution: Option<i64>,
    /// Image channels of the set, when known.
    pub channels: Option<i64>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// The statistics as a pytorch-fid `.npz` (mu, sigma).
    pub stats_url: String,
}

impl From<ReferenceRow> for ReferenceView {
    fn from(r: ReferenceRow) -> Self {
        ReferenceView {
            stats_url: format!("/references/{}/stats.npz", r.id),
            id: r.id,
            name: r.name,
            source: r.source,
            feature_network: r.feature_network,
            weights_digest: r.weights_digest,
            preprocess: r.preprocess,
            dims: r.dims,
            count: r.count,
            has_features: r.features_digest.is_some(),
            resolution: r.resolution,
            channels: r.channels,
            created_at: r.created_at,
        }
    }
}

/// A list of reference statistics.
#[derive(Serialize, ToSchema)]
pub struct ReferenceList {
    /// By name.
    pub references: Vec<ReferenceView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_event_names_are_the_serialized_ones() {
        for s in [
            SweepStatus::Queued,
            SweepStatus::Running,
            SweepStatus::Done,
            SweepStatus::Failed,
            SweepStatus::Cancelled,
        ] {
            assert_eq!(
                serde_json::to_value(Status::from(s)).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
        let notice = ShutdownNotice {
            message: "m".into(),
        };
        let progress = SweepProgress {
            idx: 0,
            sigma_rel: 0.1,
            nimg: 1,
            status: Status::Running,
            images_done: 1,
            images_total: 2,
            sweep_images_done: 1,
        };
        for event in [
            SweepEvent::Shutdown(notice),
            SweepEvent::Progress(progress),
            SweepEvent::Error(ErrorDetail {
                code: super::super::super::error::ErrorCode::NotFound,
                message: "gone".into(),
            }),
        ] {
            let tagged = serde_json::to_value(&event).unwrap();
            assert_eq!(tagged["event"], event.name());
            let data: serde_json::Value =
                serde_json::from_str(&event.data_json().unwrap()).unwrap();
            assert_eq!(tagged["data"], data);
        }
    }
}
