//! The SQLite index (sqlx, runtime queries, migrations in `migrations/`): runs, their tensor
//! manifests, snapshots, reconstructions, and the blob rows whose states make garbage
//! collection safe. One file per table family: [`runs`](Db::run), snapshots and manifests,
//! blobs, reconstructions.
//!
//! All SQL lives here. The database runs in WAL mode with `synchronous = FULL` (a committed
//! snapshot row survives power loss), foreign keys on, and a busy timeout so that the server
//! and command-line tools can share it. Rows are plain data: JSON columns come back as
//! [`serde_json::Value`], states as enums; how they look on the wire is the server's business.

mod blobs;
mod connection;
mod reconstructions;
mod references;
mod runs;
mod snapshots;
mod sweeps;

pub use blobs::{BlobRow, BlobState};
pub use connection::Db;
pub use reconstructions::{NewReconstruction, ReconstructionRow};
pub use references::{NewReference, ReferenceRow};
pub use runs::{check_name, check_run_name, Run, RunSummary};
pub use snapshots::{
    describe_differences, manifest_differences, same_width, DeletedSnapshot, ManifestEntry,
    NewSnapshot, Recorded, SnapshotRow, SLOT_TOLERANCE,
};
pub use sweeps::{BatchRow, Claim, NewBatch, PointRow, SweepRow, SweepStatus};
