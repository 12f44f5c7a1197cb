//! Reconstructions of a stored run: solve for the targets over the run's snapshots, then
//! materialize the weights into the blob store, cached by a key over everything that
//! determines their bytes — so asking again costs one index lookup.
//!
//! The key is BLAKE3 over a text naming the key format, every snapshot the solver saw (digest,
//! `nimg`, `sigma_rel`), the target's `gamma` (as exact f64 bits) and `nimg`, and the output
//! dtype. A snapshot added to the run later changes the solve and therefore the key; a target
//! asked for as `sigma_rel` or as the equivalent `gamma` shares one entry.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter};
use std::sync::Arc;

use serde_json::json;

use crate::app::DataDir;
use crate::db::{Db, NewReconstruction, ReconstructionRow, Run, SnapshotRow};
use crate::error::{Error, Result};
use crate::ingest::read_header;
use crate::materialize::{materialize_with, Input, Options, OutDtype};
use crate::phema::request::{SnapshotSpec, SolveRequest, TargetSpec};
use crate::phema::TargetSolution;
use crate::store::{BlobWriter, Digest};

/// First line of the key text; bump it when the solver or the materializer change their
/// output for the same inputs.
pub const KEY_FORMAT: &str = "hindsight reconstruction 2";

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
    /// One entry per requested target, in request order.
    pub targets: Vec<PlannedTarget>,
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

/// Solves `targets` over the stored snapshots of `run_name`.
pub async fn plan(
    db: &Db,
    run_name: &str,
    targets: Vec<TargetSpec>,
    dtype: OutDtype,
) -> Result<Plan> {
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
    let request = SolveRequest {
        snapshots: snapshots
            .iter()
            .map(|s| SnapshotSpec {
                nimg: s.nimg as u64,
                sigma_rel: Some(s.sigma_rel),
                gamma: None,
            })
            .collect(),
        targets,
        options: None,
        profile_points: None,
    };
    let response = request.solve()?;
    let targets = response
        .targets
        .into_iter()
        .map(|t| PlannedTarget {
            id: key(&snapshots, &t.solution, dtype),
            solution: t.solution,
        })
        .collect();
    Ok(Plan {
        run,
        snapshots,
        dtype,
        targets,
    })
}

