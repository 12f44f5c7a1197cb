//! `hindsight bench solve`: the solver against EDM2's algorithm in NumPy.

use std::time::Instant;

use anyhow::{bail, Context};
use hindsight::bench::{edm2_schedule, sigma_sweep, Timing};
use hindsight::phema::request::{SnapshotSpec, SolveRequest, TargetSpec};
use hindsight::phema::{self, SolveOptions};

/// Options of `hindsight bench solve`.
#[derive(clap::Args)]
pub struct SolveArgs {
    /// Number of snapshot times (each contributes one snapshot per width).
    #[arg(long, default_value_t = 256)]
    pub times: usize,
    /// Number of target widths, evenly spaced over σ_rel 0.010–0.250.
    #[arg(long, default_value_t = 31)]
    pub targets: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// Also time EDM2's algorithm in NumPy with this Python (scripts/peer_phema_solve.py).
    #[arg(long)]
    pub peer_python: Option<String>,
}

/// Times the solver on an EDM2-shaped run, and EDM2's algorithm in NumPy beside it.
pub fn solve(args: SolveArgs) -> anyhow::Result<()> {
    let SolveArgs {
        times,
        targets: n_targets,
        iterations,
        peer_python,
    } = args;
    if times == 0 || n_targets == 0 || iterations == 0 {
        bail!("--times, --targets and --iterations must be positive");
    }
    let snapshots = edm2_schedule(times, 8 << 20, &phema::DEFAULT_SIGMA_RELS);
    let targets = sigma_sweep(n_targets, 0.010, 0.250);
    let options = SolveOptions::default();
    // Warm up once, then time whole calls (Gram build, factorisation, solves, reports).
    let reference = phema::solve(&snapshots, &targets, &options)?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let out = phema::solve(&snapshots, &targets, &options)?;
        samples.push(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    let ours = Timing::from_samples(samples);
    println!(
        "solve: {} snapshots ({times} times x 2 widths), {n_targets} targets, {iterations} runs, {} threads",
        snapshots.len(),
        rayon::current_num_threads()
    );
    println!(
        "  hindsight: median {:.3} ms  min {:.3} ms  p90 {:.3} ms  (condition number {:.3e})",
        ours.median * 1e3,
        ours.min * 1e3,
        ours.p90 * 1e3,
        reference[0].condition_number
    );
    let Some(python) = peer_python else {
        return Ok(());
    };
    let request = SolveRequest {
        snapshots: snapshots.iter().map(SnapshotSpec::from).collect(),
        targets: targets.iter().map(TargetSpec::from).collect(),
        options: None,
        profile_points: None,
    };
    let script = hindsight::bench::repo_file("scripts/peer_phema_solve.py");
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .arg(iterations.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python} {}", script.display()))?;
    serde_json::to_writer(child.stdin.take().context("peer stdin")?, &request)?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("the peer script failed ({})", output.status);
    }
    #[derive(serde::Deserialize)]
    struct PeerTiming {
        median_s: f64,
        min_s: f64,
        p90_s: f64,
    }
    #[derive(serde::Deserialize)]
    struct PeerResult {
        #[serde(flatten)]
        edm2: PeerTiming,
        vectorised: PeerTiming,
        numpy: String,
        coefficients: Vec<Vec<f64>>,
    }
    let peer: PeerResult = serde_json::from_slice(&output.stdout).context("peer output")?;
    let mut worst = 0.0f64;
    for (ours, theirs) in reference.iter().zip(&peer.coefficients) {
        let scale = ours.coefficients.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        for (a, b) in ours.coefficients.iter().zip(theirs) {
            worst = worst.max((a - b).abs() / scale);
        }
    }
    let show = |name: &str, t: &PeerTiming| {
        println!(
            "  {name}: median {:.3} ms  min {:.3} ms  p90 {:.3} ms  -> hindsight is {:.1}x faster (median)",
            t.median_s * 1e3,
            t.min_s * 1e3,
            t.p90_s * 1e3,
            t.median_s / ours.median
        );
    };
    println!(
        "  peer: NumPy {} (scripts/peer_phema_solve.py), coefficients only, no report",
        peer.numpy
    );
    show("EDM2 phema.py structure", &peer.edm2);
    show("EDM2 algorithm, vectorised", &peer.vectorised);
    println!("  max coefficient difference vs EDM2: {worst:.2e} of max|w|");
    Ok(())
}
