//! Generating images from weights: which weights, which network, then seeds in batches.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::images::{grid, write_png};
use crate::app::DataDir;
use crate::datasets::one_hot;
use crate::error::{Error, Result};
use crate::format::read_header;
use crate::model::sampler::{edm_sampler, seeded_class, seeded_noise, to_rgb8, SamplerConfig};
use crate::model::{default_device, Edm2Config, Precond};
use crate::progress::Progress;

/// Where the weights come from.
#[derive(Clone, Debug)]
pub enum WeightsSource {
    /// A safetensors file with EDM2's state-dict names; its `__metadata__.run` (written by
    /// reconstructions) names the run whose network configuration applies.
    File(PathBuf),
    /// A stored reconstruction, by id.
    Reconstruction(String),
}

/// How many images and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// One image per seed, each depending on its seed only.
    pub seeds: Vec<u64>,
    /// Class of every image; `None`: drawn per seed for class-conditional networks.
    pub class: Option<usize>,
    /// Sampler steps.
    pub steps: usize,
    /// Images per batch.
    pub batch: usize,
}

/// A network ready to sample, on the device hindsight computes on.
pub struct Sampler {
    net: Precond,
    network: Edm2Config,
    device: Device,
}

impl Sampler {
    /// Loads the weights at `path` (read whole: no memory map) for `network`.
    pub fn load(path: &Path, network: &Edm2Config) -> Result<Self> {
        let device = default_device();
        let tensors = candle_core::safetensors::load(path, &device).map_err(|e| {
            Error::invalid(
                path.display().to_string(),
                format!("loading the weights: {e}"),
            )
        })?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
        Ok(Self {
            net: Precond::new(vb, network)?,
            network: network.clone(),
            device,
        })
    }

    /// The network configuration.
    pub fn network(&self) -> &Edm2Config {
        &self.network
    }

    /// Samples `seeds` (one batch) with `sampler`: 8-bit HWC images, in seed order.
    /// `on_step` is called after each sampler step.
    pub fn sample(
        &self,
        seeds: &[u64],
        class: Option<usize>,
        sampler: &SamplerConfig,
        mut on_step: impl FnMut(),
    ) -> Result<Vec<Vec<u8>>> {
        let (c, r) = (self.network.img_channels, self.network.img_resolution);
        let noise: Vec<f32> = seeds
            .iter()
            .flat_map(|&s| seeded_noise(s, &[c, r, r]))
            .collect();
        let noise = Tensor::from_vec(noise, (seeds.len(), c, r, r), &self.device)?;
        let labels = match self.network.label_dim {
            0 => None,
            n => {
                let classes: Vec<usize> = seeds
                    .iter()
                    .map(|&s| class.unwrap_or_else(|| seeded_class(s, n)))
                    .collect();
                Some(one_hot(&classes, n, &self.device)?)
            }
        };
        let out = edm_sampler(&self.net, &noise, labels.as_ref(), sampler, |_, _| {
            on_step()
        })?;
        (0..seeds.len())
            .map(|i| {
                let chw = out.get(i)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(to_rgb8(&chw, c, r, r))
            })
            .collect()
    }
}

/// The weights file and network configuration `source` names: the reconstruction's blob and
/// its run's recorded network, or the file and the run its metadata names; `network`
/// overrides the configuration.
pub async fn resolve(
    data_dir: &Path,
    source: &WeightsSource,
    network: Option<Edm2Config>,
) -> Result<(PathBuf, Edm2Config)> {
    let (path, run) = match source {
        WeightsSource::File(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let header = read_header(
                &mut &bytes[..],
                bytes.len() as u64,
                &path.display().to_string(),
            )?;
            (path.clone(), header.metadata.get("run").cloned())
        }
        WeightsSource::Reconstruction(id) => {
            let data = DataDir::open(data_dir).await?;
            let row = data.db.reconstruction(id).await?.ok_or_else(|| {
                Error::NotFound(format!("no reconstruction {id} in {}", data_dir.display()))
            })?;
            (data.store.path(&row.digest.parse()?), Some(row.run))
        }
    };
    let network = match (network, run) {
        (Some(n), _) => n,
        (None, Some(run)) => {
            let data = DataDir::open(data_dir).await?;
            let row = data.db.run(&run).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "run {run:?} is not in {}; give --network",
                    data_dir.display()
                ))
            })?;
            serde_json::from_value(row.metadata["network"].clone()).map_err(|_| {
                Error::invalid(
                    "network",
                    format!("run {run:?} records no network configuration; give --network"),
                )
            })?
        }
        (None, None) => {
            return Err(Error::invalid(
                "network",
                "the weights name no run; give --network FILE",
            ))
        }
    };
    Ok((path, network))
}

/// Generates one image per seed into `out_dir` (`<seed:06>.png`) plus `grid.png`; returns
/// the number of images. `progress` counts sampler steps × images.
///
/// Errors: unknown reconstruction or run, no network configuration, a class out of range,
/// weights that do not fit the network, and failures writing `out_dir`.
pub fn generate_to_dir(
    data_dir: &Path,
    source: &WeightsSource,
    network: Option<Edm2Config>,
    options: &GenerateOptions,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<usize> {
    crate::model::keep_freed_memory();
    let runtime =
        tokio::runtime::Runtime::new().map_err(|e| Error::io("starting the async runtime", e))?;
    let (weights, network) = runtime.block_on(resolve(data_dir, source, network))?;
    if let Some(c) = options.class {
        if c >= network.label_dim {
            return Err(Error::invalid(
                "class",
                format!("{c} is out of range for {} classes", network.label_dim),
            ));
        }
    }
    let sampler = Sampler::load(&weights, &network)?;
    let config = SamplerConfig {
        num_steps: options.steps,
        ..Default::default()
    };
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    let (c, r) = (network.img_channels, network.img_resolution);
    progress.set_length((options.seeds.len() * options.steps) as u64);
    let mut images: Vec<Vec<u8>> = Vec::with_capacity(options.seeds.len());
    for chunk in options.seeds.chunks(options.batch.max(1)) {
        progress.set_message(format!("seeds {}..={}", chunk[0], chunk[chunk.len() - 1]));
        let batch = sampler.sample(chunk, options.class, &config, || {
            progress.inc(chunk.len() as u64)
        })?;
        for (&seed, rgb) in chunk.iter().zip(batch) {
            write_png(&out_dir.join(format!("{seed:06}.png")), &rgb, r, r, c)?;
            images.push(rgb);
        }
    }
    let (pixels, width, height) = grid(&images, r, c);
    write_png(&out_dir.join("grid.png"), &pixels, width, height, c)?;
    Ok(images.len())
}
