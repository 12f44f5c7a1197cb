//! The one-command demo (`hindsight demo`): what it trains, measures and sweeps at each
//! budget, and how it finds what an earlier run of it already made (so that running it again
//! reuses the run, the reference statistics and the sweep instead of redoing them).
//!
//! The stages themselves are the library's: [`crate::train::run`],
//! [`crate::app::references::store_computed`], [`crate::sweep`] and the server; the command
//! line strings them together with progress bars.

use crate::app::DataDir;
use crate::db::{SweepRow, SweepStatus};
use crate::error::Result;
use crate::model::Edm2Config;

/// How much work the demo does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// About a minute: a tiny network, a few points of a few images (CI, smoke tests).
    Quick,
    /// About 8 minutes on 2 cores (4 of them training): samples look like clothing, a
    /// six-point curve with its minimum inside the range.
    Standard,
    /// About an hour on 2 cores: five times the training, more points, more images per point.
    Long,
}

/// Everything a budget fixes.
#[derive(Clone, Debug)]
pub struct DemoSettings {
    /// The run the demo trains (one per budget, so budgets never mix; on data other than
    /// Fashion-MNIST, [`choose_run`] names another).
    pub run: String,
    /// The network.
    pub network: Edm2Config,
    /// Images per training step.
    pub batch: usize,
    /// Reference learning rate (EDM2's Adam with magnitude-preserving layers; constant after
    /// the warm-up, as the budgets end long before EDM2's decay would start).
    pub lr: f64,
    /// Training length, thousands of images.
    pub total_kimg: u64,
    /// Snapshot interval, thousands of images.
    pub snapshot_kimg: u64,
    /// Learning-rate warm-up, millions of images.
    pub rampup_mimg: f64,
    /// Reference images (the first of Fashion-MNIST's test set).
    pub reference_images: usize,
    /// The sweep's EMA widths: within what the budget's snapshots reconstruct well (profile
    /// error under 5 %; short EMAs need frequent snapshots).
    pub sigma_rels: Vec<f64>,
    /// Images per point and seed set.
    pub num_images: usize,
    /// Seed sets per point: with two or more each metric has a spread (its error bar).
    pub seed_sets: usize,
    /// Sampler steps.
    pub steps: usize,
    /// Images per sweep batch.
    pub sweep_batch: usize,
}

impl Budget {
    /// The settings of this budget for images of `resolution`² pixels with `channels`
    /// channels and `classes` classes (Fashion-MNIST: 32, 1, 10).
    pub fn settings(self, resolution: usize, channels: usize, classes: usize) -> DemoSettings {
        let network = |model_channels: usize, channel_mult: Vec<usize>| Edm2Config {
            model_channels,
            channel_mult,
            num_blocks: 1,
            attn_resolutions: Vec::new(),
            logvar_channels: 16,
            ..Edm2Config::new(resolution, channels, classes)
        };
        match self {
            Budget::Quick => DemoSettings {
                run: "demo-quick".into(),
                network: network(16, vec![1, 2]),
                batch: 32,
                lr: 0.01,
                total_kimg: 2,
                snapshot_kimg: 1,
                rampup_mimg: 0.001,
                reference_images: 64,
                sigma_rels: vec![0.05, 0.07, 0.10],
                num_images: 16,
                seed_sets: 1,
                steps: 4,
                sweep_batch: 16,
            },
            Budget::Standard => DemoSettings {
                run: "demo".into(),
                network: network(32, vec![1, 2, 2]),
                batch: 32,
                lr: 0.05,
                total_kimg: 20,
                snapshot_kimg: 1,
                rampup_mimg: 0.002,
                reference_images: 500,
                sigma_rels: vec![0.025, 0.04, 0.065, 0.1, 0.15, 0.23],
                num_images: 64,
                seed_sets: 2,
                steps: 16,
                sweep_batch: 64,
            },
            Budget::Long => DemoSettings {
                run: "demo-long".into(),
                network: network(32, vec![1, 2, 2]),
                batch: 64,
                lr: 0.01,
                total_kimg: 100,
                snapshot_kimg: 5,
                rampup_mimg: 0.005,
                reference_images: 2000,
                sigma_rels: vec![0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20],
                num_images: 500,
                seed_sets: 1,
                steps: 24,
                sweep_batch: 50,
            },
        }
    }
}

