//! Synthetic workloads for `hindsight bench` and for tests: snapshot schedules shaped like real
//! training runs, so figures in BENCHMARKS.md can be reproduced anywhere.

use crate::phema::{Snapshot, Target, Width};

/// Snapshots of an EDM2-style run: `count` snapshot times evenly spaced `interval_nimg` apart
/// (the first at `interval_nimg`), each with one snapshot per width in `sigma_rels`.
/// EDM2's ImageNet-512 runs save every 8Mi images (`interval_nimg = 8 << 20`) for σ_rel 0.05
/// and 0.10.
pub fn edm2_schedule(count: usize, interval_nimg: u64, sigma_rels: &[f64]) -> Vec<Snapshot> {
    (1..=count as u64)
        .flat_map(|k| {
            sigma_rels.iter().map(move |&s| Snapshot {
                nimg: k * interval_nimg,
                width: Width::SigmaRel(s),
            })
        })
        .collect()
}

/// `count` targets with σ_rel evenly spaced from `lo` to `hi` inclusive, at the last snapshot.
pub fn sigma_sweep(count: usize, lo: f64, hi: f64) -> Vec<Target> {
    (0..count)
        .map(|i| {
            let s = if count == 1 {
                lo
            } else {
                lo + (hi - lo) * i as f64 / (count - 1) as f64
            };
            Target {
                width: Width::SigmaRel(s),
                nimg: None,
            }
        })
        .collect()
}

/// Summary statistics of a set of timings, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Fastest run.
    pub min: f64,
    /// Median run.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
}

impl Timing {
    /// Summarises raw timings (seconds); `samples` must not be empty.
    pub fn from_samples(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            min: samples[0],
            median: at(0.5),
            p90: at(0.9),
        }
    }
}

/// Peak resident memory of this process in KiB (`VmHWM` from `/proc/self/status`), where the
/// platform reports it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
