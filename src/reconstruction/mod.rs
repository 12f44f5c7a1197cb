//! Reconstructions of a stored run: solve for the targets over the run's snapshots
//! ([`plan`]), materialize the weights into the blob store ([`materialize_targets`]), cached by
//! a key over everything that determines their bytes — so asking again costs one index lookup
//! ([`stored`]) — and hand them out as files ([`reconstruct_to_dir`]). The command line, the
//! server and (later) sweep workers all go through these functions.

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