impl DemoSettings {
    /// The name of the reference statistics this budget uses.
    pub fn reference_name(&self, dataset: &str) -> String {
        format!("{dataset}-test-{}", self.reference_images)
    }
}

/// What an earlier demo left of the run: nothing, a run cut short (resume it), or a finished
/// one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// No such run (an empty one left by a demo stopped before its first checkpoint is
    /// removed and reported as missing).
    Missing,
    /// Trained up to this many images, short of the budget.
    Partial(u64),
    /// Trained to the budget (or beyond).
    Done(u64),
}

/// `base`, then `base-2`, `base-3`, …: the names the demo tries for a run or reference
/// statistics until one is free or holds what it wants.
fn numbered(base: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(base.to_owned()).chain((2..).map(move |n| format!("{base}-{n}")))
}

/// The run the demo trains on `dataset` (`fashion-mnist` or `procedural`) and where it
/// stands: the budget's run (`demo`, `demo-quick`, `demo-long`) for Fashion-MNIST,
/// `<that>-<dataset>` for other data — then `-2`, `-3`, … past runs of those names that were
/// trained on something else (`metadata.dataset.source`) or with other settings (network,
/// batch, learning rate: an earlier version's demo), so a run is never continued or swept
/// on data it was not trained on. Also returns a line for each run passed over.
pub async fn choose_run(
    data: &DataDir,
    settings: &DemoSettings,
    dataset: &str,
) -> Result<(String, RunState, Vec<String>)> {
    let base = if dataset == "fashion-mnist" {
        settings.run.clone()
    } else {
        format!("{}-{dataset}", settings.run)
    };
    let mut passed = Vec::new();
    for name in numbered(&base) {
        let state = run_state(data, &name, settings.total_kimg).await?;
        if state == RunState::Missing {
            return Ok((name, state, passed));
        }
        let metadata = data
            .db
            .run(&name)
            .await?
            .map(|r| r.metadata)
            .unwrap_or_default();
        let recorded = metadata["dataset"]["source"].as_str();
        if recorded != Some(dataset) {
            passed.push(format!(
                "run {name:?} was trained on {}, not {dataset}: leaving it as it is",
                recorded.unwrap_or("data it does not record")
            ));
            continue;
        }
        let training = &metadata["training"];
        let same = training["batch_size"].as_u64() == Some(settings.batch as u64)
            && training["ref_lr"].as_f64() == Some(settings.lr)
            && serde_json::to_value(&settings.network).ok().as_ref() == Some(&metadata["network"]);
        if same {
            return Ok((name, state, passed));
        }
        passed.push(format!(
            "run {name:?} was trained with other settings (an earlier version of the demo: \
             batch {}, learning rate {}): leaving it as it is",
            training["batch_size"], training["ref_lr"]
        ));
    }
    unreachable!("the loop returns")
}

/// The name of the demo's reference statistics of `test_set` (`fashion-mnist-test`,
/// `procedural`): `base`, else `base-2`, `base-3`, … past statistics of that name made from
/// other data (their `source`'s [`crate::datasets::family`]), which are left as they are;
/// with a line for each passed over.
pub async fn choose_reference(
    data: &DataDir,
    base: &str,
    test_set: &str,
) -> Result<(String, Vec<String>)> {
    let wanted = crate::datasets::family(test_set);
    let mut passed = Vec::new();
    for name in numbered(base) {
        let row = match crate::app::references::find(data, &name).await {
            Ok(row) => row,
            Err(crate::Error::NotFound(_)) => return Ok((name, passed)),
            Err(e) => return Err(e),
        };
        if crate::datasets::family(&row.source) == wanted && wanted.is_some() {
            return Ok((name, passed));
        }
        passed.push(format!(
            "reference statistics {name:?} come from {}, not {test_set}: leaving them as they are",
            row.source
        ));
    }
    unreachable!("the loop returns")
}

