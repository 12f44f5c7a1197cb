//! `hindsight import | runs | snapshots | verify | gc`: the store from the command line.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hindsight::app::DataDir;
use hindsight::ingest::{ingest_ema_pytorch, ingest_file, Hints, IngestOptions};
use hindsight::phema::request::{SnapshotSpec, SolveRequest, SolveResponse, TargetSpec};
use hindsight::phema::sigma_rel_to_gamma;
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

/// Input formats of `hindsight import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// safetensors files named the EDM2 way or carrying nimg and sigma_rel in __metadata__.
    Safetensors,
    /// ema-pytorch PostHocEMA checkpoint folders.
    EmaPytorch,
}

/// What to import, with the format's parameters.
#[derive(Clone, Debug)]
pub enum Source {
    /// safetensors files.
    Safetensors,
    /// ema-pytorch checkpoints.
    EmaPytorch {
        /// Width of each EMA index.
        sigma_rels: Vec<f64>,
        /// Training images per EMA step.
        images_per_step: u64,
    },
}

impl Source {
    /// Validates the format-specific options.
    pub fn from_args(
        format: Format,
        sigma_rels: Option<String>,
        images_per_step: Option<u64>,
    ) -> anyhow::Result<Self> {
        match format {
            Format::Safetensors => {
                if sigma_rels.is_some() || images_per_step.is_some() {
                    bail!("--sigma-rels and --images-per-step apply to --format ema-pytorch only");
                }
                Ok(Source::Safetensors)
            }
            Format::EmaPytorch => {
                let list = sigma_rels.context(
                    "--format ema-pytorch needs --sigma-rels: the sigma_rel of each EMA index, in order",
                )?;
                let mut widths = Vec::new();
                for (i, token) in list.split(',').enumerate() {
                    let v: f64 = token
                        .trim()
                        .parse()
                        .with_context(|| format!("--sigma-rels: `{token}` is not a number"))?;
                    sigma_rel_to_gamma(v, &format!("--sigma-rels[{i}]"))?;
                    if widths.contains(&v) {
                        bail!("--sigma-rels: {v} is listed twice");
                    }
                    widths.push(v);
                }
                let images_per_step = images_per_step.context(
                    "--format ema-pytorch needs --images-per-step: ema-pytorch counts steps, hindsight counts images",
                )?;
                if images_per_step == 0 {
                    bail!("--images-per-step must be positive");
                }
                Ok(Source::EmaPytorch {
                    sigma_rels: widths,
                    images_per_step,
                })
            }
        }
    }

    fn extension(&self) -> &'static str {
        match self {
            Source::Safetensors => "safetensors",
            Source::EmaPytorch { .. } => "pt",
        }
    }
}

