//! Planning a reconstruction: solve for the targets over a run's stored snapshots and give
//! each target its cache key.
//!
//! The key is BLAKE3 over a text naming the key format, every snapshot the solver saw (digest,
//! `nimg`, `sigma_rel`), the target's `gamma` (as exact f64 bits) and `nimg`, and the output
//! dtype. A snapshot added to the run later changes the solve and therefore the key; a target
//! asked for as `sigma_rel` or as the equivalent `gamma` shares one entry.

use crate::db::{Db, Run, SnapshotRow};
use crate::error::{Error, Result};
use crate::materialize::{declared_buffers, Buffers, OutDtype};
use crate::phema::request::{SnapshotSpec, SolveRequest, TargetSpec};
use crate::phema::TargetSolution;

use super::report::{QualityReport, ReportInput};

/// First line of the key text; bump it when the solver or the materializer change their
/// output for the same inputs.
pub const KEY_FORMAT: &str = "hindsight reconstruction 3";

/// Most targets one request may ask for.
pub const MAX_TARGETS: usize = 64;

/// A solved request: the run, its snapshots as the solver saw them, and each target's key and
/// solution.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The run.
    pub run: Run,
    /// Its snapshots, in the order of the solution's coefficients.
    pub snapshots: Vec<SnapshotRow>,
    /// Output element type.
    pub dtype: OutDtype,
    /// Values beyond the output type's range are clamped (and reported) rather than refused.
    pub clamp: bool,
    /// Declared float buffers averaged or copied from the newest snapshot.
    pub buffers: Buffers,
    /// One entry per requested target, in request order.
    pub targets: Vec<PlannedTarget>,
}

/// How a plan's outputs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputOptions {
    /// Element type of the reconstructed floating-point tensors.
    pub dtype: OutDtype,
    /// Clamp values beyond the type's range (f16's ±65504) instead of refusing them.
    pub clamp: bool,
    /// What happens to the float tensors the snapshots declare as buffers.
    pub buffers: Buffers,
}

impl From<OutDtype> for OutputOptions {
    fn from(dtype: OutDtype) -> Self {
        Self {
            dtype,
            clamp: false,
            buffers: Buffers::Average,
        }
    }
}

/// One target of a [`Plan`].
#[derive(Clone, Debug)]
pub struct PlannedTarget {
    /// The cache key, which is also the reconstruction's id.
    pub id: String,
    /// The solver's answer and quality report.
    pub solution: TargetSolution,
}

/// The conventional file name of a reconstruction: `<run>-<nimg:010>-<σ:.3f>.safetensors`.
pub fn file_name(run: &str, nimg: i64, sigma_rel: f64) -> String {
    format!("{run}-{nimg:010}-{sigma_rel:.3}.safetensors")
}

/// Solves `targets` over the stored snapshots of `run_name`, for outputs of `output` (an
/// [`OutDtype`], or [`OutputOptions`] to also allow clamping).
///
/// Errors: too many targets, an unknown run ([`Error::NotFound`]) or one without snapshots,
/// and the solver's errors (targets out of range, naming the field).
pub async fn plan(
    db: &Db,
    run_name: &str,
    targets: Vec<TargetSpec>,
    output: impl Into<OutputOptions>,
) -> Result<Plan> {
    let OutputOptions {
        dtype,
        clamp,
        buffers,
    } = output.into();
    if targets.len() > MAX_TARGETS {
        return Err(Error::invalid(
            "targets",
            format!(
                "{} targets in one request; at most {MAX_TARGETS}",
                targets.len()
            ),
        ));
    }
    let run = db
        .run(run_name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("run {run_name:?} does not exist")))?;
    let snapshots = db.snapshots(run.id).await?;
    if snapshots.is_empty() {
        return Err(Error::invalid(
            "run",
            format!("run {run_name:?} has no snapshots yet"),
        ));
    }
    if buffers == Buffers::Copy {
        check_declared_buffers(&snapshots)?;
    }
    let request = SolveRequest {
        targets,
        ..solve_request(&snapshots)?
    };
    let response = request.solve()?;
    let targets = response
        .targets
        .into_iter()
        .map(|t| PlannedTarget {
            id: key(&snapshots, &t.solution, dtype, clamp, buffers),
            solution: t.solution,
        })
        .collect();
    Ok(Plan {
        run,
        snapshots,
        dtype,
        clamp,
        buffers,
        targets,
    })
}

