//! Least-squares reconstruction of an EMA profile from stored snapshots (EDM2, Algorithm 3),
//! with a quality report for every target.
//!
//! Given snapshot profiles `p_1 … p_n` (each an EMA of the training weights read out at time
//! `t_k` with exponent `γ_k`) and a target profile `p`, the weights `x` minimise
//! `‖p − Σ_k x_k p_k‖` in L2 over training time, i.e. solve the Gram system `A x = b` with
//! `A_kl = ⟨p_k, p_l⟩` and `b_k = ⟨p_k, p⟩` (eq. 151). As in EDM2, the weights are then divided
//! by their sum so that the reconstruction is an average of snapshots (`Σ w = 1`).

use std::collections::BTreeMap;

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::linalg::{condition_number, GramFactor};
use super::profile::{
    check_gamma, check_nimg, check_sigma_rel, gamma_of_sigma_rel, inner_product,
    sigma_rel_of_gamma, Profile,
};
use super::tabulated::Tabulated;
use crate::error::{Error, Result};

/// The width of an EMA profile, given either way.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Width {
    /// Relative standard deviation `σ_rel ∈ (0, sqrt(1/12))`.
    SigmaRel(f64),
    /// Power-function exponent `γ > 0`.
    Gamma(f64),
}

impl Width {
    /// Validates the width and returns `(σ_rel, γ)`. `field` is the path of the enclosing
    /// object, e.g. `targets[3]`.
    pub fn resolve(self, field: &str) -> Result<(f64, f64)> {
        match self {
            Width::SigmaRel(s) => {
                check_sigma_rel(s, &format!("{field}.sigma_rel"))?;
                Ok((s, gamma_of_sigma_rel(s)))
            }
            Width::Gamma(g) => {
                check_gamma(g, &format!("{field}.gamma"))?;
                Ok((sigma_rel_of_gamma(g), g))
            }
        }
    }
}

/// A stored snapshot: an EMA of width `width` read out at training time `nimg`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    /// Training time in images. Snapshots at `nimg = 0` carry no information and are skipped,
    /// as EDM2 skips them.
    pub nimg: u64,
    /// The EMA's width.
    pub width: Width,
}

/// A profile to reconstruct.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// The EMA's width.
    pub width: Width,
    /// Training time to reconstruct at; `None` means the last snapshot's time. Any time from the
    /// first snapshot to the last is allowed, not only snapshot times.
    pub nimg: Option<u64>,
}

/// The most snapshots one solve accepts: the Gram matrix takes `8 n²` bytes (128 MiB here).
/// EDM2's longest published runs have a few hundred snapshot times per width.
pub const MAX_SNAPSHOTS: usize = 4096;

/// The most targets one solve accepts.
pub const MAX_TARGETS: usize = 4096;

/// Thresholds above which a target's report carries a warning. Fields missing from JSON take
/// their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SolveOptions {
    /// Warn when `‖p_target − Σ w p‖ / ‖p_target‖` exceeds this. Default 0.05: the EDM2 paper's
    /// reconstructions of useful widths stay well below a few percent.
    pub max_relative_error: f64,
    /// Warn when `sqrt(Σ w²)` exceeds this. Default 10: independent per-snapshot noise (such as
    /// fp16 rounding of the stored weights) is amplified ten-fold.
    pub max_noise_gain: f64,
    /// Warn when the Gram matrix's condition number exceeds this. Default 1e12: beyond it the
    /// weights themselves carry relative errors near 1e-4 from f64 rounding alone.
    pub max_condition_number: f64,
}

impl Default for SolveOptions {
    fn default() -> Self {
        Self {
            max_relative_error: 0.05,
            max_noise_gain: 10.0,
            max_condition_number: 1e12,
        }
    }
}

/// Why a target's report deserves a second look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarningCode {
    /// The snapshots cannot represent the target profile well.
    LargeProfileError,
    /// The weights amplify per-snapshot noise.
    LargeNoiseGain,
    /// The Gram system is close to singular.
    IllConditioned,
    /// Some snapshots were left out as linearly dependent on earlier ones.
    DependentSnapshots,
    /// Reconstructed values beyond the output type's range were clamped to its largest finite
    /// value (asked for with `clamp_out_of_range`; set by the materializer, not the solver).
    ClampedOutOfRange,
}

/// A warning attached to one target's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = QualityWarning)]
pub struct Warning {
    /// Machine-readable kind.
    pub code: WarningCode,
    /// One sentence for people.
    pub message: String,
}

