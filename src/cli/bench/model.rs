//! `hindsight bench train | conv | parity`: the EDM2 network against PyTorch, Winograd
//! against the direct convolution, and the reference fixture on this binary's device.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use hindsight::bench::median;
use hindsight::datasets::{one_hot, Procedural};
use hindsight::model::{default_device, Edm2Config};
use hindsight::train::{TrainConfig, Trainer};
use std::path::PathBuf;

/// Options of `hindsight bench train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Python with PyTorch: also time scripts/peer_edm2_torch.py (the same network in
    /// PyTorch, checked against the reference fixture first) with the same batch, thread
    /// count and device, and print the ratios.
    #[arg(long)]
    pub peer_python: Option<String>,
    /// Rounds of both sides, alternating which goes first (with a peer): the ratios are
    /// taken per round and their median printed, so load that comes and goes on a shared
    /// machine hits both sides alike.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Options of `hindsight bench sample`.
#[derive(clap::Args)]
pub struct SampleArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Sampler steps (2·steps − 1 network evaluations).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Timed repetitions per side and round.
    #[arg(long, default_value_t = 2)]
    pub iterations: usize,
    /// Python with PyTorch: also time the same sampler over the same network in PyTorch
    /// (scripts/peer_edm2_torch.py --sample-steps), same batch, threads and device.
    #[arg(long)]
    pub peer_python: Option<String>,
    /// Rounds of both sides, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Options of `hindsight bench conv`.
#[derive(clap::Args)]
pub struct ConvArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed repetitions per layer, algorithm and round.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// Rounds, alternating which algorithm goes first; medians over all.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Time this shape instead, `N,C,O,H` (images, input and output channels, square
    /// size); repeatable. E.g. EDM2-S layers: `--shape 8,192,192,64 --shape 32,768,768,8`.
    #[arg(long = "shape", value_parser = parse_conv_shape)]
    pub shapes: Vec<[usize; 4]>,
}

/// Options of `hindsight bench parity`.
#[derive(clap::Args)]
pub struct ParityArgs {
    /// The fixture tensors (default: $HINDSIGHT_EDM2_FIXTURE, else
    /// tests/fixtures/edm2_unet.safetensors).
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// Its JSON description (default: $HINDSIGHT_EDM2_FIXTURE_JSON, else
    /// tests/fixtures/edm2_unet.json).
    #[arg(long)]
    pub fixture_json: Option<PathBuf>,
}

/// `N,C,O,H` for `bench conv --shape`.
fn parse_conv_shape(s: &str) -> Result<[usize; 4], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let sizes: Vec<usize> = parts
        .iter()
        .map(|p| p.parse::<usize>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    <[usize; 4]>::try_from(sizes)
        .map_err(|v| format!("expected N,C,O,H (four sizes), got {} in {s:?}", v.len()))
}

/// `hindsight bench conv`: 3×3 convolution shapes (by default each one of the `bench train`
/// network at `batch` images; else the given `[N, C, O, H]`, square images), timed on the CPU
/// with the direct GEMM path and with Winograd's F(2×2, 3×3): the forward pass alone, and the
/// forward pass with both gradients.
pub fn conv(args: ConvArgs) -> anyhow::Result<()> {
    let ConvArgs {
        batch,
        iterations,
        rounds,
        shapes,
    } = args;
    let shapes = shapes.as_slice();
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
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let TrainArgs {
        batch,
        iterations,
        peer_python,
        rounds,
    } = args;
    let peer_python = peer_python.as_deref();
    hindsight::model::keep_freed_memory();
    anyhow::ensure!(
        iterations > 0 && rounds > 0,
        "--iterations and --rounds must be positive"
    );
    // The committed reference fixture's network.
    let network = Edm2Config::small(16, 3, 10);
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
    let peer_args = vec![
        "--batch".to_owned(),
        batch.to_string(),
        "--iterations".to_owned(),
        iterations.to_string(),
    ];
    let peer = || -> anyhow::Result<(f64, f64, String)> {
        let (v, about) = run_edm2_peer(python, &peer_args)?;
        let get = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("no {k:?} in the peer's output {v}"))
        };
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