/// For [`Buffers::Copy`]: every snapshot declares its buffers (the newest one weighed is the
/// one copied from, and which it is depends on the target). Errors name `buffers` and the
/// first snapshot without the declaration.
fn check_declared_buffers(snapshots: &[SnapshotRow]) -> Result<()> {
    for s in snapshots {
        let metadata: std::collections::BTreeMap<String, String> =
            serde_json::from_value(s.metadata.clone()).unwrap_or_default();
        let source = format!(
            "snapshot {} (nimg {}, sigma_rel {})",
            s.id, s.nimg, s.sigma_rel
        );
        if declared_buffers(&metadata, &source)?.is_none() {
            return Err(Error::invalid(
                "buffers",
                format!(
                    "\"copy\" needs snapshots that declare their buffers (\"{}\" in \
                     __metadata__, written by the Python client's PowerEMA and by `hindsight \
                     import` of EDM2 pickles); {source} declares none — use \"average\"",
                    crate::materialize::BUFFERS_METADATA_KEY
                ),
            ));
        }
    }
    Ok(())
}

/// A solve request over stored snapshots, in the order given (which is the order of the
/// solution's coefficients), with their update rules, and no targets yet. Fails only on a
/// stored update rule this version cannot read.
pub fn solve_request(snapshots: &[SnapshotRow]) -> Result<SolveRequest> {
    let snapshots = snapshots
        .iter()
        .map(|s| {
            Ok(SnapshotSpec {
                nimg: s.nimg as u64,
                sigma_rel: Some(s.sigma_rel),
                gamma: None,
                profile: s
                    .profile
                    .clone()
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| {
                        Error::Index(format!("snapshot {}: its update rule: {e}", s.digest))
                    })?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(SolveRequest {
        snapshots,
        targets: Vec::new(),
        options: None,
        profile_points: None,
    })
}

fn key(
    snapshots: &[SnapshotRow],
    solution: &TargetSolution,
    dtype: OutDtype,
    clamp: bool,
    buffers: Buffers,
) -> String {
    let mut text = format!(
        "{KEY_FORMAT}\ndtype {}\ntarget gamma {:016x} nimg {}\n",
        dtype.as_str(),
        solution.gamma.to_bits(),
        solution.nimg
    );
    if clamp {
        text.push_str("out_of_range clamp\n");
    }
    if buffers != Buffers::Average {
        // Averaging is the rule keys were made with before buffers could be copied.
        text.push_str(&format!("buffers {}\n", buffers.as_str()));
    }
    for s in snapshots {
        text.push_str(&format!(
            "snapshot {} nimg {} sigma_rel {:016x}\n",
            s.digest,
            s.nimg,
            s.sigma_rel.to_bits()
        ));
        if let Some(profile) = &s.profile {
            // serde_json writes object keys sorted: the same rule, the same text.
            text.push_str(&format!("profile {profile}\n"));
        }
    }
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// The report stored with a reconstruction: the solver's figures and the snapshots it weighs.
pub fn report(plan: &Plan, target: &PlannedTarget) -> QualityReport {
    let s = &target.solution;
    let inputs = plan
        .snapshots
        .iter()
        .zip(&s.coefficients)
        .filter(|(_, &w)| w != 0.0)
        .map(|(snap, &w)| ReportInput {
            digest: snap.digest.clone(),
            nimg: snap.nimg as u64,
            sigma_rel: snap.sigma_rel,
            weight: w,
        })
        .collect();
    QualityReport {
        sigma_rel: s.sigma_rel,
        gamma: s.gamma,
        nimg: s.nimg,
        used_snapshots: s.used_snapshots as u64,
        relative_error: s.relative_error,
        coefficient_l1: s.coefficient_l1,
        noise_gain: s.noise_gain,
        condition_number: s.condition_number,
        dependent_snapshots: s
            .dependent_snapshots
            .iter()
            .map(|&i| plan.snapshots[i].digest.clone())
            .collect(),
        warnings: s.warnings.clone(),
        inputs,
        clamped: Vec::new(),
    }
}
