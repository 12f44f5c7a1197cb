//! `hindsight generate`: sample images from weights with EDM's Heun sampler.

use std::path::{Path, PathBuf};

use anyhow::bail;
use hindsight::model::Edm2Config;
use hindsight::sample::{generate_to_dir, parse_seeds, GenerateOptions, WeightsSource};

use super::common::bar;

/// Options of `hindsight generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A safetensors file of network weights (EDM2 state-dict names).
    #[arg(long, conflicts_with = "reconstruction")]
    pub weights: Option<PathBuf>,
    /// A stored reconstruction's id (see POST /reconstruct or `hindsight reconstruct`).
    #[arg(long)]
    pub reconstruction: Option<String>,
    /// Network configuration JSON; default: the `network` recorded with the weights' run.
    #[arg(long)]
    pub network: Option<PathBuf>,
    /// Seeds, e.g. `0-63` or `1,5,9`: one image per seed, each depending on its seed only.
    #[arg(long, default_value = "0-15")]
    pub seeds: String,
    /// Class of every image (default: drawn per seed for class-conditional networks).
    #[arg(long)]
    pub class: Option<usize>,
    /// Sampler steps.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Output directory: `<seed:06>.png` per image and `grid.png`.
    #[arg(long)]
    pub out: PathBuf,
}

/// Generates on the compute pool with a progress bar.
pub fn run(data_dir: &Path, args: GenerateArgs) -> anyhow::Result<()> {
    let source = match (args.weights, args.reconstruction) {
        (Some(path), _) => WeightsSource::File(path),
        (None, Some(id)) => WeightsSource::Reconstruction(id),
        (None, None) => bail!("give --weights FILE or --reconstruction ID"),
    };
    let network = args.network.as_deref().map(Edm2Config::read).transpose()?;
    let options = GenerateOptions {
        seeds: parse_seeds(&args.seeds)?,
        class: args.class,
        steps: args.steps,
        batch: args.batch,
    };
    let progress = bar("generating", "generating {bar:30} {pos}/{len} steps {msg}");
    let count = hindsight::model::on_compute_pool(|| {
        generate_to_dir(data_dir, &source, network, &options, &args.out, &progress)
    })?;
    progress.finish_and_clear();
    eprintln!(
        "wrote {count} image(s) and grid.png to {}",
        args.out.display()
    );
    Ok(())
}
