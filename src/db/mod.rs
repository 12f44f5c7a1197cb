//! The SQLite index (sqlx, runtime queries, migrations in `migrations/`, described in
//! `migrations/README.md`): what the store's blobs are. All SQL lives here, one file per table
//! family:
//!
//! - `connection`: [`Db`], opening the file (pragmas, migrations), `quick_check`, and the
//!   `BEGIN IMMEDIATE` transaction helper the other files use.
//! - `runs`: the `runs` table, named training runs with JSON metadata ([`Run`],
//!   [`RunSummary`]), and the name rules ([`check_run_name`]).
//! - `snapshots`: the `snapshots` and `run_tensors` tables, stored EMA snapshots and each
//!   run's tensor manifest ([`SnapshotRow`], [`NewSnapshot`]); one slot per
//!   `(run, nimg, sigma_rel)` up to [`SLOT_TOLERANCE`] ([`same_width`]).
//! - `blobs`: the `blobs` table, its garbage-collection states ([`BlobState`]: `pending →
//!   valid → deleted`), the claims an ingest holds between publishing a blob and recording
//!   the row that refers to it, and GC's mark and sweep.
//! - `reconstructions`: the `reconstructions` table, stored materializer outputs keyed by what
//!   determines their bytes ([`ReconstructionRow`]).
//! - `references`: the `reference_stats` table, reference statistics for FID and KID by name
//!   ([`ReferenceRow`]).
//! - `sweeps`: the `sweeps`, `sweep_points` and `sweep_batches` tables, the durable job queue
//!   of sweeps with leased points ([`SweepRow`], [`PointRow`], [`BatchRow`], [`Claim`]).
//! - `leases`: the `sweep_leases` and `sweep_lease_metrics` tables, every lease taken on a
//!   point ([`LeaseRow`]: a sweep's workers and failed attempts) and the user metrics an
//!   external evaluator reported under its lease.
//!
//! The database runs in WAL mode with `synchronous = FULL` (a committed row survives power
//! loss), foreign keys on, and a busy timeout so that the server and command-line tools can
//! share it. Rows are plain data: JSON columns come back as [`serde_json::Value`] (the
//! reconstruction report as the library's typed `QualityReport`), states as enums; how they
//! look on the wire is the server's business. The database knows digests as
//! hex text; the files behind them are [`crate::store`]'s.

mod blobs;
mod connection;
mod leases;
mod reconstructions;
mod references;
mod runs;
mod snapshots;
mod sweeps;

pub use blobs::{BlobRow, BlobState};
pub use connection::Db;
pub use leases::{ms_to_rfc3339, LeaseRow};
pub use reconstructions::{NewReconstruction, ReconstructionRow};
pub use references::{NewReference, ReferenceRow};
pub use runs::{check_name, check_run_name, Run, RunSummary};
pub use snapshots::{
    describe_differences, manifest_differences, same_width, DeletedSnapshot, ManifestEntry,
    NewSnapshot, Recorded, SnapshotRow, SLOT_TOLERANCE,
};
pub use sweeps::{
    new_lease_id, BatchRow, BatchWrite, Claim, ClaimFilter, Evaluator, LeaseOutcome, NewBatch,
    PointRow, SweepRow, SweepStatus,
};
