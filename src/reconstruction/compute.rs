//! Computing planned reconstructions: one materialization pass over the snapshots for all
//! missing targets, published into the store and recorded in the index.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter};
use std::sync::Arc;

use super::plan::{report, Plan};
use super::report::{ClampedTensor, QualityReport};
use crate::app::DataDir;
use crate::db::{NewReconstruction, ReconstructionRow};
use crate::error::{blocking, Error, Result};
use crate::format::read_header;
use crate::materialize::{materialize_with, Buffers, Input, Options, OutDtype, OutOfRange};
use crate::phema::{Warning, WarningCode};
use crate::store::{BlobStore, BlobWriter, Digest};

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
/// Targets with the same id are computed once. Runs the pass on the blocking pool;
/// `progress` is called with the input bytes read as the pass goes.
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
    let snapshots: Vec<(String, i64)> = used
        .iter()
        .map(|&i| (plan.snapshots[i].digest.clone(), plan.snapshots[i].nimg))
        .collect();
    let digests: Vec<String> = snapshots.iter().map(|s| s.0.clone()).collect();
    let pass = PassInputs {
        checksums: data.db.blob_checksums(&digests).await?,
        snapshots,
        weights: which
            .iter()
            .map(|&t| {
                let c = &plan.targets[t].solution.coefficients;
                used.iter().map(|&i| c[i]).collect()
            })
            .collect(),
        metadata: which
            .iter()
            .map(|&t| output_metadata(plan, t, &used))
            .collect(),
        dtype: plan.dtype,
        clamp: plan.clamp,
        buffers: plan.buffers,
        verify,
    };
    let store = data.store.clone();
    let (writers, clamped) = blocking("the materialization pass", move || {
        pass.run(&store, &*progress)
    })
    .await?;
    let rows = publish(data, plan, &which, writers, &clamped).await?;
    data.db.record_reconstructions(&rows).await?;
    let mut stored = Vec::with_capacity(rows.len());
    for r in &rows {
        stored.push(
            data.db
                .reconstruction(&r.id)
                .await?
                .ok_or_else(|| Error::Index(format!("reconstruction {} vanished", r.id)))?,
        );
    }
    Ok(stored)
}

/// The `__metadata__` of target `t`'s output: what it is, the solver's figures, and the
/// snapshots it weighs (`used`) with their weights.
fn output_metadata(plan: &Plan, t: usize, used: &[usize]) -> BTreeMap<String, String> {
    let target = &plan.targets[t];
    let s = &target.solution;
    let digests: Vec<&str> = used
        .iter()
        .map(|&i| plan.snapshots[i].digest.as_str())
        .collect();
    let weights: Vec<String> = used
        .iter()
        .map(|&i| format!("{:e}", s.coefficients[i]))
        .collect();
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
        ("snapshot_digests".to_owned(), digests.join(",")),
        ("snapshot_weights".to_owned(), weights.join(",")),
    ])
}

/// Everything the blocking pass needs, owned so it can move to the blocking pool.
struct PassInputs {
    /// (digest, nimg) of each snapshot read.
    snapshots: Vec<(String, i64)>,
    /// Their recorded read checksums, in the same order.
    checksums: Vec<Option<String>>,
    /// Per target, one weight per snapshot.
    weights: Vec<Vec<f64>>,
    /// Per target, the output's metadata.
    metadata: Vec<BTreeMap<String, String>>,
    dtype: OutDtype,
    clamp: bool,
    buffers: Buffers,
    verify: bool,
}

impl PassInputs {
    /// Reads the snapshots' headers and runs the materialization into one unpublished blob
    /// per target; returns them with the tensors whose values were clamped. When something
    /// was clamped, the pass runs a second time with each output's metadata naming what (the
    /// header, metadata included, is written before the data, so the first pass cannot).
    fn run(
        mut self,
        store: &BlobStore,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Vec<BlobWriter>, Vec<OutOfRange>)> {
        let (writers, clamped) = self.pass(store, progress)?;
        if clamped.is_empty() {
            return Ok((writers, clamped));
        }
        drop(writers);
        for (k, meta) in self.metadata.iter_mut().enumerate() {
            let mine: Vec<String> = clamped
                .iter()
                .filter(|c| c.target == k)
                .map(|c| format!("{}:{}:{:e}", c.tensor, c.elements, c.max_abs))
                .collect();
            if !mine.is_empty() {
                meta.insert(
                    "clamped_out_of_range".to_owned(),
                    format!(
                        "values beyond {}'s range clamped to its largest finite value \
                         (tensor:elements:largest magnitude): {}",
                        self.dtype.as_str(),
                        mine.join(",")
                    ),
                );
            }
        }
        let (writers, again) = self.pass(store, &|_| {})?;
        debug_assert_eq!(again, clamped);
        Ok((writers, clamped))
    }