/// Where the demo's run `name` stands, against a budget of `total_kimg` thousand images.
pub async fn run_state(data: &DataDir, name: &str, total_kimg: u64) -> Result<RunState> {
    let Some(run) = data.db.run(name).await? else {
        return Ok(RunState::Missing);
    };
    let checkpoint = crate::train::checkpoint::checkpoint_path(&data.path, name);
    if !checkpoint.is_file() && data.db.delete_run_if_empty(run.id).await? {
        tracing::info!(run = %name, "removed an empty run left by an interrupted demo");
        return Ok(RunState::Missing);
    }
    let last = data
        .db
        .snapshots(run.id)
        .await?
        .iter()
        .map(|s| s.nimg as u64)
        .max()
        .unwrap_or(0);
    Ok(if last >= total_kimg * 1000 {
        RunState::Done(last)
    } else {
        RunState::Partial(last)
    })
}

/// The newest sweep of the demo's run with exactly these settings and reference that is
/// finished or can still finish (queued, running): reused instead of starting another.
pub async fn matching_sweep(
    data: &DataDir,
    settings: &DemoSettings,
    reference_id: i64,
) -> Result<Option<SweepRow>> {
    let Some(run) = data.db.run(&settings.run).await? else {
        return Ok(None);
    };
    let mut sweeps = data.db.sweeps(Some(run.id)).await?;
    sweeps.sort_by_key(|s| std::cmp::Reverse(s.id));
    for sweep in sweeps {
        if matches!(sweep.status, SweepStatus::Failed | SweepStatus::Cancelled) {
            continue;
        }
        let Ok(spec) = crate::sweep::spec_of(&sweep) else {
            continue;
        };
        if spec.reference_id == Some(reference_id)
            && spec.sigma_rels == settings.sigma_rels
            && spec.num_images == settings.num_images
            && spec.seed_sets == settings.seed_sets
            && spec.sampler
                == crate::sweep::SamplerSpec::Builtin(crate::sweep::SamplerSettings {
                    steps: settings.steps,
                    ..spec.sampler.settings()
                })
            && spec.metrics.len() == 2
        {
            return Ok(Some(sweep));
        }
    }
    Ok(None)
}

/// The shape of a sweep's curve for one metric (one training time): where its best point
/// lies and how much worse the two ends of the σ_rel range are than it, against the noise of
/// the points involved. EDM2's Fig. 5 shows why the EMA length is chosen after training: a
/// minimum inside the range, both ends worse.
#[derive(Clone, Debug, PartialEq)]
pub struct CurveShape {
    /// The best point's σ_rel and mean value (the metric's units, unscaled).
    pub best: (f64, f64),
    /// The shortest σ_rel and how much worse its mean is than the best (≥ 0).
    pub shortest: (f64, f64),
    /// The longest σ_rel and how much worse its mean is than the best (≥ 0).
    pub longest: (f64, f64),
    /// The largest error bar ([`crate::sweep::error_bar`]: the spread over seed sets, else
    /// KID's standard error) of those three points; `None` when none has one.
    pub noise: Option<f64>,
}

impl CurveShape {
    /// Whether the best point is strictly inside the range.
    pub fn interior(&self) -> bool {
        self.best.0 > self.shortest.0 && self.best.0 < self.longest.0
    }

    /// Whether the minimum is inside the range and both ends are worse than the best by more
    /// than the noise (false without a noise estimate).
    pub fn clear_interior(&self) -> bool {
        self.interior()
            && self
                .noise
                .is_some_and(|n| self.shortest.1 > n && self.longest.1 > n)
    }
}