fn key(snapshots: &[SnapshotRow], solution: &TargetSolution, dtype: OutDtype) -> String {
    let mut text = format!(
        "{KEY_FORMAT}\ndtype {}\ntarget gamma {:016x} nimg {}\n",
        dtype.as_str(),
        solution.gamma.to_bits(),
        solution.nimg
    );
    for s in snapshots {
        text.push_str(&format!(
            "snapshot {} nimg {} sigma_rel {:016x}\n",
            s.digest,
            s.nimg,
            s.sigma_rel.to_bits()
        ));
    }
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// The report stored with a reconstruction: the solver's figures and the snapshots it weighs.
pub fn report(plan: &Plan, target: &PlannedTarget) -> serde_json::Value {
    let s = &target.solution;
    let inputs: Vec<_> = plan
        .snapshots
        .iter()
        .zip(&s.coefficients)
        .filter(|(_, &w)| w != 0.0)
        .map(|(snap, &w)| {
            json!({"digest": snap.digest, "nimg": snap.nimg, "sigma_rel": snap.sigma_rel, "weight": w})
        })
        .collect();
    json!({
        "sigma_rel": s.sigma_rel,
        "gamma": s.gamma,
        "nimg": s.nimg,
        "used_snapshots": s.used_snapshots,
        "relative_error": s.relative_error,
        "coefficient_l1": s.coefficient_l1,
        "noise_gain": s.noise_gain,
        "condition_number": s.condition_number,
        "dependent_snapshots": s.dependent_snapshots
            .iter()
            .map(|&i| &plan.snapshots[i].digest)
            .collect::<Vec<_>>(),
        "warnings": s.warnings,
        "inputs": inputs,
    })
}

/// Indices of the plan's snapshots that targets `which` give a weight.
fn used_snapshots(plan: &Plan, which: &[usize]) -> Vec<usize> {
    (0..plan.snapshots.len())
        .filter(|&i| {
            which
                .iter()
                .any(|&t| plan.targets[t].solution.coefficients[i] != 0.0)
        })
        .collect()
}

/// Bytes that materializing targets `which` reads (for progress bars).
pub fn input_bytes(plan: &Plan, which: &[usize]) -> u64 {
    used_snapshots(plan, which)
        .iter()
        .map(|&i| plan.snapshots[i].byte_size as u64)
        .sum()
}

/// Materializes targets `which` of `plan` in one pass into the store and records them.
/// Targets with the same id are computed once. Runs the pass on the blocking pool.
pub async fn materialize_targets(
    data: &DataDir,
    plan: &Plan,
    which: &[usize],
    verify: bool,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Vec<ReconstructionRow>> {
    let mut which: Vec<usize> = which.to_vec();
    {
        let mut seen = std::collections::BTreeSet::new();
        which.retain(|&t| seen.insert(plan.targets[t].id.clone()));
    }
    if which.is_empty() {
        return Ok(Vec::new());
    }
    let used = used_snapshots(plan, &which);
    let used_digests: Vec<String> = used
        .iter()
        .map(|&i| plan.snapshots[i].digest.clone())
        .collect();
    let weights: Vec<Vec<f64>> = which
        .iter()
        .map(|&t| {
            let c = &plan.targets[t].solution.coefficients;
            used.iter().map(|&i| c[i]).collect()
        })
        .collect();
    let metadata: Vec<BTreeMap<String, String>> = which
        .iter()
        .map(|&t| {
            let target = &plan.targets[t];
            let s = &target.solution;
            BTreeMap::from([
                ("hindsight_reconstruction".to_owned(), target.id.clone()),
                ("run".to_owned(), plan.run.name.clone()),
                ("nimg".to_owned(), s.nimg.to_string()),
                ("sigma_rel".to_owned(), s.sigma_rel.to_string()),
                ("gamma".to_owned(), s.gamma.to_string()),
                ("relative_error".to_owned(), s.relative_error.to_string()),
                ("noise_gain".to_owned(), s.noise_gain.to_string()),
                ("coefficient_l1".to_owned(), s.coefficient_l1.to_string()),
                (
                    "condition_number".to_owned(),
                    s.condition_number.to_string(),
                ),
                ("snapshot_digests".to_owned(), used_digests.join(",")),
                (
                    "snapshot_weights".to_owned(),
                    weights_text(&s.coefficients, &used),
                ),
            ])
        })
        .collect();
    let store = data.store.clone();
    let snaps: Vec<(String, i64)> = used
        .iter()
        .map(|&i| (plan.snapshots[i].digest.clone(), plan.snapshots[i].nimg))
        .collect();
    let checksums = data
        .db
        .blob_checksums(&snaps.iter().map(|s| s.0.clone()).collect::<Vec<_>>())
        .await?;
    let dtype = plan.dtype;
    let count = which.len();
    let writers = tokio::task::spawn_blocking(move || -> Result<Vec<BlobWriter>> {
        let mut inputs = Vec::with_capacity(snaps.len());
        for ((digest_hex, nimg), checksum) in snaps.iter().zip(&checksums) {
            let digest: Digest = digest_hex.parse()?;
            let mut file = store.open_blob(&digest)?;
            let len = file
                .metadata()
                .map_err(|e| Error::io(format!("reading blob {digest}"), e))?
                .len();
            let header = read_header(&mut BufReader::new(&mut file), len, digest_hex)?;
            inputs.push(Input {
                digest,
                header,
                nimg: *nimg as u64,
                checksum: checksum.as_deref().map(str::parse).transpose()?,
            });
        }
        let mut writers = (0..count)
            .map(|_| {
                Ok(BufWriter::with_capacity(
                    1 << 20,
                    store.writer()?.with_early_writeback(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        {
            let mut outs: Vec<&mut (dyn std::io::Write + Send)> = writers
                .iter_mut()
                .map(|w| w as &mut (dyn std::io::Write + Send))
                .collect();
            let options = Options {
                verify,
                progress: &*progress,
            };
            materialize_with(
                &store, &inputs, &weights, dtype, &metadata, &mut outs, &options,
            )?;
        }
        writers
            .into_iter()
            .map(|w| {
                w.into_inner()
                    .map_err(|e| Error::io("writing a reconstruction", e.into_error()))
            })
            .collect()
    })
    .await
    .map_err(|e| Error::Database(format!("the materialization task failed: {e}")))??;

    let mut rows = Vec::with_capacity(count);
    for (writer, &t) in writers.into_iter().zip(&which) {
        let digest = writer.digest_so_far();
        let size = writer.len();
        let checksum = writer.checksum_so_far().to_hex();
        data.db
            .claim_blob(&digest.to_hex(), size, Some(&checksum))
            .await?;
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| Error::Database(format!("publishing a blob failed: {e}")))??;
        let target = &plan.targets[t];
        rows.push(NewReconstruction {
            id: target.id.clone(),
            run_id: plan.run.id,
            nimg: target.solution.nimg,
            sigma_rel: target.solution.sigma_rel,
            gamma: target.solution.gamma,
            dtype: dtype.as_str().to_owned(),
            digest: digest.to_hex(),
            byte_size: size,
            report: report(plan, target),
        });
    }
    data.db.record_reconstructions(&rows).await?;
    let mut stored = Vec::with_capacity(rows.len());
    for r in &rows {
        stored.push(
            data.db
                .reconstruction(&r.id)
                .await?
                .ok_or_else(|| Error::Database(format!("reconstruction {} vanished", r.id)))?,
        );
    }
    Ok(stored)
}

fn weights_text(coefficients: &[f64], used: &[usize]) -> String {
    used.iter()
        .map(|&i| format!("{:e}", coefficients[i]))
        .collect::<Vec<_>>()
        .join(",")
}

/// The stored reconstruction `id`, if its row exists and its blob is in the store (a row
/// whose blob was lost counts as missing, so it is computed again).
pub async fn stored(data: &DataDir, id: &str) -> Result<Option<ReconstructionRow>> {
    match data.db.reconstruction(id).await? {
        Some(row) if data.store.contains(&row.digest.parse()?) => Ok(Some(row)),
        _ => Ok(None),
    }
}
