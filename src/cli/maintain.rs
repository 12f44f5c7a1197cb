//! `hindsight verify | gc`: upkeep of the data directory.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use hindsight::app::DataDir;

use super::common::{bar, block_on, human_bytes};

/// Re-hashes every blob; prints each problem and a summary; fails if any was found.
pub fn verify(data_dir: &Path) -> anyhow::Result<()> {
    let progress = bar(
        "verifying",
        "{spinner} verifying {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
    );
    let report = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(hindsight::app::verify(&data, &progress).await?)
    })?;
    progress.finish_and_clear();
    for p in &report.problems {
        println!("{p}");
    }
    println!(
        "verified {} blobs ({}): {} problem(s)",
        report.blobs,
        human_bytes(report.bytes),
        report.problems.len()
    );
    if report.pending_claims > 0 {
        println!(
            "{} pending claim(s): ingests in progress, or abandoned by ingests that died \
             (not data; recovered when the data directory is next opened after {} minutes)",
            report.pending_claims,
            hindsight::app::CLAIM_GRACE.as_secs() / 60
        );
    }
    if report.checksums_filled > 0 {
        println!(
            "recorded the read checksum of {} blob(s) stored without one",
            report.checksums_filled
        );
    }
    if !report.ok() {
        bail!("{} blob(s) failed verification", report.problems.len());
    }
    Ok(())
}

/// Options of `hindsight gc`.
#[derive(clap::Args)]
pub struct GcArgs {
    /// Leave pending blobs (ingests in progress) younger than this alone.
    #[arg(long, default_value_t = 3600)]
    grace_secs: u64,
}

/// Removes unreferenced blobs and orphaned staging files.
pub fn gc(data_dir: &Path, args: GcArgs) -> anyhow::Result<()> {
    let report = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(hindsight::app::gc(&data, Duration::from_secs(args.grace_secs)).await?)
    })?;
    println!(
        "gc: {} blob(s) unreferenced, {} removed, {} orphaned temporary file(s) removed, {} \
         blob file(s) without an index row removed",
        report.unreferenced, report.removed, report.temp_files, report.unindexed
    );
    Ok(())
}

/// Options of `hindsight rebuild-index`.
#[derive(clap::Args)]
pub struct RebuildIndexArgs {
    /// Rebuild even though the index is healthy (it is moved aside first, not deleted).
    #[arg(long)]
    force: bool,
}

/// Rebuilds a lost or damaged index from the snapshots in the store.
pub fn rebuild_index(data_dir: &Path, args: RebuildIndexArgs) -> anyhow::Result<()> {
    let report =
        block_on(async { Ok(hindsight::ingest::rebuild_index(data_dir, args.force).await?) })?;
    if let Some(aside) = &report.moved_aside {
        println!("the old index is kept as {}", aside.display());
    }
    for (run, n) in &report.runs {
        println!("run {run:?}: {n} snapshot(s)");
    }
    for r in &report.refused {
        println!("refused: {r}");
    }
    if report.unreadable_journal_lines > 0 {
        println!(
            "warning: {} line(s) of store/journal.jsonl could not be read: the snapshots they \
             recorded may be missing above (or sit in a recovered-N run)",
            report.unreadable_journal_lines
        );
    }
    println!(
        "{} other blob(s) are not indexed: reconstructions, reference statistics, sweep data, \
         and any snapshot neither the journal nor its own __metadata__ describes. They stay in \
         the store, but `hindsight gc` deletes blobs the index does not know: copy out what you \
         need first (their files are data/store/blobs/<ab>/<cd>/<digest>).",
        report.other_blobs
    );
    for d in &report.other_digests {
        println!("  not indexed: {d}");
    }
    Ok(())
}