pub async fn import(
    data_dir: &Path,
    dir: &Path,
    run: &str,
    check_finite: bool,
    source: Source,
) -> anyhow::Result<()> {
    let data = DataDir::open(data_dir).await?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == source.extension()))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .{} files", dir.display(), source.extension());
    }
    let total: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let existed = data.db.run(run).await?.is_some();
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
    // A few files at a time: one file's fsync overlaps the next one's copy.
    const IN_FLIGHT: usize = 3;
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = files.iter().cloned();
    loop {
        while tasks.len() < IN_FLIGHT {
            let Some(path) = queue.next() else { break };
            let (db, store, run_row, bar, source) = (
                data.db.clone(),
                data.store.clone(),
                run_row.clone(),
                bar.clone(),
                source.clone(),
            );
            tasks.spawn(async move {
                let options = IngestOptions { check_finite };
                let result = match source {
                    Source::Safetensors => {
                        let progress = bar.clone();
                        ingest_file(
                            &db,
                            &store,
                            &run_row,
                            &path,
                            Hints::default(),
                            options,
                            move |delta| progress.inc(delta),
                        )
                        .await
                    }
                    Source::EmaPytorch {
                        sigma_rels,
                        images_per_step,
                    } => {
                        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                        let result = ingest_ema_pytorch(
                            &db,
                            &store,
                            &run_row,
                            &path,
                            &sigma_rels,
                            images_per_step,
                            options,
                        )
                        .await;
                        bar.inc(size);
                        result
                    }
                };
                (path, result)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (path, result) = joined.context("an import task failed")?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
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
    failed.sort();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "run {run}: {inserted} imported, {present} already present, {} refused; {} in {secs:.1} s ({}/s)",
        failed.len(),
        human_bytes(total),
        human_bytes((total as f64 / secs.max(1e-9)) as u64)
    );
    if !failed.is_empty() {
        if !existed && data.db.delete_run_if_empty(run_row.id).await? {
            eprintln!("run {run:?} was not created: nothing was imported");
        }
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
    let mut filled = 0;
    for row in rows.iter().filter(|r| r.state != "deleted") {
        let digest: Digest = row.digest.parse()?;
        let store = data.store.clone();
        let (status, checksum) =
            tokio::task::spawn_blocking(move || store.verify_with_checksum(&digest)).await??;
        bar.inc(row.size.max(0) as u64);
        match status {
            BlobStatus::Intact => {
                // The fast read checksum: recorded for blobs stored before checksums were
                // kept; a recorded one that disagrees with intact content is corrected (it
                // would otherwise fail every reconstruction reading this blob).
                let computed = checksum
                    .expect("intact blobs come with a checksum")
                    .to_hex();
                match &row.checksum {
                    Some(recorded) if *recorded == computed => {}
                    recorded => {
                        if recorded.is_some() {
                            problems
                                .push(format!("checksum record wrong (corrected): {}", row.digest));
                        } else {
                            filled += 1;
                        }
                        data.db.set_blob_checksum(&row.digest, &computed).await?;
                    }
                }
            }
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
    if filled > 0 {
        println!("recorded the read checksum of {filled} blob(s) stored without one");
    }
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

/// Writes `count` EDM2-named fp16 snapshots of `params` parameters (split over a few tensors
/// like a network's layers) into `dir`.
fn generate_snapshots(dir: &Path, count: usize, params: u64) -> anyhow::Result<u64> {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir)?;
    // Layer sizes: a few large and many small tensors, summing to `params`.
    let mut sizes = vec![params / 4, params / 4, params / 8, params / 8];
    let rest = params - sizes.iter().sum::<u64>();
    sizes.extend(std::iter::repeat_n(rest / 64, 64));
    sizes.push(params - sizes.iter().sum::<u64>());
    let bar = ProgressBar::new(count as u64);
    bar.set_style(ProgressStyle::with_template("generating {bar:30} {pos}/{len}").expect("valid"));
    let mut total = 0;
    for k in 0..count {
        let kimg = (k as u64 / 2 + 1) * 8388; // every 8Mi images, two widths each
        let sigma = if k % 2 == 0 { 0.05 } else { 0.10 };
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ k as u64;
        let buffers: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .flat_map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        // A finite fp16 in [-2, 2): sign, exponent 0..15, mantissa.
                        let bits = (state as u16) & 0xBFFF;
                        bits.to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        let tensors: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let view = TensorView::new(Dtype::F16, vec![b.len() / 2], b).expect("valid view");
                (format!("layer{i:03}.weight"), view)
            })
            .collect();
        let path = dir.join(format!("bench-{kimg:07}-{sigma:.3}.safetensors"));
        safetensors::serialize_to_file(tensors, None, &path)?;
        total += std::fs::metadata(&path)?.len();
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(total)
}

/// Generates `count` snapshots into `dir` unless it already holds that many.
pub fn ensure_generated(dir: &Path, count: usize, params: u64) -> anyhow::Result<()> {
    let present = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    if present != count {
        let _ = std::fs::remove_dir_all(dir);
        generate_snapshots(dir, count, params)?;
    }
    Ok(())
}

fn time_command(program: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = std::process::Command::new(program).args(args).status()?;
    if !status.success() {
        bail!("{program} failed: {status}");
    }
    Ok(start.elapsed().as_secs_f64())
}

pub async fn bench_import(
    dir: &Path,
    count: usize,
    params: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let input = dir.join("snapshots");
    let bytes = if input.is_dir() && std::fs::read_dir(&input)?.count() == count {
        std::fs::read_dir(&input)?
            .map(|e| Ok(e?.metadata()?.len()))
            .sum::<anyhow::Result<u64>>()?
    } else {
        let _ = std::fs::remove_dir_all(&input);
        generate_snapshots(&input, count, params)?
    };
    // Warm the page cache so that both sides read from memory.
    for e in std::fs::read_dir(&input)? {
        let mut f = std::fs::File::open(e?.path())?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "import: {count} fp16 snapshots of {params} parameters, {gib:.2} GiB, page cache warm, {}",
        dir.display()
    );
    let cp_dest = dir.join("cp-copy");
    let data_dir = dir.join("data");
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("executable path")?.to_owned();
    let clean = || -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(&cp_dest);
        let _ = std::fs::remove_dir_all(&data_dir);
        // Deleting 6 GiB leaves the disk and the page cache busy; start each timing quiet.
        time_command("sync", &[])?;
        Ok(())
    };
    let run_cp = || -> anyhow::Result<(f64, f64)> {
        let cp = time_command(
            "cp",
            &["-r".as_ref(), input.as_os_str(), cp_dest.as_os_str()],
        )?;
        Ok((cp, time_command("sync", &[])?))
    };
    let run_ours = || {
        time_command(
            &exe,
            &[
                "--data-dir".as_ref(),
                data_dir.as_os_str(),
                "import".as_ref(),
                input.as_os_str(),
                "--run".as_ref(),
                "bench".as_ref(),
            ],
        )
    };
    // Round 0 is a warm-up, printed but not counted: the first writes of a fresh process tree
    // on these virtual machines pay for the host backing guest memory, whichever side runs
    // first. Later rounds alternate which side goes first.
    // (cp first?, % of cp's speed, % of cp + sync's) per timed round.
    let mut results: Vec<(bool, f64, f64)> = Vec::new();
    for round in 0..=rounds {
        clean()?;
        let cp_first = round % 2 == 1;
        let (cp, sync_after_cp, ours) = if cp_first {
            let (cp, sync) = run_cp()?;
            let ours = run_ours()?;
            (cp, sync, ours)
        } else {
            let ours = run_ours()?;
            time_command("sync", &[])?;
            let (cp, sync) = run_cp()?;
            (cp, sync, ours)
        };
        let label = if round == 0 {
            "warm-up".to_owned()
        } else {
            format!("round {round}")
        };
        println!(
            "  {label} ({} first): cp {cp:.2} s ({:.2} GiB/s), cp + sync {:.2} s; hindsight \
             import (hash + fsync + index) {ours:.2} s ({:.2} GiB/s) -> {:.0}% of cp's speed, \
             {:.0}% of cp + sync",
            if cp_first { "cp" } else { "import" },
            gib / cp,
            cp + sync_after_cp,
            gib / ours,
            100.0 * cp / ours,
            100.0 * (cp + sync_after_cp) / ours
        );
        if round > 0 {
            results.push((
                cp_first,
                100.0 * cp / ours,
                100.0 * (cp + sync_after_cp) / ours,
            ));
        }
    }
    clean()?;
    // Which side runs first matters on virtual machines whose host reclaims freed guest
    // memory: the second side's page cache comes from colder memory. Both orders are reported.
    for (label, keep) in [
        ("all rounds", None),
        ("cp first", Some(true)),
        ("import first", Some(false)),
    ] {
        let picked: Vec<&(bool, f64, f64)> = results
            .iter()
            .filter(|r| keep.is_none_or(|k| r.0 == k))
            .collect();
        if picked.is_empty() {
            continue;
        }
        let vs_cp: Vec<f64> = picked.iter().map(|r| r.1).collect();
        let (lo, hi) = vs_cp
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        println!(
            "median, {label} ({}): {:.0}% of cp's speed (range {lo:.0}-{hi:.0}%), {:.0}% of cp + \
             sync",
            picked.len(),
            median(vs_cp),
            median(picked.iter().map(|r| r.2).collect())
        );
    }
    Ok(())
}

/// Runs a command, returning its wall time and the `peak_rss_kib N` it reports on stderr.
fn time_reporting(program: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<(f64, u64)> {
    let start = Instant::now();
    let out = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .output()?;
    let secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{} failed: {}\n{stderr}", program.display(), out.status);
    }
    let rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((secs, rss))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `hindsight bench reconstruct`: one and eight σ_rel from generated fp16 snapshots, against
/// `cat` of the same files and (optionally) EDM2's algorithm in NumPy, in one run.
pub async fn bench_reconstruct(
    dir: &Path,
    count: usize,
    params: u64,
    rounds: usize,
    peer_python: Option<String>,
) -> anyhow::Result<()> {
    let input = dir.join("snapshots");
    if !(input.is_dir() && std::fs::read_dir(&input)?.count() == count) {
        let _ = std::fs::remove_dir_all(&input);
        generate_snapshots(&input, count, params)?;
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&input)?
        .map(|e| Ok(e?.path()))
        .collect::<anyhow::Result<_>>()?;
    files.sort();
    let bytes: u64 = files
        .iter()
        .map(|f| Ok(std::fs::metadata(f)?.len()))
        .sum::<anyhow::Result<u64>>()?;
    let data_dir = dir.join("data");
    let exe = std::env::current_exe()?;
    {
        let data = DataDir::open(&data_dir).await?;
        let stored = match data.db.run("bench").await? {
            Some(r) => data.db.snapshots(r.id).await?.len(),
            None => 0,
        };
        if stored != count {
            drop(data);
            let _ = std::fs::remove_dir_all(&data_dir);
            time_command(
                exe.to_str().context("executable path")?,
                &[
                    "--data-dir".as_ref(),
                    data_dir.as_os_str(),
                    "import".as_ref(),
                    input.as_os_str(),
                    "--run".as_ref(),
                    "bench".as_ref(),
                ],
            )?;
        }
    }
    let out = dir.join("out");
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "reconstruct: {count} fp16 snapshots of {params} parameters ({gib:.2} GiB), page cache \
         warm, {rounds} rounds, medians; {} worker threads",
        rayon::current_num_threads()
    );
    let cases: [(&str, &str); 2] = [
        ("one sigma_rel", "0.15"),
        ("eight sigma_rel", "0.04,0.07,0.09,0.12,0.15,0.18,0.21,0.25"),
    ];
    for (label, sigmas) in cases {
        let mut cat = Vec::new();
        let mut verified = Vec::new();
        let mut unverified = Vec::new();
        let mut peer = Vec::new();
        let mut rss = (0u64, 0u64);
        for round in 0..rounds {
            // The files live in the store; time `cat` of the blobs the reconstruction reads.
            let blobs: Vec<std::ffi::OsString> = {
                let data = DataDir::open(&data_dir).await?;
                let run = data.db.run("bench").await?.context("bench run")?;
                data.db
                    .snapshots(run.id)
                    .await?
                    .iter()
                    .map(|s| Ok(data.store.path(&s.digest.parse()?).into_os_string()))
                    .collect::<anyhow::Result<_>>()?
            };
            let cat_args: Vec<&std::ffi::OsStr> = blobs.iter().map(|b| b.as_os_str()).collect();
            let start = Instant::now();
            let status = std::process::Command::new("cat")
                .args(&cat_args)
                .stdout(std::process::Stdio::null())
                .status()?;
            anyhow::ensure!(status.success(), "cat failed");
            cat.push(start.elapsed().as_secs_f64());
            // Alternate which variant runs first: the first run after `cat` and the removal
            // of the previous outputs was seen to pay for the file system's clean-up.
            let mut order = [(false, &mut verified), (true, &mut unverified)];
            if round % 2 == 1 {
                order.reverse();
            }
            for (no_verify, times) in order {
                let mut args: Vec<&std::ffi::OsStr> = vec![
                    "--data-dir".as_ref(),
                    data_dir.as_os_str(),
                    "reconstruct".as_ref(),
                    "--run".as_ref(),
                    "bench".as_ref(),
                    "--sigma-rel".as_ref(),
                    sigmas.as_ref(),
                    "--dtype".as_ref(),
                    "f16".as_ref(),
                    "--out".as_ref(),
                    out.as_os_str(),
                    "--recompute".as_ref(),
                    "--report-peak-rss".as_ref(),
                ];
                if no_verify {
                    args.push("--no-verify".as_ref());
                }
                // Each timed run computes afresh and publishes durably: earlier results go,
                // rows and files, the way `gc` removes them (the index stays consistent).
                {
                    let data = DataDir::open(&data_dir).await?;
                    let run = data.db.run("bench").await?.context("bench run")?;
                    data.db.forget_reconstructions(run.id).await?;
                    for digest in data.db.gc_mark(Duration::ZERO).await? {
                        let store = data.store.clone();
                        let d: Digest = digest.parse()?;
                        data.db
                            .gc_sweep(&digest, move || store.remove(&d).map(|_| ()))
                            .await?;
                    }
                    let _ = std::fs::remove_dir_all(&out);
                }
                let (secs, peak) = time_reporting(&exe, &args)?;
                times.push(secs);
                if no_verify {
                    rss.1 = rss.1.max(peak);
                } else {
                    rss.0 = rss.0.max(peak);
                }
            }
            if let Some(py) = &peer_python {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peer_reconstruct.py");
                let (secs, peak) = time_reporting(
                    Path::new(py),
                    &[
                        script.as_os_str(),
                        input.as_os_str(),
                        sigmas.as_ref(),
                        out.join("peer").as_os_str(),
                    ],
                )?;
                peer.push((secs, peak));
            }
        }
        let cat = median(cat);
        let v = median(verified);
        let u = median(unverified);
        println!(
            "  {label}: cat floor {cat:.2} s; hindsight {v:.2} s verified ({:.1}x cat), \
             {u:.2} s --no-verify ({:.1}x cat); peak RSS {} / {} MiB",
            v / cat,
            u / cat,
            rss.0 / 1024,
            rss.1 / 1024
        );
        if !peer.is_empty() {
            let p = median(peer.iter().map(|p| p.0).collect());
            let peak = peer.iter().map(|p| p.1).max().unwrap_or(0);
            println!(
                "  {label}: EDM2 algorithm (NumPy) {p:.2} s ({:.1}x cat), peak RSS {} MiB -> \
                 hindsight {:.1}x faster verified, {:.1}x --no-verify",
                p / cat,
                peak / 1024,
                p / v,
                p / u
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// Output element types of `hindsight reconstruct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

/// Writes one reconstruction per solved target into `out_dir`.
/// A solve request over a stored run's snapshots, in the order `snapshots` lists them.
pub fn solve_request(snaps: &[hindsight::db::SnapshotRow]) -> SolveRequest {
    SolveRequest {
        snapshots: snaps
            .iter()
            .map(|s| SnapshotSpec {
                nimg: s.nimg as u64,
                sigma_rel: Some(s.sigma_rel),
                gamma: None,
            })
            .collect(),
        targets: Vec::new(),
        options: None,
        profile_points: None,
    }
}

/// How `hindsight reconstruct` reads and caches.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReconstructFlags {
    /// Skip hashing the snapshots as they are read.
    pub no_verify: bool,
    /// Compute even when the store already holds the result.
    pub recompute: bool,
    /// Copy the files out of the store instead of hard-linking them.
    pub copy: bool,
}

/// Solves `targets` over a stored run, materializes what the store does not hold yet (one
/// pass for all of them), and copies one file per target into `out_dir`; returns the solve's
/// report.
pub async fn reconstruct(
    data_dir: &Path,
    run: &str,
    targets: Vec<TargetSpec>,
    dtype: Dtype,
    out_dir: &Path,
    flags: ReconstructFlags,
) -> anyhow::Result<SolveResponse> {
    use hindsight::materialize::OutDtype;
    use hindsight::reconstruction::{self, file_name};
    use std::collections::BTreeSet;
    use std::sync::Arc;

    let out_dtype = match dtype {
        Dtype::F32 => OutDtype::F32,
        Dtype::F16 => OutDtype::F16,
        Dtype::Bf16 => OutDtype::BF16,
    };
    let data = DataDir::open(data_dir).await?;
    let plan = reconstruction::plan(&data.db, run, targets, out_dtype).await?;
    let names: Vec<String> = plan
        .targets
        .iter()
        .map(|t| file_name(run, t.solution.nimg as i64, t.solution.sigma_rel))
        .collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        bail!(
            "two targets round to the same file name (sigma_rel to 3 decimals); ask for each once"
        );
    }
    let mut rows = Vec::with_capacity(plan.targets.len());
    let mut missing = Vec::new();
    for (t, target) in plan.targets.iter().enumerate() {
        let found = if flags.recompute {
            None
        } else {
            reconstruction::stored(&data, &target.id).await?
        };
        if found.is_none() {
            missing.push(t);
        }
        rows.push(found);
    }
    if !missing.is_empty() {
        let total = reconstruction::input_bytes(&plan, &missing);
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "reconstructing {msg} {bar:30} {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(format!("{} target(s)", missing.len()));
        let ticker = bar.clone();
        let made = reconstruction::materialize_targets(
            &data,
            &plan,
            &missing,
            !flags.no_verify,
            Arc::new(move |n| ticker.inc(n)),
        )
        .await?;
        bar.finish_and_clear();
        for &t in &missing {
            let id = &plan.targets[t].id;
            rows[t] = made.iter().find(|r| &r.id == id).cloned();
        }
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Each file is a hard link to the (read-only, durable) blob when the output directory is
    // on the store's file system, else a copy that is staged, made durable, and only then
    // given its name. Either way a name never points at a partial file.
    let mut linked = 0;
    for (row, name) in rows.iter().zip(&names) {
        let row = row.as_ref().context("a reconstruction was not recorded")?;
        let blob = data.store.path(&row.digest.parse()?);
        let target = out_dir.join(name);
        let staged = out_dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&staged);
        if !flags.copy && std::fs::hard_link(&blob, &staged).is_ok() {
            linked += 1;
        } else {
            let mut tmp = tempfile::Builder::new()
                .prefix(".reconstruction-")
                .tempfile_in(out_dir)
                .with_context(|| format!("creating a file in {}", out_dir.display()))?;
            let mut source = data.store.open_blob(&row.digest.parse()?)?;
            std::io::copy(&mut source, tmp.as_file_mut())
                .with_context(|| format!("copying {}", blob.display()))?;
            tmp.as_file().sync_all()?;
            tmp.persist(&staged)?;
        }
        std::fs::rename(&staged, &target)
            .with_context(|| format!("naming {}", target.display()))?;
    }
    std::fs::File::open(out_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", out_dir.display()))?;
    let reused = rows.len() - missing.len();
    eprintln!(
        "wrote {} file(s) to {} ({} computed, {} already in the store; {linked} hard-linked \
         to the store's read-only copy)",
        names.len(),
        out_dir.display(),
        missing.len(),
        reused
    );
    Ok(SolveResponse {
        targets: plan
            .targets
            .into_iter()
            .map(|t| hindsight::phema::request::TargetOutput {
                solution: t.solution,
                profile: None,
            })
            .collect(),
    })
}
