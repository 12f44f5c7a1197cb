//! The server's side of the external-evaluator protocol (`docs/EVALUATORS.md`): an
//! evaluator — the user's own code on the user's own GPUs — claims a point of an external
//! sweep under a lease, uploads the images (or audited Inception features) of its batches and
//! its user metrics, and finishes the point; the server scores the images exactly as for
//! builtin points ([`Scorer`]) and records the result once.
//!
//! Every write names its lease and re-checks it, with the current time, inside its
//! transaction: a lease that ran out, ended, or whose sweep was cancelled records nothing
//! ([`Error::LeaseLost`], 409). A refused upload records nothing either: bodies are parsed,
//! featurized and audited before anything is stored, and the batch row is what makes them
//! count. A batch recorded already is a no-op when the same bytes arrive again and a 409
//! otherwise, so a retried request is safe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::results::{MetricSummary, PointResult};
use super::scoring::{batch_timings, features_by, Scorer};
use super::spec::{spec_of, SweepSpec};
use super::upload::{parse_batch, relative_difference, BatchUpload, Images, Layout};
use super::worker::{now_ms, MAX_ATTEMPTS};
use super::GRID_IMAGES;
use crate::app::DataDir;
use crate::db::{
    BatchWrite, ClaimFilter, Evaluator, LeaseOutcome, LeaseRow, NewBatch, PointRow,
    ReconstructionRow, ReferenceRow, SweepRow,
};
use crate::error::{blocking, Error, Result};
use crate::materialize::OutDtype;
use crate::metrics::{npy, FeatureExtractor, FEATURES};
use crate::phema::request::TargetSpec;
use crate::reconstruction;

/// Relative L2 difference above which an evaluator's features of an audit image are refused.
pub const AUDIT_TOLERANCE: f64 = 1e-3;

/// Fewest audit images a features upload carries.
pub const MIN_AUDIT_IMAGES: usize = 2;

/// Longest message kept from a failing evaluator, characters.
pub const MAX_FAIL_MESSAGE: usize = 4000;

/// Settings of the protocol.
#[derive(Clone, Debug)]
pub struct EvaluationConfig {
    /// How long a lease lasts from its claim and from each heartbeat or write.
    pub lease: Duration,
    /// Hash snapshots while materializing a point's reconstruction.
    pub verify_reads: bool,
    /// Largest array an upload's `.npz` may inflate to, bytes.
    pub max_upload: u64,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(120),
            verify_reads: true,
            max_upload: 256 << 20,
        }
    }
}

/// Everything an evaluator needs about its lease (the body of a claim or heartbeat).
#[derive(Clone, Debug)]
pub struct LeaseState {
    /// The lease.
    pub lease: LeaseRow,
    /// Its sweep.
    pub sweep: SweepRow,
    /// The sweep's specification.
    pub spec: SweepSpec,
    /// The point.
    pub point: PointRow,
    /// The reconstruction to evaluate.
    pub reconstruction: ReconstructionRow,
    /// Batches recorded already (of this reconstruction).
    pub batches_done: Vec<i64>,
    /// User metrics recorded under this lease.
    pub metrics_recorded: Vec<(String, Vec<f64>)>,
    /// The reference statistics, when the sweep has image metrics.
    pub reference: Option<ReferenceRow>,
}

impl LeaseState {
    /// Whether features computed by the evaluator are taken (the reference's are
    /// Inception's, not the fallback projection's).
    pub fn features_accepted(&self) -> bool {
        self.spec.has_images() && !self.spec.is_fallback()
    }
}

/// An audit's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Audit {
    /// Images checked.
    pub images: usize,
    /// The largest relative L2 difference found.
    pub max_relative_difference: f64,
}

/// What recording a batch did.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchReceipt {
    /// The batch.
    pub batch: usize,
    /// Its images.
    pub images: usize,
    /// False when the same upload was recorded before (nothing changed).
    pub recorded: bool,
    /// `server` or `client`.
    pub features_by: &'static str,
    /// The audit of client features.
    pub audit: Option<Audit>,
    /// Server seconds spent on the upload (parsing, features, audit, storing).
    pub seconds: f64,
}

/// The server's side of external evaluation over one data directory.
pub struct Evaluations {
    data: DataDir,
    scorer: Arc<Scorer>,
    config: EvaluationConfig,
}

