//! The command line: one `Args` struct per command, parsed by clap, each handled by one
//! function of its file that calls the library and prints. No library logic lives here.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod bench;
mod common;
mod demo;
mod generate;
mod maintain;
mod metrics;
mod reconstruct;
mod serve;
mod solve;
mod store;
mod sweep;
mod track;
mod train;

/// Post-hoc EMA of neural-network weights (EDM2): reconstruct any EMA length after training.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Where hindsight keeps its SQLite index and snapshot store.
    #[arg(
        long,
        global = true,
        env = "HINDSIGHT_DATA_DIR",
        default_value = "./hindsight-data"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Solve for post-hoc EMA coefficients: reads a JSON request on stdin, writes JSON on stdout.
    ///
    /// Input: {"snapshots": [{"nimg": N, "sigma_rel": S}, ...], "targets": [{"sigma_rel": S,
    /// "nimg": N?} | {"gamma": G, "nimg": N?}, ...], "profile_points": P?}.
    /// Target nimg defaults to the last snapshot. Errors exit non-zero with one line on stderr
    /// naming the bad field.
    Solve(solve::SolveArgs),
    /// Measure performance against the peers (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Import a directory of safetensors snapshots (or EDM2's own .pkl / training-state .pt
    /// files, or ema-pytorch checkpoints: see --format) into a run (created if new).
    ///
    /// Each file's training time and EMA width come from its __metadata__ (nimg, and sigma_rel
    /// or gamma) or from an EDM2 file name, <prefix>-<kimg:07d>-<sigma:.3f>.safetensors (or
    /// .pkl), whose kimg maps back to nimg as EDM2's reconstruct_phema.py does:
    /// nimg = (kimg·1000 + 999) // 1024 · 1024, the largest multiple of 1024 images whose
    /// thousands are kimg (network-snapshot-0008388-0.050.pkl is nimg 8388608).
    /// Re-importing the same files is a no-op; a different file at a stored (nimg, sigma_rel)
    /// is refused, as is any file whose tensors differ from the run's.
    Import(store::ImportArgs),
    /// Reconstruct EMA weights from a stored run: one safetensors file per target in --out,
    /// named <run>-<nimg>-<sigma_rel:.3f>.safetensors, with the quality report printed.
    Reconstruct(reconstruct::ReconstructArgs),
    /// The main job on a fresh machine: train the EDM2 network on Fashion-MNIST (σ_rel 0.05
    /// and 0.10 snapshots), sweep σ_rel with FID and KID, write a sample grid of the best EMA
    /// length and serve the web UI with the curve; a second run reuses what exists.
    Demo(demo::DemoArgs),
    /// Train an EDM2 network (procedural images, Fashion-MNIST, or PNGs), writing power-function EMA
    /// snapshots (σ_rel 0.05 and 0.10 by default) into the store as a run.
    Train(train::TrainArgs),
    /// Generate images with EDM's Heun sampler from weights (a file or a stored
    /// reconstruction): one PNG per seed plus grid.png.
    Generate(generate::GenerateArgs),
    /// Serve the HTTP API (reconstruct, download, upload, listings; see /openapi.json).
    Serve(serve::ServeArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(serve::TokenCommand),
    /// List runs.
    Runs(store::RunsArgs),
    /// List a run's snapshots.
    Snapshots(store::SnapshotsArgs),
    /// Re-hash every stored blob and report mismatches and missing files.
    Verify,
    /// Delete blobs no snapshot references (and orphaned temporary files).
    Gc(maintain::GcArgs),
    /// Rebuild a lost or damaged index (index.sqlite) from the snapshots in the store: the
    /// old index is moved aside, each snapshot is validated and recorded again, in runs
    /// grouped by tensor manifest (named after the run its reconstructions name, else
    /// recovered-N).
    RebuildIndex(maintain::RebuildIndexArgs),
    /// Reference statistics of an image set for FID (mean and covariance of its Inception
    /// features): written as a pytorch-fid .npz and/or stored under a name for sweeps.
    ///
    /// Images are compared as they are stored (Fashion-MNIST: 28×28 padded to 32×32, grey
    /// replicated to RGB), resized to 299×299 as NVIDIA's Inception export does.
    RefStats(metrics::RefStatsArgs),
    /// FID between two image sets or statistics files, and KID where both sides are images.
    Fid(metrics::FidArgs),
    /// List stored reference statistics.
    References(metrics::ReferencesArgs),
    /// Sweep EMA lengths: reconstruct each σ_rel (and training time), sample, and compute
    /// FID/KID against reference statistics; prints the table and writes the curve as SVG.
    ///
    /// Image i of every point comes from seed i, so points differ by their weights, not by
    /// their noise. Progress is kept per batch: Ctrl-C, a crash or a kill loses at most one
    /// batch, and `--resume ID` continues.
    Sweep(sweep::SweepArgs),
    /// List sweeps, or show one (`hindsight sweeps ID`), or cancel one (`--cancel`).
    Sweeps(sweep::SweepsArgs),
    /// Run a sweep worker on the data directory (beside `hindsight serve`, or alone).
    Worker(sweep::WorkerArgs),
    /// Track power-function EMAs of values given as JSON on stdin and print every EMA after
    /// every update (checks other trackers against this one; see src/cli/track.rs).
    #[command(hide = true)]
    EmaTrack,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir;
    match cli.command {
        Command::Solve(args) => solve::run(&data_dir, args),
        Command::Bench(command) => bench::run(command),
        Command::Import(args) => store::import(&data_dir, args),
        Command::Reconstruct(args) => reconstruct::run(&data_dir, args),
        Command::Demo(args) => demo::run(&data_dir, args),
        Command::Train(args) => train::run(&data_dir, args),
        Command::Generate(args) => generate::run(&data_dir, args),
        Command::Serve(args) => serve::run(&data_dir, args),
        Command::Token(command) => serve::token(command),
        Command::Runs(args) => store::runs(&data_dir, args),
        Command::Snapshots(args) => store::snapshots(&data_dir, args),
        Command::Verify => maintain::verify(&data_dir),
        Command::Gc(args) => maintain::gc(&data_dir, args),
        Command::RebuildIndex(args) => maintain::rebuild_index(&data_dir, args),
        Command::RefStats(args) => metrics::ref_stats(&data_dir, args),
        Command::Fid(args) => metrics::fid(&data_dir, args),
        Command::References(args) => metrics::list(&data_dir, args),
        Command::Sweep(args) => sweep::run(&data_dir, args),
        Command::Sweeps(args) => sweep::sweeps(&data_dir, args),
        Command::Worker(args) => sweep::worker(&data_dir, args),
        Command::EmaTrack => track::run(),
    }
}

/// What to do next about a library error, in this command line's terms (the library's and
/// the API's messages say only what is wrong; hints about commands are added here).
pub fn hint(error: &hindsight::Error) -> Option<&'static str> {
    use hindsight::Error;
    match error {
        Error::NotFound(m) if m.starts_with("no reference statistics") => Some(
            "`hindsight references` lists them; `hindsight ref-stats DATASET --name NAME` \
             makes them",
        ),
        Error::Conflict(m) if m.starts_with("reference statistics") => {
            Some("`hindsight references` lists the names taken")
        }
        Error::NotFound(m) if m.contains("has no snapshot") => {
            Some("`hindsight snapshots RUN` lists a run's snapshots")
        }
        Error::NotFound(m) if m.starts_with("run") && m.ends_with("does not exist") => {
            Some("`hindsight runs` lists the runs")
        }
        Error::NotFound(m) if m.starts_with("no sweep") => Some("`hindsight sweeps` lists them"),
        Error::InvalidInput { field, reason }
            if field == "metrics" && reason.starts_with("KID needs") =>
        {
            Some("`hindsight ref-stats DATASET --name NAME` computes statistics that keep features")
        }
        _ => None,
    }
}
