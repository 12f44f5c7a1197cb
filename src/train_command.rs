//! `hindsight train`: trains an EDM2 network on the procedural dataset or PNG images and writes
//! power-function EMA snapshots into the store as a run.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use hindsight::app::DataDir;
use hindsight::ingest::SnapshotWriter;
use hindsight::model::{default_device, Edm2Config};
use hindsight::phema::{PowerEma, Width};
use hindsight::train::data::{Dataset, ImageFolder, Procedural};
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
    /// Training images: `procedural` (built in, no download) or a folder / ZIP of PNGs in
    /// EDM2's dataset layout (`dataset.json` labels optional; size and classes come from it).
    #[arg(long, default_value = "procedural")]
    pub dataset: String,
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

fn checkpoint_path(data_dir: &Path, run: &str) -> std::path::PathBuf {
    data_dir
        .join("training")
        .join(run)
        .join("checkpoint.safetensors")
}

fn stats_path(data_dir: &Path, run: &str) -> std::path::PathBuf {
    data_dir.join("training").join(run).join("stats.jsonl")
}

fn tensor_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    Ok(flat(t)?.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes the trainer, the EMAs and the data position atomically (temp file, fsync, rename).
fn save_checkpoint(
    path: &Path,
    trainer: &Trainer,
    ema: &PowerEma,
    data_index: u64,
) -> anyhow::Result<()> {
    use hindsight::ingest::{write_safetensors, OutTensor};
    let (tensors, mut meta) = trainer.checkpoint();
    let names = ema.names();
    meta.insert(
        "ema_sigma_rels".into(),
        serde_json::to_string(&ema.emas().iter().map(|e| e.sigma_rel).collect::<Vec<_>>())?,
    );
    meta.insert("ema_names".into(), serde_json::to_string(names)?);
    meta.insert("ema_nimg".into(), ema.nimg().to_string());
    meta.insert("data_index".into(), data_index.to_string());
    // (name, shape, little-endian f32 bytes) of the trainer's tensors, then of every EMA
    // buffer (the EMA tracks the state dict, in its order).
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), tensor_bytes(t)?)))
        .collect::<anyhow::Result<_>>()?;
    let state = trainer.state_dict();
    for (k, e) in ema.emas().iter().enumerate() {
        for ((name, values), (_, t)) in names.iter().zip(&e.tensors).zip(&state) {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            entries.push((format!("ema{k}/{name}"), t.dims().to_vec(), bytes));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let out: Vec<OutTensor<'_>> = entries
        .iter()
        .map(|(n, s, b)| OutTensor {
            name: n,
            dtype: "F32",
            shape: s,
            data: b,
        })
        .collect();
    std::fs::create_dir_all(path.parent().expect("checkpoint dir"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(path.parent().expect("checkpoint dir"))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write_safetensors(&mut w, &out, &meta)?;
        std::io::Write::flush(&mut w)?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

fn load_checkpoint(path: &Path, device: &Device) -> anyhow::Result<(Trainer, PowerEma, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = hindsight::ingest::read_header(
        &mut &bytes[..],
        bytes.len() as u64,
        &path.display().to_string(),
    )?;
    let meta = header.metadata;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    let trainer = Trainer::restore(&tensors, &meta, device)?;
    let get = |k: &str| {
        meta.get(k)
            .with_context(|| format!("{}: no {k}", path.display()))
    };
    let sigma_rels: Vec<f64> = serde_json::from_str(get("ema_sigma_rels")?)?;
    let names: Vec<String> = serde_json::from_str(get("ema_names")?)?;
    let mut emas = Vec::new();
    for (k, &sigma_rel) in sigma_rels.iter().enumerate() {
        let tensors = names
            .iter()
            .map(|n| {
                let t = tensors
                    .get(&format!("ema{k}/{n}"))
                    .with_context(|| format!("no ema{k}/{n}"))?;
                flat(t)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (_, gamma) = Width::SigmaRel(sigma_rel).resolve("ema")?;
        emas.push(hindsight::phema::TrackedEma {
            sigma_rel,
            gamma,
            tensors,
        });
    }
    let ema = PowerEma::from_parts(names, emas, get("ema_nimg")?.parse()?)?;
    let data_index = get("data_index")?.parse()?;
    Ok((trainer, ema, data_index))
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
pub fn train(data_dir: &Path, mut args: TrainArgs) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    let dataset = if args.dataset == "procedural" {
        Dataset::Procedural(Procedural {
            resolution: args.resolution,
            classes: args.classes,
            seed: args.seed ^ 0x5eed,
        })
    } else {
        let folder = ImageFolder::open(Path::new(&args.dataset))?;
        args.resolution = folder.resolution;
        args.classes = folder.classes;
        eprintln!(
            "dataset {}: {} images of {2}×{2}, {3} classes",
            args.dataset,
            folder.len(),
            folder.resolution,
            folder.classes
        );
        Dataset::Images(folder, args.seed ^ 0x5eed)
    };
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
            "the dataset has 3×{0}×{0} images; the network expects {1}×{2}×{2}",
            args.resolution,
            network.img_channels,
            network.img_resolution
        );
    }
    if args.batch == 0 || args.total_kimg == 0 || args.snapshot_kimg == 0 || args.status_kimg == 0 {
        bail!("--batch, --total-kimg, --snapshot-kimg and --status-kimg must be positive");
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
    let checkpoint = checkpoint_path(data_dir, &args.run);
    let resumed = if args.resume {
        if !checkpoint.is_file() {
            bail!(
                "no checkpoint for run {:?} at {}",
                args.run,
                checkpoint.display()
            );
        }
        Some(load_checkpoint(&checkpoint, &device)?)
    } else {
        None
    };
    if let Some((t, _, _)) = &resumed {
        config = t.config.clone();
    }
    let (mut trainer, resumed_ema, mut index) = match resumed {
        Some((t, e, i)) => (t, Some(e), i),
        None => (Trainer::new(config.clone(), &device)?, None, 0),
    };

    let state = trainer.state_dict();
    let names: Vec<String> = state.iter().map(|(n, _)| n.clone()).collect();
    let shapes: Vec<Vec<usize>> = state.iter().map(|(_, t)| t.dims().to_vec()).collect();
    let values: Vec<Vec<f32>> = state
        .iter()
        .map(|(_, t)| flat(t))
        .collect::<anyhow::Result<_>>()?;
    let mut ema = match resumed_ema {
        Some(e) => e,
        None => PowerEma::new(
            &widths,
            0,
            names
                .iter()
                .map(String::as_str)
                .zip(values.iter().map(Vec::as_slice)),
        )?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let metadata = serde_json::json!({
        "trainer": "hindsight train",
        "dataset": {"source": args.dataset, "resolution": args.resolution, "classes": args.classes, "seed": args.seed ^ 0x5eed},
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
    let interval = args.snapshot_kimg * 1000;
    let status_interval = args.status_kimg * 1000;
    let mut next_status = (trainer.cur_nimg / status_interval + 1) * status_interval;
    let stats_file = stats_path(data_dir, &args.run);
    std::fs::create_dir_all(stats_file.parent().expect("stats dir"))?;
    let mut stats_out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stats_file)
        .with_context(|| format!("opening {}", stats_file.display()))?;
    let mut interval_losses: Vec<f64> = Vec::new();
    let mut interval_start = (Instant::now(), trainer.cur_nimg);
    let mut next_snapshot = (trainer.cur_nimg / interval + 1) * interval;
    bar.set_position(trainer.cur_nimg.min(total));
    let mut recent = Vec::new();
    let mut snapshots = 0;
    while trainer.cur_nimg < total {
        let mut pixels = Vec::with_capacity(args.batch * 3 * args.resolution * args.resolution);
        let mut classes = Vec::with_capacity(args.batch);
        for _ in 0..args.batch {
            let (img, class) = dataset.example(index);
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
        interval_losses.push(stats.loss);
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
        if trainer.cur_nimg >= next_status || trainer.cur_nimg >= total {
            let n = interval_losses.len() as f64;
            let mean = interval_losses.iter().sum::<f64>() / n;
            let var = interval_losses
                .iter()
                .map(|l| (l - mean).powi(2))
                .sum::<f64>()
                / n;
            let secs = interval_start.0.elapsed().as_secs_f64();
            let line = serde_json::json!({
                "nimg": trainer.cur_nimg,
                "loss_mean": mean,
                "loss_std": var.sqrt(),
                "lr": stats.lr,
                "images_per_sec": (trainer.cur_nimg - interval_start.1) as f64 / secs.max(1e-9),
                "elapsed_secs": start.elapsed().as_secs_f64(),
            });
            std::io::Write::write_all(&mut stats_out, format!("{line}\n").as_bytes())?;
            interval_losses.clear();
            interval_start = (Instant::now(), trainer.cur_nimg);
            next_status += status_interval;
        }
        if trainer.cur_nimg >= next_snapshot || trainer.cur_nimg >= total {
            let stored = runtime.block_on(writer.write(&ema))?;
            snapshots += stored.len();
            next_snapshot += interval;
            save_checkpoint(&checkpoint, &trainer, &ema, index)?;
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

/// `hindsight bench conv`: 3×3 convolution shapes (by default each one of the `bench train`
/// network at `batch` images; else the given `[N, C, O, H]`, square images), timed on the CPU
/// with the direct GEMM path and with Winograd's F(2×2, 3×3): the forward pass alone, and the
/// forward pass with both gradients.
pub fn bench_conv(
    batch: usize,
    iterations: usize,
    rounds: usize,
    shapes: &[[usize; 4]],
) -> anyhow::Result<()> {
    use hindsight::model::{conv2d_same, set_winograd, winograd_applies, winograd_enabled};
    anyhow::ensure!(
        batch > 0 && iterations > 0 && rounds > 0,
        "--batch, --iterations and --rounds must be positive"
    );
    if let Some(bad) = shapes.iter().find(|s| s.contains(&0)) {
        anyhow::bail!("--shape {bad:?}: every size must be positive");
    }
    hindsight::model::keep_freed_memory();
    let initial = winograd_enabled();
    let device = Device::Cpu;
    let layers: Vec<[usize; 4]> = if shapes.is_empty() {
        [
            (4, 32, 16),
            (32, 32, 16),
            (32, 32, 8),
            (64, 64, 8),
            (128, 64, 8),
            (96, 64, 8),
            (64, 64, 16),
            (96, 32, 16),
            (64, 32, 16),
            (32, 3, 16),
        ]
        .map(|(c, o, h)| [batch, c, o, h])
        .to_vec()
    } else {
        shapes.to_vec()
    };
    println!(
        "3x3 convolutions ({}), {} threads; medians of {iterations} x {rounds} rounds \
         (alternating which algorithm goes first)",
        if shapes.is_empty() {
            format!("the bench network's, batch {batch}")
        } else {
            "the given shapes".to_string()
        },
        rayon::current_num_threads()
    );
    println!(
        "  {:<24} {:>11} {:>11} {:>6}   {:>12} {:>12} {:>6}",
        "N x C -> O, HxW", "fwd direct", "Winograd", "ratio", "f+b direct", "Winograd", "ratio"
    );
    let (mut total_f, mut total_b) = ([0.0f64; 2], [0.0f64; 2]);
    for [batch, c, o, h] in layers {
        let x =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, c, h, h), &device)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, 3, 3), &device)?)?;
        let r = Tensor::randn(0f32, 1.0, (batch, o, h, h), &device)?;
        let (xt, wt) = (x.as_tensor().detach(), w.as_tensor().detach());
        let mut times: [[Vec<f64>; 2]; 2] = Default::default(); // [algorithm][fwd, fwd+bwd]
        for round in 0..rounds {
            for k in 0..2 {
                let winograd = (k + round) % 2 == 1;
                set_winograd(winograd);
                let a = usize::from(winograd);
                for i in 0..=iterations {
                    let t = Instant::now();
                    conv2d_same(&xt, &wt)?;
                    let f = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let g = (conv2d_same(x.as_tensor(), w.as_tensor())? * &r)?
                        .sum_all()?
                        .backward()?;
                    anyhow::ensure!(g.get(w.as_tensor()).is_some(), "no weight gradient");
                    let b = t.elapsed().as_secs_f64();
                    if i > 0 {
                        times[a][0].push(f);
                        times[a][1].push(b);
                    }
                }
            }
        }
        let [[fd, bd], [fw, bw]] = times.map(|t| t.map(median));
        for (a, (f, b)) in [(fd, bd), (fw, bw)].into_iter().enumerate() {
            total_f[a] += f;
            total_b[a] += b;
        }
        let applies = winograd_applies(3, c, o, h, h);
        println!(
            "  {:<24} {:>8.3} ms {:>8.3} ms {:>5.2}x   {:>9.3} ms {:>9.3} ms {:>5.2}x{}",
            format!("{batch} x {c} -> {o}, {h}x{h}"),
            fd * 1e3,
            fw * 1e3,
            fw / fd,
            bd * 1e3,
            bw * 1e3,
            bw / bd,
            if applies { "" } else { "  (direct either way)" }
        );
    }
    println!(
        "  {:<24} {:>8.3} ms {:>8.3} ms {:>5.2}x   {:>9.3} ms {:>9.3} ms {:>5.2}x",
        "total",
        total_f[0] * 1e3,
        total_f[1] * 1e3,
        total_f[1] / total_f[0],
        total_b[0] * 1e3,
        total_b[1] * 1e3,
        total_b[1] / total_b[0]
    );
    set_winograd(initial);
    Ok(())
}

/// `hindsight bench train`: seconds per forward pass and per training step of the EDM2 network
/// in the configuration of the reference fixture (16×16, 3 channels, 10 classes,
/// model_channels 32, channel_mult [1, 2], 1 block, attention at 8×8).
pub fn bench_train(
    batch: usize,
    iterations: usize,
    peer_python: Option<&str>,
    rounds: usize,
) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    anyhow::ensure!(
        iterations > 0 && rounds > 0,
        "--iterations and --rounds must be positive"
    );
    let network: Edm2Config = serde_json::from_value(serde_json::json!({
        "img_resolution": 16, "img_channels": 3, "label_dim": 10, "model_channels": 32,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
        "channels_per_head": 32, "logvar_channels": 16
    }))?;
    let device = default_device();
    let mut config = TrainConfig::new(network, batch);
    config.rampup_mimg = 0.0;
    let mut trainer = Trainer::new(config, &device)?;
    let data = Procedural {
        resolution: 16,
        classes: 10,
        seed: 1,
    };
    let mut pixels = Vec::new();
    let mut classes = Vec::new();
    for i in 0..batch as u64 {
        let (img, c) = data.image(i);
        pixels.extend(img);
        classes.push(c);
    }
    let images = Tensor::from_vec(pixels, (batch, 3, 16, 16), &device)?;
    let labels = one_hot(&classes, 10, &device)?;
    let sigma = Tensor::full(1.0f32, batch, &device)?;
    let threads = rayon::current_num_threads();
    // Medians of `iterations` timed repetitions after one warm-up repetition.
    let mut ours = || -> anyhow::Result<(f64, f64)> {
        let mut forward = Vec::new();
        let mut step = Vec::new();
        for _ in 0..iterations + 1 {
            let t = Instant::now();
            let (d, _) = trainer.net().forward(&images, &sigma, Some(&labels))?;
            d.sum_all()?.to_scalar::<f32>()?;
            forward.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            trainer.step(&images, Some(&labels))?;
            device.synchronize()?;
            step.push(t.elapsed().as_secs_f64());
        }
        forward.remove(0);
        step.remove(0);
        Ok((median(forward), median(step)))
    };
    let convolutions = if !device.is_cpu() {
        "candle's"
    } else if hindsight::model::winograd_enabled() {
        "Winograd F(2x2,3x3) where it applies"
    } else {
        "direct (HINDSIGHT_CONV=direct)"
    };
    println!(
        "EDM2 16x16 mc32 [1,2] 1 block attn 8x8, batch {batch}, {threads} threads, device \
         {device:?}, convolutions {convolutions}"
    );
    let Some(python) = peer_python else {
        let (forward, step) = ours()?;
        println!(
            "  hindsight (candle): forward {forward:.4} s, training step {step:.4} s (medians of \
             {iterations})"
        );
        return Ok(());
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peer_edm2_torch.py");
    let device_name = if device.is_cuda() { "cuda" } else { "cpu" };
    let peer = || -> anyhow::Result<(f64, f64, String)> {
        let output = std::process::Command::new(python)
            .arg(&script)
            .args(["--batch", &batch.to_string()])
            .args(["--iterations", &iterations.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--device", device_name])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {python} {}", script.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "the PyTorch peer failed ({})",
            output.status
        );
        let line = String::from_utf8_lossy(&output.stdout);
        let peer: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("the PyTorch peer printed {line:?}"))?;
        let get = |k: &str| {
            peer[k]
                .as_f64()
                .with_context(|| format!("no {k:?} in the peer's output {line:?}"))
        };
        let about = format!(
            "PyTorch {} ({}, fixture parity {:.1e})",
            peer["torch"].as_str().unwrap_or("?"),
            peer["device"].as_str().unwrap_or("?"),
            get("parity")?
        );
        Ok((get("forward_s")?, get("step_s")?, about))
    };
    println!(
        "  medians of {iterations} per side and round; rounds alternate which side goes first"
    );
    let (mut forward_ratios, mut step_ratios) = (Vec::new(), Vec::new());
    let mut about = String::new();
    for round in 0..rounds {
        let ((f, s), (pf, ps, peer_about)) = if round % 2 == 0 {
            let o = ours()?;
            (o, peer()?)
        } else {
            let p = peer()?;
            (ours()?, p)
        };
        about = peer_about;
        let first = if round % 2 == 0 {
            "hindsight"
        } else {
            "PyTorch"
        };
        println!(
            "  round {} ({first} first): hindsight forward {f:.4} s, step {s:.4} s | PyTorch \
             forward {pf:.4} s, step {ps:.4} s | ratio forward {:.2}x, step {:.2}x",
            round + 1,
            f / pf,
            s / ps
        );
        forward_ratios.push(f / pf);
        step_ratios.push(s / ps);
    }
    println!(
        "  peer: {about}\n  hindsight / PyTorch, median of {rounds} round(s): forward {:.2}x, \
         training step {:.2}x (below 1: hindsight faster)",
        median(forward_ratios),
        median(step_ratios)
    );
    Ok(())
}

/// The median (upper middle for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `hindsight bench parity`: the reference fixture's comparisons on this binary's device.
pub fn bench_parity(
    fixture: Option<std::path::PathBuf>,
    fixture_json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use hindsight::model::parity::{compare_all, fixture_paths, Fixture};
    // tests/fixtures of the working directory (a checkout), else of the source tree built from.
    let mut dir = Path::new("tests/fixtures").to_path_buf();
    if !dir.is_dir() {
        dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    }
    let (default_tensors, default_json) = fixture_paths(&dir);
    let tensors = fixture.unwrap_or(default_tensors);
    let json = fixture_json.unwrap_or(default_json);
    let device = default_device();
    let start = Instant::now();
    let fx = Fixture::load(&tensors, &json, &device)?;
    let results = compare_all(&fx)?;
    println!(
        "EDM2 network vs the reference fixture {} on {:?} ({:.1} s)",
        tensors.display(),
        device,
        start.elapsed().as_secs_f64()
    );
    for c in &results {
        println!(
            "  {:<4} {:<72} {:.2e}  (tolerance {:.0e})",
            if c.ok() { "ok" } else { "FAIL" },
            c.what,
            c.error,
            c.tolerance
        );
    }
    let failed = results.iter().filter(|c| !c.ok()).count();
    if failed > 0 {
        bail!("{failed} comparison(s) outside tolerance");
    }
    Ok(())
}