/// A worker's name: 1 to 100 printable characters.
fn check_worker(worker: &str) -> Result<()> {
    let n = worker.chars().count();
    if n == 0 || n > 100 || worker.chars().any(char::is_control) || worker.trim() != worker {
        return Err(Error::invalid(
            "worker",
            format!(
                "{worker:?}: a worker's name is 1 to 100 printable characters, without \
                 surrounding spaces"
            ),
        ));
    }
    Ok(())
}

/// Whether an error may pass on another attempt (see `worker::retryable`).
fn retryable(e: &Error) -> bool {
    !matches!(
        e,
        Error::InvalidInput { .. }
            | Error::NonFinite { .. }
            | Error::NotFound(_)
            | Error::OutOfRange { .. }
    )
}

impl Evaluations {
    /// The protocol over `data`, scoring with `scorer`.
    pub fn new(data: DataDir, scorer: Arc<Scorer>, config: EvaluationConfig) -> Self {
        Self {
            data,
            scorer,
            config,
        }
    }

    /// The protocol's settings.
    pub fn config(&self) -> &EvaluationConfig {
        &self.config
    }

    /// The feature networks and references it scores with (shared with the builtin worker).
    pub fn scorer(&self) -> Arc<Scorer> {
        self.scorer.clone()
    }

    /// Stores reference statistics `name` from features an evaluator computed of the user's
    /// own images: an `.npz` of `features` (float32 `[N, 2048]`), `audit_images` (at least
    /// [`MIN_AUDIT_IMAGES`]) and optionally `audit_index`, audited as batches are. The
    /// reference records the audit images' size and channels.
    pub async fn reference_from_features(
        &self,
        name: &str,
        body: axum::body::Bytes,
        layout: Option<Layout>,
    ) -> Result<ReferenceRow> {
        crate::app::references::check_reference_name(name)?;
        if !body.starts_with(b"PK") {
            return Err(Error::invalid(
                "body",
                "not an .npz: reference features are an .npz of features (float32 [N, 2048]) \
                 and audit_images (uint8)",
            ));
        }
        let max_upload = self.config.max_upload;
        let upload = blocking("reading uploaded features", move || {
            parse_batch(&body, layout, max_upload)
        })
        .await?;
        let BatchUpload::Features {
            features,
            n,
            audit,
            audit_index,
        } = upload
        else {
            return Err(Error::invalid("body", "not an .npz of features"));
        };
        if n < 2 {
            return Err(Error::invalid(
                "features",
                format!("{n} rows; statistics need at least 2 images"),
            ));
        }
        if audit.n < MIN_AUDIT_IMAGES {
            return Err(Error::invalid(
                "audit_images",
                format!(
                    "{} audit images; features come with at least {MIN_AUDIT_IMAGES} of the \
                     images, which the server checks them against",
                    audit.n
                ),
            ));
        }
        let extractor = self.scorer.extractor().await?;
        let server = featurize(&extractor, &audit).await?;
        let mut worst = (0usize, 0f64);
        for (j, &row) in audit_index.iter().enumerate() {
            let d = relative_difference(
                &features[row * FEATURES..(row + 1) * FEATURES],
                &server[j * FEATURES..(j + 1) * FEATURES],
            );
            if d > worst.1 || d.is_nan() {
                worst = (j, d);
            }
        }
        if !(worst.1 <= AUDIT_TOLERANCE) {
            return Err(Error::AuditFailed(format!(
                "audit_images[{}] (image {}): the uploaded features differ from the server's \
                 by {:.3e} (relative L2), more than {AUDIT_TOLERANCE:e}: compute them as \
                 NVIDIA's detector does (uint8 RGB, TensorFlow's bilinear resize to 299×299 \
                 with its half-pixel offset, (x − 128) / 128)",
                worst.0, audit_index[worst.0], worst.1
            )));
        }
        let features = Arc::new(features);
        let stats = {
            let features = features.clone();
            blocking("computing statistics", move || {
                crate::metrics::statistics(&features, FEATURES)
            })
            .await?
        };
        crate::app::references::store_computed(
            &self.data,
            crate::app::references::ReferenceOrigin {
                name: name.to_owned(),
                source: format!(
                    "features of {n} images computed by an evaluator (audited on {} images, \
                     largest relative difference {:.1e})",
                    audit.n, worst.1
                ),
                resolution: Some(audit.side),
                channels: Some(audit.c),
            },
            &stats,
            &features,
            &extractor,
        )
        .await
    }

