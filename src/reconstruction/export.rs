//! Handing reconstructions out as files: one safetensors file per target in a directory
//! (`hindsight reconstruct`, the demo), computing whatever the store does not hold yet.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::compute::{input_bytes, materialize_targets, stored};
use super::plan::{file_name, plan, OutputOptions};
use crate::app::DataDir;
use crate::db::ReconstructionRow;
use crate::error::{blocking, Error, Result};
use crate::materialize::{Buffers, OutDtype};
use crate::phema::request::TargetSpec;
use crate::phema::TargetSolution;
use crate::progress::Progress;
use crate::store::BlobStore;

/// How [`reconstruct_to_dir`] reads, caches and writes.
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    /// Check the snapshots' checksums as they are read (the default).
    pub verify: bool,
    /// Compute even when the store already holds the result.
    pub recompute: bool,
    /// Copy the files out of the store instead of hard-linking them.
    pub copy: bool,
    /// Clamp values beyond the output type's range (f16's ±65504) instead of refusing them.
    pub clamp: bool,
    /// What happens to the float tensors the snapshots declare as buffers.
    pub buffers: Buffers,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            verify: true,
            recompute: false,
            copy: false,
            clamp: false,
            buffers: Buffers::Average,
        }
    }
}

/// What [`reconstruct_to_dir`] did.
#[derive(Clone, Debug)]
pub struct Exported {
    /// The solver's answer and quality report per target, in request order.
    pub solutions: Vec<TargetSolution>,
    /// The files written, in request order (`<run>-<nimg:010>-<σ:.3f>.safetensors`).
    pub files: Vec<PathBuf>,
    /// Targets computed now.
    pub computed: usize,
    /// Targets the store already held.
    pub reused: usize,
    /// Files that are hard links to the store's read-only blobs (the others are copies).
    pub linked: usize,
    /// The stored report of each target, in request order (the solver's figures, the
    /// weighted snapshots, and `clamped` tensors when values were clamped).
    pub reports: Vec<super::report::QualityReport>,
}

/// Solves `targets` over the stored run `run`, materializes what the store does not hold yet
/// (one pass for all of them; `progress` counts the bytes it reads), and puts one file per
/// target into `out_dir` (created if missing).
///
/// Each file is a hard link to the (read-only, durable) blob when `out_dir` is on the store's
/// file system and `copy` is off, else a copy that is staged, made durable, and only then
/// given its name. Either way a name never points at a partial file, and the directory is
/// synced at the end.
///
/// Errors: those of [`plan`](super::plan()) (unknown run, bad targets), two targets that
/// round to the same file name, and failures reading the store or writing `out_dir`.
pub async fn reconstruct_to_dir(
    data: &DataDir,
    run: &str,
    targets: Vec<TargetSpec>,
    dtype: OutDtype,
    out_dir: &Path,
    options: ExportOptions,
    progress: Arc<dyn Progress>,
) -> Result<Exported> {
    let output = OutputOptions {
        dtype,
        clamp: options.clamp,
        buffers: options.buffers,
    };
    let plan = plan(&data.db, run, targets, output).await?;
    let names: Vec<String> = plan
        .targets
        .iter()
        .map(|t| file_name(run, t.solution.nimg as i64, t.solution.sigma_rel))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
    if distinct.len() != names.len() {
        return Err(Error::invalid(
            "targets",
            "two targets round to the same file name (sigma_rel to 3 decimals); ask for each \
             once",
        ));
    }
    let mut rows = Vec::with_capacity(plan.targets.len());
    let mut missing = Vec::new();
    for (t, target) in plan.targets.iter().enumerate() {
        let found = if options.recompute {
            None
        } else {
            stored(data, &target.id).await?
        };
        if found.is_none() {
            missing.push(t);
        }
        rows.push(found);
    }
    if !missing.is_empty() {
        progress.set_length(input_bytes(&plan, &missing));
        progress.set_message(format!("{} target(s)", missing.len()));
        let ticker = progress.clone();
        let made = materialize_targets(
            data,
            &plan,
            &missing,
            options.verify,
            Arc::new(move |n| ticker.inc(n)),
        )
        .await?;
        for &t in &missing {
            let id = &plan.targets[t].id;
            rows[t] = made.iter().find(|r| &r.id == id).cloned();
        }
    }
    let rows: Vec<ReconstructionRow> = rows
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Index("a reconstruction was not recorded".into())))
        .collect::<Result<_>>()?;
    let reports = rows.iter().map(|r| r.report.clone()).collect();
    let (store, dir, copy) = (data.store.clone(), out_dir.to_owned(), options.copy);
    let (files, linked) = blocking("writing reconstructions into a directory", move || {
        export_files(&store, &rows, &names, &dir, copy)
    })
    .await?;
    Ok(Exported {
        reused: files.len() - missing.len(),
        computed: missing.len(),
        solutions: plan.targets.into_iter().map(|t| t.solution).collect(),
        files,
        linked,
        reports,
    })
}

/// Puts each row's blob into `dir` under its name (hard link, else durable copy; staged and
/// renamed), then syncs `dir`. Returns the paths and how many are hard links.
fn export_files(
    store: &BlobStore,
    rows: &[ReconstructionRow],
    names: &[String],
    dir: &Path,
    copy: bool,
) -> Result<(Vec<PathBuf>, usize)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut files = Vec::with_capacity(rows.len());
    let mut linked = 0;
    for (row, name) in rows.iter().zip(names) {
        let digest = row.digest.parse()?;
        let blob = store.path(&digest);
        let target = dir.join(name);
        let staged = dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&staged);
        if !copy && std::fs::hard_link(&blob, &staged).is_ok() {
            linked += 1;
        } else {
            let mut tmp = tempfile::Builder::new()
                .prefix(".reconstruction-")
                .tempfile_in(dir)
                .map_err(|e| Error::io(format!("creating a file in {}", dir.display()), e))?;
            let mut source = store.open_blob(&digest)?;
            std::io::copy(&mut source, tmp.as_file_mut())
                .map_err(|e| Error::io(format!("copying {}", blob.display()), e))?;
            tmp.as_file()
                .sync_all()
                .map_err(|e| Error::io(format!("syncing a copy in {}", dir.display()), e))?;
            tmp.persist(&staged)
                .map_err(|e| Error::io(format!("naming {}", staged.display()), e.error))?;
        }
        std::fs::rename(&staged, &target)
            .map_err(|e| Error::io(format!("naming {}", target.display()), e))?;
        files.push(target);
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    Ok((files, linked))
}
