//! `hindsight rebuild-index`: a new index from the snapshots in the store, when the old one is
//! lost or damaged (see [`crate::Error::IndexDamaged`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::file::{ingest_file, IngestOptions};
use super::resolve::Hints;
use crate::app::{DataDir, INDEX_FILE, REBUILD_MARKER, STORE_DIR};
use crate::db::Db;
use crate::db::Run;
use crate::error::{blocking, Error, Result};
use crate::format::read_header;
use crate::phema::RealisedProfile;
use crate::store::{BlobStore, Digest, JournalRecord};

/// What [`rebuild_index`] did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RebuildReport {
    /// Where the old index (and its -wal, -shm files) went, if there was one.
    pub moved_aside: Option<PathBuf>,
    /// Runs recreated, with their snapshot counts.
    pub runs: BTreeMap<String, usize>,
    /// Blobs that were not snapshots (reconstructions, reference statistics, sweep
    /// features and grids), left unindexed: `gc` removes them; reconstructions are
    /// recomputed on demand, reference statistics must be made again.
    pub other_blobs: usize,
    /// Blobs that looked like snapshots but were refused, one line each.
    pub refused: Vec<String>,
    /// Journal lines that could not be read (damaged): the snapshots they recorded may be
    /// missing from the rebuilt index, or in a `recovered-N` run.
    pub unreadable_journal_lines: usize,
    /// Digests of the blobs counted in `other_blobs`.
    pub other_digests: Vec<String>,
}