    /// The Inception weights' digest, once loaded (what the evaluator's features must come
    /// from); loads them.
    pub async fn weights_digest(&self) -> Result<String> {
        Ok(self.scorer.extractor().await?.digest.clone())
    }

    fn expires(&self) -> i64 {
        now_ms() + self.config.lease.as_millis() as i64
    }

    /// Claims the first waiting point of an external sweep (of `sweep`, of `run`, when
    /// given) for `worker`; materializes its reconstruction (float32) and pins it. `None`:
    /// no point is waiting. Errors: a bad worker name, an unknown or builtin sweep, an
    /// unknown run; a reconstruction that cannot be made (the point then goes back to the
    /// queue, or fails for good when the error is in the data).
    pub async fn claim(
        &self,
        worker: &str,
        sweep: Option<i64>,
        run: Option<&str>,
    ) -> Result<Option<LeaseState>> {
        check_worker(worker)?;
        let run_id = match run {
            Some(name) => Some(
                self.data
                    .db
                    .run(name)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("run: {name:?} does not exist")))?
                    .id,
            ),
            None => None,
        };
        if let Some(id) = sweep {
            let row = self
                .data
                .db
                .sweep(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("sweep: no sweep {id}")))?;
            if row.evaluator != Evaluator::External {
                return Err(Error::invalid(
                    "sweep",
                    format!(
                        "sweep {id} is evaluated by hindsight's builtin worker, not by external \
                         evaluators"
                    ),
                ));
            }
        }
        let now = now_ms();
        let Some(claim) = self
            .data
            .db
            .claim_point(
                worker,
                now,
                self.expires(),
                ClaimFilter {
                    evaluator: Evaluator::External,
                    sweep,
                    run_id,
                },
            )
            .await?
        else {
            return Ok(None);
        };
        let lease = claim.owner.clone();
        let (sweep_id, idx) = (claim.point.sweep_id, claim.point.idx);
        let made = self.reconstruct(&claim.sweep, &claim.point).await;
        let row = match made {
            Ok(row) => row,
            Err(e) => {
                let retry = retryable(&e) && claim.point.attempts < MAX_ATTEMPTS;
                let message = format!("reconstructing the point: {}", e.chain_text());
                tracing::warn!(sweep = sweep_id, idx, retry, error = %message, "external claim");
                self.data
                    .db
                    .fail_point(
                        sweep_id,
                        idx,
                        &lease,
                        &message,
                        retry,
                        LeaseOutcome::Failed,
                        None,
                    )
                    .await?;
                return Err(e);
            }
        };
        if !self
            .data
            .db
            .pin_reconstruction(sweep_id, idx, &lease, &row.id)
            .await?
        {
            return Err(Error::LeaseLost(format!(
                "lease {lease} was lost while its reconstruction was made (the sweep was \
                 cancelled); claim again"
            )));
        }
        // The lease runs from now: materializing must not eat into it.
        self.data
            .db
            .heartbeat_lease(&lease, now_ms(), self.expires())
            .await?;
        self.state(&lease).await.map(Some)
    }

    /// The point's reconstruction (float32), stored or made now.
    async fn reconstruct(&self, sweep: &SweepRow, point: &PointRow) -> Result<ReconstructionRow> {
        let plan = reconstruction::plan(
            &self.data.db,
            &sweep.run,
            vec![TargetSpec {
                sigma_rel: Some(point.sigma_rel),
                gamma: None,
                nimg: Some(point.nimg as u64),
            }],
            OutDtype::F32,
        )
        .await?;
        let id = plan.targets[0].id.clone();
        match reconstruction::stored(&self.data, &id).await? {
            Some(row) => Ok(row),
            None => reconstruction::materialize_targets(
                &self.data,
                &plan,
                &[0],
                self.config.verify_reads,
                Arc::new(|_| {}),
            )
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Index(format!("reconstruction {id} was not stored"))),
        }
    }

    /// The state of live lease `lease` (what a claim and a heartbeat answer).
    pub async fn state(&self, lease: &str) -> Result<LeaseState> {
        let row = self.data.db.live_lease(lease, now_ms()).await?;
        let sweep = super::find(&self.data, row.sweep_id).await?;
        let spec = spec_of(&sweep)?;
        let point = self
            .data
            .db
            .sweep_points(row.sweep_id)
            .await?
            .into_iter()
            .find(|p| p.idx == row.point_idx)
            .ok_or_else(|| Error::Index(format!("point {} vanished", row.point_idx)))?;
        let reconstruction_id = point.reconstruction_id.clone().ok_or_else(|| {
            Error::Index(format!("lease {lease}: its point has no reconstruction"))
        })?;
        let reconstruction = reconstruction::stored(&self.data, &reconstruction_id)
            .await?
            .ok_or_else(|| {
                Error::Index(format!(
                    "reconstruction {reconstruction_id} of lease {lease} is gone"
                ))
            })?;
        let batches_done = self
            .data
            .db
            .sweep_batches(row.sweep_id, row.point_idx, &reconstruction_id)
            .await?
            .iter()
            .map(|b| b.batch)
            .collect();
        let reference = match spec.reference_id {
            Some(id) => self.data.db.reference(id).await?,
            None => None,
        };
        Ok(LeaseState {
            metrics_recorded: self.data.db.lease_metrics(lease).await?,
            lease: row,
            sweep,
            spec,
            point,
            reconstruction,
            batches_done,
            reference,
        })
    }

    /// Extends live lease `lease`; returns its state.
    pub async fn heartbeat(&self, lease: &str) -> Result<LeaseState> {
        self.data
            .db
            .heartbeat_lease(lease, now_ms(), self.expires())
            .await?;
        self.state(lease).await
    }

    /// The evaluator gives up on its point: back to the queue (failed for good after
    /// [`MAX_ATTEMPTS`]), `message` kept. Returns whether it will be tried again.
    pub async fn fail(&self, lease: &str, message: &str) -> Result<bool> {
        let row = self.data.db.live_lease(lease, now_ms()).await?;
        let message: String = message.chars().take(MAX_FAIL_MESSAGE).collect();
        let message = if message.trim().is_empty() {
            "the evaluator failed without a message".to_owned()
        } else {
            message
        };
        let attempts = self
            .data
            .db
            .sweep_points(row.sweep_id)
            .await?
            .iter()
            .find(|p| p.idx == row.point_idx)
            .map_or(MAX_ATTEMPTS, |p| p.attempts);
        let retry = attempts < MAX_ATTEMPTS;
        if !self
            .data
            .db
            .fail_point(
                row.sweep_id,
                row.point_idx,
                lease,
                &message,
                retry,
                LeaseOutcome::Failed,
                Some(now_ms()),
            )
            .await?
        {
            self.data.db.live_lease(lease, now_ms()).await?;
            return Err(Error::LeaseLost(format!("lease {lease} was lost")));
        }
        Ok(retry)
    }

    /// Records batch `k` of the lease's point from an upload (see [`parse_batch`]).
    /// Errors: a batch out of range, a body of the wrong shape, dtype or image size (400
    /// naming the part), an audit that fails ([`Error::AuditFailed`]), a batch recorded
    /// from another upload ([`Error::Conflict`]), a lost lease.
    pub async fn record_batch(
        &self,
        lease: &str,
        k: u64,
        body: axum::body::Bytes,
        layout: Option<Layout>,
    ) -> Result<BatchReceipt> {
        let started = Instant::now();
        let state = self.state(lease).await?;
        let spec = &state.spec;
        if !spec.has_images() {
            return Err(Error::invalid(
                "batch",
                "this sweep computes no FID or KID, so its points take no images: report \
                 the user metrics and finish",
            ));
        }
        let batches = spec.batches_per_point() as u64;
        if k >= batches {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{k} is out of range: the point has {batches} batches (0 … {})",
                    batches - 1
                ),
            ));
        }
        let k = k as usize;
        let seeds = spec.batch_seeds(k);
        let n = (seeds.end - seeds.start) as usize;
        let upload_digest = blake3::hash(&body).to_hex().to_string();
        let point = &state.point;
        // A repeated upload is answered before any work.
        if let Some(b) = self
            .data
            .db
            .sweep_batches(point.sweep_id, point.idx, &state.reconstruction.id)
            .await?
            .iter()
            .find(|b| b.batch == k as i64)
        {
            let same = self
                .data
                .db
                .batch_upload_digest(
                    point.sweep_id,
                    point.idx,
                    k as i64,
                    &state.reconstruction.id,
                )
                .await?
                .as_deref()
                == Some(upload_digest.as_str());
            if !same {
                return Err(Error::Conflict(format!(
                    "batch {k} is recorded already from another upload (a batch is recorded \
                     once; the same bytes again are a no-op)"
                )));
            }
            return Ok(BatchReceipt {
                batch: k,
                images: b.images as usize,
                recorded: false,
                features_by: if b.features_by == "client" {
                    "client"
                } else {
                    "server"
                },
                audit: None,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let reference_id = spec
            .reference_id
            .ok_or_else(|| Error::Index("an image sweep without reference statistics".into()))?;
        let reference = self.scorer.reference(reference_id).await?;
        let extractor = self.scorer.extractor_for(&reference).await?;
        let max_upload = self.config.max_upload;
        let upload = blocking("reading an uploaded batch", move || {
            parse_batch(&body, layout, max_upload)
        })
        .await?;
        let geometry = (reference.row.resolution, reference.row.channels);
        let check_images = |images: &Images, field: &str| -> Result<()> {
            if let Some(r) = geometry.0 {
                if images.side as i64 != r {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "{0}×{0} images; the reference statistics {1:?} are of {r}×{r} \
                             images, and FID compares images of one size",
                            images.side, reference.row.name
                        ),
                    ));
                }
            }
            Ok(())
        };
        let features_started = Instant::now();
        let (features, grid_source, by, audit) = match upload {
            BatchUpload::Images(images) => {
                if images.n != n {
                    return Err(Error::invalid(
                        "images",
                        format!("{} images; batch {k} holds {n} (seeds {seeds:?})", images.n),
                    ));
                }
                check_images(&images, "images")?;
                let features = featurize(&extractor, &images).await?;
                (features, Some(images), "client_images", None)
            }
            BatchUpload::Features {
                features,
                n: rows,
                audit,
                audit_index,
            } => {
                if !state.features_accepted() {
                    return Err(Error::invalid(
                        "features",
                        format!(
                            "the reference statistics {:?} hold features of the fallback pixel \
                             projection, which only the server computes: upload images",
                            reference.row.name
                        ),
                    ));
                }
                if rows != n {
                    return Err(Error::invalid(
                        "features",
                        format!("{rows} rows; batch {k} holds {n} images (seeds {seeds:?})"),
                    ));
                }
                if audit.n < MIN_AUDIT_IMAGES.min(n) {
                    return Err(Error::invalid(
                        "audit_images",
                        format!(
                            "{} audit images; features come with at least {} of the batch's \
                             images, which the server checks them against",
                            audit.n,
                            MIN_AUDIT_IMAGES.min(n)
                        ),
                    ));
                }
                check_images(&audit, "audit_images")?;
                let server = featurize(&extractor, &audit).await?;
                let mut worst = (0usize, 0f64);
                for (j, &row) in audit_index.iter().enumerate() {
                    let d = relative_difference(
                        &features[row * FEATURES..(row + 1) * FEATURES],
                        &server[j * FEATURES..(j + 1) * FEATURES],
                    );
                    if d > worst.1 || d.is_nan() {
                        worst = (j, d);
                    }
                }
                if !(worst.1 <= AUDIT_TOLERANCE) {
                    let j = worst.0;
                    return Err(Error::AuditFailed(format!(
                        "audit_images[{j}] (image {} of batch {k}): the uploaded features differ \
                         from the server's by {:.3e} (relative L2), more than {AUDIT_TOLERANCE:e}: \
                         compute them as NVIDIA's detector does (uint8 RGB, TensorFlow's \
                         bilinear resize to 299×299 with its half-pixel offset, (x − 128) / 128, \
                         inception-2015-12-05 pool3), or upload the images instead",
                        audit_index[j], worst.1
                    )));
                }
                let grid = (k == 0).then(|| {
                    // The grid shows the audit images in batch order.
                    let mut order: Vec<usize> = (0..audit.n).collect();
                    order.sort_by_key(|&j| audit_index[j]);
                    audit.select(&order)
                });
                let report = Audit {
                    images: audit.n,
                    max_relative_difference: worst.1,
                };
                (features, grid, "client", Some(report))
            }
        };
        let features_s = features_started.elapsed().as_secs_f64();
        let features_by: &'static str = if by == "client" { "client" } else { "server" };
        let mut bytes = Vec::with_capacity(features.len() * 4 + 128);
        npy::write_f32(&mut bytes, &[n, FEATURES], &features)
            .map_err(|e| Error::io("encoding features", e))?;
        let features_digest = self.data.put_blob(bytes, "a batch's features").await?;
        let grid_digest = match grid_source.filter(|_| k == 0) {
            Some(images) => {
                let png = blocking("drawing a point's grid", move || grid_png(&images)).await?;
                Some(self.data.put_blob(png, "an image grid").await?)
            }
            None => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let written = self
            .data
            .db
            .record_batch(
                point.sweep_id,
                point.idx,
                lease,
                &NewBatch {
                    batch: k as i64,
                    reconstruction_id: state.reconstruction.id.clone(),
                    images: n as i64,
                    features_digest,
                    seconds,
                    sample_seconds: 0.0,
                    features_seconds: features_s,
                    grid_digest,
                    features_by,
                    upload_digest: Some(upload_digest),
                },
                self.expires(),
                Some(now_ms()),
            )
            .await?;
        match written {
            BatchWrite::Recorded | BatchWrite::AlreadyRecorded => Ok(BatchReceipt {
                batch: k,
                images: n,
                recorded: written == BatchWrite::Recorded,
                features_by,
                audit,
                seconds,
            }),
            BatchWrite::Different => Err(Error::Conflict(format!(
                "batch {k} was recorded meanwhile from another upload"
            ))),
            BatchWrite::LeaseLost => {
                self.data.db.live_lease(lease, now_ms()).await?;
                Err(Error::LeaseLost(format!("lease {lease} was lost")))
            }
        }
    }

    /// Records user metrics (`{"name": value or [value per seed set]}`) under the lease.
    /// Errors name `metrics.NAME`: undeclared, not finite, the wrong number of values.
    pub async fn record_metrics(
        &self,
        lease: &str,
        body: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<(String, Vec<f64>)>> {
        let state = self.state(lease).await?;
        let values = checked_metric_values(&state.spec, body)?;
        self.data
            .db
            .record_lease_metrics(lease, now_ms(), self.expires(), &values)
            .await?;
        self.data.db.lease_metrics(lease).await
    }

    /// Finishes the lease's point: every batch and user metric must be recorded
    /// ([`Error::Unfinished`] names what is missing); the server computes FID and KID from
    /// the recorded features and records the result once. Returns the point.
    pub async fn finish(&self, lease: &str) -> Result<PointRow> {
        let state = self.state(lease).await?;
        let spec = &state.spec;
        let point = &state.point;
        let mut missing = Vec::new();
        let batches = spec.batches_per_point();
        let absent: Vec<String> = (0..batches as i64)
            .filter(|b| !state.batches_done.contains(b))
            .map(|b| b.to_string())
            .collect();
        if !absent.is_empty() {
            let shown: Vec<&str> = absent.iter().take(20).map(String::as_str).collect();
            missing.push(format!(
                "batches {}{} of {batches} are not recorded",
                shown.join(", "),
                if absent.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        let unreported: Vec<&str> = spec
            .user_metrics
            .iter()
            .filter(|m| !state.metrics_recorded.iter().any(|(n, _)| *n == m.name))
            .map(|m| m.name.as_str())
            .collect();
        if !unreported.is_empty() {
            missing.push(format!(
                "metrics {} are not reported (POST /evaluations/{lease}/metrics)",
                unreported.join(", ")
            ));
        }
        if !missing.is_empty() {
            return Err(Error::Unfinished(format!(
                "point {} of sweep {} cannot be finished: {}",
                point.idx,
                point.sweep_id,
                missing.join("; ")
            )));
        }
        let started = Instant::now();
        let batch_rows = self
            .data
            .db
            .sweep_batches(point.sweep_id, point.idx, &state.reconstruction.id)
            .await?;
        let (mut result, stats_digest) = if spec.has_images() {
            let reference_id = spec.reference_id.ok_or_else(|| {
                Error::Index("an image sweep without reference statistics".into())
            })?;
            let reference = self.scorer.reference(reference_id).await?;
            let (result, stats) = self
                .scorer
                .metrics(spec, &batch_rows, &reference, &state.reconstruction.id)
                .await?;
            let mut npz = std::io::Cursor::new(Vec::new());
            stats.write_npz(&mut npz)?;
            let digest = self
                .data
                .put_blob(npz.into_inner(), "a point's statistics")
                .await?;
            (result, Some(digest))
        } else {
            (
                PointResult {
                    fid: None,
                    kid: None,
                    num_images: 0,
                    seed_sets: spec.seed_sets,
                    kid_subsets: None,
                    reconstruction: state.reconstruction.id.clone(),
                    timings: Default::default(),
                    user: Default::default(),
                    features: None,
                },
                None,
            )
        };
        for (name, values) in &state.metrics_recorded {
            result
                .user
                .insert(name.clone(), MetricSummary::of(values.clone(), None));
        }
        result.timings = batch_timings(&batch_rows, 0.0, started.elapsed().as_secs_f64());
        result.features = features_by(&batch_rows);
        let value = serde_json::to_value(&result).map_err(|e| Error::Index(e.to_string()))?;
        if !self
            .data
            .db
            .finish_point(
                point.sweep_id,
                point.idx,
                lease,
                &value,
                stats_digest.as_deref(),
                Some(now_ms()),
            )
            .await?
        {
            self.data.db.live_lease(lease, now_ms()).await?;
            return Err(Error::LeaseLost(format!("lease {lease} was lost")));
        }
        self.data
            .db
            .sweep_points(point.sweep_id)
            .await?
            .into_iter()
            .find(|p| p.idx == point.idx)
            .ok_or_else(|| Error::Index("the finished point vanished".into()))
    }
}

/// Inception (or fallback) features of `images`, on the compute pool.
async fn featurize(extractor: &Arc<FeatureExtractor>, images: &Images) -> Result<Vec<f32>> {
    let (extractor, images) = (extractor.clone(), images.clone());
    blocking("computing features", move || {
        crate::model::on_compute_pool(|| {
            extractor.features(&images.pixels, images.n, images.c, images.side, images.side)
        })
    })
    .await
}

/// A PNG grid of the first [`GRID_IMAGES`] of `images`.
fn grid_png(images: &Images) -> Result<Vec<u8>> {
    let shown: Vec<Vec<u8>> = (0..images.n.min(GRID_IMAGES))
        .map(|i| images.hwc(i))
        .collect();
    let (pixels, w, h) = crate::sample::grid(&shown, images.side, images.c);
    crate::sample::encode_png(&pixels, w, h, images.c).map_err(|e| {
        Error::io(
            "encoding an image grid",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// The values of a metrics report, checked against the sweep: each name declared, each value
/// a finite number or a list of one finite number per seed set.
pub fn checked_metric_values(
    spec: &SweepSpec,
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, Vec<f64>)>> {
    if body.is_empty() {
        return Err(Error::invalid(
            "metrics",
            "an empty report: give {\"name\": value, …}",
        ));
    }
    let declared: Vec<&str> = spec.user_metrics.iter().map(|m| m.name.as_str()).collect();
    let mut out = Vec::with_capacity(body.len());
    for (name, value) in body {
        let field = format!("metrics.{name}");
        if !declared.contains(&name.as_str()) {
            return Err(Error::invalid(
                field,
                if declared.is_empty() {
                    "the sweep declares no user metrics".to_owned()
                } else {
                    format!(
                        "not declared by the sweep (its user metrics: {})",
                        declared.join(", ")
                    )
                },
            ));
        }
        let number = |v: &serde_json::Value, at: String| -> Result<f64> {
            if let Some(text) = v.as_str().and_then(|t| t.strip_prefix(NONFINITE_MARK)) {
                return Err(Error::invalid(at, format!("{text} is not a finite number")));
            }
            let x = v
                .as_f64()
                .ok_or_else(|| Error::invalid(at.clone(), format!("{v} is not a number")))?;
            if !x.is_finite() {
                return Err(Error::invalid(at, format!("{x} is not a finite number")));
            }
            Ok(x)
        };
        let values = match value {
            serde_json::Value::Array(items) => {
                if items.len() != spec.seed_sets {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "{} values; give one per seed set ({}) or one for the point",
                            items.len(),
                            spec.seed_sets
                        ),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| number(v, format!("{field}[{i}]")))
                    .collect::<Result<Vec<_>>>()?
            }
            v => vec![number(v, field)?],
        };
        out.push((name.clone(), values));
    }
    Ok(out)
}

/// What [`lenient_json`] puts in place of a bare `NaN`, `Infinity` or `-Infinity`.
pub const NONFINITE_MARK: &str = "\u{0}nonfinite:";

/// Parses JSON that may hold the bare `NaN`, `Infinity` and `-Infinity` Python's `json`
/// writes: they become marked strings, so that the error can name the field that held them
/// instead of a line and column.
pub fn lenient_json(bytes: &[u8]) -> std::result::Result<serde_json::Value, serde_json::Error> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(first) => {
            let Ok(text) = std::str::from_utf8(bytes) else {
                return Err(first);
            };
            let mut out = String::with_capacity(text.len() + 32);
            let mut in_string = false;
            let mut escaped = false;
            let mut rest = text;
            while let Some(c) = rest.chars().next() {
                if in_string {
                    out.push(c);
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        in_string = false;
                    }
                    rest = &rest[c.len_utf8()..];
                    continue;
                }
                let token = ["-Infinity", "Infinity", "NaN"]
                    .into_iter()
                    .find(|t| rest.starts_with(t));
                if let Some(t) = token {
                    out.push_str(&format!("\"\\u0000nonfinite:{t}\""));
                    rest = &rest[t.len()..];
                    continue;
                }
                if c == '"' {
                    in_string = true;
                }
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
            serde_json::from_str(&out).map_err(|_| first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_non_finite_numbers_are_named_not_lost() {
        let v = lenient_json(br#"{"val_loss": NaN, "b": [1, -Infinity], "s": "NaN"}"#).unwrap();
        assert_eq!(v["val_loss"], format!("{NONFINITE_MARK}NaN"));
        assert_eq!(v["b"][1], format!("{NONFINITE_MARK}-Infinity"));
        assert_eq!(v["s"], "NaN");
        assert!(lenient_json(b"{\"a\": nope}").is_err());
    }

    #[test]
    fn worker_names_are_printable() {
        assert!(check_worker("gpu-3 (node 7)").is_ok());
        for bad in ["", " x", "a\nb", &"w".repeat(101)] {
            let e = check_worker(bad).unwrap_err();
            assert!(e.to_string().starts_with("worker: "), "{e}");
        }
    }
}

/// The Python that works external sweep `sweep` with the client (`Client.evaluate`), for
/// the command line and the UI to show; `server` is the server's URL (default
/// `http://127.0.0.1:8080`, what `hindsight serve` binds).
pub fn python_snippet(sweep: i64, spec: &SweepSpec, server: Option<&str>) -> String {
    let server = server.unwrap_or("http://127.0.0.1:8080");
    let user: Vec<String> = spec
        .user_metrics
        .iter()
        .map(|m| format!("\"{}\": ...", m.name))
        .collect();
    let metrics = if user.is_empty() {
        String::new()
    } else {
        format!(
            "\n\ndef metrics(model, point):  # the sweep's user metrics, a number each\n    \
             return {{{}}}\n",
            user.join(", ")
        )
    };
    let generate = if spec.has_images() {
        "\n\ndef generate(model, seeds, sampler):  # uint8 [B, C, H, W]; image i from seeds[i]\n    \
         noise = seeded_randn(seeds, (C, H, W), device=\"cuda\")  # one generator per seed\n    \
         return my_sampler(model, noise, **sampler)\n"
    } else {
        ""
    };
    format!(
        "import os\n\
         from hindsight_client import Client, seeded_randn\n\n\
         def load(state_dict):  # your model, holding the reconstructed EMA weights\n    \
         model = MyModel()\n    \
         model.load_state_dict(state_dict)\n    \
         return model.eval().to(\"cuda\")\n{generate}{metrics}\n\
         client = Client(\"{server}\", token=os.environ.get(\"HINDSIGHT_TOKEN\"))\n\
         client.evaluate(sweep={sweep}, load=load{}{}, device=\"cuda\")\n",
        if spec.has_images() {
            ", generate=generate"
        } else {
            ""
        },
        if user.is_empty() {
            ""
        } else {
            ", metrics=metrics"
        },
    )
}
