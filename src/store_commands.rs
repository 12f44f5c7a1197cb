//! `hindsight import | runs | snapshots | verify | gc`: the store from the command line.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hindsight::app::DataDir;
use hindsight::ingest::{ingest_file, Hints, IngestOptions};
use hindsight::store::{BlobStatus, Digest};
use indicatif::{ProgressBar, ProgressStyle};

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub async fn import(
    data_dir: &Path,
    dir: &Path,
    run: &str,
    check_finite: bool,
) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors files", dir.display());
    }
    let total: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let run_row = data.db.run_or_create(run).await?;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let (mut inserted, mut present, mut failed) = (0, 0, Vec::new());
    let mut done_before = 0u64;
    for path in &files {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        bar.set_message(name.clone());
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let progress_bar = bar.clone();
        let base = done_before;
        let result = ingest_file(
            &data.db,
            &data.store,
            &run_row,
            path,
            Hints::default(),
            IngestOptions { check_finite },
            move |copied| progress_bar.set_position(base + copied),
        )
        .await;
        done_before += size;
        bar.set_position(done_before);
        match result {
            Ok(r) if r.inserted => inserted += 1,
            Ok(_) => present += 1,
            Err(e) => {
                // Printed whether or not the bar is drawn (it is hidden off a terminal).
                bar.suspend(|| eprintln!("refused {name}: {e}"));
                failed.push(name);
            }
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "run {run}: {inserted} imported, {present} already present, {} refused; {} in {secs:.1} s ({}/s)",
        failed.len(),
        human_bytes(total),
        human_bytes((total as f64 / secs.max(1e-9)) as u64)
    );
    if !failed.is_empty() {
        bail!("{} file(s) refused: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

pub async fn runs(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let runs = data.db.runs().await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &runs)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<30} {:>9} {:>11} {:>14} {:>14}  created",
        "run", "snapshots", "size", "first nimg", "last nimg"
    )?;
    for r in runs {
        writeln!(
            out,
            "{:<30} {:>9} {:>11} {:>14} {:>14}  {}",
            r.name,
            r.snapshots,
            human_bytes(r.bytes as u64),
            r.first_nimg.map_or("-".into(), |v| v.to_string()),
            r.last_nimg.map_or("-".into(), |v| v.to_string()),
            r.created_at
        )?;
    }
    Ok(())
}

pub async fn snapshots(data_dir: &Path, run: &str, json: bool) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let Some(run_row) = data.db.run(run).await? else {
        bail!("run {run:?} does not exist (see `hindsight runs`)");
    };
    let rows = data.db.snapshots(run_row.id).await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>14} {:>9} {:>8} {:>11} {:>8}  digest",
        "nimg", "sigma_rel", "gamma", "size", "tensors"
    )?;
    for s in rows {
        writeln!(
            out,
            "{:>14} {:>9.4} {:>8.3} {:>11} {:>8}  {}",
            s.nimg,
            s.sigma_rel,
            s.gamma,
            human_bytes(s.byte_size as u64),
            s.tensor_count,
            &s.digest[..16]
        )?;
    }
    Ok(())
}

pub async fn verify(data_dir: &Path) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let rows = data.db.blobs().await?;
    let total: u64 = rows.iter().map(|r| r.size.max(0) as u64).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} verifying {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template"),
    );
    let mut problems = Vec::new();
    for row in rows.iter().filter(|r| r.state != "deleted") {
        let digest: Digest = row.digest.parse()?;
        let store = data.store.clone();
        let status = tokio::task::spawn_blocking(move || store.verify(&digest)).await??;
        bar.inc(row.size.max(0) as u64);
        match status {
            BlobStatus::Intact => {}
            BlobStatus::Missing => problems.push(format!("missing: {}", row.digest)),
            BlobStatus::Corrupt { actual } => problems.push(format!(
                "corrupt: {} (content hashes to {actual})",
                row.digest
            )),
        }
    }
    bar.finish_and_clear();
    for p in &problems {
        println!("{p}");
    }
    println!(
        "verified {} blobs ({}): {} problem(s)",
        rows.len(),
        human_bytes(total),
        problems.len()
    );
    if !problems.is_empty() {
        bail!("{} blob(s) failed verification", problems.len());
    }
    Ok(())
}

pub async fn gc(data_dir: &Path, grace_secs: u64) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let grace = Duration::from_secs(grace_secs);
    let marked = data.db.gc_mark(grace).await?;
    let mut removed = 0;
    for digest in data.db.deleted_blobs().await? {
        let d: Digest = digest.parse()?;
        let store = data.store.clone();
        if data
            .db
            .gc_sweep(&digest, move || store.remove(&d).map(|_| ()))
            .await?
        {
            removed += 1;
        }
    }
    let temp = data.store.clean_temp(grace)?;
    println!(
        "gc: {} blob(s) unreferenced, {removed} removed, {temp} orphaned temporary file(s) removed",
        marked.len()
    );
    Ok(())
}
