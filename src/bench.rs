//! Synthetic workloads for `hindsight bench`, the demo and tests: snapshot schedules shaped
//! like real training runs and synthetic snapshot files of any size, so figures in
//! BENCHMARKS.md can be reproduced anywhere; and the small statistics the benchmarks print.

use std::path::Path;

use crate::error::{Error, Result};
use crate::phema::{Snapshot, Target, Width};
use crate::progress::Progress;

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

/// The median of `values` (the upper middle one for an even count); `values` must not be
/// empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Writes `count` EDM2-named fp16 snapshots (`bench-<kimg:07>-<σ:.3f>.safetensors`, σ_rel
/// 0.05 and 0.10 alternating, a snapshot time every 8Mi images) of `params` parameters each,
/// split over a few large and many small tensors like a network's layers, into `dir`. The
/// values are finite pseudo-random fp16 in [−2, 2), the same for the same arguments. Returns
/// the bytes written; `progress` counts files.
pub fn write_synthetic_snapshots(
    dir: &Path,
    count: usize,
    params: u64,
    progress: &dyn Progress,
) -> Result<u64> {
    use safetensors::tensor::{Dtype, TensorView};
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| Error::io(what, e)
    };
    std::fs::create_dir_all(dir).map_err(io(&format!("creating {}", dir.display())))?;
    // Layer sizes: a few large and many small tensors, summing to `params`.
    let mut sizes = vec![params / 4, params / 4, params / 8, params / 8];
    let rest = params - sizes.iter().sum::<u64>();
    sizes.extend(std::iter::repeat_n(rest / 64, 64));
    sizes.push(params - sizes.iter().sum::<u64>());
    progress.set_length(count as u64);
    let mut total = 0;
    for k in 0..count {
        let kimg = (k as u64 / 2 + 1) * 8388; // every 8Mi images, two widths each
        let sigma = if k % 2 == 0 { 0.05 } else { 0.10 };
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ k as u64;
        let buffers: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .flat_map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        // A finite fp16 in [-2, 2): sign, exponent 0..15, mantissa.
                        let bits = (state as u16) & 0xBFFF;
                        bits.to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        let tensors: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let view = TensorView::new(Dtype::F16, vec![b.len() / 2], b).expect("valid view");
                (format!("layer{i:03}.weight"), view)
            })
            .collect();
        let path = dir.join(format!("bench-{kimg:07}-{sigma:.3}.safetensors"));
        safetensors::serialize_to_file(tensors, None, &path).map_err(|e| {
            Error::io(
                format!("writing {}", path.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        total += std::fs::metadata(&path)
            .map_err(io(&format!("reading {}", path.display())))?
            .len();
        progress.inc(1);
    }
    Ok(total)
}

/// [`write_synthetic_snapshots`] unless `dir` already holds `count` files (from an earlier
/// call with the same arguments); a directory with another count is emptied and rewritten.
pub fn ensure_synthetic_snapshots(
    dir: &Path,
    count: usize,
    params: u64,
    progress: &dyn Progress,
) -> Result<()> {
    let present = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    if present != count {
        let _ = std::fs::remove_dir_all(dir);
        write_synthetic_snapshots(dir, count, params, progress)?;
    }
    Ok(())
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

/// The repository file `relative` (a peer script, a fixture): under the current directory when
/// it is there (a checkout run from its root, e.g. on a GPU machine), else in the checkout the
/// binary was built from.
pub fn repo_file(relative: &str) -> std::path::PathBuf {
    let here = std::path::Path::new(relative);
    if here.exists() {
        return here.to_owned();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}
