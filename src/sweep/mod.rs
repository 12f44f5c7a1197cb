//! Sweeps: sample quality as a function of EMA length (and, in 2-D, of training time) — the
//! curve of EDM2's Fig. 5, from one request.
//!
//! A sweep is a list of points `(sigma_rel, nimg)`. For each, a worker reconstructs the
//! weights (cached like every reconstruction), samples `num_images × seed_sets` images with
//! EDM's Heun sampler — image `i` from seed `i`, so every point sees the same noise and
//! differences between points are not seed noise — takes their Inception features, and
//! computes FID (and KID) against stored reference statistics, per seed set with mean ± std.
//!
//! - `spec`: the request, its validation (4xx naming the field) and the stored specification.
//! - `worker`: the durable job loop (leases, per-batch records, resumption).
//! - `batch`: sampling and features of one batch.
//! - `results`: a point's result, the best point.
//! - `external`: the server's side of the external-evaluator protocol (leases over HTTP,
//!   uploaded images or audited features, user metrics; `docs/EVALUATORS.md`).
//! - `upload`: parsing what an external evaluator uploads for a batch.
//! - `scoring`: feature networks, reference statistics and FID/KID from recorded features,
//!   shared by the builtin worker and external evaluation.
//! - `labels`: how each metric is named, scaled and compared, and a point's error bar —
//!   decided once for the UI, the command line, the plot and the Python client.
//! - `plot`: the curve (1-D) or heat map (2-D) as SVG.
//! - `estimate`: how long a sweep would take, from the timings of finished points.
//!
//! The queue lives in the index (`db::sweeps`); any number of workers — one inside
//! `hindsight serve`, more from `hindsight worker` — share it.

mod batch;
pub mod estimate;
pub mod external;
mod labels;
pub mod plot;
mod results;
mod scoring;
mod spec;
pub mod upload;
mod worker;

pub use batch::GRID_IMAGES;
pub use labels::{best_point, error_bar, Goal, MetricInfo, MetricKind, UserMetric};
pub use results::{MetricSummary, PointResult, Timings};
pub use scoring::{batch_timings, features_by, LoadedReference, Scorer};
pub use spec::{
    run_network, spec_of, validate, MetricRequest, SamplerRequest, SamplerSettings, SamplerSpec,
    SweepLimits, SweepRequest, SweepSpec, MAX_USER_METRICS,
};
pub use worker::{
    new_worker_id, now_ms, Observer, Worker, WorkerConfig, WorkerEvent, MAX_ATTEMPTS,
};

use crate::app::DataDir;
use crate::db::SweepRow;
use crate::error::{Error, Result};

/// Validates `request` (see [`validate`]) and queues the sweep; returns its row.
pub async fn create(
    data: &DataDir,
    request: SweepRequest,
    limits: &SweepLimits,
) -> Result<SweepRow> {
    let (spec, run, reference) = validate(data, request, limits).await?;
    let value = serde_json::to_value(&spec).map_err(|e| Error::Index(e.to_string()))?;
    let id = data
        .db
        .insert_sweep(
            run.id,
            reference.as_ref().map(|r| r.id),
            spec.evaluator,
            &value,
            &spec.points(),
            (limits.max_unfinished_per_run, limits.max_unfinished),
        )
        .await?;
    data.db
        .sweep(id)
        .await?
        .ok_or_else(|| Error::Index(format!("sweep {id} vanished")))
}

/// The sweep `id`, or [`Error::NotFound`].
pub async fn find(data: &DataDir, id: i64) -> Result<SweepRow> {
    data.db
        .sweep(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no sweep {id}")))
}
