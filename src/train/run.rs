//! The training loop of `hindsight train` (and of anything else that trains into the store):
//! batches from a dataset, one [`Trainer::step`] each, the power-function EMAs updated with
//! the true image count after every step, a snapshot of every EMA (and a checkpoint) every
//! `snapshot_kimg`, one JSON line of statistics every `status_kimg`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use super::checkpoint::{self, flat};
use super::trainer::{TrainConfig, Trainer};
use crate::app::DataDir;
use crate::datasets::Dataset;
use crate::error::{Error, Result};
use crate::ingest::SnapshotWriter;
use crate::model::{default_device, Edm2Config};
use crate::phema::{PowerEma, Width};
use crate::progress::Progress;

/// What to train, on what, for how long. Field names follow `hindsight train`'s flags.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Run to write the snapshots into (created with the configuration as its metadata).
    pub run: String,
    /// The network; `None`: [`Edm2Config::small`] for the dataset's size, channels and
    /// classes.
    pub network: Option<Edm2Config>,
    /// `procedural`, `fashion-mnist`, an IDX file, or a folder / ZIP of PNGs (whose size and
    /// classes win); `None`: `procedural`, or with `resume` the dataset the run recorded.
    pub dataset: Option<String>,
    /// Image side of the procedural dataset.
    pub resolution: usize,
    /// Classes of the procedural dataset (0: unconditional).
    pub classes: usize,
    /// Images per step.
    pub batch: usize,
    /// Training length, thousands of images.
    pub total_kimg: u64,
    /// Snapshot (and checkpoint) interval, thousands of images.
    pub snapshot_kimg: u64,
    /// Statistics interval, thousands of images.
    pub status_kimg: u64,
    /// Reference learning rate.
    pub lr: f64,
    /// Batches before the learning rate decays as 1/sqrt(t).
    pub ref_batches: f64,
    /// Learning-rate warm-up, millions of images.
    pub rampup_mimg: f64,
    /// EMA widths to track.
    pub sigma_rels: Vec<f64>,
    /// Seed of initialisation, noise and data.
    pub seed: u64,
    /// Continue from the run's checkpoint (the network and training settings come from it).
    pub resume: bool,
}

/// What [`run`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Training images seen at the end (including those before a resume).
    pub nimg: u64,
    /// Wall time of this call, seconds.
    pub secs: f64,
    /// Snapshots written by this call.
    pub snapshots: usize,
}

/// Trains as `options` says, writing snapshots into the run and the checkpoint and statistics
/// under `<data_dir>/training/<run>/`. `progress` counts images (its length is the total) and
/// gets the running loss as its message. Runs on the calling thread (call it on the compute
/// pool, see [`crate::model::on_compute_pool`]); the index is written through a runtime of its
/// own.
///
/// Errors: invalid options (zero sizes, a network that does not fit the dataset), a missing
/// checkpoint with `resume`, and failures of the data, the network, the store or the index.
pub fn run(
    data_dir: &Path,
    options: TrainOptions,
    progress: &dyn Progress,
) -> Result<TrainSummary> {
    crate::model::keep_freed_memory();
    let mut session = Session::prepare(data_dir, options, progress)?;
    session.train(progress)
}

/// A training run in progress.
struct Session {
    options: TrainOptions,
    dataset: Dataset,
    device: Device,
    trainer: Trainer,
    ema: PowerEma,
    /// Position in the data stream.
    index: u64,
    writer: SnapshotWriter,
    runtime: tokio::runtime::Runtime,
    checkpoint: std::path::PathBuf,
    stats: std::fs::File,
}

