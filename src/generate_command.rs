//! `hindsight generate`: sample images from weights with EDM's Heun sampler.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use hindsight::app::DataDir;
use hindsight::model::sampler::{edm_sampler, seeded_class, seeded_noise, to_rgb8, SamplerConfig};
use hindsight::model::{default_device, Edm2Config, Precond};
use indicatif::{ProgressBar, ProgressStyle};

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

/// Parses `0-63`, `1,5,9` or mixtures.
pub fn parse_seeds(text: &str) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
                if b < a || b - a > 1_000_000 {
                    bail!("seed range {part:?} is empty or too large");
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().with_context(|| format!("seed {part:?}"))?),
        }
    }
    if out.is_empty() {
        bail!("no seeds given");
    }
    Ok(out)
}

fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> anyhow::Result<()> {
    let tmp = path.with_extension("png.partial");
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut encoder = png::Encoder::new(file, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(rgb)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Generates the images.
pub fn generate(data_dir: &Path, args: GenerateArgs) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    let runtime = tokio::runtime::Runtime::new()?;
    let (weights_path, run_name) = match (&args.weights, &args.reconstruction) {
        (Some(path), _) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let header = hindsight::ingest::read_header(
                &mut &bytes[..],
                bytes.len() as u64,
                &path.display().to_string(),
            )?;
            (path.clone(), header.metadata.get("run").cloned())
        }
        (None, Some(id)) => runtime.block_on(async {
            let data = DataDir::open(data_dir).await?;
            let row = data
                .db
                .reconstruction(id)
                .await?
                .with_context(|| format!("no reconstruction {id} in {}", data_dir.display()))?;
            anyhow::Ok((data.store.path(&row.digest.parse()?), Some(row.run)))
        })?,
        (None, None) => bail!("give --weights FILE or --reconstruction ID"),
    };
    let network: Edm2Config = match (&args.network, &run_name) {
        (Some(path), _) => serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("parsing {}", path.display()))?,
        (None, Some(run)) => runtime.block_on(async {
            let data = DataDir::open(data_dir).await?;
            let row = data.db.run(run).await?.with_context(|| {
                format!(
                    "run {run:?} is not in {}; give --network",
                    data_dir.display()
                )
            })?;
            let meta: serde_json::Value = serde_json::from_str(&row.metadata)?;
            serde_json::from_value(meta["network"].clone()).with_context(|| {
                format!("run {run:?} records no network configuration; give --network")
            })
        })?,
        (None, None) => bail!("the weights name no run; give --network FILE"),
    };
    let seeds = parse_seeds(&args.seeds)?;
    if let Some(c) = args.class {
        if c >= network.label_dim {
            bail!(
                "--class {c} is out of range for {} classes",
                network.label_dim
            );
        }
    }
    let device = default_device();
    let vb = load_weights(&weights_path, &device)?;
    let net = Precond::new(vb, &network)?;
    let sampler = SamplerConfig {
        num_steps: args.steps,
        ..Default::default()
    };
    std::fs::create_dir_all(&args.out)?;
    let (c, r) = (network.img_channels, network.img_resolution);
    let bar = ProgressBar::new((seeds.len() * args.steps) as u64);
    bar.set_style(ProgressStyle::with_template(
        "generating {bar:30} {pos}/{len} steps {msg}",
    )?);
    let mut images: Vec<Vec<u8>> = Vec::with_capacity(seeds.len());
    for chunk in seeds.chunks(args.batch.max(1)) {
        let noise: Vec<f32> = chunk
            .iter()
            .flat_map(|&s| seeded_noise(s, &[c, r, r]))
            .collect();
        let noise = Tensor::from_vec(noise, (chunk.len(), c, r, r), &device)?;
        let labels = if network.label_dim > 0 {
            let mut v = vec![0f32; chunk.len() * network.label_dim];
            for (i, &s) in chunk.iter().enumerate() {
                let class = args
                    .class
                    .unwrap_or_else(|| seeded_class(s, network.label_dim));
                v[i * network.label_dim + class] = 1.0;
            }
            Some(Tensor::from_vec(
                v,
                (chunk.len(), network.label_dim),
                &device,
            )?)
        } else {
            None
        };
        bar.set_message(format!("seeds {}..={}", chunk[0], chunk[chunk.len() - 1]));
        let out = edm_sampler(&net, &noise, labels.as_ref(), &sampler, |_, _| {
            bar.inc(chunk.len() as u64)
        })?;
        for (i, &seed) in chunk.iter().enumerate() {
            let chw = out.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            let rgb = to_rgb8(&chw, c, r, r);
            write_png(&args.out.join(format!("{seed:06}.png")), &rgb, r, r)?;
            images.push(rgb);
        }
    }
    bar.finish_and_clear();
    // The grid: seeds in order, as square as possible.
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    let rows = images.len().div_ceil(cols);
    let mut grid = vec![0u8; rows * r * cols * r * c];
    for (k, img) in images.iter().enumerate() {
        let (gy, gx) = (k / cols, k % cols);
        for y in 0..r {
            let dst = ((gy * r + y) * cols * r + gx * r) * c;
            grid[dst..dst + r * c].copy_from_slice(&img[y * r * c..(y + 1) * r * c]);
        }
    }
    write_png(&args.out.join("grid.png"), &grid, cols * r, rows * r)?;
    eprintln!(
        "wrote {} image(s) and grid.png to {}",
        images.len(),
        args.out.display()
    );
    Ok(())
}

/// Loads safetensors weights by reading the file (no memory map, so no `unsafe`).
fn load_weights(
    path: &Path,
    device: &candle_core::Device,
) -> anyhow::Result<candle_nn::VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(candle_nn::VarBuilder::from_tensors(
        tensors,
        DType::F32,
        device,
    ))
}
