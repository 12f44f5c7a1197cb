//! The sweep worker: claims a point under a lease, reconstructs its weights (cached), samples
//! and takes features batch by batch — each batch's features stored and recorded before the
//! next starts — then computes the metrics and records the point once.
//!
//! Durability: a worker killed at any moment leaves at most a batch in flight; the point's
//! lease expires and the next worker resumes from the recorded batches. A heartbeat renews
//! the lease while a batch computes; every record checks the lease in its transaction, so a
//! worker that lost its point (stalled past the expiry, or the sweep was cancelled) stops
//! without writing. Features are recorded with the reconstruction they come from, and a point
//! whose reconstruction changed drops its old batches (see `Db::pin_reconstruction`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::batch::compute_batch;
use super::results::PointResult;
use super::scoring::{batch_timings, features_by, Scorer};
use super::spec::{run_network, spec_of, SweepSpec};
use crate::app::DataDir;
use crate::db::{
    BatchWrite, Claim, ClaimFilter, Evaluator, LeaseOutcome, NewBatch, PointRow, SweepRow,
};
use crate::error::{blocking, Error, Result};
use crate::materialize::OutDtype;
use crate::metrics::{npy, FeatureExtractor, FEATURES};
use crate::phema::request::TargetSpec;
use crate::reconstruction;
use crate::sample::Sampler;

/// A point that failed this many times for reasons that may pass (I/O, a crash in a batch)
/// is marked failed; errors in the input fail it at once.
pub const MAX_ATTEMPTS: i64 = 3;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique worker id (lease owner).
    pub id: String,
    /// Lease length; the heartbeat renews it every third of it.
    pub lease: Duration,
    /// How long an idle worker waits before looking for work again.
    pub poll: Duration,
    /// The Inception weights (default: found as `metrics::locate_weights` finds them).
    pub weights: Option<PathBuf>,
    /// Work only on this sweep.
    pub sweep: Option<i64>,
    /// Hash snapshots while materializing.
    pub verify_reads: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: new_worker_id(),
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            weights: None,
            sweep: None,
            verify_reads: true,
        }
    }
}

/// `<host>-<pid>-<8 hex>`: unique per process and start.
pub fn new_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What a worker reports as it goes (to a progress bar, a log).
#[derive(Clone, Debug)]
pub enum WorkerEvent {
    /// A point was claimed; `images_done` of `images_total` are recorded already.
    Claimed {
        /// The point.
        point: Box<PointRow>,
        /// Images per point.
        images_total: usize,
    },
    /// A batch was recorded.
    Batch {
        /// Sweep id.
        sweep: i64,
        /// Point index.
        idx: i64,
        /// Images in the batch.
        images: usize,
        /// Seconds it took.
        seconds: f64,
    },
    /// A point was recorded.
    Finished {
        /// Sweep id.
        sweep: i64,
        /// Point index.
        idx: i64,
        /// Its result.
        result: Box<PointResult>,
    },
    /// A point failed (and is requeued when `retry`).
    Failed {
        /// Sweep id.
        sweep: i64,
        /// Point index.
        idx: i64,
        /// The error.
        error: String,
        /// Whether another attempt will follow.
        retry: bool,
    },
    /// The worker lost a point's lease (cancelled, or taken after an expiry).
    Lost {
        /// Sweep id.
        sweep: i64,
        /// Point index.
        idx: i64,
    },
}

/// Receives worker events.
pub type Observer = Arc<dyn Fn(&WorkerEvent) + Send + Sync>;

/// A sweep worker over one data directory. Cheap to share (`Arc`); run one per device.
pub struct Worker {
    data: DataDir,
    config: WorkerConfig,
    scorer: Arc<Scorer>,
    observer: Observer,
}

/// How one claimed point ended.
enum Outcome {
    Done(Box<PointResult>),
    Lost,
}

/// Now, in Unix milliseconds (the unit of leases).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether an error may pass on another attempt (I/O, a busy database) rather than being
/// in the request or the stored data.
fn retryable(e: &Error) -> bool {
    !matches!(
        e,
        Error::InvalidInput { .. }
            | Error::NonFinite { .. }
            | Error::NotFound(_)
            | Error::OutOfRange { .. }
            | Error::Incomplete { .. }
    )
}

impl Worker {
    /// A worker over `data`; `observer` receives its events.
    pub fn new(data: DataDir, config: WorkerConfig, observer: Observer) -> Self {
        let scorer = Arc::new(Scorer::new(data.clone(), config.weights.clone()));
        Self::with_scorer(data, config, scorer, observer)
    }

