//! `hindsight sweep`, `hindsight sweeps`, `hindsight worker`: sweeps from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hindsight::app::DataDir;
use hindsight::db::{Evaluator, PointRow, SweepRow};
use hindsight::metrics::Metric;
use hindsight::phema::parse_sigma_rel_list;
use hindsight::sweep::{
    self, Goal, MetricInfo, MetricRequest, PointResult, SamplerRequest, SamplerSettings,
    SweepLimits, SweepRequest, UserMetric, Worker, WorkerConfig, WorkerEvent,
};

use super::common::{bar, block_on, print_json};

/// Options of `hindsight sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// The run.
    #[arg(long, required_unless_present = "resume")]
    pub run: Option<String>,
    /// EMA widths: a list, or EDM2's syntax `0.02,0.03,...,0.25`.
    #[arg(long, required_unless_present = "resume", allow_hyphen_values = true)]
    pub sigma_rel: Option<String>,
    /// Training times to reconstruct at, comma-separated (a 2-D sweep); default: the run's
    /// last snapshot.
    #[arg(long)]
    pub nimg: Option<String>,
    /// `builtin` (this process samples the run's EDM2 network) or `external` (your own
    /// model, evaluated by the Python client's `Client.evaluate` against `hindsight serve`;
    /// the command prints the snippet). Default: builtin when the run records a network
    /// configuration, else external.
    #[arg(long)]
    pub evaluator: Option<String>,
    /// Metrics, comma-separated: fid, kid (default: both when the reference keeps its
    /// features, else fid).
    #[arg(long)]
    pub metric: Option<String>,
    /// A user metric the external evaluator reports: `NAME:min` or `NAME:max`, optionally
    /// `:LABEL` (`val_loss:min:validation loss`). Repeat for several.
    #[arg(long)]
    pub user_metric: Vec<String>,
    /// Images per seed set (default 50 000, EDM2's; a CPU affords a few thousand).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// Seed sets: each metric is reported as mean ± std over them.
    #[arg(long, default_value_t = 1)]
    pub seed_sets: usize,
    /// Reference statistics by name or id (see `hindsight references`); needed for FID and
    /// KID.
    #[arg(long)]
    pub reference: Option<String>,
    /// Sampler steps.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Images per batch: the unit of progress and resumption.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual cache paths).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where to write the curve (heat map for 2-D sweeps) as SVG; default sweep-<id>.svg.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Continue sweep ID (after Ctrl-C or a crash) instead of starting one.
    #[arg(long, conflicts_with_all = ["run", "sigma_rel", "reference"])]
    pub resume: Option<i64>,
    /// Only queue the sweep (for `hindsight serve` or `hindsight worker` to do) and print
    /// its id.
    #[arg(long)]
    pub detach: bool,
    /// Print the finished sweep as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sweep even when the reference statistics come from another dataset than the run was
    /// trained on (refused otherwise: FID would measure the datasets' difference).
    #[arg(long, conflicts_with = "resume")]
    pub allow_dataset_mismatch: bool,
}

/// Options of `hindsight sweeps`.
#[derive(clap::Args, Debug)]
pub struct SweepsArgs {
    /// Show this sweep's points (default: list the sweeps).
    pub id: Option<i64>,
    /// Only this run's sweeps.
    #[arg(long)]
    pub run: Option<String>,
    /// Cancel sweep ID (finished points stay).
    #[arg(long, requires = "id")]
    pub cancel: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `hindsight worker`.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual cache paths).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Lease length in seconds: a point whose worker died goes back to the queue this long
    /// after its last heartbeat.
    #[arg(long, default_value_t = 60.0)]
    pub lease_secs: f64,
    /// Stop when there is nothing to do instead of waiting for more.
    #[arg(long)]
    pub once: bool,
}

fn parse_list<T: std::str::FromStr>(text: &str, what: &str) -> anyhow::Result<Vec<T>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: {s:?} is not valid"))
        })
        .collect()
}

/// `NAME:min|max[:LABEL]` of `--user-metric`.
fn user_metric(text: &str) -> anyhow::Result<UserMetric> {
    let mut parts = text.splitn(3, ':');
    let name = parts.next().unwrap_or_default().to_owned();
    let goal = match parts.next() {
        Some("min") => Goal::Min,
        Some("max") => Goal::Max,
        _ => bail!("--user-metric {text:?}: write NAME:min or NAME:max (optionally :LABEL)"),
    };
    Ok(UserMetric {
        name,
        goal,
        label: parts.next().unwrap_or_default().to_owned(),
    })
}

