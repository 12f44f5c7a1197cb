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

fn time_command(program: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = std::process::Command::new(program).args(args).status()?;
    if !status.success() {
        bail!("{program} failed: {status}");
    }
    Ok(start.elapsed().as_secs_f64())
}

pub async fn bench_import(dir: &Path, count: usize, params: u64) -> anyhow::Result<()> {
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
    for round in 1..=2 {
        let cp_dest = dir.join("cp-copy");
        let data_dir = dir.join("data");
        let _ = std::fs::remove_dir_all(&cp_dest);
        let _ = std::fs::remove_dir_all(&data_dir);
        let cp = time_command(
            "cp",
            &["-r".as_ref(), input.as_os_str(), cp_dest.as_os_str()],
        )?;
        let sync_after_cp = time_command("sync", &[])?;
        let exe = std::env::current_exe()?;
        let ours = time_command(
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
        println!(
            "  round {round}: cp {cp:.2} s ({:.2} GiB/s), cp + sync {:.2} s; hindsight import \
             (hash + fsync + index) {ours:.2} s ({:.2} GiB/s) -> {:.0}% of cp's speed, {:.0}% of \
             cp + sync",
            gib / cp,
            cp + sync_after_cp,
            gib / ours,
            100.0 * cp / ours,
            100.0 * (cp + sync_after_cp) / ours
        );
        let _ = std::fs::remove_dir_all(&cp_dest);
        let _ = std::fs::remove_dir_all(&data_dir);
    }
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

/// Solves `targets` over a stored run and writes one reconstruction per target into
/// `out_dir`; returns the solve's report.
pub async fn reconstruct(
    data_dir: &Path,
    run: &str,
    targets: Vec<TargetSpec>,
    dtype: Dtype,
    out_dir: &Path,
) -> anyhow::Result<SolveResponse> {
    use hindsight::ingest::read_header;
    use hindsight::materialize::{materialize, Input, OutDtype};
    use std::collections::{BTreeMap, BTreeSet};

    let data = DataDir::open(data_dir).await?;
    let Some(run_row) = data.db.run(run).await? else {
        bail!("run {run:?} does not exist (see `hindsight runs`)");
    };
    let snaps = data.db.snapshots(run_row.id).await?;
    if snaps.is_empty() {
        bail!("run {run:?} has no snapshots yet");
    }
    let mut request = solve_request(&snaps);
    request.targets = targets;
    let response = request.solve()?;
    let targets = &response.targets;
    let used: Vec<usize> = (0..snaps.len())
        .filter(|&i| targets.iter().any(|t| t.solution.coefficients[i] != 0.0))
        .collect();
    let names: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "{run}-{:010}-{:.3}.safetensors",
                t.solution.nimg, t.solution.sigma_rel
            )
        })
        .collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        bail!(
            "two targets round to the same file name (sigma_rel to 3 decimals); ask for each once"
        );
    }
    let mut inputs = Vec::with_capacity(used.len());
    for &i in &used {
        let digest: Digest = snaps[i].digest.parse()?;
        let mut file = data.store.open_blob(&digest)?;
        let len = file.metadata()?.len();
        let header = read_header(
            &mut std::io::BufReader::new(&mut file),
            len,
            &snaps[i].digest,
        )?;
        inputs.push(Input {
            digest,
            header,
            nimg: snaps[i].nimg as u64,
        });
    }
    let weights: Vec<Vec<f64>> = targets
        .iter()
        .map(|t| used.iter().map(|&i| t.solution.coefficients[i]).collect())
        .collect();
    let used_digests: Vec<&str> = used.iter().map(|&i| snaps[i].digest.as_str()).collect();
    let metadata: Vec<BTreeMap<String, String>> = targets
        .iter()
        .map(|t| {
            let s = &t.solution;
            BTreeMap::from([
                ("run".to_owned(), run.to_owned()),
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
            ])
        })
        .collect();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut staged = Vec::with_capacity(targets.len());
    for _ in targets {
        staged.push(
            tempfile::Builder::new()
                .prefix(".reconstruction-")
                .tempfile_in(out_dir)
                .with_context(|| format!("creating a file in {}", out_dir.display()))?,
        );
    }
    let out_dtype = match dtype {
        Dtype::F32 => OutDtype::F32,
        Dtype::F16 => OutDtype::F16,
        Dtype::Bf16 => OutDtype::BF16,
    };
    let bar = ProgressBar::new_spinner();
    bar.set_message(format!(
        "reconstructing {} target(s) from {} snapshot(s)",
        targets.len(),
        inputs.len()
    ));
    bar.enable_steady_tick(Duration::from_millis(120));
    let store = data.store.clone();
    let files: Vec<std::fs::File> = staged
        .iter()
        .map(|t| t.reopen())
        .collect::<std::io::Result<_>>()?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut writers: Vec<std::io::BufWriter<std::fs::File>> = files
            .into_iter()
            .map(|f| std::io::BufWriter::with_capacity(1 << 20, f))
            .collect();
        {
            let mut outs: Vec<&mut dyn Write> =
                writers.iter_mut().map(|w| w as &mut dyn Write).collect();
            materialize(&store, &inputs, &weights, out_dtype, &metadata, &mut outs)?;
        }
        for w in writers {
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        Ok(())
    })
    .await??;
    bar.finish_and_clear();
    // Published only after every output is complete and durable.
    for (tmp, name) in staged.into_iter().zip(&names) {
        tmp.persist(out_dir.join(name))?;
    }
    eprintln!("wrote {} file(s) to {}", names.len(), out_dir.display());
    Ok(response)
}
