//! Importing a directory of snapshot files into a run (`hindsight import`, the demo).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::edm2::{ingest_edm2, parse_edm2_file_name, Edm2File};
use super::ema_pytorch::{ingest_ema_pytorch, EmaPytorchSettings};
use super::file::{ingest_file, IngestOptions, Ingested};
use super::resolve::{slot_of, Hints};
use super::run::RunForIngest;
use crate::app::DataDir;
use crate::db::Run;
use crate::error::{Error, Result};
use crate::phema::sigma_rel_to_gamma;
use crate::progress::Progress;

/// What a directory holds, with the format's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// safetensors files named the EDM2 way or carrying `nimg` and `sigma_rel` (or `gamma`)
    /// in their `__metadata__`.
    Safetensors,
    /// ema-pytorch `PostHocEMA` checkpoint folders (`{index}.{step}.pt`).
    EmaPytorch(EmaPytorchSettings),
    /// EDM2's own files (NVlabs/edm2): a folder's snapshot pickles
    /// `<prefix>-<kimg:07d>-<std:.3f>.pkl` except `phema-*` (reconstructions, imported only when
    /// given as the file), or, in a folder without such pickles, the EMAs of its
    /// `training-state-<kimg:07d>.pt` files (one fp32 snapshot per std; the pickles at the same
    /// time hold the same EMAs in fp16, so the two do not share a run). A single file of either
    /// kind may be given. Time: `nimg = (kimg·1000 + 999) // 1024 · 1024`, as EDM2's
    /// `reconstruct_phema.py` maps names back.
    Edm2,
}

impl Source {
    /// An ema-pytorch source, validated: every width a valid σ_rel, none twice, and a
    /// positive number of images per step and of calls per update. Errors name
    /// `sigma_rels[i]`, `images_per_step` or `update_every`.
    pub fn ema_pytorch(
        sigma_rels: &[f64],
        images_per_step: u64,
        update_every: u64,
    ) -> Result<Self> {
        for (i, &v) in sigma_rels.iter().enumerate() {
            sigma_rel_to_gamma(v, &format!("sigma_rels[{i}]"))?;
            if sigma_rels[..i].contains(&v) {
                return Err(Error::invalid(
                    format!("sigma_rels[{i}]"),
                    format!("{v} is listed twice"),
                ));
            }
        }
        if sigma_rels.is_empty() {
            return Err(Error::invalid("sigma_rels", "at least one width is needed"));
        }
        if images_per_step == 0 {
            return Err(Error::invalid("images_per_step", "must be positive"));
        }
        if update_every == 0 {
            return Err(Error::invalid("update_every", "must be positive"));
        }
        Ok(Source::EmaPytorch(EmaPytorchSettings {
            sigma_rels: sigma_rels.to_vec(),
            images_per_step,
            update_every,
        }))
    }

    /// The file extension this source reads: `safetensors`, `pt`, or for EDM2 `pkl` (its
    /// snapshot pickles; its training states are `.pt`).
    pub fn extension(&self) -> &'static str {
        match self {
            Source::Safetensors => "safetensors",
            Source::EmaPytorch(_) => "pt",
            Source::Edm2 => "pkl",
        }
    }
}

/// What [`import_dir`] did.
#[derive(Debug)]
pub struct ImportReport {
    /// Snapshots stored new (one per file, except an EDM2 training state: one per EMA).
    pub inserted: usize,
    /// Snapshots already stored (a re-import).
    pub present: usize,
    /// Files refused, by name, with the reason.
    pub refused: Vec<(String, Error)>,
    /// Bytes of all the files.
    pub bytes: u64,
    /// Wall time, seconds.
    pub secs: f64,
    /// The run did not exist before, nothing was stored, and it was removed again.
    pub run_removed: bool,
}

/// Files ingested at once: one file's fsync overlaps the next one's copy.
const IN_FLIGHT: usize = 3;

/// Imports every `.safetensors` (or, for ema-pytorch, `.pt`) file of `dir` into the run
/// `run_name` (created if new). Each file is validated and stored on its own: a refused file
/// is listed in the report (and passed to `progress.note`) and does not stop the others.
/// `progress` counts bytes.
///
/// The outcome does not depend on timing: while the run has no manifest, files are ingested
/// one at a time in name order, so the first file (by name) that is accepted defines a new
/// run's manifest and every later file is checked against it; then the rest go a few at a
/// time, except that files claiming a (nimg, σ_rel) slot an earlier file of this import also
/// claims are ingested last, in name order (the first file of a slot is stored; a later one
/// is a no-op when identical, a conflict otherwise).
///
/// `dir` may also be a single file of the source's extension.
///
/// Errors: `dir` unreadable or without a matching file, an invalid run name, or an index or
/// store failure.
pub async fn import_dir(
    data: &DataDir,
    dir: &Path,
    run_name: &str,
    source: &Source,
    options: IngestOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImportReport> {
    let files = match source {
        Source::Edm2 => edm2_files(dir)?,
        _ => matching_files(dir, source.extension())?,
    };
    let bytes: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.set_length(bytes);
    let target = RunForIngest::open(&data.db, run_name).await?;
    let run = target.get().expect("open creates the run").clone();
    let start = Instant::now();
    let mut import = Import {
        data,
        run: &run,
        source,
        options,
        progress: progress.clone(),
        report: ImportReport {
            inserted: 0,
            present: 0,
            refused: Vec::new(),
            bytes,
            secs: 0.0,
            run_removed: false,
        },
    };
    let mut queue = files.into_iter();
    // Until the run has a manifest: one at a time, in name order.
    while data.db.manifest(run.id).await?.is_empty() {
        let Some(path) = queue.next() else { break };
        let result = ingest_one(data, &run, &path, source, options, progress.clone()).await;
        import.record(&path, result);
    }
    let (now, later) = split_shared_slots(queue.collect(), source);
    import.concurrently(now).await?;
    for path in later {
        let result = ingest_one(data, &run, &path, source, options, progress.clone()).await;
        import.record(&path, result);
    }
    let mut report = import.report;
    report.refused.sort_by(|a, b| a.0.cmp(&b.0));
    report.secs = start.elapsed().as_secs_f64();
    if !report.refused.is_empty() {
        report.run_removed = target.abandon(&data.db).await?;
    }
    Ok(report)
}

/// Files (in name order) whose slot no earlier file of the list claims, and the others.
/// Only safetensors files are looked into; ema-pytorch file names are their slots.
fn split_shared_slots(files: Vec<PathBuf>, source: &Source) -> (Vec<PathBuf>, Vec<PathBuf>) {
    if *source != Source::Safetensors {
        return (files, Vec::new());
    }
    let mut seen = std::collections::HashSet::new();
    files
        .into_iter()
        .partition(|path| slot_of(path).is_none_or(|slot| seen.insert(slot)))
}

/// An import in progress: where to, and what happened so far.
struct Import<'a> {
    data: &'a DataDir,
    run: &'a Run,
    source: &'a Source,
    options: IngestOptions,
    progress: Arc<dyn Progress>,
    report: ImportReport,
}

