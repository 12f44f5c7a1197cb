//! `hindsight bench import | reconstruct`: the store against `cp`, `cat` and EDM2's
//! reconstruction in NumPy, on generated fp16 snapshots.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hindsight::app::DataDir;
use hindsight::bench::median;

use crate::cli::common::bar;
use std::path::PathBuf;

/// Options of `hindsight bench import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// Where to generate the snapshots and the copies (needs about 3x their size free).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of snapshots.
    #[arg(long, default_value_t = 48)]
    pub snapshots: usize,
    /// Parameters per snapshot.
    #[arg(long, default_value_t = 34_000_000)]
    pub params: u64,
    /// Timed rounds after the warm-up round (they alternate which side goes first).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
}

/// Options of `hindsight bench reconstruct`.
#[derive(clap::Args)]
pub struct ReconstructArgs {
    /// Where to keep the generated snapshots and their data directory (reused when present).
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of snapshots.
    #[arg(long, default_value_t = 48)]
    pub snapshots: usize,
    /// Parameters per snapshot.
    #[arg(long, default_value_t = 34_000_000)]
    pub params: u64,
    /// Timed rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Python with NumPy for scripts/peer_reconstruct.py.
    #[arg(long)]
    pub peer_python: Option<String>,
}

/// Generates `count` snapshots of `params` parameters into `dir` unless it holds them.
fn ensure_generated(dir: &Path, count: usize, params: u64) -> anyhow::Result<()> {
    let progress = bar("generating", "generating {bar:30} {pos}/{len}");
    hindsight::bench::ensure_synthetic_snapshots(dir, count, params, &progress)?;
    progress.finish_and_clear();
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

/// `hindsight bench import`: `import` of generated fp16 snapshots against `cp` (and `cp` +
/// `sync`) of the same files, rounds alternating which side goes first.
pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let ImportArgs {
        dir,
        snapshots: count,
        params,
        rounds,
    } = args;
    let dir = dir.as_path();
    let input = dir.join("snapshots");
    ensure_generated(&input, count, params)?;
    let bytes = std::fs::read_dir(&input)?
        .map(|e| Ok(e?.metadata()?.len()))
        .sum::<anyhow::Result<u64>>()?;
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

/// `hindsight bench reconstruct`: one and eight σ_rel from generated fp16 snapshots, against
/// `cat` of the same files and (optionally) EDM2's algorithm in NumPy, in one run.
pub async fn reconstruct(args: ReconstructArgs) -> anyhow::Result<()> {
    let ReconstructArgs {
        dir,
        snapshots: count,
        params,
        rounds,
        peer_python,
    } = args;
    let dir = dir.as_path();
    let input = dir.join("snapshots");
    ensure_generated(&input, count, params)?;
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
                    hindsight::app::gc(&data, Duration::ZERO).await?;
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
                let script = hindsight::bench::repo_file("scripts/peer_reconstruct.py");
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