fn lease(secs: f64) -> anyhow::Result<Duration> {
    if !(secs.is_finite() && (1.0..=86_400.0).contains(&secs)) {
        bail!("--lease-secs must be between 1 and 86400");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Creates (or resumes) a sweep, works it to the end with a progress bar, prints the table
/// and writes the SVG.
pub fn run(data_dir: &Path, args: SweepArgs) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    block_on(async move {
        let data = DataDir::open(data_dir).await?;
        let sweep = match args.resume {
            Some(id) => sweep::find(&data, id).await?,
            None => {
                let evaluator = match args.evaluator.as_deref() {
                    None => None,
                    Some("builtin") => Some(Evaluator::Builtin),
                    Some("external") => Some(Evaluator::External),
                    Some(other) => bail!("--evaluator {other:?}: builtin or external"),
                };
                let mut metrics: Option<Vec<MetricRequest>> = args
                    .metric
                    .as_deref()
                    .map(|m| parse_list::<Metric>(m, "--metric"))
                    .transpose()?
                    .map(|list| list.into_iter().map(MetricRequest::Image).collect());
                if !args.user_metric.is_empty() {
                    let mut list = metrics.take().unwrap_or_else(|| {
                        // User metrics alone unless FID/KID are asked for (or a reference is
                        // given, which means them).
                        if args.reference.is_some() {
                            vec![MetricRequest::Image(Metric::Fid)]
                        } else {
                            Vec::new()
                        }
                    });
                    for m in &args.user_metric {
                        list.push(MetricRequest::User(user_metric(m)?));
                    }
                    metrics = Some(list);
                }
                let request = SweepRequest {
                    run: args.run.clone().expect("clap requires it"),
                    evaluator,
                    sigma_rels: parse_sigma_rel_list(args.sigma_rel.as_deref().expect("required"))?,
                    nimgs: args
                        .nimg
                        .as_deref()
                        .map(|n| parse_list::<u64>(n, "--nimg"))
                        .transpose()?,
                    metrics,
                    num_images: args.num_images,
                    seed_sets: Some(args.seed_sets),
                    sampler: SamplerRequest::Settings(SamplerSettings {
                        steps: args.steps,
                        ..Default::default()
                    }),
                    reference: args.reference.clone(),
                    batch: Some(args.batch),
                    kid_subsets: None,
                    kid_subset_size: None,
                    allow_dataset_mismatch: args.allow_dataset_mismatch,
                };
                // The command line answers to its user alone: a generous cap.
                let limits = SweepLimits {
                    max_images: 10_000_000,
                    ..Default::default()
                };
                sweep::create(&data, request, &limits).await?
            }
        };
        let spec = sweep::spec_of(&sweep)?;
        for w in &spec.warnings {
            eprintln!("warning: {w}");
        }
        if spec.evaluator == Evaluator::External {
            println!("{}", sweep.id);
            eprintln!(
                "queued external sweep {} ({} points): your own code evaluates it. Serve this \
                 data directory (`hindsight serve`), then run on each GPU machine:\n",
                sweep.id, sweep.points
            );
            eprintln!("{}", sweep::external::python_snippet(sweep.id, &spec, None));
            return Ok(());
        }
        if args.detach {
            println!("{}", sweep.id);
            eprintln!(
                "queued sweep {} ({} points); `hindsight serve` or `hindsight worker` will do it",
                sweep.id, sweep.points
            );
            return Ok(());
        }
        eprintln!(
            "sweep {}: {} point(s) × {} image(s) ({} seed set(s) of {}), reference {}",
            sweep.id,
            sweep.points,
            spec.images_per_point(),
            spec.seed_sets,
            spec.num_images,
            spec.reference_name
                .as_deref()
                .map_or("none (user metrics)".to_owned(), |n| format!("{n:?}"))
        );
        work(&data, &sweep, args.weights.clone()).await?;
        let sweep = sweep::find(&data, sweep.id).await?;
        let points = data.db.sweep_points(sweep.id).await?;
        if args.json {
            return print_json(&serde_json::json!({"sweep": sweep, "points": points}));
        }
        print_points(&sweep, &points)?;
        let first = spec.metric_infos().remove(0);
        let out = args
            .plot
            .unwrap_or_else(|| PathBuf::from(format!("sweep-{}.svg", sweep.id)));
        if points.iter().any(|p| p.result.is_some()) {
            let svg = sweep::plot::sweep_svg(&sweep, &points, &first.metric)?;
            std::fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote the {} curve to {}", first.label, out.display());
        }
        match sweep.status {
            hindsight::db::SweepStatus::Done => Ok(()),
            s => bail!("sweep {} ended {}", sweep.id, s.as_str()),
        }
    })
}

/// Works `sweep` in this process until it is finished (points other workers hold are
/// waited for), with a progress bar over all its images; Ctrl-C puts the point in progress
/// back in the queue.
async fn work(data: &DataDir, sweep: &SweepRow, weights: Option<PathBuf>) -> anyhow::Result<()> {
    let spec = sweep::spec_of(sweep)?;
    let total = (sweep.points as usize * spec.images_per_point()) as u64;
    let progress = bar(
        "sweep",
        "{bar:30} {pos}/{len} images {per_sec} ETA {eta} {msg}",
    );
    progress.set_length(total);
    progress.set_position(sweep.images_done as u64);
    progress.reset_eta();
    let observer_bar = progress.clone();
    // The first metric as every display names and scales it (FD-pixels for the fallback).
    let first = spec.metric_infos().remove(0);
    let observer: sweep::Observer = Arc::new(move |event: &WorkerEvent| match event {
        WorkerEvent::Claimed { point, .. } => {
            observer_bar.set_message(format!("σ_rel {:.3} @ {}", point.sigma_rel, point.nimg))
        }
        WorkerEvent::Finished { idx, result, .. } => {
            let value = result.named(&first.metric).map_or(String::new(), |m| {
                format!(" {} {}", first.axis_label, first.format_summary(m))
            });
            observer_bar.println(format!("point {idx}:{value}"));
        }
        WorkerEvent::Failed {
            idx, error, retry, ..
        } => observer_bar.println(format!(
            "point {idx} failed{}: {error}",
            if *retry { " (will retry)" } else { "" }
        )),
        _ => {}
    });
    let config = WorkerConfig {
        weights,
        sweep: Some(sweep.id),
        ..Default::default()
    };
    let worker = Arc::new(Worker::new(data.clone(), config, observer));
    let stop = tokio_util::sync::CancellationToken::new();
    let worker_task = tokio::spawn(worker.clone().run(stop.clone().cancelled_owned()));
    let mut told = std::collections::HashSet::new();
    let interrupted = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = sweep::find(data, sweep.id).await?;
        progress.set_position(now.images_done as u64);
        if now.status.is_terminal() {
            break false;
        }
        // Points another worker holds (one killed earlier, say) are waited for: say so.
        for p in data.db.sweep_points(sweep.id).await? {
            let (Some(owner), Some(until)) = (&p.lease_owner, p.lease_expires) else {
                continue;
            };
            if p.status.as_str() == "running" && owner != worker.id() && told.insert(p.idx) {
                let left = (until - sweep::now_ms()).max(0) as f64 / 1000.0;
                progress.println(format!(
                    "point {} is held by worker {owner}; if that worker is gone, this one takes \
                     it over when its lease runs out (in {left:.0} s)",
                    p.idx
                ));
            }
        }
    };
    stop.cancel();
    let _ = worker_task.await;
    progress.finish_and_clear();
    if interrupted {
        bail!(
            "interrupted; finished batches are kept: `hindsight sweep --resume {}` continues",
            sweep.id
        );
    }
    Ok(())
}