impl Import<'_> {
    /// Counts one file's outcome (and notes a refusal).
    fn record(&mut self, path: &Path, result: Result<Vec<Ingested>>) {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        match result {
            Ok(done) => {
                for r in done {
                    if r.inserted {
                        self.report.inserted += 1;
                    } else {
                        self.report.present += 1;
                    }
                }
            }
            Err(e) => {
                self.progress
                    .note(&format!("refused {name}: {}", e.chain_text()));
                self.report.refused.push((name, e));
            }
        }
    }

    /// Ingests `files` [`IN_FLIGHT`] at a time.
    async fn concurrently(&mut self, files: Vec<PathBuf>) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut queue = files.into_iter();
        loop {
            while tasks.len() < IN_FLIGHT {
                let Some(path) = queue.next() else { break };
                let (data, run, source, progress) = (
                    self.data.clone(),
                    self.run.clone(),
                    self.source.clone(),
                    self.progress.clone(),
                );
                let options = self.options;
                tasks.spawn(async move {
                    let result = ingest_one(&data, &run, &path, &source, options, progress).await;
                    (path, result)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                return Ok(());
            };
            let (path, result) = joined.map_err(|e| Error::Task {
                what: "an import task".into(),
                reason: e.to_string(),
            })?;
            self.record(&path, result);
        }
    }
}

/// The files of `dir` with extension `ext`, sorted by name; `dir` may also be one such file.
fn matching_files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        if dir.extension().is_some_and(|e| e == ext) {
            return Ok(vec![dir.to_owned()]);
        }
        return Err(Error::invalid(
            dir.display().to_string(),
            format!("is not a .{ext} file; give a .{ext} file or a folder of them"),
        ));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::invalid(
            dir.display().to_string(),
            format!("no .{ext} files"),
        ));
    }
    Ok(files)
}

/// The EDM2 files of `dir` (see [`Source::Edm2`]), sorted by name; `dir` may also be one.
fn edm2_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let kind = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_edm2_file_name)
    };
    let expected = "EDM2 snapshot pickles (<prefix>-<kimg>-<std>.pkl, e.g. \
                    network-snapshot-0008388-0.050.pkl) or training-state-<kimg>.pt files";
    if dir.is_file() {
        if kind(dir).is_some() {
            return Ok(vec![dir.to_owned()]);
        }
        return Err(Error::invalid(
            dir.display().to_string(),
            format!("is not one of EDM2's files; give one of its {expected}, or a folder of them"),
        ));
    }
    let mut files: Vec<(PathBuf, Edm2File)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter_map(|p| kind(&p).map(|k| (p, k)))
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let is_reconstruction = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("phema-"))
    };
    let pickles: Vec<PathBuf> = files
        .iter()
        .filter(|(p, k)| matches!(k, Edm2File::Pickle(..)) && !is_reconstruction(p))
        .map(|(p, _)| p.clone())
        .collect();
    if !pickles.is_empty() {
        return Ok(pickles);
    }
    let states: Vec<PathBuf> = files
        .iter()
        .filter(|(_, k)| matches!(k, Edm2File::TrainingState(_)))
        .map(|(p, _)| p.clone())
        .collect();
    if states.is_empty() {
        return Err(Error::invalid(
            dir.display().to_string(),
            format!(
                "no {expected} (phema-*.pkl reconstructions are imported only when given as \
                 the file)"
            ),
        ));
    }
    Ok(states)
}

async fn ingest_one(
    data: &DataDir,
    run: &Run,
    path: &Path,
    source: &Source,
    options: IngestOptions,
    progress: Arc<dyn Progress>,
) -> Result<Vec<Ingested>> {
    match source {
        Source::Safetensors => ingest_file(
            &data.db,
            &data.store,
            run,
            path,
            Hints::default(),
            options,
            move |delta| progress.inc(delta),
        )
        .await
        .map(|r| vec![r]),
        Source::EmaPytorch(settings) => {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let result =
                ingest_ema_pytorch(&data.db, &data.store, run, path, settings, options).await;
            progress.inc(size);
            result.map(|r| vec![r])
        }
        Source::Edm2 => {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let result = ingest_edm2(&data.db, &data.store, run, path, options).await;
            progress.inc(size);
            result
        }
    }
}