/// Rebuilds the index of the data directory at `path` from the blobs in its store.
///
/// The current index (if any) is first moved aside to `index.sqlite.damaged-<unix time>`
/// (with its `-wal` and `-shm` files), never deleted. The store's journal
/// (`store/journal.jsonl`, one line per snapshot recorded or deleted) is replayed first:
/// every journaled snapshot whose blob is present goes back into its run with its time,
/// width and update rule. Then every other blob that is a safetensors file
/// whose `__metadata__` gives a training time and a width (`nimg`, and `sigma_rel` or
/// `gamma`) and that is not a reconstruction becomes a snapshot again, through the same
/// validation as `import`. Snapshots go into runs by their tensor manifest (names, dtypes,
/// shapes): a manifest that a stored reconstruction's `run` metadata names gets that run's
/// name, the others `recovered-1`, `recovered-2`, … in order of their first digest. Run
/// metadata, reconstructions, reference statistics and sweeps are not recoverable from the
/// blobs and are counted in `other_blobs`.
///
/// Errors: the index is healthy (nothing to rebuild: `force` rebuilds anyway), or I/O.
pub async fn rebuild_index(path: &Path, force: bool) -> Result<RebuildReport> {
    // Nobody else may have the directory open (a server would keep writing into the index
    // that is moved aside).
    let lock = crate::app::lock_data_dir(path, true)?;
    if !force {
        let probe = lock
            .try_clone()
            .map_err(|e| Error::io("locking the data directory", e))?;
        match DataDir::open_locked(path, probe).await {
            Ok(_) => {
                return Err(Error::invalid(
                    "index",
                    format!(
                        "{} opens and passes SQLite's integrity check: nothing to rebuild \
                         (--force rebuilds it anyway, moving it aside first)",
                        path.join(INDEX_FILE).display()
                    ),
                ))
            }
            Err(Error::IndexDamaged { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // Until the rebuild ends, the marker keeps every command out: a rebuild that fails half
    // way must not leave an index that looks healthy (gc would delete what it lacks).
    let marker = path.join(REBUILD_MARKER);
    std::fs::write(&marker, b"hindsight rebuild-index in progress\n")
        .and_then(|()| std::fs::File::open(path)?.sync_all())
        .map_err(|e| Error::io(format!("writing {}", marker.display()), e))?;
    let index = path.join(INDEX_FILE);
    let mut report = RebuildReport::default();
    if index.exists() || index.with_extension("sqlite-wal").exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = path.join(format!("{INDEX_FILE}.damaged-{stamp}"));
        for suffix in ["", "-wal", "-shm"] {
            let from = path.join(format!("{INDEX_FILE}{suffix}"));
            if from.exists() {
                let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                std::fs::rename(&from, &to)
                    .map_err(|e| Error::io(format!("moving {} aside", from.display()), e))?;
            }
        }
        report.moved_aside = Some(aside);
    }
    let db = Db::open(&index).await?;
    let store = BlobStore::open(path.join(STORE_DIR))?;
    let data = DataDir::assemble(path, db, store.clone(), lock);
    rebuild_into(&data, &store, &mut report).await?;
    std::fs::remove_file(&marker)
        .and_then(|()| std::fs::File::open(path)?.sync_all())
        .map_err(|e| Error::io(format!("removing {}", marker.display()), e))?;
    tracing::warn!(
        runs = report.runs.len(),
        snapshots = report.runs.values().sum::<usize>(),
        other_blobs = report.other_blobs,
        "rebuilt the index of {}",
        path.display()
    );
    Ok(report)
}

/// The run named `name` in the new index, created if missing; `None` (with the reason in
/// `report.refused`) when the name is not usable any more.
async fn run_for(data: &DataDir, name: &str, report: &mut RebuildReport) -> Result<Option<Run>> {
    if let Some(run) = data.db.run(name).await? {
        return Ok(Some(run));
    }
    match data
        .db
        .create_run(
            name,
            "recovered by hindsight rebuild-index",
            &serde_json::json!({}),
        )
        .await
    {
        Ok(run) => Ok(Some(run)),
        Err(e @ (Error::InvalidInput { .. } | Error::Conflict(_))) => {
            report
                .refused
                .push(format!("run {name:?}: {}", e.chain_text()));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn rebuild_into(data: &DataDir, store: &BlobStore, report: &mut RebuildReport) -> Result<()> {
    let found = {
        let store = store.clone();
        blocking("reading the store's headers", move || classify(&store)).await?
    };
    // The journal: snapshots by (run, digest, nimg, σ_rel), minus the deleted ones.
    let journal = store.journal()?;
    report.unreadable_journal_lines += journal.unreadable;
    let mut journaled: Vec<Journaled> = Vec::new();
    for record in journal.records {
        match record {
            JournalRecord::Snapshot {
                run,
                digest,
                nimg,
                sigma_rel,
                gamma: _,
                profile,
            } => journaled.push(Journaled {
                run,
                digest,
                nimg,
                sigma_rel,
                profile,
            }),
            JournalRecord::Delete {
                run,
                digest,
                nimg,
                sigma_rel,
            } => journaled.retain(|r| {
                !(r.run == run
                    && r.digest == digest
                    && r.nimg == nimg
                    && crate::db::same_width(r.sigma_rel, sigma_rel))
            }),
        }
    }
    let mut covered = std::collections::HashSet::new();
    for record in journaled {
        let digest = record.digest;
        if !store.contains(&digest) {
            report.refused.push(format!(
                "journal: snapshot {} of run {:?} is not in the store",
                digest, record.run
            ));
            continue;
        }
        let Some(run) = run_for(data, &record.run, report).await? else {
            continue;
        };
        let hints = Hints {
            nimg: Some(record.nimg),
            width: Some(crate::phema::Width::SigmaRel(record.sigma_rel)),
            profile: record.profile,
        };
        match ingest_file(
            &data.db,
            &data.store,
            &run,
            &store.path(&digest),
            hints,
            IngestOptions::default(),
            |_| {},
        )
        .await
        {
            Ok(done) => {
                covered.insert(digest.to_hex());
                // A snapshot journaled twice (a re-import, an earlier rebuild) counts once.
                *report.runs.entry(record.run).or_default() += usize::from(done.inserted);
            }
            Err(e) => report.refused.push(e.chain_text()),
        }
    }
    // Names for manifests, from reconstructions that say which run they came from.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (manifest, run) in &found.reconstruction_runs {
        names.entry(manifest.clone()).or_insert_with(|| run.clone());
    }
    let mut numbered = 0;
    for (shapes, files) in found.snapshots.values() {
        let files: Vec<&PathBuf> = files
            .iter()
            .filter(|f| {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                !covered.contains(name)
            })
            .collect();
        if files.is_empty() {
            continue;
        }
        let name = match names.get(shapes) {
            Some(n) if !report.runs.contains_key(n) => n.clone(),
            _ => {
                numbered += 1;
                format!("recovered-{numbered}")
            }
        };
        let Some(run) = run_for(data, &name, report).await? else {
            continue;
        };
        let mut n = 0;
        for file in files {
            match ingest_file(
                &data.db,
                &data.store,
                &run,
                file.as_path(),
                Hints::default(),
                IngestOptions::default(),
                |_| {},
            )
            .await
            {
                Ok(done) => n += usize::from(done.inserted),
                Err(e) => report.refused.push(e.chain_text()),
            }
        }
        report.runs.insert(name, n);
    }
    // Runs that got nothing (every snapshot refused) are not kept.
    for run in data.db.runs().await? {
        if run.snapshots == 0 {
            if let Some(r) = data.db.run(&run.name).await? {
                data.db.delete_run_if_empty(r.id).await?;
            }
            report.runs.remove(&run.name);
        }
    }
    // What the new index does not know, which `gc` would delete: every blob no snapshot uses.
    let mut known = std::collections::HashSet::new();
    for run in data.db.runs().await? {
        if let Some(r) = data.db.run(&run.name).await? {
            known.extend(data.db.snapshots(r.id).await?.into_iter().map(|s| s.digest));
        }
    }
    report.other_digests = store
        .list()?
        .into_iter()
        .map(|d| d.to_hex())
        .filter(|d| !known.contains(d))
        .collect();
    report.other_blobs = report.other_digests.len();
    Ok(())
}

/// A snapshot the journal recorded and did not delete since.
struct Journaled {
    run: String,
    digest: Digest,
    nimg: u64,
    sigma_rel: f64,
    profile: Option<RealisedProfile>,
}

/// The store's blobs, sorted into snapshots (by manifest) and the rest.
#[derive(Default)]
struct Found {
    /// By full manifest (names, dtypes, shapes): the manifest's names and shapes, and the files.
    snapshots: BTreeMap<String, (String, Vec<PathBuf>)>,
    reconstruction_runs: Vec<(String, String)>,
    /// Digests of the blobs that are neither (or, without metadata, snapshots the journal
    /// may know).
    others: Vec<String>,
}

fn classify(store: &BlobStore) -> Result<Found> {
    let mut found = Found::default();
    for digest in store.list()? {
        let path = store.path(&digest);
        let header = std::fs::File::open(&path)
            .and_then(|f| Ok((f.metadata()?.len(), f)))
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))
            .and_then(|(len, f)| {
                read_header(&mut std::io::BufReader::new(f), len, &digest.to_hex())
            });
        let Ok(header) = header else {
            found.others.push(digest.to_hex());
            continue;
        };
        // Names and shapes: a reconstruction may be f32 where its snapshots are f16.
        let shapes: Vec<String> = {
            let mut t: Vec<String> = header
                .tensors
                .iter()
                .map(|t| format!("{}{:?}", t.name, t.shape))
                .collect();
            t.sort();
            t
        };
        let shapes = shapes.join(";");
        let meta = &header.metadata;
        if meta.contains_key("hindsight_reconstruction") {
            if let Some(run) = meta.get("run") {
                found.reconstruction_runs.push((shapes, run.clone()));
            }
            found.others.push(digest.to_hex());
        } else if meta.contains_key("nimg")
            && (meta.contains_key("sigma_rel") || meta.contains_key("gamma"))
            && !header.tensors.is_empty()
        {
            let mut full: Vec<String> = header
                .tensors
                .iter()
                .map(|t| format!("{}:{}{:?}", t.name, t.dtype, t.shape))
                .collect();
            full.sort();
            found
                .snapshots
                .entry(full.join(";"))
                .or_insert_with(|| (shapes, Vec::new()))
                .1
                .push(path);
        } else {
            found.others.push(digest.to_hex());
        }
    }
    Ok(found)
}