    /// One materialization pass.
    fn pass(
        &self,
        store: &BlobStore,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Vec<BlobWriter>, Vec<OutOfRange>)> {
        let mut inputs = Vec::with_capacity(self.snapshots.len());
        for ((digest_hex, nimg), checksum) in self.snapshots.iter().zip(&self.checksums) {
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
        let mut writers = (0..self.weights.len())
            .map(|_| {
                Ok(BufWriter::with_capacity(
                    1 << 20,
                    store.writer()?.with_early_writeback(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let clamped = {
            let mut outs: Vec<&mut (dyn std::io::Write + Send)> = writers
                .iter_mut()
                .map(|w| w as &mut (dyn std::io::Write + Send))
                .collect();
            let options = Options {
                verify: self.verify,
                progress,
                clamp: self.clamp,
                buffers: self.buffers,
            };
            materialize_with(
                store,
                &inputs,
                &self.weights,
                self.dtype,
                &self.metadata,
                &mut outs,
                &options,
            )?
            .clamped
        };
        let writers = writers
            .into_iter()
            .map(|w| {
                w.into_inner()
                    .map_err(|e| Error::io("writing a reconstruction", e.into_error()))
            })
            .collect::<Result<_>>()?;
        Ok((writers, clamped))
    }
}

/// Claims and publishes each target's blob; returns the rows to record, whose reports list
/// what was clamped (`clamped` is per pass target, in `which` order).
async fn publish(
    data: &DataDir,
    plan: &Plan,
    which: &[usize],
    writers: Vec<BlobWriter>,
    clamped: &[OutOfRange],
) -> Result<Vec<NewReconstruction>> {
    let mut rows = Vec::with_capacity(which.len());
    for (k, (writer, &t)) in writers.into_iter().zip(which).enumerate() {
        let digest = writer.digest_so_far();
        let size = writer.len();
        let checksum = writer.checksum_so_far().to_hex();
        data.db
            .claim_blob(&digest.to_hex(), size, Some(&checksum))
            .await?;
        blocking("publishing a reconstruction", move || writer.finish()).await?;
        let target = &plan.targets[t];
        rows.push(NewReconstruction {
            id: target.id.clone(),
            run_id: plan.run.id,
            nimg: target.solution.nimg,
            sigma_rel: target.solution.sigma_rel,
            gamma: target.solution.gamma,
            dtype: plan.dtype.as_str().to_owned(),
            digest: digest.to_hex(),
            byte_size: size,
            report: with_clamped(
                report(plan, target),
                plan.dtype,
                clamped.iter().filter(|c| c.target == k),
            ),
        });
    }
    Ok(rows)
}

/// `report` with the tensors whose values were clamped (`clamped`) listed under `clamped`
/// and announced in its warnings; unchanged when there are none.
fn with_clamped<'a>(
    mut report: QualityReport,
    dtype: OutDtype,
    clamped: impl Iterator<Item = &'a OutOfRange>,
) -> QualityReport {
    report.clamped = clamped
        .map(|c| ClampedTensor {
            tensor: c.tensor.clone(),
            elements: c.elements,
            max_abs: c.max_abs,
        })
        .collect();
    if !report.clamped.is_empty() {
        report.warnings.push(Warning {
            code: WarningCode::ClampedOutOfRange,
            message: format!(
                "{} tensor(s) had values beyond {}'s range, clamped to its largest finite value",
                report.clamped.len(),
                dtype.as_str()
            ),
        });
    }
    report
}

/// The stored reconstruction `id`, if its row exists and its blob file is present, without
/// reading the blob: for listings, and for downloads, which check what they send as they
/// send it.
pub async fn listed(data: &DataDir, id: &str) -> Result<Option<ReconstructionRow>> {
    match data.db.reconstruction(id).await? {
        Some(row) if data.store.contains(&row.digest.parse()?) => Ok(Some(row)),
        _ => Ok(None),
    }
}

/// The stored reconstruction `id`, if its row exists and its blob is in the store, intact.
/// The blob is checked ([`crate::store::BlobStore::check_intact`]: a full read against the
/// recorded checksum the first time, then remembered while the file is unchanged) before it
/// is handed out as a cached result; a row whose blob was lost or damaged counts as missing,
/// so it is computed again (and the recomputed file replaces the damaged one). The damage is
/// logged; `hindsight verify` reports it until then.
pub async fn stored(data: &DataDir, id: &str) -> Result<Option<ReconstructionRow>> {
    let Some(row) = listed(data, id).await? else {
        return Ok(None);
    };
    let digest: crate::store::Digest = row.digest.parse()?;
    if data.store.known_intact(&digest) {
        return Ok(Some(row));
    }
    let checksum = data
        .db
        .blob_checksums(std::slice::from_ref(&row.digest))
        .await?
        .pop()
        .flatten()
        .and_then(|c| c.parse::<crate::store::Checksum>().ok());
    let store = data.store.clone();
    let status = blocking("checking a stored reconstruction", move || {
        store.check_intact(&digest, checksum.as_ref())
    })
    .await?;
    match status {
        crate::store::BlobStatus::Intact => Ok(Some(row)),
        crate::store::BlobStatus::Missing => {
            tracing::warn!(reconstruction = id, digest = %digest, "a stored reconstruction's blob is missing; computing it again");
            Ok(None)
        }
        crate::store::BlobStatus::Corrupt { actual } => {
            tracing::error!(reconstruction = id, digest = %digest, actual = %actual, "a stored reconstruction's blob is damaged; computing it again");
            Ok(None)
        }
    }
}
