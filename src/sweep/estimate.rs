//! How long a builtin sweep would take, from the timings its run's finished points recorded
//! ([`super::Timings`]): never a number that was not measured on this server.
//!
//! A point's time is its reconstruction, its images (sampling, Inception features, storing)
//! and its metrics. Sampling scales with the denoiser evaluations of EDM's Heun sampler,
//! `2·steps − 1` per image (EDM, arXiv 2206.00364, Algorithm 1); features and storing scale
//! with the images; reconstruction and metrics are per point. Points run one after another on
//! one worker (`hindsight serve` runs one; `hindsight worker` adds more).

use crate::app::DataDir;
use crate::db::{Evaluator, PointRow, Run, SweepRow};
use crate::error::Result;

use super::{run_network, spec_of, PointResult};

/// Sweeps of other runs looked at for a measurement when the run has none of its own.
const OTHER_SWEEPS_SCANNED: usize = 200;

/// Costs measured on one sweep's finished points.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// The run measured.
    pub run: String,
    /// Whether it is the run asked about (else a run with the same network configuration).
    pub same_run: bool,
    /// The sweep measured.
    pub sweep: i64,
    /// Its finished points that recorded timings.
    pub points: usize,
    /// Its sampler steps.
    pub steps: usize,
    /// Images per second over the points' batches (sampling, features, storing).
    pub images_per_s: f64,
    /// Seconds of sampling per image at `steps`.
    pub sample_s_per_image: f64,
    /// Seconds of Inception features per image.
    pub features_s_per_image: f64,
    /// Seconds per image of the rest of a batch (storing features, the image grid).
    pub other_s_per_image: f64,
    /// Seconds per point of reconstructing its weights (mean; 0 where they were stored).
    pub reconstruct_s: f64,
    /// Seconds per point of statistics, FID and KID (mean).
    pub metrics_s: f64,
}

/// What would be swept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    /// Points (σ_rel values × training times).
    pub points: usize,
    /// Images per seed set.
    pub num_images: usize,
    /// Seed sets.
    pub seed_sets: usize,
    /// Sampler steps.
    pub steps: usize,
}

impl Planned {
    /// Images sampled in all.
    pub fn images(&self) -> usize {
        self.points * self.num_images * self.seed_sets
    }
}

/// Denoiser evaluations per image of EDM's Heun sampler with `steps` steps.
fn evaluations(steps: usize) -> f64 {
    (2 * steps.max(1) - 1) as f64
}

impl Measured {
    /// The costs of the finished points of `sweep` (a builtin sweep of run `run`) that
    /// recorded images and timings; `None` when there are none.
    pub fn of_points(
        run: &str,
        same_run: bool,
        sweep: i64,
        steps: usize,
        points: &[PointRow],
    ) -> Option<Self> {
        let results: Vec<PointResult> = points
            .iter()
            .filter_map(|p| serde_json::from_value::<PointResult>(p.result.clone()?).ok())
            .filter(|r| r.num_images * r.seed_sets > 0 && r.timings.batches_s > 0.0)
            .collect();
        if results.is_empty() {
            return None;
        }
        let n = results.len() as f64;
        let images: f64 = results
            .iter()
            .map(|r| (r.num_images * r.seed_sets) as f64)
            .sum();
        let sum = |f: &dyn Fn(&PointResult) -> f64| results.iter().map(f).sum::<f64>();
        let batches = sum(&|r| r.timings.batches_s);
        // Results recorded before sampling and features were timed apart: all sampling (an
        // estimate that scales the features with the steps too, so errs long).
        let split = |r: &PointResult| {
            let t = &r.timings;
            if t.sample_s + t.features_s > 0.0 {
                (t.sample_s, t.features_s)
            } else {
                (t.batches_s, 0.0)
            }
        };
        let sample = sum(&|r| split(r).0);
        let features = sum(&|r| split(r).1);
        let other = sum(&|r| {
            let (s, f) = split(r);
            (r.timings.batches_s - s - f).max(0.0)
        });
        Some(Measured {
            run: run.to_owned(),
            same_run,
            sweep,
            points: results.len(),
            steps,
            images_per_s: images / batches,
            sample_s_per_image: sample / images,
            features_s_per_image: features / images,
            other_s_per_image: other / images,
            reconstruct_s: sum(&|r| r.timings.reconstruct_s) / n,
            metrics_s: sum(&|r| r.timings.metrics_s) / n,
        })
    }