/// Runs scripts/peer_edm2_torch.py with `args` on this binary's thread count and device;
/// returns its JSON line and a description of the peer.
fn run_edm2_peer(python: &str, args: &[String]) -> anyhow::Result<(serde_json::Value, String)> {
    let script = hindsight::bench::repo_file("scripts/peer_edm2_torch.py");
    let device_name = if default_device().is_cuda() {
        "cuda"
    } else {
        "cpu"
    };
    let output = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .args(["--threads", &rayon::current_num_threads().to_string()])
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
    let about = format!(
        "PyTorch {} ({}, fixture parity {:.1e})",
        peer["torch"].as_str().unwrap_or("?"),
        peer["device"].as_str().unwrap_or("?"),
        peer["parity"].as_f64().unwrap_or(f64::NAN)
    );
    Ok((peer, about))
}

/// `hindsight bench sample`: EDM's Heun sampler over the reference fixture's network, images
/// per second, against the same sampler and network in PyTorch.
pub fn sample(args: SampleArgs) -> anyhow::Result<()> {
    use hindsight::model::sampler::{edm_sampler, seeded_noise, SamplerConfig};
    hindsight::model::keep_freed_memory();
    anyhow::ensure!(
        args.iterations > 0 && args.rounds > 0 && args.batch > 0 && args.steps >= 2,
        "--iterations, --rounds and --batch must be positive and --steps at least 2"
    );
    let network = Edm2Config::small(16, 3, 10);
    let device = default_device();
    let trainer = Trainer::new(TrainConfig::new(network, args.batch), &device)?;
    let noise: Vec<f32> = (0..args.batch as u64)
        .flat_map(|s| seeded_noise(s, &[3, 16, 16]))
        .collect();
    let noise = Tensor::from_vec(noise, (args.batch, 3, 16, 16), &device)?;
    let classes: Vec<usize> = (0..args.batch).map(|i| i % 10).collect();
    let labels = one_hot(&classes, 10, &device)?;
    let config = SamplerConfig {
        num_steps: args.steps,
        ..Default::default()
    };
    let ours = || -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..args.iterations + 1 {
            let t = Instant::now();
            let x = edm_sampler(trainer.net(), &noise, Some(&labels), &config, |_, _| {})?;
            x.sum_all()?.to_scalar::<f32>()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        Ok(args.batch as f64 / median(times))
    };
    println!(
        "EDM Heun sampler, {} steps ({} evaluations), EDM2 16x16 mc32 [1,2] network, batch {}, \
         {} threads, device {device:?}",
        args.steps,
        2 * args.steps - 1,
        args.batch,
        rayon::current_num_threads()
    );
    let Some(python) = &args.peer_python else {
        println!("  hindsight: {:.1} images/s", ours()?);
        return Ok(());
    };
    let peer_args = vec![
        "--batch".to_owned(),
        args.batch.to_string(),
        "--iterations".to_owned(),
        args.iterations.to_string(),
        "--sample-steps".to_owned(),
        args.steps.to_string(),
    ];
    let peer = || -> anyhow::Result<(f64, String)> {
        let (v, about) = run_edm2_peer(python, &peer_args)?;
        let s = v["sample_s"]
            .as_f64()
            .context("no sample_s in the peer's output")?;
        Ok((args.batch as f64 / s, about))
    };
    let mut ratios = Vec::new();
    let mut about = String::new();
    for round in 0..args.rounds {
        let (o, (p, a)) = if round % 2 == 0 {
            let o = ours()?;
            (o, peer()?)
        } else {
            let p = peer()?;
            (ours()?, p)
        };
        about = a;
        println!(
            "  round {}: hindsight {o:.1} images/s | PyTorch {p:.1} images/s | {:.2}x",
            round + 1,
            o / p
        );
        ratios.push(o / p);
    }
    println!(
        "  peer: {about}\n  hindsight images/s over PyTorch's, median of {} round(s): {:.2}x \
         (above 1: hindsight faster)",
        args.rounds,
        median(ratios)
    );
    Ok(())
}

/// `hindsight bench parity`: the reference fixture's comparisons on this binary's device.
pub fn parity(args: ParityArgs) -> anyhow::Result<()> {
    let ParityArgs {
        fixture,
        fixture_json,
    } = args;
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