/// The [`CurveShape`] of `metric` over a sweep's `points` (those finished with a value; the
/// training time is ignored, so pass one time's points); `None` with fewer than two.
pub fn sweep_curve_shape(
    points: &[crate::db::PointRow],
    metric: &crate::sweep::MetricInfo,
) -> Option<CurveShape> {
    let values = points
        .iter()
        .filter_map(|p| {
            let r: crate::sweep::PointResult = serde_json::from_value(p.result.clone()?).ok()?;
            Some((p.sigma_rel, r.named(&metric.metric)?.clone()))
        })
        .collect();
    curve_shape(values, metric)
}

/// The [`CurveShape`] of `metric` from `(σ_rel, value)` pairs in any order (non-finite means
/// are left out); `None` with fewer than two.
pub fn curve_shape(
    values: Vec<(f64, crate::sweep::MetricSummary)>,
    metric: &crate::sweep::MetricInfo,
) -> Option<CurveShape> {
    let mut values: Vec<_> = values
        .into_iter()
        .filter(|v| v.1.mean.is_finite())
        .collect();
    if values.len() < 2 {
        return None;
    }
    values.sort_by(|a, b| a.0.total_cmp(&b.0));
    let best = values.iter().reduce(|a, b| {
        if metric.better(b.1.mean, a.1.mean) {
            b
        } else {
            a
        }
    })?;
    let worse = |v: &(f64, crate::sweep::MetricSummary)| (v.0, (v.1.mean - best.1.mean).abs());
    let (first, last) = (&values[0], &values[values.len() - 1]);
    let noise = [best, first, last]
        .iter()
        .filter_map(|v| crate::sweep::error_bar(&v.1))
        .reduce(f64::max);
    Some(CurveShape {
        best: (best.0, best.1.mean),
        shortest: worse(first),
        longest: worse(last),
        noise,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metric;
    use crate::sweep::MetricInfo;

    fn point(_idx: i64, sigma_rel: f64, fid: &[f64]) -> (f64, crate::sweep::MetricSummary) {
        (
            sigma_rel,
            crate::sweep::MetricSummary::of(fid.to_vec(), None),
        )
    }

    #[test]
    fn a_u_is_told_from_a_monotone_curve_and_from_noise() {
        let fid = MetricInfo::new(Metric::Fid, false);
        // Unordered points; minimum at 0.07; ends worse by 6 and 20 against a spread of 1.
        let u = [
            point(2, 0.07, &[100.0, 101.0]),
            point(0, 0.03, &[106.0, 107.0]),
            point(1, 0.05, &[102.0, 103.0]),
            point(3, 0.19, &[120.0, 121.0]),
        ];
        let shape = curve_shape(u.to_vec(), &fid).unwrap();
        assert_eq!(shape.best, (0.07, 100.5));
        assert_eq!(shape.shortest, (0.03, 6.0));
        assert_eq!(shape.longest, (0.19, 20.0));
        assert!((shape.noise.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert!(shape.interior() && shape.clear_interior());
        // The best at an end: no interior minimum.
        let monotone = [point(0, 0.03, &[90.0, 91.0]), point(1, 0.05, &[95.0, 96.0])];
        let shape = curve_shape(monotone.to_vec(), &fid).unwrap();
        assert!(!shape.interior() && !shape.clear_interior());
        // Inside, but an end within the noise: not clear.
        let shallow = [
            point(0, 0.03, &[100.0, 104.0]),
            point(1, 0.05, &[99.0, 103.0]),
            point(2, 0.10, &[110.0, 114.0]),
        ];
        let shape = curve_shape(shallow.to_vec(), &fid).unwrap();
        assert!(shape.interior() && !shape.clear_interior());
        // One seed set of FID has no noise estimate: never "clear".
        let single = [
            point(0, 0.03, &[5.0]),
            point(1, 0.05, &[1.0]),
            point(2, 0.1, &[7.0]),
        ];
        assert!(!curve_shape(single.to_vec(), &fid).unwrap().clear_interior());
        assert!(curve_shape(single[..1].to_vec(), &fid).is_none());
    }
}