fn summary(r: &PointResult, info: &MetricInfo) -> String {
    r.named(&info.metric)
        .map_or_else(|| "-".into(), |m| info.format_summary(m))
}

fn print_points(sweep: &SweepRow, points: &[PointRow]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // Names, scales and directions as the server sends them with the sweep
    // (`Sweep.metrics`); a sweep whose spec cannot be read shows FID and KID.
    let spec = sweep::spec_of(sweep).ok();
    let infos = match &spec {
        Some(spec) => spec.metric_infos(),
        None => vec![
            MetricInfo::new(Metric::Fid, false),
            MetricInfo::new(Metric::Kid, false),
        ],
    };
    if spec.as_ref().is_some_and(|s| s.is_fallback()) {
        let labels: Vec<&str> = infos
            .iter()
            .filter(|m| m.fallback)
            .map(|m| m.label.as_str())
            .collect();
        writeln!(
            out,
            "metrics on the fallback pixel projection: {}",
            labels.join(", ")
        )?;
    }
    let width = |m: &MetricInfo| m.axis_label.chars().count().max(20);
    let mut header = format!("{:>5} {:>9} {:>14}", "point", "sigma_rel", "nimg");
    for m in &infos {
        header.push_str(&format!(" {:>w$}", m.axis_label, w = width(m)));
    }
    header.push_str(&format!(" {:>9}  status", "images/s"));
    writeln!(out, "{header}")?;
    for p in points {
        let r: Option<PointResult> = p
            .result
            .clone()
            .and_then(|v| serde_json::from_value(v).ok());
        let mut line = format!("{:>5} {:>9.4} {:>14}", p.idx, p.sigma_rel, p.nimg);
        for m in &infos {
            let cell = r.as_ref().map_or_else(|| "-".into(), |r| summary(r, m));
            line.push_str(&format!(" {:>w$}", cell, w = width(m)));
        }
        let rate = r.as_ref().map_or_else(
            || "-".into(),
            |r| {
                if r.timings.images_per_s > 0.0 {
                    format!("{:.1}", r.timings.images_per_s)
                } else {
                    "-".into()
                }
            },
        );
        writeln!(
            out,
            "{line} {:>9}  {}{}",
            rate,
            p.status.as_str(),
            p.error
                .as_deref()
                .filter(|_| p.status != hindsight::db::SweepStatus::Done)
                .map_or(String::new(), |e| format!(": {e}"))
        )?;
    }
    for m in &infos {
        if let Some((best, _)) = sweep::best_point(points, m) {
            writeln!(
                out,
                "best {}: σ_rel {:.4} at nimg {} (point {})",
                if m.fallback { &m.label } else { &m.metric },
                best.sigma_rel,
                best.nimg,
                best.idx
            )?;
        }
    }
    writeln!(
        out,
        "sweep {} {}: {}/{} points done",
        sweep.id,
        sweep.status.as_str(),
        sweep.points_done,
        sweep.points
    )?;
    Ok(())
}

