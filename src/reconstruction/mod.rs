//! Reconstructions of a stored run: solve for the targets over the run's snapshots, materialize
//! the weights into the blob store, cached by a key over everything that determines their
//! bytes (so asking again costs one index lookup), and hand them out as files. The command
//! line (`hindsight reconstruct`, `solve`), the server's reconstruct routes and jobs, and the
//! sweep workers all go through these functions.
//!
//! - `plan`: [`plan`] solves for the targets over the run's snapshots ([`solve_request`]) and
//!   gives each target its cache key ([`KEY_FORMAT`]); [`report`] is a target's quality
//!   report, [`file_name`] its EDM2-style file name.
//! - `compute`: [`materialize_targets`], one materialization pass over the snapshots for
//!   every missing target, published into the store and recorded in the index; [`stored`]
//!   (the cached result, its blob checked intact) and [`listed`] (the row, blob present, not
//!   read).
//! - `report`: [`QualityReport`], the one type of the report a reconstruction stores (the
//!   index's JSON column), the API sends (`QualityReport` in `/openapi.json`) and the command
//!   line prints; its warnings are [`crate::phema::WarningCode`]s, clamping included.
//! - `export`: [`reconstruct_to_dir`], one safetensors file per target in a directory,
//!   computing what the store does not hold yet (hard links when it can).

mod compute;
mod export;
mod plan;
pub(crate) mod report;

pub use compute::{input_bytes, listed, materialize_targets, stored};
pub use export::{reconstruct_to_dir, ExportOptions, Exported};
pub use plan::{
    file_name, plan, report, solve_request, OutputOptions, Plan, PlannedTarget, KEY_FORMAT,
    MAX_TARGETS,
};
pub use report::{ClampedTensor, QualityReport, ReportInput};