impl Session {
    /// Opens the dataset, builds or restores the trainer and the EMAs, and opens the run.
    fn prepare(
        data_dir: &Path,
        mut options: TrainOptions,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Runtime::new()
            .map_err(|e| Error::io("starting the async runtime", e))?;
        if options.resume {
            resume_dataset(&runtime, data_dir, &mut options)?;
        }
        let source = options
            .dataset
            .clone()
            .unwrap_or_else(|| "procedural".to_owned());
        let dataset = Dataset::open(&source, options.resolution, options.classes, options.seed)?;
        if let Dataset::Images(folder, _) = &dataset {
            progress.note(&format!(
                "dataset {}: {} of {2}×{2}, {3} channel(s), {4} classes",
                source,
                folder.summary(),
                folder.resolution,
                folder.channels,
                folder.classes
            ));
            if let Some(skipped) = folder.report().skipped_summary() {
                progress.note(&format!("warning: dataset {source}: {skipped}"));
            }
        }
        options.resolution = dataset.resolution();
        options.classes = dataset.classes();
        let network = options.network.clone().unwrap_or_else(|| {
            Edm2Config::small(options.resolution, dataset.channels(), options.classes)
        });
        if network.label_dim == 0 && options.classes > 0 {
            // An unconditional network on labelled data: the labels go unused.
            progress.note(&format!(
                "training unconditionally (label_dim 0): the dataset's {} class labels are not used",
                options.classes
            ));
            options.classes = 0;
        }
        check(&options, dataset.channels(), &network)?;
        let widths: Vec<Width> = options
            .sigma_rels
            .iter()
            .map(|&s| Width::SigmaRel(s))
            .collect();
        let mut config = TrainConfig::new(network, options.batch);
        config.ref_lr = options.lr;
        config.ref_batches = options.ref_batches;
        config.rampup_mimg = options.rampup_mimg;
        config.seed = options.seed;
        let device = default_device();
        let checkpoint = checkpoint::checkpoint_path(data_dir, &options.run);
        let (trainer, ema, index) = if options.resume {
            if !checkpoint.is_file() {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "no checkpoint for run {:?} at {}",
                        options.run,
                        checkpoint.display()
                    ),
                ));
            }
            checkpoint::load(&checkpoint, &device)?
        } else {
            let trainer = Trainer::new(config, &device)?;
            let ema = fresh_ema(&trainer, &widths)?;
            (trainer, ema, 0)
        };
        let config = &trainer.config;
        let metadata = serde_json::json!({
            "trainer": "hindsight train",
            "dataset": {"source": source, "resolution": options.resolution,
                        "channels": dataset.channels(),
                        "classes": options.classes, "seed": dataset.seed()},
            "training": config,
            "network": config.network,
        });
        let shapes: Vec<Vec<usize>> = trainer
            .state_dict()
            .iter()
            .map(|(_, t)| t.dims().to_vec())
            .collect();
        let writer = runtime.block_on(async {
            let data = DataDir::open(data_dir).await?;
            SnapshotWriter::new(&data, &options.run, &metadata, &ema, &shapes).await
        })?;
        let stats_file = checkpoint::stats_path(data_dir, &options.run);
        let io = |e| Error::io(format!("opening {}", stats_file.display()), e);
        std::fs::create_dir_all(stats_file.parent().expect("a stats path has a directory"))
            .map_err(io)?;
        let stats = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stats_file)
            .map_err(io)?;
        Ok(Session {
            options,
            dataset,
            device,
            trainer,
            ema,
            index,
            writer,
            runtime,
            checkpoint,
            stats,
        })
    }

    /// The loop, from the trainer's current time to `total_kimg`.
    fn train(&mut self, progress: &dyn Progress) -> Result<TrainSummary> {
        let batch = self.options.batch;
        let total = self.options.total_kimg * 1000;
        let interval = self.options.snapshot_kimg * 1000;
        let status_interval = self.options.status_kimg * 1000;
        let start = Instant::now();
        let mut next_status = (self.trainer.cur_nimg / status_interval + 1) * status_interval;
        let mut next_snapshot = (self.trainer.cur_nimg / interval + 1) * interval;
        let mut status = StatusInterval::new(self.trainer.cur_nimg);
        let mut recent = Vec::new();
        let mut snapshots = 0;
        progress.set_length(total);
        progress.set_position(self.trainer.cur_nimg.min(total));
        while self.trainer.cur_nimg < total {
            let (images, labels) = self.dataset.batch(self.index, batch, &self.device)?;
            let labels = labels.filter(|_| self.options.classes > 0);
            self.index += batch as u64;
            let stats = self.trainer.step(&images, labels.as_ref())?;
            recent.push(stats.loss);
            if recent.len() > 20 {
                recent.remove(0);
            }
            status.losses.push(stats.loss);
            let state: Vec<Vec<f32>> = self
                .trainer
                .state_dict()
                .iter()
                .map(|(_, t)| flat(t))
                .collect::<Result<_>>()?;
            let refs: Vec<&[f32]> = state.iter().map(Vec::as_slice).collect();
            self.ema.update(self.trainer.cur_nimg, &refs)?;
            progress.set_position(self.trainer.cur_nimg.min(total));
            progress.set_message(format!(
                "loss {:.3}  lr {:.2e}",
                recent.iter().sum::<f64>() / recent.len() as f64,
                stats.lr
            ));
            let now = self.trainer.cur_nimg;
            if now >= next_status || now >= total {
                let line = status.finish(now, stats.lr, start);
                self.stats
                    .write_all(format!("{line}\n").as_bytes())
                    .map_err(|e| Error::io("writing the training statistics", e))?;
                status = StatusInterval::new(now);
                next_status += status_interval;
            }
            if now >= next_snapshot || now >= total {
                snapshots += self.runtime.block_on(self.writer.write(&self.ema))?.len();
                next_snapshot += interval;
                checkpoint::save(&self.checkpoint, &self.trainer, &self.ema, self.index)?;
            }
        }
        Ok(TrainSummary {
            nimg: self.trainer.cur_nimg,
            secs: start.elapsed().as_secs_f64(),
            snapshots,
        })
    }
}

