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
    /// About eight minutes on 2 cores: samples look like clothing, a six-point curve.
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
    /// Images per point.
    pub num_images: usize,
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
                total_kimg: 2,
                snapshot_kimg: 1,
                rampup_mimg: 0.001,
                reference_images: 64,
                sigma_rels: vec![0.05, 0.07, 0.10],
                num_images: 16,
                steps: 4,
                sweep_batch: 16,
            },
            Budget::Standard => DemoSettings {
                run: "demo".into(),
                network: network(32, vec![1, 2, 2]),
                batch: 64,
                total_kimg: 20,
                snapshot_kimg: 1,
                rampup_mimg: 0.002,
                reference_images: 500,
                sigma_rels: vec![0.03, 0.04, 0.06, 0.09, 0.13, 0.19],
                num_images: 128,
                steps: 16,
                sweep_batch: 64,
            },
            Budget::Long => DemoSettings {
                run: "demo-long".into(),
                network: network(32, vec![1, 2, 2]),
                batch: 64,
                total_kimg: 100,
                snapshot_kimg: 5,
                rampup_mimg: 0.005,
                reference_images: 2000,
                sigma_rels: vec![0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20],
                num_images: 500,
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

/// The run the demo trains on `dataset` (`fashion-mnist` or `procedural`) and where it
/// stands: the budget's run (`demo`, `demo-quick`, `demo-long`) for Fashion-MNIST,
/// `<that>-<dataset>` for other data — then `-2`, `-3`, … past runs of those names that were
/// trained on something else (`metadata.dataset.source`), so a run is never continued or
/// swept on data it was not trained on. Also returns a line for each run passed over.
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
    for n in 1.. {
        let name = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let state = run_state(data, &name, settings.total_kimg).await?;
        if state == RunState::Missing {
            return Ok((name, state, passed));
        }
        let run = data.db.run(&name).await?;
        let recorded = run
            .as_ref()
            .and_then(|r| r.metadata["dataset"]["source"].as_str().map(str::to_owned));
        if recorded.as_deref() == Some(dataset) {
            return Ok((name, state, passed));
        }
        passed.push(format!(
            "run {name:?} was trained on {}, not {dataset}: leaving it as it is",
            recorded.as_deref().unwrap_or("data it does not record")
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
            && spec.seed_sets == 1
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