/// The solution for one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSolution {
    /// The target's relative standard deviation.
    pub sigma_rel: f64,
    /// The target's exponent.
    pub gamma: f64,
    /// The training time reconstructed at.
    pub nimg: u64,
    /// One weight per input snapshot, in input order; 0 for snapshots after `nimg` (or at 0).
    /// The weights sum to one.
    pub coefficients: Vec<f64>,
    /// How many snapshots took part: those with `0 < nimg_k ≤ nimg`, less
    /// `dependent_snapshots`.
    pub used_snapshots: usize,
    /// `‖p_target − Σ_k w_k p_k‖ / ‖p_target‖`, L2 over training time, in closed form.
    pub relative_error: f64,
    /// `Σ_k |w_k|`: 1 for a pure average, larger when weights cancel.
    pub coefficient_l1: f64,
    /// `sqrt(Σ_k w_k²)`: the factor by which independent per-snapshot noise of equal size is
    /// scaled in the reconstruction.
    pub noise_gain: f64,
    /// 2-norm condition number of the Gram matrix of the used snapshots.
    pub condition_number: f64,
    /// Snapshots (input indices) at or before `nimg` that were left out of the solve because
    /// their profiles are linear combinations of earlier snapshots' to working precision
    /// (their weight is 0). Usually empty; see [`solve`].
    pub dependent_snapshots: Vec<usize>,
    /// Warnings for this target (empty when all figures are within [`SolveOptions`]).
    pub warnings: Vec<Warning>,
}

/// Solves for every target in one call. The Gram matrix is factored once for all targets.
///
/// Snapshots are used when `0 < nimg_k ≤ nimg` of the target. Exact duplicates (same `nimg`
/// and width) are an error. A snapshot whose profile is a linear combination of earlier ones
/// to working precision (pivot of the unit-diagonal Gram matrix below `4 ε · max(n, 16)`, which
/// happens when snapshots crowd together) is left out with weight 0 and listed in
/// `dependent_snapshots`: a Cholesky factorisation that skips such columns in its single pass,
/// which keeps the weights bounded where a plain solve would return huge cancelling ones.
///
/// ```
/// use hindsight::phema::{solve, Snapshot, SolveOptions, Target, Width};
///
/// // EMAs of width 0.05 and 0.10 saved every 1Mi images, up to 8Mi.
/// let snapshots: Vec<Snapshot> = (1..=8u64)
///     .flat_map(|k| [0.05, 0.10].map(|s| Snapshot { nimg: k << 20, width: Width::SigmaRel(s) }))
///     .collect();
/// let targets = [Target { width: Width::SigmaRel(0.08), nimg: None }];
/// let out = solve(&snapshots, &targets, &SolveOptions::default())?;
/// let w = &out[0].coefficients;
/// assert_eq!(w.len(), snapshots.len());
/// assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
/// // Eight snapshot times reproduce the σ_rel 0.08 profile to about 1% (L2).
/// assert!(out[0].relative_error < 0.02 && out[0].warnings.is_empty());
/// # Ok::<(), hindsight::Error>(())
/// ```
pub fn solve(
    snapshots: &[Snapshot],
    targets: &[Target],
    options: &SolveOptions,
) -> Result<Vec<TargetSolution>> {
    solve_realised(snapshots, &[], targets, options)
}

