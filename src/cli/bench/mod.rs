//! `hindsight bench`: measurements against the peers, side by side in one run (figures in
//! BENCHMARKS.md).

use std::path::PathBuf;

use clap::Subcommand;

mod model;
mod solve;
mod store;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time `hindsight import` of generated fp16 snapshots against `cp` of the same files.
    Import(ImportArgs),
    /// Time `reconstruct` of one and of eight σ_rel from generated fp16 snapshots against `cat`
    /// of the same files (and EDM2's algorithm in NumPy with --peer-python).
    Reconstruct(ReconstructArgs),
    /// Time the EDM2 network's forward pass and training step (the reference fixture's
    /// configuration).
    Train(TrainArgs),
    /// Time each 3×3 convolution shape of the `bench train` network (forward, and forward with
    /// both gradients) on the CPU with the direct GEMM path and with Winograd's F(2×2, 3×3),
    /// side by side in one run.
    Conv(ConvArgs),
    /// Check the EDM2 network on the device this binary computes on (CUDA when built with
    /// the `cuda` feature and a GPU is present) against the reference fixture: forward pass,
    /// sampler, forced weight normalisation, loss and every gradient. Exits 1 when any is
    /// outside its tolerance.
    Parity(ParityArgs),
    /// Time `solve` on an EDM2-shaped run: snapshots every 8Mi images for two widths.
    Solve(SolveArgs),
}

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

/// Options of `hindsight bench train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Python with PyTorch: also time scripts/peer_edm2_torch.py (the same network in
    /// PyTorch, checked against the reference fixture first) with the same batch, thread
    /// count and device, and print the ratios.
    #[arg(long)]
    pub peer_python: Option<String>,
    /// Rounds of both sides, alternating which goes first (with a peer): the ratios are
    /// taken per round and their median printed, so load that comes and goes on a shared
    /// machine hits both sides alike.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Options of `hindsight bench conv`.
#[derive(clap::Args)]
pub struct ConvArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed repetitions per layer, algorithm and round.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// Rounds, alternating which algorithm goes first; medians over all.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Time this shape instead, `N,C,O,H` (images, input and output channels, square
    /// size); repeatable. E.g. EDM2-S layers: `--shape 8,192,192,64 --shape 32,768,768,8`.
    #[arg(long = "shape", value_parser = parse_conv_shape)]
    pub shapes: Vec<[usize; 4]>,
}

/// Options of `hindsight bench parity`.
#[derive(clap::Args)]
pub struct ParityArgs {
    /// The fixture tensors (default: $HINDSIGHT_EDM2_FIXTURE, else
    /// tests/fixtures/edm2_unet.safetensors).
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// Its JSON description (default: $HINDSIGHT_EDM2_FIXTURE_JSON, else
    /// tests/fixtures/edm2_unet.json).
    #[arg(long)]
    pub fixture_json: Option<PathBuf>,
}

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
/// Runs a benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    use hindsight::model::on_compute_pool;
    match command {
        BenchCommand::Import(args) => super::block_on(store::import(args)),
        BenchCommand::Reconstruct(args) => super::block_on(store::reconstruct(args)),
        BenchCommand::Train(args) => on_compute_pool(|| model::train(args)),
        BenchCommand::Conv(args) => on_compute_pool(|| model::conv(args)),
        BenchCommand::Parity(args) => model::parity(args),
        BenchCommand::Solve(args) => solve::solve(args),
    }
}

/// `N,C,O,H` for `bench conv --shape`.
fn parse_conv_shape(s: &str) -> Result<[usize; 4], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let sizes: Vec<usize> = parts
        .iter()
        .map(|p| p.parse::<usize>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    <[usize; 4]>::try_from(sizes)
        .map_err(|v| format!("expected N,C,O,H (four sizes), got {} in {s:?}", v.len()))
}
