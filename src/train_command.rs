//! `hindsight train`: trains an EDM2 network on the procedural dataset and writes
//! power-function EMA snapshots into the store as a run.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use hindsight::app::DataDir;
use hindsight::ingest::SnapshotWriter;
use hindsight::model::{default_device, Edm2Config};
use hindsight::phema::{PowerEma, Width};
use hindsight::train::data::Procedural;
use hindsight::train::{TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `hindsight train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Run to write the snapshots into (created with the configuration as its metadata).
    #[arg(long)]
    pub run: String,
    /// Network configuration as JSON (EDM2's names); default: a small 16×16 model.
    #[arg(long)]
    pub network: Option<std::path::PathBuf>,
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
    /// Learning-rate warm-up in millions of images.
    #[arg(long, default_value_t = 0.01)]
    pub rampup_mimg: f64,
    /// EMA widths to track (EDM2 list syntax).
    #[arg(long, default_value = "0.05,0.10")]
    pub sigma_rels: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn default_network(resolution: usize, classes: usize) -> Edm2Config {
    serde_json::from_value(serde_json::json!({
        "img_resolution": resolution, "img_channels": 3, "label_dim": classes,
        "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
        "attn_resolutions": [resolution / 2], "channels_per_head": 32, "logvar_channels": 16
    }))
    .expect("valid default network")
}

fn one_hot(classes: &[usize], n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; classes.len() * n];
    for (i, &c) in classes.iter().enumerate() {
        v[i * n + c] = 1.0;
    }
    Tensor::from_vec(v, (classes.len(), n), device)
}

fn flat(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs the training loop.
pub fn train(data_dir: &Path, args: TrainArgs) -> anyhow::Result<()> {
    let network = match &args.network {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let de = &mut serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(de)
                .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?
        }
        None => default_network(args.resolution, args.classes),
    };
    if network.label_dim != args.classes {
        bail!(
            "the network has label_dim {} but --classes is {}",
            network.label_dim,
            args.classes
        );
    }
    if network.img_resolution != args.resolution || network.img_channels != 3 {
        bail!(
            "the procedural dataset makes 3×{0}×{0} images; the network expects {1}×{2}×{2}",
            args.resolution,
            network.img_channels,
            network.img_resolution
        );
    }
    if args.batch == 0 || args.total_kimg == 0 || args.snapshot_kimg == 0 {
        bail!("--batch, --total-kimg and --snapshot-kimg must be positive");
    }
    let widths: Vec<Width> = hindsight::phema::parse_sigma_rel_list(&args.sigma_rels)?
        .into_iter()
        .map(Width::SigmaRel)
        .collect();
    let mut config = TrainConfig::new(network, args.batch);
    config.ref_lr = args.lr;
    config.ref_batches = args.ref_batches;
    config.rampup_mimg = args.rampup_mimg;
    config.seed = args.seed;
    let device = default_device();
    let mut trainer = Trainer::new(config.clone(), &device)?;
    let dataset = Procedural {
        resolution: args.resolution,
        classes: args.classes,
        seed: args.seed ^ 0x5eed,
    };

    let state = trainer.state_dict();
    let names: Vec<String> = state.iter().map(|(n, _)| n.clone()).collect();
    let shapes: Vec<Vec<usize>> = state.iter().map(|(_, t)| t.dims().to_vec()).collect();
    let values: Vec<Vec<f32>> = state
        .iter()
        .map(|(_, t)| flat(t))
        .collect::<anyhow::Result<_>>()?;
    let mut ema = PowerEma::new(
        &widths,
        0,
        names
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(Vec::as_slice)),
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    let metadata = serde_json::json!({
        "trainer": "hindsight train",
        "dataset": {"kind": "procedural", "resolution": args.resolution, "classes": args.classes, "seed": dataset.seed},
        "training": config,
        "network": config.network,
    });
    let writer = runtime.block_on(async {
        let data = DataDir::open(data_dir).await?;
        SnapshotWriter::new(&data, &args.run, &metadata, &ema, &shapes).await
    })?;

    let total = args.total_kimg * 1000;
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} img  {per_sec}  {msg}",
    )?);
    let start = Instant::now();
    let mut next_snapshot = args.snapshot_kimg * 1000;
    let mut index = 0u64;
    let mut recent = Vec::new();
    let mut snapshots = 0;
    while trainer.cur_nimg < total {
        let mut pixels = Vec::with_capacity(args.batch * 3 * args.resolution * args.resolution);
        let mut classes = Vec::with_capacity(args.batch);
        for _ in 0..args.batch {
            let (img, class) = dataset.image(index);
            index += 1;
            pixels.extend(img);
            classes.push(class);
        }
        let images = Tensor::from_vec(
            pixels,
            (args.batch, 3, args.resolution, args.resolution),
            &device,
        )?;
        let labels = if args.classes > 0 {
            Some(one_hot(&classes, args.classes, &device)?)
        } else {
            None
        };
        let stats = trainer.step(&images, labels.as_ref())?;
        recent.push(stats.loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        let state: Vec<Vec<f32>> = trainer
            .state_dict()
            .iter()
            .map(|(_, t)| flat(t))
            .collect::<anyhow::Result<_>>()?;
        let refs: Vec<&[f32]> = state.iter().map(Vec::as_slice).collect();
        ema.update(trainer.cur_nimg, &refs)?;
        bar.set_position(trainer.cur_nimg.min(total));
        bar.set_message(format!(
            "loss {:.3}  lr {:.2e}",
            recent.iter().sum::<f64>() / recent.len() as f64,
            stats.lr
        ));
        if trainer.cur_nimg >= next_snapshot || trainer.cur_nimg >= total {
            let stored = runtime.block_on(writer.write(&ema))?;
            snapshots += stored.len();
            next_snapshot += args.snapshot_kimg * 1000;
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "trained {} images in {:.1} s; wrote {snapshots} snapshot(s) into run {:?} (see `hindsight snapshots {}`)",
        trainer.cur_nimg,
        start.elapsed().as_secs_f64(),
        args.run,
        args.run
    );
    Ok(())
}