/// Lists sweeps, shows one, or cancels one.
pub fn sweeps(data_dir: &Path, args: SweepsArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    block_on(async move {
        let data = DataDir::open(data_dir).await?;
        if let Some(id) = args.id {
            if args.cancel {
                data.db.cancel_sweep(id).await?;
            }
            let sweep = sweep::find(&data, id).await?;
            let points = data.db.sweep_points(id).await?;
            if args.json {
                return print_json(&serde_json::json!({"sweep": sweep, "points": points}));
            }
            return print_points(&sweep, &points);
        }
        let run_id = match &args.run {
            Some(name) => Some(data.existing_run(name).await?.id),
            None => None,
        };
        let rows = data.db.sweeps(run_id).await?;
        if args.json {
            for r in &rows {
                print_json(r)?;
            }
            return Ok(());
        }
        writeln!(
            out,
            "{:>4}  {:<20} {:<10} {:>7} {:>12}  created",
            "id", "run", "status", "points", "images"
        )?;
        for s in rows {
            let per_point = sweep::spec_of(&s).map_or(0, |sp| sp.images_per_point());
            writeln!(
                out,
                "{:>4}  {:<20} {:<10} {:>3}/{:<3} {:>12}  {}",
                s.id,
                s.run,
                s.status.as_str(),
                s.points_done,
                s.points,
                format!("{}/{}", s.images_done, s.points as usize * per_point),
                s.created_at
            )?;
        }
        Ok(())
    })
}

/// Runs a sweep worker on the data directory until Ctrl-C (or, with --once, until idle).
pub fn worker(data_dir: &Path, args: WorkerArgs) -> anyhow::Result<()> {
    hindsight::model::keep_freed_memory();
    let lease = lease(args.lease_secs)?;
    block_on(async move {
        let data = DataDir::open(data_dir).await?;
        let observer: sweep::Observer = Arc::new(|event: &WorkerEvent| match event {
            WorkerEvent::Claimed { point, .. } => eprintln!(
                "sweep {} point {}: σ_rel {:.4} at nimg {} ({} images recorded)",
                point.sweep_id, point.idx, point.sigma_rel, point.nimg, point.images_done
            ),
            WorkerEvent::Finished { sweep, idx, result } => eprintln!(
                "sweep {sweep} point {idx}: done{}",
                result
                    .fid
                    .as_ref()
                    .map_or(String::new(), |m| format!(", FID {:.3}", m.mean))
            ),
            WorkerEvent::Failed {
                sweep,
                idx,
                error,
                retry,
            } => eprintln!(
                "sweep {sweep} point {idx}: failed{}: {error}",
                if *retry { " (requeued)" } else { "" }
            ),
            WorkerEvent::Lost { sweep, idx } => {
                eprintln!("sweep {sweep} point {idx}: lease lost (cancelled or taken over)")
            }
            WorkerEvent::Batch { .. } => {}
        });
        let config = WorkerConfig {
            weights: args.weights,
            lease,
            ..Default::default()
        };
        let worker = Arc::new(Worker::new(data, config, observer));
        eprintln!("worker {} on {}", worker.id(), data_dir.display());
        if args.once {
            let n = worker.run_until_idle().await?;
            eprintln!("nothing left to do after {n} point(s)");
            return Ok(());
        }
        let shutdown = async {
            hindsight::server::shutdown_signal().await;
        };
        worker.run(shutdown).await;
        eprintln!("stopped; points in progress went back to the queue");
        Ok(())
    })
}
