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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, OnceCell};

use super::batch::compute_batch;
use super::results::{set_metrics, MetricSummary, PointResult, Timings};
use super::spec::{run_network, spec_of, SweepSpec};
use crate::app::{references, DataDir};
use crate::db::{BatchRow, Claim, NewBatch, PointRow, ReferenceRow, SweepRow};
use crate::error::{blocking, Error, Result};
use crate::materialize::OutDtype;
use crate::metrics::{npy, FeatureExtractor, FeatureStats, Metric, FEATURES};
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

/// Reference statistics loaded for metrics.
struct LoadedReference {
    row: ReferenceRow,
    stats: FeatureStats,
    features: Option<Vec<f32>>,
}

/// A sweep worker over one data directory. Cheap to share (`Arc`); run one per device.
pub struct Worker {
    data: DataDir,
    config: WorkerConfig,
    extractor: OnceCell<Arc<FeatureExtractor>>,
    /// The fallback feature network, for references computed with it.
    pixel_projection: OnceCell<Arc<FeatureExtractor>>,
    references: Mutex<HashMap<i64, Arc<LoadedReference>>>,
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
        Self {
            data,
            config,
            extractor: OnceCell::new(),
            pixel_projection: OnceCell::new(),
            references: Mutex::new(HashMap::new()),
            observer,
        }
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The feature network `reference` was computed with: the Inception network (loaded once,
    /// when the first point needs it), or the fallback pixel projection.
    async fn extractor_for(&self, reference: &LoadedReference) -> Result<Arc<FeatureExtractor>> {
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
        self.extractor().await
    }

    /// Loads the feature network once (the first point needs it).
    async fn extractor(&self) -> Result<Arc<FeatureExtractor>> {
        self.extractor
            .get_or_try_init(|| async {
                let weights = self.config.weights.clone();
                blocking("loading the Inception weights", move || {
                    Ok(Arc::new(FeatureExtractor::open(weights.as_deref())?))
                })
                .await
            })
            .await
            .cloned()
    }

    async fn reference(&self, id: i64) -> Result<Arc<LoadedReference>> {
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
                self.config.sweep,
            )
            .await?;
        let Some(claim) = claim else {
            return Ok(false);
        };
        let (sweep, idx) = (claim.point.sweep_id, claim.point.idx);
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = self.heartbeat(sweep, idx, lost.clone());
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
                    .fail_point(sweep, idx, &self.config.id, &error, retry)
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
        let held: Vec<(i64, i64)> = match sqlx::query_as(
            "SELECT sweep_id, idx FROM sweep_points WHERE lease_owner = ? AND status = 'running'",
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
        for (sweep, idx) in held {
            let _ = self
                .data
                .db
                .fail_point(sweep, idx, &self.config.id, "the worker stopped", true)
                .await;
        }
    }

    fn heartbeat(
        &self,
        sweep: i64,
        idx: i64,
        lost: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let db = self.data.db.clone();
        let owner = self.config.id.clone();
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
        let reference = self.reference(spec.reference_id).await?;
        let extractor = self.extractor_for(&reference).await?;
        if let Some(d) = &reference.row.weights_digest {
            if *d != extractor.digest {
                return Err(Error::invalid(
                    "reference",
                    format!(
                        "reference statistics {:?} come from feature weights {} and this \
                         worker has {} ({}): features of two networks are not comparable",
                        reference.row.name,
                        &d[..12],
                        &extractor.digest[..12],
                        extractor.source
                    ),
                ));
            }
        }
        // Weights: the reconstruction, stored or made now.
        let started = Instant::now();
        let (reconstruction_id, weights_path, network) =
            self.reconstruct(&claim.sweep, &claim.point).await?;
        let reconstruct_s = started.elapsed().as_secs_f64();
        if !self
            .data
            .db
            .pin_reconstruction(sweep, idx, &self.config.id, &reconstruction_id)
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
            .metrics(&spec, &batches, &reference, &reconstruction_id)
            .await?;
        let images: i64 = batches.iter().map(|b| b.images).sum();
        let batches_s: f64 = batches.iter().map(|b| b.seconds).sum();
        let result = PointResult {
            timings: Timings {
                reconstruct_s,
                batches_s,
                sample_s: batches.iter().map(|b| b.sample_seconds).sum(),
                features_s: batches.iter().map(|b| b.features_seconds).sum(),
                metrics_s: started.elapsed().as_secs_f64(),
                images_per_s: if batches_s > 0.0 {
                    images as f64 / batches_s
                } else {
                    0.0
                },
            },
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
            .finish_point(sweep, idx, &self.config.id, &value, &stats_digest)
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
        let config = spec.sampler.config();
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
                &self.config.id,
                &NewBatch {
                    batch: b as i64,
                    reconstruction_id: reconstruction_id.to_owned(),
                    images: n as i64,
                    features_digest,
                    seconds,
                    sample_seconds: out.sample_s,
                    features_seconds: out.features_s,
                    grid_digest,
                },
                now_ms() + self.config.lease.as_millis() as i64,
            )
            .await?;
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

    /// FID and KID per seed set, and the statistics of all the point's images.
    async fn metrics(
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
        };
        Ok((result, all))
    }
}
