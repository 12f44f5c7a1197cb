//! `hindsight bench fid`: the Fréchet distance of 2048-d statistics against pytorch-fid's, and
//! Inception features against PyTorch running the same TorchScript file, side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use hindsight::bench::median;
use hindsight::metrics::{self, FeatureStats, Inception};

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
    frechet(&dir, &args)?;
    inception(&dir, &args)
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
    let net = Inception::new(&weights.tensors, weights.preprocess, &Device::Cpu)?;
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peer_fid.py");
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
