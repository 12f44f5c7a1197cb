//! `hindsight train`: trains an EDM2 network on the procedural dataset, IDX or PNG images and
//! writes power-function EMA snapshots into the store as a run.

use std::path::{Path, PathBuf};

use hindsight::model::Edm2Config;
use hindsight::train::TrainOptions;

use super::common::bar;

/// Options of `hindsight train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Run to write the snapshots into (created with the configuration as its metadata).
    #[arg(long)]
    pub run: String,
    /// Network configuration as JSON (EDM2's names); default: a small 16×16 model.
    #[arg(long)]
    pub network: Option<PathBuf>,
    /// Training images: `procedural` (built in, no download), `fashion-mnist` (Debian's
    /// dataset-fashion-mnist, 28×28 padded to 32×32, 10 classes), an
    /// `*-images-idx3-ubyte[.gz]` file, or a folder / ZIP of PNGs in EDM2's dataset layout
    /// (`dataset.json` labels optional). Image sets bring their size, channels and classes.
    /// Default: `procedural`; with --resume, the dataset the run was trained on.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Image side of the procedural dataset (and of the default network).
    #[arg(long, default_value_t = 16)]
    pub resolution: usize,
    /// Classes of the procedural dataset (0: unconditional).
    #[arg(long, default_value_t = 0)]
    pub classes: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Training length in thousands of images.
    #[arg(long, default_value_t = 64)]
    pub total_kimg: u64,
    /// Snapshot interval in thousands of images.
    #[arg(long, default_value_t = 8)]
    pub snapshot_kimg: u64,
    /// Reference learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// Batches before the learning rate decays as 1/sqrt(t).
    #[arg(long, default_value_t = 2000.0)]
    pub ref_batches: f64,
    /// Statistics interval in thousands of images: one JSON line per interval (images, loss
    /// mean and standard deviation, learning rate, images per second) appended to
    /// `<data-dir>/training/<run>/stats.jsonl`.
    #[arg(long, default_value_t = 1)]
    pub status_kimg: u64,
    /// Learning-rate warm-up in millions of images.
    #[arg(long, default_value_t = 0.01)]
    pub rampup_mimg: f64,
    /// EMA widths to track (EDM2 list syntax).
    #[arg(long, default_value = "0.05,0.10")]
    pub sigma_rels: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the run's checkpoint (written at every snapshot) up to --total-kimg;
    /// the network and training options come from the checkpoint.
    #[arg(long)]
    pub resume: bool,
}

/// Trains on the compute pool with a progress bar.
pub fn run(data_dir: &Path, args: TrainArgs) -> anyhow::Result<()> {
    let options = TrainOptions {
        network: args.network.as_deref().map(Edm2Config::read).transpose()?,
        sigma_rels: hindsight::phema::parse_sigma_rel_list(&args.sigma_rels)?,
        run: args.run,
        dataset: args.dataset,
        resolution: args.resolution,
        classes: args.classes,
        batch: args.batch,
        total_kimg: args.total_kimg,
        snapshot_kimg: args.snapshot_kimg,
        status_kimg: args.status_kimg,
        lr: args.lr,
        ref_batches: args.ref_batches,
        rampup_mimg: args.rampup_mimg,
        seed: args.seed,
        resume: args.resume,
    };
    let run = options.run.clone();
    let progress = bar("training", "{bar:30} {pos}/{len} img  {per_sec}  {msg}");
    let summary =
        hindsight::model::on_compute_pool(|| hindsight::train::run(data_dir, options, &progress))?;
    progress.finish_and_clear();
    eprintln!(
        "trained {} images in {:.1} s; wrote {} snapshot(s) into run {run:?} (see `hindsight \
         snapshots {run}`)",
        summary.nimg, summary.secs, summary.snapshots
    );
    Ok(())
}