/// [`solve`] for snapshots whose EMAs were not all updated by EDM2's rule: `realised[i]`,
/// when given, is the profile snapshot `i` really has (see [`Tabulated`]), which the solve and
/// its quality report then use instead of the power function its width names (the width
/// remains its label: ordering, duplicates). `realised` is empty (every snapshot a power
/// profile) or has one entry per snapshot. Inner products with tabulated profiles are exact
/// (closed form per piece); a target is still a power-function profile.
pub fn solve_realised(
    snapshots: &[Snapshot],
    realised: &[Option<Tabulated>],
    targets: &[Target],
    options: &SolveOptions,
) -> Result<Vec<TargetSolution>> {
    if !realised.is_empty() && realised.len() != snapshots.len() {
        return Err(Error::invalid(
            "profiles",
            format!(
                "{} realised profiles for {} snapshots",
                realised.len(),
                snapshots.len()
            ),
        ));
    }
    let table = |i: usize| realised.get(i).and_then(Option::as_ref);
    if snapshots.is_empty() {
        return Err(Error::invalid(
            "snapshots",
            "at least one snapshot is needed",
        ));
    }
    if snapshots.len() > MAX_SNAPSHOTS {
        return Err(Error::invalid(
            "snapshots",
            format!(
                "{} snapshots given; at most {MAX_SNAPSHOTS} per solve",
                snapshots.len()
            ),
        ));
    }
    if targets.len() > MAX_TARGETS {
        return Err(Error::invalid(
            "targets",
            format!(
                "{} targets given; at most {MAX_TARGETS} per solve",
                targets.len()
            ),
        ));
    }
    // Resolve widths and keep the usable snapshots, sorted by time (then exponent).
    let mut profiles = Vec::with_capacity(snapshots.len());
    for (i, s) in snapshots.iter().enumerate() {
        let (_, gamma) = s.width.resolve(&format!("snapshots[{i}]"))?;
        check_nimg(s.nimg, &format!("snapshots[{i}].nimg"))?;
        if s.nimg > 0 {
            profiles.push((i, s.nimg, gamma));
        }
    }
    if profiles.is_empty() {
        return Err(Error::invalid(
            "snapshots",
            "every snapshot has nimg = 0; a snapshot must be taken after training started",
        ));
    }
    profiles.sort_by(|a, b| (a.1, a.2).partial_cmp(&(b.1, b.2)).expect("finite"));
    for pair in profiles.windows(2) {
        let ((i, t, g), (j, u, h)) = (pair[0], pair[1]);
        if t == u && (g - h).abs() <= 1e-12 * g && table(i) == table(j) {
            let (first, second) = (i.min(j), i.max(j));
            return Err(Error::invalid(
                format!("snapshots[{second}]"),
                format!(
                    "duplicates snapshots[{first}] (nimg {t}, sigma_rel {:.6})",
                    sigma_rel_of_gamma(g)
                ),
            ));
        }
    }
    let last_nimg = profiles.last().expect("non-empty").1;
    let first_nimg = profiles[0].1;

    // Resolve targets.
    let mut resolved = Vec::with_capacity(targets.len());
    for (j, t) in targets.iter().enumerate() {
        let (sigma_rel, gamma) = t.width.resolve(&format!("targets[{j}]"))?;
        let nimg = t.nimg.unwrap_or(last_nimg);
        check_nimg(nimg, &format!("targets[{j}].nimg"))?;
        if nimg > last_nimg {
            return Err(Error::invalid(
                format!("targets[{j}].nimg"),
                format!(
                    "{nimg} is after the last snapshot ({last_nimg}); post-hoc EMA cannot extrapolate"
                ),
            ));
        }
        if nimg < first_nimg {
            return Err(Error::invalid(
                format!("targets[{j}].nimg"),
                format!("{nimg} is before the first snapshot ({first_nimg})"),
            ));
        }
        resolved.push((sigma_rel, gamma, nimg));
    }

    // Factor the Gram matrix. A snapshot whose profile is a linear combination of the earlier
    // ones to working precision (closely spaced snapshots make such near-dependencies) is left
    // out: it adds nothing the others cannot express, and keeping it would only produce huge,
    // cancelling weights. The first profile is never left out (its pivot is exactly 1).
    let all: Vec<Shape<'_>> = profiles
        .iter()
        .map(|&(i, nimg, gamma)| match table(i) {
            Some(t) => Shape::Table(t),
            None => Shape::Power(Profile {
                nimg: nimg as f64,
                gamma,
            }),
        })
        .collect();
    let (equilibrated, scale) = match all
        .iter()
        .map(|s| match s {
            Shape::Power(p) => Some(*p),
            Shape::Table(_) => None,
        })
        .collect::<Option<Vec<Profile>>>()
    {
        Some(powers) => equilibrated_gram(&powers),
        None => equilibrated_gram_of_shapes(&all),
    };
    let (factor, skipped) = GramFactor::new(equilibrated, scale);
    let mut dependent: Vec<(usize, u64)> = skipped
        .iter()
        .map(|&k| (profiles[k].0, profiles[k].1))
        .collect();
    dependent.sort_unstable();
    let mut kept = Vec::with_capacity(profiles.len() - skipped.len());
    let mut sorted = Vec::with_capacity(kept.capacity());
    for (k, (p, profile)) in profiles.iter().zip(&all).enumerate() {
        if skipped.binary_search(&k).is_err() {
            kept.push(*p);
            sorted.push(profile.clone());
        }
    }

    // Group targets by how many (kept) snapshots they use.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (j, &(_, _, nimg)) in resolved.iter().enumerate() {
        let used = kept.partition_point(|p| p.1 <= nimg);
        groups.entry(used).or_default().push(j);
    }
    let profiles = kept;

    let mut out: Vec<Option<TargetSolution>> = vec![None; targets.len()];
    for (&m, members) in &groups {
        let target_profiles: Vec<Profile> = members
            .iter()
            .map(|&j| Profile {
                nimg: resolved[j].2 as f64,
                gamma: resolved[j].1,
            })
            .collect();
        // Two balanced tasks: the smallest eigenvalue (a Lanczos run through two triangular
        // solves per step) on one side; the largest (a shorter run) and the solves on the other.
        let (inverse_lambda_min, (lambda_max, (x, q))) = rayon::join(
            || factor.inverse_smallest_eigenvalue(m),
            || {
                let lambda_max = factor.largest_eigenvalue(m);
                let rhs = DMatrix::from_fn(m, members.len(), |i, c| {
                    sorted[i].dot_power(target_profiles[c])
                });
                (lambda_max, factor.solve(m, &rhs))
            },
        );
        let condition_number = condition_number(lambda_max, inverse_lambda_min);
        for (c, &j) in members.iter().enumerate() {
            let (sigma_rel, gamma, nimg) = resolved[j];
            let target = target_profiles[c];
            let exact = sorted[..m].iter().position(|s| match s {
                Shape::Power(p) => p.nimg == target.nimg && p.gamma == target.gamma,
                Shape::Table(_) => false,
            });
            let (weights, relative_error) = match exact {
                // The target is one of the snapshots: the exact solution is that snapshot alone.
                Some(k) => {
                    let mut w = vec![0.0; m];
                    w[k] = 1.0;
                    (w, 0.0)
                }
                None => normalise(
                    x.column(c).as_slice(),
                    q[c],
                    target.norm_squared(),
                    &format!("targets[{j}]"),
                )?,
            };
            let mut coefficients = vec![0.0; snapshots.len()];
            for (k, w) in weights.iter().enumerate() {
                coefficients[profiles[k].0] = *w;
            }
            let coefficient_l1 = weights.iter().map(|w| w.abs()).sum();
            let noise_gain = weights.iter().map(|w| w * w).sum::<f64>().sqrt();
            let dependent_snapshots: Vec<usize> = dependent
                .iter()
                .filter(|&&(_, t)| t <= nimg)
                .map(|&(i, _)| i)
                .collect();
            let mut warnings = warnings(
                options,
                relative_error,
                noise_gain,
                condition_number,
                sigma_rel,
            );
            if !dependent_snapshots.is_empty() {
                warnings.push(Warning {
                    code: WarningCode::DependentSnapshots,
                    message: format!(
                        "{} snapshot(s) were left out because their profiles are linear \
                         combinations of earlier ones to working precision: {:?}",
                        dependent_snapshots.len(),
                        dependent_snapshots
                    ),
                });
            }
            out[j] = Some(TargetSolution {
                sigma_rel,
                gamma,
                nimg,
                coefficients,
                used_snapshots: m,
                relative_error,
                coefficient_l1,
                noise_gain,
                condition_number,
                dependent_snapshots,
                warnings,
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every target solved"))
        .collect())
}

/// A snapshot's profile as the solver sees it: the closed-form power function, or a
/// tabulated profile.
#[derive(Clone, Debug)]
enum Shape<'a> {
    Power(Profile),
    Table(&'a Tabulated),
}

impl Shape<'_> {
    fn dot(&self, other: &Shape<'_>) -> f64 {
        match (self, other) {
            (Shape::Power(a), Shape::Power(b)) => inner_product(*a, *b),
            (Shape::Power(p), Shape::Table(t)) | (Shape::Table(t), Shape::Power(p)) => {
                t.dot_power(*p)
            }
            (Shape::Table(a), Shape::Table(b)) => a.dot(b),
        }
    }

    fn dot_power(&self, q: Profile) -> f64 {
        match self {
            Shape::Power(p) => inner_product(*p, q),
            Shape::Table(t) => t.dot_power(q),
        }
    }

    fn norm_squared(&self) -> f64 {
        match self {
            Shape::Power(p) => p.norm_squared(),
            Shape::Table(t) => t.norm_squared(),
        }
    }

    fn density(&self, tau: f64) -> f64 {
        match self {
            Shape::Power(p) => p.density(tau),
            Shape::Table(t) => t.density(tau),
        }
    }
}

/// [`equilibrated_gram`] for any mix of power and tabulated profiles: every entry from the
/// exact inner product, columns in parallel (a pair of tabulated profiles costs their pieces).
fn equilibrated_gram_of_shapes(sorted: &[Shape<'_>]) -> (DMatrix<f64>, Vec<f64>) {
    use rayon::prelude::*;
    let n = sorted.len();
    let scale: Vec<f64> = sorted
        .iter()
        .map(|p| p.norm_squared().sqrt().recip())
        .collect();
    let mut s = DMatrix::zeros(n, n);
    s.as_mut_slice()
        .par_chunks_exact_mut(n)
        .enumerate()
        .for_each(|(a, col)| {
            col[a] = 1.0;
            for b in a + 1..n {
                col[b] = sorted[a].dot(&sorted[b]) * scale[a] * scale[b];
            }
        });
    (s, scale)
}

/// The lower triangle of the equilibrated Gram matrix `S = D A D` of time-sorted profiles,
/// with `A_ab = ⟨p_a, p_b⟩` and `D = diag(A_kk^{-1/2})`, and `diag(D)`.
///
/// Entry `(b, a)` with `t_a ≤ t_b` needs `(t_a / t_b)^γ_b`. Snapshots come in a handful of
/// widths, so for each distinct `γ` the factors `(t_a / t_max)^γ` and `(t_max / t_b)^γ` are
/// computed once and the entry is their product: `O(n)` calls to `pow` instead of `O(n²)`.
/// Each factor is within an ulp or so of exact, so the product's relative error stays near the
/// direct formula's `γ · ε`. When a factor leaves the normal range (very large `γ` over a long
/// span of times) the entry falls back to the direct ratio, and equal times give exactly 1.
fn equilibrated_gram(sorted: &[Profile]) -> (DMatrix<f64>, Vec<f64>) {
    const MAX_FACTORED_WIDTHS: usize = 16;
    let n = sorted.len();
    let t_max = sorted[n - 1].nimg;
    let scale: Vec<f64> = sorted
        .iter()
        .map(|p| p.norm_squared().sqrt().recip())
        .collect();
    let mut widths: Vec<f64> = Vec::new();
    let class: Vec<usize> = sorted
        .iter()
        .map(|p| match widths.iter().position(|&g| g == p.gamma) {
            Some(c) => c,
            None => {
                widths.push(p.gamma);
                widths.len() - 1
            }
        })
        .collect();
    let factored = widths.len() <= MAX_FACTORED_WIDTHS;
    // up[c][a] = (t_a / t_max)^γ_c, down[c][b] = (t_max / t_b)^γ_c / t_b · D_b.
    let (up, down): (Vec<Vec<f64>>, Vec<Vec<f64>>) = if factored {
        widths
            .iter()
            .map(|&g| {
                let up = sorted.iter().map(|p| (p.nimg / t_max).powf(g)).collect();
                let down = sorted.iter().map(|p| (t_max / p.nimg).powf(g)).collect();
                (up, down)
            })
            .unzip()
    } else {
        (Vec::new(), Vec::new())
    };
    let mut s = DMatrix::zeros(n, n);
    for (a, col) in s.as_mut_slice().chunks_exact_mut(n).enumerate() {
        let early = sorted[a];
        col[a] = 1.0;
        for b in a + 1..n {
            let late = sorted[b];
            let c = class[b];
            let ratio_pow = if early.nimg == late.nimg {
                1.0
            } else if factored
                && up[c][a] >= f64::MIN_POSITIVE
                && down[c][b] <= 1.0 / f64::MIN_POSITIVE
            {
                up[c][a] * down[c][b]
            } else {
                (early.nimg / late.nimg).powf(late.gamma)
            };
            let pair = (early.gamma + 1.0) * (late.gamma + 1.0) / (early.gamma + late.gamma + 1.0);
            col[b] = pair * ratio_pow / late.nimg * scale[a] * scale[b];
        }
    }
    (s, scale)
}

/// Normalises the least-squares weights `x` to sum to one and returns them with the relative
/// profile error of the normalised reconstruction.
///
/// With `q = bᵀ A⁻¹ b` (the squared norm of the orthogonal projection of the target onto the
/// snapshots' span), `c = ‖p‖²` and `s = Σ x`, the error of `w = x / s` is
/// `‖p − Σ w p_k‖² = (c − q) + q (1 − 1/s)²`, exact whenever `A x = b`. This avoids the
/// quadratic form `c − 2 wᵀb + wᵀ A w`, whose terms grow with `Σ|w|` and cancel.
fn normalise(x: &[f64], q: f64, c: f64, field: &str) -> Result<(Vec<f64>, f64)> {
    let s: f64 = x.iter().sum();
    let l1: f64 = x.iter().map(|v| v.abs()).sum();
    if !s.is_finite() || s.abs() <= 1e-9 * l1 {
        return Err(Error::invalid(
            field,
            format!(
                "the least-squares weights sum to {s:e} (Σ|x| = {l1:e}) and cannot be \
                 normalised; the snapshots do not represent this profile"
            ),
        ));
    }
    let w = x.iter().map(|v| v / s).collect();
    let miss = 1.0 - 1.0 / s;
    let err2 = ((c - q) / c).max(0.0) + q / c * miss * miss;
    Ok((w, err2.sqrt()))
}

fn warnings(
    options: &SolveOptions,
    relative_error: f64,
    noise_gain: f64,
    condition_number: f64,
    sigma_rel: f64,
) -> Vec<Warning> {
    let mut out = Vec::new();
    if relative_error > options.max_relative_error {
        out.push(Warning {
            code: WarningCode::LargeProfileError,
            message: format!(
                "the snapshots reproduce the sigma_rel {sigma_rel:.4} profile only to {:.1}% \
                 (threshold {:.1}%); the reconstruction is a different EMA than asked for",
                relative_error * 100.0,
                options.max_relative_error * 100.0
            ),
        });
    }
    if noise_gain > options.max_noise_gain {
        out.push(Warning {
            code: WarningCode::LargeNoiseGain,
            message: format!(
                "the weights amplify independent per-snapshot noise {noise_gain:.1}x \
                 (threshold {:.1}x); low-precision snapshots will show through",
                options.max_noise_gain
            ),
        });
    }
    if condition_number > options.max_condition_number {
        out.push(Warning {
            code: WarningCode::IllConditioned,
            message: format!(
                "the Gram matrix has condition number {condition_number:.2e} (threshold {:.0e}); \
                 the weights may be inaccurate",
                options.max_condition_number
            ),
        });
    }
    out
}

/// One point of a sampled profile pair, for plots.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfilePoint {
    /// Training time in images.
    pub nimg: f64,
    /// Density of the target profile at `nimg` (per image).
    pub target: f64,
    /// Density of the reconstruction `Σ_k w_k p_k` at `nimg`.
    pub reconstructed: f64,
}

/// Samples the target profile and its reconstruction on `points` evenly spaced times from
/// `start_nimg` (clamped to `[0, nimg]`) to the target time `nimg`, inclusive. The solution's
/// coefficients are in the order of `snapshots`, as returned by [`solve`].
pub fn sample_profiles(
    snapshots: &[Snapshot],
    solution: &TargetSolution,
    start_nimg: f64,
    points: usize,
) -> Result<Vec<ProfilePoint>> {
    sample_profiles_realised(snapshots, &[], solution, start_nimg, points)
}

/// [`sample_profiles`] for snapshots with realised profiles (as in [`solve_realised`]).
pub fn sample_profiles_realised(
    snapshots: &[Snapshot],
    realised: &[Option<Tabulated>],
    solution: &TargetSolution,
    start_nimg: f64,
    points: usize,
) -> Result<Vec<ProfilePoint>> {
    if snapshots.len() != solution.coefficients.len() {
        return Err(Error::invalid(
            "coefficients",
            format!(
                "{} coefficients for {} snapshots",
                solution.coefficients.len(),
                snapshots.len()
            ),
        ));
    }
    let mut used = Vec::new();
    for (i, (s, &w)) in snapshots.iter().zip(&solution.coefficients).enumerate() {
        if w != 0.0 && s.nimg > 0 {
            let (_, gamma) = s.width.resolve(&format!("snapshots[{i}]"))?;
            let shape = match realised.get(i).and_then(Option::as_ref) {
                Some(t) => Shape::Table(t),
                None => Shape::Power(Profile {
                    nimg: s.nimg as f64,
                    gamma,
                }),
            };
            used.push((shape, w));
        }
    }
    let target = Profile {
        nimg: solution.nimg as f64,
        gamma: solution.gamma,
    };
    let steps = points.max(2) - 1;
    let start = start_nimg.clamp(0.0, target.nimg);
    Ok((0..=steps)
        .map(|i| {
            let tau = start + (target.nimg - start) * i as f64 / steps as f64;
            ProfilePoint {
                nimg: tau,
                target: target.density(tau),
                reconstructed: used.iter().map(|(p, w)| w * p.density(tau)).sum(),
            }
        })
        .collect())
}