    /// Seconds one point of `planned` would take.
    pub fn point_seconds(&self, planned: &Planned) -> f64 {
        let images = (planned.num_images * planned.seed_sets) as f64;
        let sample = self.sample_s_per_image * evaluations(planned.steps) / evaluations(self.steps);
        self.reconstruct_s
            + self.metrics_s
            + images * (sample + self.features_s_per_image + self.other_s_per_image)
    }

    /// Seconds the whole of `planned` would take on one worker.
    pub fn seconds(&self, planned: &Planned) -> f64 {
        self.point_seconds(planned) * planned.points as f64
    }
}

/// The newest builtin sweep of `run` with finished, timed points; failing that, the newest
/// of another run recording the same network configuration (`metadata.network`), among the
/// server's newest sweeps. `None`: nothing measured.
pub async fn measured(data: &DataDir, run: &Run) -> Result<Option<Measured>> {
    let timed = |sweep: &SweepRow, points: &[PointRow], same_run: bool| {
        let steps = spec_of(sweep).ok()?.sampler.settings().steps;
        Measured::of_points(&sweep.run, same_run, sweep.id, steps, points)
    };
    for sweep in data.db.sweeps(Some(run.id)).await? {
        if sweep.evaluator != Evaluator::Builtin {
            continue;
        }
        let points = data.db.sweep_points(sweep.id).await?;
        if let Some(m) = timed(&sweep, &points, true) {
            return Ok(Some(m));
        }
    }
    if run_network(run).is_err() {
        return Ok(None);
    }
    let network = &run.metadata["network"];
    let mut same_network = std::collections::HashMap::new();
    let others = data
        .db
        .sweeps_page(None, None, OTHER_SWEEPS_SCANNED)
        .await?;
    for sweep in others {
        if sweep.evaluator != Evaluator::Builtin || sweep.run_id == run.id {
            continue;
        }
        let same = match same_network.get(&sweep.run_id) {
            Some(&same) => same,
            None => {
                let same = match data.db.run(&sweep.run).await? {
                    Some(other) => &other.metadata["network"] == network,
                    None => false,
                };
                same_network.insert(sweep.run_id, same);
                same
            }
        };
        if !same {
            continue;
        }
        let points = data.db.sweep_points(sweep.id).await?;
        if let Some(m) = timed(&sweep, &points, false) {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Measured {
        Measured {
            run: "r".into(),
            same_run: true,
            sweep: 1,
            points: 2,
            steps: 4,
            images_per_s: 10.0,
            sample_s_per_image: 0.07,
            features_s_per_image: 0.02,
            other_s_per_image: 0.01,
            reconstruct_s: 3.0,
            metrics_s: 1.0,
        }
    }

    #[track_caller]
    fn check(planned: Planned, expected_point_s: f64) {
        let m = measured();
        let got = m.point_seconds(&planned);
        assert!(
            (got - expected_point_s).abs() < 1e-9,
            "{got} vs {expected_point_s}"
        );
        let all = m.seconds(&planned);
        assert!((all - expected_point_s * planned.points as f64).abs() < 1e-9);
    }

    #[test]
    fn sampling_scales_with_denoiser_evaluations_the_rest_with_images() {
        let at = |points, num_images, seed_sets, steps| Planned {
            points,
            num_images,
            seed_sets,
            steps,
        };
        // As measured: 100 images × (0.07 + 0.02 + 0.01) s + 4 s.
        check(at(1, 100, 1, 4), 14.0);
        check(at(3, 100, 1, 4), 14.0);
        check(at(1, 50, 2, 4), 14.0);
        // 32 steps: 63 evaluations instead of 7, nine times the sampling.
        check(at(1, 100, 1, 32), 4.0 + 100.0 * (0.63 + 0.03));
        assert_eq!(at(12, 1000, 2, 32).images(), 24_000);
    }
}