    /// A worker sharing `scorer` (its loaded networks and references) with others.
    pub fn with_scorer(
        data: DataDir,
        config: WorkerConfig,
        scorer: Arc<Scorer>,
        observer: Observer,
    ) -> Self {
        Self {
            data,
            config,
            scorer,
            observer,
        }
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The worker's networks and references (share them with [`Worker::with_scorer`]).
    pub fn scorer(&self) -> Arc<Scorer> {
        self.scorer.clone()
    }

    /// Claims and works one point to its end. Returns false when there was nothing to claim.
    pub async fn run_once(&self) -> Result<bool> {
        let now = now_ms();
        let claim = self
            .data
            .db
            .claim_point(
                &self.config.id,
                now,
                now + self.config.lease.as_millis() as i64,
                ClaimFilter {
                    evaluator: Evaluator::Builtin,
                    sweep: self.config.sweep,
                    run_id: None,
                },
            )
            .await?;
        let Some(claim) = claim else {
            return Ok(false);
        };
        let (sweep, idx) = (claim.point.sweep_id, claim.point.idx);
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = self.heartbeat(sweep, idx, &claim.owner, lost.clone());
        let outcome = self.process(&claim, &lost).await;
        heartbeat.abort();
        match outcome {
            Ok(Outcome::Done(result)) => {
                (self.observer)(&WorkerEvent::Finished { sweep, idx, result });
            }
            Ok(Outcome::Lost) => (self.observer)(&WorkerEvent::Lost { sweep, idx }),
            Err(e) => {
                let retry = retryable(&e) && claim.point.attempts < MAX_ATTEMPTS;
                let error = e.chain_text();
                tracing::warn!(sweep, idx, retry, error = %error, "sweep point failed");
                self.data
                    .db
                    .fail_point(
                        sweep,
                        idx,
                        &claim.owner,
                        &error,
                        retry,
                        LeaseOutcome::Failed,
                        None,
                    )
                    .await?;
                (self.observer)(&WorkerEvent::Failed {
                    sweep,
                    idx,
                    error,
                    retry,
                });
            }
        }
        Ok(true)
    }

    /// Works until there is nothing to claim; returns the points worked on.
    pub async fn run_until_idle(&self) -> Result<usize> {
        let mut n = 0;
        while self.run_once().await? {
            n += 1;
        }
        Ok(n)
    }

    /// Works until `shutdown` resolves, looking for work every `poll` when idle. A point in
    /// progress at shutdown goes back to the queue at once (its finished batches stay).
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = self.run_once() => match r {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e.chain_text(), "sweep worker"),
                },
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
        self.release_held().await;
    }

    /// Puts points this worker holds back in the queue (a graceful stop).
    async fn release_held(&self) {
        let held: Vec<(i64, i64, String)> = match sqlx::query_as(
            "SELECT sweep_id, point_idx, lease_id FROM sweep_leases \
             WHERE worker = ? AND outcome IS NULL",
        )
        .bind(&self.config.id)
        .fetch_all(self.data.db.pool())
        .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "listing held sweep points");
                return;
            }
        };
        for (sweep, idx, lease) in held {
            let _ = self
                .data
                .db
                .fail_point(
                    sweep,
                    idx,
                    &lease,
                    "the worker stopped",
                    true,
                    LeaseOutcome::Released,
                    None,
                )
                .await;
        }
    }

    fn heartbeat(
        &self,
        sweep: i64,
        idx: i64,
        lease: &str,
        lost: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let db = self.data.db.clone();
        let owner = lease.to_owned();
        let lease = self.config.lease;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match db
                    .renew_lease(sweep, idx, &owner, now_ms() + lease.as_millis() as i64)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        lost.store(true, Ordering::SeqCst);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e.chain_text(), "renewing a sweep lease"),
                }
            }
        })
    }

    async fn process(&self, claim: &Claim, lost: &AtomicBool) -> Result<Outcome> {
        let spec = spec_of(&claim.sweep)?;
        let (sweep, idx) = (claim.point.sweep_id, claim.point.idx);
        (self.observer)(&WorkerEvent::Claimed {
            point: Box::new(claim.point.clone()),
            images_total: spec.images_per_point(),
        });
        let reference_id = spec.reference_id.ok_or_else(|| {
            Error::invalid("reference", "a builtin sweep without reference statistics")
        })?;
        let reference = self.scorer.reference(reference_id).await?;
        let extractor = self.scorer.extractor_for(&reference).await?;
        // Weights: the reconstruction, stored or made now.
        let started = Instant::now();
        let (reconstruction_id, weights_path, network) =
            self.reconstruct(&claim.sweep, &claim.point).await?;
        let reconstruct_s = started.elapsed().as_secs_f64();
        if !self
            .data
            .db
            .pin_reconstruction(sweep, idx, &claim.owner, &reconstruction_id)
            .await?
        {
            return Ok(Outcome::Lost);
        }
        let done: Vec<i64> = self
            .data
            .db
            .sweep_batches(sweep, idx, &reconstruction_id)
            .await?
            .iter()
            .map(|b| b.batch)
            .collect();
        let todo: Vec<usize> = (0..spec.batches_per_point())
            .filter(|b| !done.contains(&(*b as i64)))
            .collect();
        if !todo.is_empty() {
            let sampler = {
                let network = network.clone();
                blocking("loading the reconstructed weights", move || {
                    Ok(Arc::new(Sampler::load(&weights_path, &network)?))
                })
                .await?
            };
            for b in todo {
                if lost.load(Ordering::SeqCst) {
                    return Ok(Outcome::Lost);
                }
                if !self
                    .run_batch(&spec, claim, b, &reconstruction_id, &sampler, &extractor)
                    .await?
                {
                    return Ok(Outcome::Lost);
                }
            }
        }
        let batches = self
            .data
            .db
            .sweep_batches(sweep, idx, &reconstruction_id)
            .await?;
        let started = Instant::now();
        let (result, stats) = self
            .scorer
            .metrics(&spec, &batches, &reference, &reconstruction_id)
            .await?;
        let result = PointResult {
            timings: batch_timings(&batches, reconstruct_s, started.elapsed().as_secs_f64()),
            features: features_by(&batches),
            ..result
        };
        let mut npz = std::io::Cursor::new(Vec::new());
        stats.write_npz(&mut npz)?;
        let stats_digest = self
            .data
            .put_blob(npz.into_inner(), "a point's statistics")
            .await?;
        let value = serde_json::to_value(&result).map_err(|e| Error::Index(e.to_string()))?;
        if self
            .data
            .db
            .finish_point(sweep, idx, &claim.owner, &value, Some(&stats_digest), None)
            .await?
        {
            Ok(Outcome::Done(Box::new(result)))
        } else {
            Ok(Outcome::Lost)
        }
    }

    /// The point's reconstruction: its id, its file, and the run's network.
    async fn reconstruct(
        &self,
        sweep: &SweepRow,
        point: &PointRow,
    ) -> Result<(String, PathBuf, crate::model::Edm2Config)> {
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
        let network = run_network(&plan.run)?;
        let id = plan.targets[0].id.clone();
        let row = match reconstruction::stored(&self.data, &id).await? {
            Some(row) => row,
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
            .ok_or_else(|| Error::Index(format!("reconstruction {id} was not stored")))?,
        };
        Ok((id, self.data.store.path(&row.digest.parse()?), network))
    }

    /// Samples, featurizes and records batch `b`; false when the lease is lost.
    async fn run_batch(
        &self,
        spec: &SweepSpec,
        claim: &Claim,
        b: usize,
        reconstruction_id: &str,
        sampler: &Arc<Sampler>,
        extractor: &Arc<FeatureExtractor>,
    ) -> Result<bool> {
        let (sweep, idx) = (claim.point.sweep_id, claim.point.idx);
        let seeds = spec.batch_seeds(b);
        let config = spec.sampler.settings().config();
        let started = Instant::now();
        let out = {
            let (sampler, extractor, seeds) = (sampler.clone(), extractor.clone(), seeds.clone());
            blocking("sampling a batch", move || {
                crate::model::on_compute_pool(|| {
                    compute_batch(&sampler, &extractor, seeds, &config, b == 0)
                })
            })
            .await?
        };
        let n = (seeds.end - seeds.start) as usize;
        let mut bytes = Vec::with_capacity(out.features.len() * 4 + 128);
        npy::write_f32(&mut bytes, &[n, FEATURES], &out.features)
            .map_err(|e| Error::io("encoding features", e))?;
        let features_digest = self.data.put_blob(bytes, "a batch's features").await?;
        let grid_digest = match out.grid_png {
            Some(png) => Some(self.data.put_blob(png, "an image grid").await?),
            None => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let recorded = self
            .data
            .db
            .record_batch(
                sweep,
                idx,
                &claim.owner,
                &NewBatch {
                    batch: b as i64,
                    reconstruction_id: reconstruction_id.to_owned(),
                    images: n as i64,
                    features_digest,
                    seconds,
                    sample_seconds: out.sample_s,
                    features_seconds: out.features_s,
                    grid_digest,
                    features_by: "server",
                    upload_digest: None,
                },
                now_ms() + self.config.lease.as_millis() as i64,
                None,
            )
            .await?;
        let recorded = matches!(recorded, BatchWrite::Recorded | BatchWrite::AlreadyRecorded);
        if recorded {
            (self.observer)(&WorkerEvent::Batch {
                sweep,
                idx,
                images: n,
                seconds,
            });
        }
        Ok(recorded)
    }
}
