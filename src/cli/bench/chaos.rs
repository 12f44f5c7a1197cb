//! `hindsight bench chaos`: the crash loop. SIGKILL at random moments of `hindsight import`,
//! of a server taking uploads, and of reconstructions (server and CLI); after every kill the
//! data directory is reopened (start-up recovery), `verify` must pass, every file under
//! `store/blobs` must hash to its name (no partial blob visible), and every snapshot whose
//! upload or import was acknowledged must be present with its digest. Every few rounds the
//! interrupted work is run to completion (jobs resume). Sweeps' own kill-and-resume test is
//! `tests/sweep_e2e.rs`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cli::common::bar;

/// Options of `hindsight bench chaos`.
#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Kills (each followed by a restart and the checks).
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Seed of the random kill times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to work (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What the crash loop found.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    /// Kills survived, by what was killed.
    pub kills: BTreeMap<String, usize>,
    /// Acknowledged snapshots checked after the kills (cumulative).
    pub acknowledged_checked: usize,
    /// Blob files hashed after the kills (cumulative).
    pub blob_files_checked: usize,
    /// Times `verify` failed after a kill.
    pub verify_failures: usize,
    /// Blob files under `store/blobs` whose content did not match their name.
    pub partial_blobs: usize,
    /// Acknowledged snapshots missing or changed after a kill.
    pub lost_snapshots: usize,
    /// Interrupted work that did not complete when run again.
    pub resume_failures: usize,
    /// Staging files left once the data directory was reopened.
    pub staging_left: usize,
    /// One line per failure.
    pub failures: Vec<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The crash loop.
pub fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let snaps = dir.join("snaps");
    hindsight::bench::ensure_synthetic_snapshots(&snaps, 24, 400_000, &())?;
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let exe = std::env::current_exe()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut report = ChaosReport::default();
    let start = Instant::now();
    // The acknowledged snapshots: (run, digest) pairs that must survive.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    // How long an uninterrupted import takes, to spread the kills over it.
    let t = Instant::now();
    run_ok(&exe, &data, &["import", path_str(&snaps)?, "--run", "base"])?;
    let import_ms = (t.elapsed().as_millis() as u64).max(20);
    for (run, digest) in snapshot_digests(&exe, &data, "base")? {
        acknowledged.push((run, digest));
    }
    let progress = bar("chaos", "chaos {bar:30} {pos}/{len} kills");
    progress.set_length(args.iterations as u64);
    for i in 0..args.iterations {
        let what = match i % 4 {
            0 => "import",
            1 => "server taking uploads",
            2 => "server reconstructing",
            _ => "reconstruct (CLI)",
        };
        let outcome = match i % 4 {
            0 => kill_import(&exe, &data, &snaps, i, import_ms, &mut rng),
            1 => kill_uploads(&exe, &data, &snaps, i, &mut rng, &mut acknowledged),
            2 => kill_server_reconstruct(&exe, &data, &mut rng),
            _ => kill_cli_reconstruct(&exe, &data, &dir, &mut rng),
        };
        if let Err(e) = outcome {
            report.failures.push(format!("round {i} ({what}): {e:#}"));
        }
        *report.kills.entry(what.to_owned()).or_default() += 1;
        check(&exe, &data, &acknowledged, i, &mut report)?;
        // Jobs resume: every fourth round, the interrupted import runs to completion.
        if i % 4 == 3 {
            let run = format!("import-{}", i - 3);
            match run_ok(&exe, &data, &["import", path_str(&snaps)?, "--run", &run]) {
                Ok(_) => {
                    let n = snapshot_digests(&exe, &data, &run)?.len();
                    if n != 24 {
                        report.resume_failures += 1;
                        report.failures.push(format!(
                            "round {i}: resumed import holds {n} of 24 snapshots"
                        ));
                    }
                }
                Err(e) => {
                    report.resume_failures += 1;
                    report
                        .failures
                        .push(format!("round {i}: resuming the import: {e:#}"));
                }
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    report.seconds = start.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "chaos: {} kills in {:.0} s ({}); after each: verify, every blob file hashed ({} in \
             all), every acknowledged snapshot checked ({} in all)",
            args.iterations,
            report.seconds,
            report
                .kills
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            report.blob_files_checked,
            report.acknowledged_checked
        );
        println!(
            "failures: verify {}, partial blobs {}, lost snapshots {}, resume {}, staging left {}",
            report.verify_failures,
            report.partial_blobs,
            report.lost_snapshots,
            report.resume_failures,
            report.staging_left
        );
        for f in &report.failures {
            println!("  {f}");
        }
    }
    if !report.failures.is_empty() {
        bail!("{} failure(s)", report.failures.len());
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

fn command(exe: &Path, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(exe);
    c.arg("--data-dir").arg(data).args(args);
    c
}

/// Runs a command to completion; its standard output, or an error with its standard error.
fn run_ok(exe: &Path, data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = command(exe, data, args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (run, digest) of every snapshot of `run` (none when the run does not exist).
fn snapshot_digests(exe: &Path, data: &Path, run: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = command(exe, data, &["snapshots", run, "--json"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["digest"].as_str().map(|d| (run.to_owned(), d.to_owned())))
        .collect())
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The chaos loop's servers answer `POST /reconstruct` at once (202) so that kills land
/// mid-computation.
const NO_WAIT: &[&str] = &["--reconstruct-wait-secs", "0"];

/// Starts `hindsight serve` (no sweep worker, then `extra`) on a free
/// port; returns it and its address. Shared with `bench load`.
pub(super) fn start_server(
    exe: &Path,
    data: &Path,
    extra: &[&str],
) -> anyhow::Result<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--addr", addr.as_str(), "--no-sweep-worker"];
    args.extend_from_slice(extra);
    let mut child = command(exe, data, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited at start: {status}");
        }
        if Instant::now() > deadline {
            sigkill(&mut child);
            bail!("the server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn kill_import(
    exe: &Path,
    data: &Path,
    snaps: &Path,
    round: usize,
    import_ms: u64,
    rng: &mut impl Rng,
) -> anyhow::Result<()> {
    let mut child = command(
        exe,
        data,
        &[
            "import",
            path_str(snaps)?,
            "--run",
            &format!("import-{round}"),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    std::thread::sleep(Duration::from_millis(rng.random_range(0..import_ms)));
    sigkill(&mut child);
    Ok(())
}

/// Uploads the snapshots from two clients while the server is killed at a random moment;
/// every upload answered 200/201 joins `acknowledged`.
fn kill_uploads(
    exe: &Path,
    data: &Path,
    snaps: &Path,
    round: usize,
    rng: &mut impl Rng,
    acknowledged: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let (mut server, addr) = start_server(exe, data, NO_WAIT)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(snaps)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    let run = format!("upload-{round}");
    let acks: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut clients = Vec::new();
    for part in files.chunks(files.len().div_ceil(2)) {
        let (part, addr, run, acks) = (part.to_vec(), addr.clone(), run.clone(), acks.clone());
        clients.push(std::thread::spawn(move || {
            let agent = agent();
            for f in part {
                let Ok(bytes) = std::fs::read(&f) else { return };
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let url = format!("http://{addr}/runs/{run}/snapshots?filename={name}");
                let Ok(mut response) = agent.post(&url).send(&bytes[..]) else {
                    return; // the server is gone
                };
                if matches!(response.status().as_u16(), 200 | 201) {
                    let mut body = String::new();
                    if response
                        .body_mut()
                        .as_reader()
                        .read_to_string(&mut body)
                        .is_ok()
                    {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                            if let Some(d) = v["digest"].as_str() {
                                acks.lock().expect("acks").push((run.clone(), d.to_owned()));
                            }
                        }
                    }
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
    sigkill(&mut server);
    for c in clients {
        let _ = c.join();
    }
    acknowledged.extend(acks.lock().expect("acks").drain(..));
    Ok(())
}

fn kill_server_reconstruct(exe: &Path, data: &Path, rng: &mut impl Rng) -> anyhow::Result<()> {
    let (mut server, addr) = start_server(exe, data, NO_WAIT)?;
    let sigma: f64 = rng.random_range(0.03..0.2);
    let body = format!(r#"{{"run": "base", "sigma_rel": {sigma:.4}, "wait_secs": 0}}"#);
    let response = agent()
        .post(&format!("http://{addr}/reconstruct"))
        .header("Content-Type", "application/json")
        .send(body.as_bytes());
    std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
    sigkill(&mut server);
    match response {
        Ok(r) if matches!(r.status().as_u16(), 200 | 202) => Ok(()),
        Ok(r) => bail!("POST /reconstruct answered {}", r.status()),
        Err(e) => bail!("POST /reconstruct: {e}"),
    }
}

fn kill_cli_reconstruct(
    exe: &Path,
    data: &Path,
    dir: &Path,
    rng: &mut impl Rng,
) -> anyhow::Result<()> {
    let sigma = format!("{:.4}", rng.random_range(0.03..0.2));
    let out = dir.join("out");
    let mut child = command(
        exe,
        data,
        &[
            "reconstruct",
            "--run",
            "base",
            "--sigma-rel",
            &sigma,
            "--out",
            path_str(&out)?,
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    std::thread::sleep(Duration::from_millis(rng.random_range(0..120)));
    sigkill(&mut child);
    Ok(())
}

/// After a kill: reopen (recovery), verify, hash every blob file, check the acknowledged.
fn check(
    exe: &Path,
    data: &Path,
    acknowledged: &[(String, String)],
    round: usize,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    if let Err(e) = run_ok(exe, data, &["verify"]) {
        report.verify_failures += 1;
        report
            .failures
            .push(format!("round {round}: verify: {e:#}"));
    }
    let store = hindsight::store::BlobStore::open(data.join("store"))?;
    for digest in store.list()? {
        report.blob_files_checked += 1;
        if store.verify(&digest)? != hindsight::store::BlobStatus::Intact {
            report.partial_blobs += 1;
            report.failures.push(format!(
                "round {round}: blob file {digest} does not match its name"
            ));
        }
    }
    // `verify` opened the directory, which removed dead writers' staging files (those a
    // second old: files of the last moment before the kill are removed by the next open).
    let mut left = store.temp_files()?.len();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(1100));
        run_ok(exe, data, &["runs"])?;
        left = store.temp_files()?.len();
    }
    if left > 0 {
        report.staging_left += left;
        report.failures.push(format!(
            "round {round}: {left} staging file(s) left after reopening"
        ));
    }
    let mut by_run: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (run, _) in acknowledged {
        if !by_run.contains_key(run.as_str()) {
            let present = snapshot_digests(exe, data, run)?;
            by_run.insert(run, present.into_iter().map(|(_, d)| d).collect());
        }
    }
    for (run, digest) in acknowledged {
        report.acknowledged_checked += 1;
        if !by_run[run.as_str()].contains(digest) {
            report.lost_snapshots += 1;
            report.failures.push(format!(
                "round {round}: acknowledged snapshot {digest} of {run} is gone"
            ));
        }
    }
    Ok(())
}