/// With `--resume`, the dataset (and, unless given, the network) come from the run's record
/// (`metadata.dataset`, `metadata.network`): the data stream continues where it stopped. A
/// different `--dataset` is refused.
fn resume_dataset(
    runtime: &tokio::runtime::Runtime,
    data_dir: &Path,
    options: &mut TrainOptions,
) -> Result<()> {
    let run = runtime.block_on(async {
        let data = DataDir::open(data_dir).await?;
        data.db.run(&options.run).await
    })?;
    let Some(run) = run else {
        return Ok(()); // No run yet: the missing checkpoint is reported below.
    };
    let recorded = &run.metadata["dataset"];
    let Some(source) = recorded["source"].as_str() else {
        return Ok(());
    };
    match &options.dataset {
        Some(given) if given != source => {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "run {:?} was trained on {source:?}; resuming it on {given:?} would change \
                     its data (leave --dataset out to continue on the same data)",
                    options.run
                ),
            ))
        }
        _ => options.dataset = Some(source.to_owned()),
    }
    if let Some(r) = recorded["resolution"].as_u64() {
        options.resolution = r as usize;
    }
    if let Some(c) = recorded["classes"].as_u64() {
        options.classes = c as usize;
    }
    if options.network.is_none() {
        options.network = serde_json::from_value(run.metadata["network"].clone()).ok();
    }
    Ok(())
}

/// Refuses options that cannot train: a network that does not fit the dataset, zero sizes.
fn check(options: &TrainOptions, channels: usize, network: &Edm2Config) -> Result<()> {
    if network.label_dim != options.classes {
        return Err(Error::invalid(
            "network",
            format!(
                "the network has label_dim {} but the dataset has {} classes (label_dim 0 \
                 trains unconditionally on any dataset)",
                network.label_dim, options.classes
            ),
        ));
    }
    if network.img_resolution != options.resolution || network.img_channels != channels {
        return Err(Error::invalid(
            "network",
            format!(
                "the dataset has {channels}×{0}×{0} images; the network expects {1}×{2}×{2}",
                options.resolution, network.img_channels, network.img_resolution
            ),
        ));
    }
    if options.batch == 0
        || options.total_kimg == 0
        || options.snapshot_kimg == 0
        || options.status_kimg == 0
    {
        return Err(Error::invalid(
            "options",
            "--batch, --total-kimg, --snapshot-kimg and --status-kimg must be positive",
        ));
    }
    Ok(())
}

/// EMAs of the trainer's initial state, one per width.
fn fresh_ema(trainer: &Trainer, widths: &[Width]) -> Result<PowerEma> {
    let state = trainer.state_dict();
    let values: Vec<Vec<f32>> = state.iter().map(|(_, t)| flat(t)).collect::<Result<_>>()?;
    PowerEma::new(
        widths,
        0,
        state
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(values.iter().map(Vec::as_slice)),
    )
}

/// The losses of one statistics interval.
struct StatusInterval {
    started: Instant,
    start_nimg: u64,
    losses: Vec<f64>,
}

impl StatusInterval {
    fn new(nimg: u64) -> Self {
        Self {
            started: Instant::now(),
            start_nimg: nimg,
            losses: Vec::new(),
        }
    }

    /// The interval's line of `stats.jsonl`: images, loss mean and standard deviation,
    /// learning rate, images per second, seconds since the run (this call) started.
    fn finish(&self, nimg: u64, lr: f64, run_start: Instant) -> serde_json::Value {
        let n = self.losses.len() as f64;
        let mean = self.losses.iter().sum::<f64>() / n;
        let var = self.losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
        let secs = self.started.elapsed().as_secs_f64();
        serde_json::json!({
            "nimg": nimg,
            "loss_mean": mean,
            "loss_std": var.sqrt(),
            "lr": lr,
            "images_per_sec": (nimg - self.start_nimg) as f64 / secs.max(1e-9),
            "elapsed_secs": run_start.elapsed().as_secs_f64(),
        })
    }
}
