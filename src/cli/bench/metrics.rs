//! `hindsight bench fid`: the Fréchet distance of 2048-d statistics against pytorch-fid's, and
//! Inception features against PyTorch running the same TorchScript file, side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use hindsight::bench::median;
use hindsight::metrics::{self, FeatureStats, Inception};

use crate::cli::common::block_on;

/// Options of `hindsight bench fid`.
#[derive(clap::Args)]
pub struct FidArgs {
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual places).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Python with numpy, scipy, torch and pytorch-fid: also time scripts/peer_fid.py on the
    /// same inputs, and print the ratios.
    #[arg(long)]
    pub peer_python: Option<String>,
    /// Images for the feature timing (Fashion-MNIST's test set, 32×32 grey as RGB; the
    /// procedural set when it is not installed).
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Timed rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Where to put the statistics and images handed to the peer (a temporary directory by
    /// default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs both timings.
pub fn fid(args: FidArgs) -> anyhow::Result<()> {
    if args.images == 0 || args.batch == 0 || args.rounds == 0 {
        bail!("--images, --batch and --rounds must be positive");
    }
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let parity_ok = parity(&args)?;
    frechet(&dir, &args)?;
    inception(&dir, &args)?;
    if !parity_ok {
        bail!("Inception features are outside the tolerance (see above)");
    }
    Ok(())
}

/// Features of the committed 32 Fashion-MNIST images (tests/fixtures/inception_real
/// .safetensors) on this binary's device against the CPU, and — for NVIDIA's weights —
/// against PyTorch's features of the same images and file. Prints both; false when either
/// exceeds 1e-4 relative.
fn parity(args: &FidArgs) -> anyhow::Result<bool> {
    let fixture = hindsight::bench::repo_file("tests/fixtures/inception_real.safetensors");
    let path = metrics::locate_weights(args.weights.as_deref())?;
    let weights = metrics::load_weights(&path)?;
    let data = candle_core::safetensors::load(&fixture, &Device::Cpu)
        .with_context(|| format!("reading {}", fixture.display()))?;
    let images = &data["images_u8"];
    let (n, c, h, w) = images.dims4()?;
    let pixels: Vec<f32> = images
        .flatten_all()?
        .to_vec1::<u8>()?
        .iter()
        .map(|&v| v as f32)
        .collect();
    let features = |device: &Device| -> anyhow::Result<Vec<f32>> {
        let net = Inception::new(&weights.tensors, weights.preprocess, device)?;
        Ok(net
            .features(&pixels, n, c, h, w)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let max_rel = |got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        got.iter()
            .zip(want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
            / scale
    };
    let device = hindsight::model::default_device();
    let ours = features(&device)?;
    let mut ok = true;
    if !device.is_cpu() {
        let e = max_rel(&ours, &features(&Device::Cpu)?);
        println!("Inception parity, {device:?} against the CPU ({n} images): {e:.2e} relative");
        ok &= e <= 1e-4;
    }
    if weights.preprocess == metrics::Preprocess::Nvidia {
        let want = data["features"].flatten_all()?.to_vec1::<f32>()?;
        let e = max_rel(&ours, &want);
        println!(
            "Inception parity, {device:?} against PyTorch's torch.jit.load of the same file \
             ({n} Fashion-MNIST images): {e:.2e} relative (tolerance 1e-4)"
        );
        ok &= e <= 1e-4;
    }
    Ok(ok)
}

/// Two sets of 2048-d statistics with realistic structure: features that mix 256 shared
/// factors, from different seeds and scales.
fn synthetic_stats(seed: u64, scale: f32, n: usize) -> anyhow::Result<FeatureStats> {
    let d = metrics::FEATURES;
    let factors = 256;
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let mixing: Vec<f32> = (0..factors * d).map(|_| next()).collect();
    let mut stats = FeatureStats::new(d);
    let batch = 256;
    for _ in 0..n.div_ceil(batch) {
        let mut rows = vec![0f32; batch * d];
        for row in rows.chunks_exact_mut(d) {
            let z: Vec<f32> = (0..factors).map(|_| next()).collect();
            for (f, &zf) in z.iter().enumerate() {
                let m = &mixing[f * d..(f + 1) * d];
                row.iter_mut()
                    .zip(m)
                    .for_each(|(r, &w)| *r += zf * w * scale);
            }
            row.iter_mut().for_each(|r| *r += next() * 0.1);
        }
        stats.add(&rows)?;
    }
    Ok(stats)
}

fn frechet(dir: &Path, args: &FidArgs) -> anyhow::Result<()> {
    let n = 4096;
    let a = synthetic_stats(1, 1.0, n)?;
    let b = synthetic_stats(2, 1.1, n)?;
    let mut times = Vec::new();
    let mut fd = 0.0;
    for _ in 0..args.rounds {
        let start = Instant::now();
        fd = metrics::frechet_distance_of(&a, &b)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let ours = median(times);
    println!(
        "Fréchet distance, 2048-d statistics of {n} samples each, {} threads: hindsight {ours:.3} s \
         (median of {}), FD {fd:.6}",
        rayon::current_num_threads(),
        args.rounds
    );
    let Some(python) = &args.peer_python else {
        return Ok(());
    };
    let (pa, pb) = (dir.join("a.npz"), dir.join("b.npz"));
    a.write_npz(std::fs::File::create(&pa)?)?;
    b.write_npz(std::fs::File::create(&pb)?)?;
    let peer = run_peer(
        python,
        &[
            "frechet".as_ref(),
            pa.as_os_str(),
            pb.as_os_str(),
            args.rounds.to_string().as_ref(),
        ],
    )?;
    let theirs = median(
        serde_json::from_value::<Vec<f64>>(peer["seconds"].clone()).context("peer seconds")?,
    );
    let their_fd = peer["fd"].as_f64().context("peer fd")?;
    println!(
        "  pytorch-fid {} (scipy.linalg.sqrtm): {theirs:.3} s, FD {their_fd:.6} -> hindsight \
         {:.1}x faster, relative difference {:.1e}",
        peer["pytorch_fid"].as_str().unwrap_or("?"),
        theirs / ours,
        ((fd - their_fd) / their_fd).abs()
    );
    Ok(())
}

fn inception(dir: &Path, args: &FidArgs) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    let path = metrics::locate_weights(args.weights.as_deref())?;
    let weights = metrics::load_weights(&path)?;
    let device = hindsight::model::default_device();
    let net = Inception::new(&weights.tensors, weights.preprocess, &device)?;
    let dataset = hindsight::datasets::Dataset::open("fashion-mnist-test", 32, 0, 0)
        .or_else(|_| hindsight::datasets::Dataset::open("procedural", 32, 0, 0))?;
    let (c, r) = (dataset.channels(), dataset.resolution());
    let images: Vec<u8> = (0..args.images)
        .flat_map(|i| dataset.pixels(i % dataset.len()))
        .collect();
    let mut rates = Vec::new();
    let mut mean = 0.0;
    for _ in 0..args.rounds {
        let start = Instant::now();
        let mut sum = 0.0f64;
        for chunk in images.chunks(args.batch * c * r * r) {
            let pixels: Vec<f32> = chunk.iter().map(|&v| v as f32).collect();
            let n = chunk.len() / (c * r * r);
            let f = net.features(&pixels, n, c, r, r)?;
            sum += f.sum_all()?.to_scalar::<f32>()? as f64;
        }
        rates.push(args.images as f64 / start.elapsed().as_secs_f64());
        mean = sum / (args.images * metrics::FEATURES) as f64;
    }
    let ours = median(rates);
    println!(
        "Inception features, {} {r}x{r} images (channels {c}, as RGB), batch {}, {} threads: \
         hindsight {ours:.2} images/s (median of {}), mean feature {mean:.6}",
        args.images,
        args.batch,
        rayon::current_num_threads(),
        args.rounds
    );
    let Some(python) = &args.peer_python else {
        return Ok(());
    };
    let npy = dir.join("images.npy");
    let rgb: Vec<u8> = images
        .chunks_exact(c * r * r)
        .flat_map(|img| {
            (0..3).flat_map(move |ch| img[(ch % c) * r * r..(ch % c + 1) * r * r].to_vec())
        })
        .collect();
    metrics::npy::write_u8(
        &mut std::fs::File::create(&npy)?,
        &[args.images, 3, r, r],
        &rgb,
    )?;
    let peer = run_peer(
        python,
        &[
            "inception".as_ref(),
            path.as_os_str(),
            npy.as_os_str(),
            args.batch.to_string().as_ref(),
            rayon::current_num_threads().to_string().as_ref(),
            args.rounds.to_string().as_ref(),
            if device.is_cuda() { "cuda" } else { "cpu" }.as_ref(),
        ],
    )?;
    let theirs = median(
        serde_json::from_value::<Vec<f64>>(peer["images_per_second"].clone())
            .context("peer rates")?,
    );
    println!(
        "  PyTorch {} (torch.jit.load of the same file): {theirs:.2} images/s, mean feature \
         {:.6} -> hindsight {:.2}x PyTorch's speed",
        peer["torch"].as_str().unwrap_or("?"),
        peer["features_mean"].as_f64().unwrap_or(f64::NAN),
        ours / theirs
    );
    Ok(())
}

fn run_peer(python: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<serde_json::Value> {
    run_peer_script(python, "scripts/peer_fid.py", args)
}

/// Runs `script` (relative to the repository) with `python` and parses its one JSON line.
fn run_peer_script(
    python: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<serde_json::Value> {
    let script = hindsight::bench::repo_file(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("the peer failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("the peer printed {text:?}"))
}

/// Options of `hindsight bench sweep-point`.
#[derive(clap::Args)]
pub struct SweepPointArgs {
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual places).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Python with numpy, scipy, torch, safetensors and pytorch-fid: also time
    /// scripts/peer_sweep_point.py on the same snapshots, and print the ratio.
    #[arg(long)]
    pub peer_python: Option<String>,
    /// Images of the point.
    #[arg(long, default_value_t = 64)]
    pub num_images: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Sampler steps.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Where to put the data directory and the peer's inputs (a temporary directory by
    /// default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// One sweep point end to end — reconstruct, sample, features, FID — through the sweep
/// worker, against the same pipeline in Python (EDM2's solve, the PyTorch network and
/// sampler, the TorchScript Inception, pytorch-fid's Fréchet distance).
pub fn sweep_point(args: SweepPointArgs) -> anyhow::Result<()> {
    use hindsight::app::DataDir;
    use hindsight::format::{write_safetensors, OutTensor};
    use hindsight::model::Edm2Config;
    use hindsight::sweep::{self, SweepLimits, SweepRequest, Worker, WorkerConfig};
    use hindsight::train::{TrainConfig, Trainer};
    if args.num_images < 2 || args.batch == 0 || args.steps < 2 {
        bail!("--num-images must be at least 2, --batch positive, --steps at least 2");
    }
    hindsight::model::keep_freed_memory();
    let weights = metrics::locate_weights(args.weights.as_deref())?;
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    let snap_dir = dir.join("snapshots");
    std::fs::create_dir_all(&snap_dir)?;
    // The reference fixture's network; snapshots at four times for σ_rel 0.05 and 0.10, each
    // a differently seeded initialisation (values do not change the work).
    let network = Edm2Config::small(16, 3, 10);
    for (k, nimg) in [1u64 << 20, 2 << 20, 3 << 20, 4 << 20]
        .into_iter()
        .enumerate()
    {
        for (j, sigma_rel) in [0.05, 0.10].into_iter().enumerate() {
            let mut config = TrainConfig::new(network.clone(), 1);
            config.seed = (k * 2 + j) as u64;
            let trainer = Trainer::new(config, &Device::Cpu)?;
            let state = trainer.state_dict();
            let data: Vec<(String, Vec<usize>, Vec<u8>)> = state
                .iter()
                .map(|(name, t)| -> anyhow::Result<_> {
                    let v = t.flatten_all()?.to_vec1::<f32>()?;
                    Ok((
                        name.clone(),
                        t.dims().to_vec(),
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ))
                })
                .collect::<anyhow::Result<_>>()?;
            let tensors: Vec<OutTensor<'_>> = data
                .iter()
                .map(|(name, shape, bytes)| OutTensor {
                    name,
                    dtype: "F32",
                    shape,
                    data: bytes,
                })
                .collect();
            let meta = std::collections::BTreeMap::from([
                ("nimg".to_owned(), nimg.to_string()),
                ("sigma_rel".to_owned(), sigma_rel.to_string()),
            ]);
            let mut out = Vec::new();
            write_safetensors(&mut out, &tensors, &meta)?;
            std::fs::write(snap_dir.join(format!("snap-{k}-{j}.safetensors")), out)?;
        }
    }
    let network_json = dir.join("network.json");
    std::fs::write(&network_json, serde_json::to_string(&network)?)?;
    // Reference statistics: any 2048-d ones do for timing.
    let reference = dir.join("reference.npz");
    synthetic_stats(7, 1.0, 2048)?.write_npz(std::fs::File::create(&reference)?)?;
    let (sigma_rel, nimg) = (0.08, 4u64 << 20);
    let data_dir = dir.join("data");
    let ours = block_on(async {
        let data = DataDir::open(&data_dir).await?;
        data.db
            .create_run("bench", "", &serde_json::json!({ "network": network }))
            .await?;
        hindsight::ingest::import_dir(
            &data,
            &snap_dir,
            "bench",
            &hindsight::ingest::Source::Safetensors,
            Default::default(),
            std::sync::Arc::new(()),
        )
        .await?;
        let bytes = std::fs::read(&reference)?;
        let origin = hindsight::app::references::ReferenceOrigin {
            name: "bench".into(),
            source: "synthetic".into(),
            resolution: None,
            channels: None,
        };
        hindsight::app::references::import(&data, origin, &bytes).await?;
        let started = Instant::now();
        let request = SweepRequest {
            run: "bench".into(),
            sigma_rels: vec![sigma_rel],
            nimgs: Some(vec![nimg]),
            evaluator: None,
            metrics: Some(vec![hindsight::sweep::MetricRequest::Image(
                metrics::Metric::Fid,
            )]),
            num_images: Some(args.num_images),
            seed_sets: None,
            sampler: hindsight::sweep::SamplerRequest::Settings(
                hindsight::sweep::SamplerSettings {
                    steps: args.steps,
                    ..Default::default()
                },
            ),
            reference: Some("bench".into()),
            batch: Some(args.batch),
            kid_subsets: None,
            kid_subset_size: None,
            allow_dataset_mismatch: false,
        };
        let created = sweep::create(&data, request, &SweepLimits::default()).await?;
        let worker = Worker::new(
            data.clone(),
            WorkerConfig {
                weights: Some(weights.clone()),
                ..Default::default()
            },
            std::sync::Arc::new(|_| {}),
        );
        worker.run_until_idle().await?;
        let seconds = started.elapsed().as_secs_f64();
        let point = data.db.sweep_points(created.id).await?.remove(0);
        let result = point
            .result
            .with_context(|| format!("the point did not finish: {:?}", point.error))?;
        anyhow::Ok((seconds, result))
    })?;
    let (seconds, result) = ours;
    let t = &result["timings"];
    println!(
        "one sweep point: {} images, batch {}, {} steps, EDM2 16x16 mc32 network, {} threads",
        args.num_images,
        args.batch,
        args.steps,
        rayon::current_num_threads()
    );
    println!(
        "  hindsight: {seconds:.2} s (reconstruct {:.2} s, sampling {:.2} s, features {:.2} s, \
         statistics and FID {:.2} s), FID {:.4}",
        t["reconstruct_s"].as_f64().unwrap_or(0.0),
        t["sample_s"].as_f64().unwrap_or(0.0),
        t["features_s"].as_f64().unwrap_or(0.0),
        t["metrics_s"].as_f64().unwrap_or(0.0),
        result["fid"]["mean"].as_f64().unwrap_or(f64::NAN)
    );
    let Some(python) = &args.peer_python else {
        return Ok(());
    };
    let peer = run_peer_script(
        python,
        "scripts/peer_sweep_point.py",
        &[
            snap_dir.as_os_str(),
            network_json.as_os_str(),
            sigma_rel.to_string().as_ref(),
            nimg.to_string().as_ref(),
            reference.as_os_str(),
            weights.as_os_str(),
            args.num_images.to_string().as_ref(),
            args.batch.to_string().as_ref(),
            args.steps.to_string().as_ref(),
            rayon::current_num_threads().to_string().as_ref(),
            if hindsight::model::default_device().is_cuda() {
                "cuda"
            } else {
                "cpu"
            }
            .as_ref(),
        ],
    )?;
    let theirs = peer["seconds"]
        .as_f64()
        .context("no seconds from the peer")?;
    println!(
        "  Python (EDM2 solve + PyTorch {} + TorchScript Inception + pytorch-fid): {theirs:.2} s \
         (reconstruct {:.2} s, sampling {:.2} s, features {:.2} s, FID {:.2} s), FID {:.4} \
         -> hindsight {:.2}x faster",
        peer["torch"].as_str().unwrap_or("?"),
        peer["reconstruct_s"].as_f64().unwrap_or(0.0),
        peer["sample_s"].as_f64().unwrap_or(0.0),
        peer["features_s"].as_f64().unwrap_or(0.0),
        peer["fid_s"].as_f64().unwrap_or(0.0),
        peer["fid"].as_f64().unwrap_or(f64::NAN),
        theirs / seconds
    );
    Ok(())
}
