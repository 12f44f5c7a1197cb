//! `hindsight bench`: measurements against the peers, side by side in one run (figures in
//! BENCHMARKS.md).

use clap::Subcommand;

use super::common::block_on;

mod attack;
mod chaos;
mod load;
mod metrics;
mod model;
mod solve;
mod store;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The crash loop: SIGKILL at random moments of imports, uploads and reconstructions;
    /// after each, recovery, `verify`, every blob hashed and every acknowledged snapshot
    /// checked. Exits 1 on any failure.
    Chaos(chaos::ChaosArgs),
    /// Replays the attacks that once exhausted the server (nested and memo-heavy pickles, an
    /// .npz zip bomb, slow readers, silent connections) against `hindsight serve`: answers,
    /// peak RSS and healthz latency per attack. Exits 1 when one is not refused cleanly,
    /// the RSS passes 600 MiB or healthz 100 ms.
    Attack(attack::AttackArgs),
    /// Many concurrent clients (downloads with and without Range, identical and distinct
    /// reconstructions, uploads) against `hindsight serve`, then the same downloads from
    /// tower-http's ServeDir: requests, errors, p50/p99 and the server's peak RSS.
    Load(load::LoadArgs),
    /// Time `hindsight import` of generated fp16 snapshots against `cp` of the same files.
    Import(store::ImportArgs),
    /// Time `reconstruct` of one and of eight σ_rel from generated fp16 snapshots against `cat`
    /// of the same files (and EDM2's algorithm in NumPy with --peer-python).
    Reconstruct(store::ReconstructArgs),
    /// Time the EDM2 network's forward pass and training step (the reference fixture's
    /// configuration).
    Train(model::TrainArgs),
    /// Time EDM's Heun sampler (images per second) over the `bench train` network, against
    /// the same sampler and network in PyTorch with --peer-python.
    Sample(model::SampleArgs),
    /// Time each 3×3 convolution shape of the `bench train` network (forward, and forward with
    /// both gradients) on the CPU with the direct GEMM path and with Winograd's F(2×2, 3×3),
    /// side by side in one run.
    Conv(model::ConvArgs),
    /// Check the EDM2 network on the device this binary computes on (CUDA when built with
    /// the `cuda` feature and a GPU is present) against the reference fixture: forward pass,
    /// sampler, forced weight normalisation, loss and every gradient. Exits 1 when any is
    /// outside its tolerance.
    Parity(model::ParityArgs),
    /// Time `solve` on an EDM2-shaped run: snapshots every 8Mi images for two widths.
    Solve(solve::SolveArgs),
    /// Time the Fréchet distance of 2048-d statistics against pytorch-fid's, and Inception
    /// features against PyTorch running the same weights file, side by side.
    Fid(metrics::FidArgs),
    /// Time one sweep point end to end (reconstruct, sample, Inception features, FID) through
    /// the sweep worker, against the same pipeline in Python with --peer-python.
    SweepPoint(metrics::SweepPointArgs),
}

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    use hindsight::model::on_compute_pool;
    match command {
        BenchCommand::Chaos(args) => chaos::chaos(args),
        BenchCommand::Attack(args) => attack::attack(args),
        BenchCommand::Load(args) => load::load(args),
        BenchCommand::Import(args) => block_on(store::import(args)),
        BenchCommand::Reconstruct(args) => block_on(store::reconstruct(args)),
        BenchCommand::Train(args) => on_compute_pool(|| model::train(args)),
        BenchCommand::Conv(args) => on_compute_pool(|| model::conv(args)),
        BenchCommand::Sample(args) => on_compute_pool(|| model::sample(args)),
        BenchCommand::Parity(args) => model::parity(args),
        BenchCommand::Solve(args) => solve::solve(args),
        BenchCommand::Fid(args) => on_compute_pool(|| metrics::fid(args)),
        BenchCommand::SweepPoint(args) => metrics::sweep_point(args),
    }
}
