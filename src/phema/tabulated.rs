//! Profiles that are not power functions: what an EMA really averages when its update rule
//! differs from EDM2's (ema-pytorch's `update_every`, constant-β "traditional" EMAs), computed
//! exactly from the rule, and the exact inner products the solver needs.
//!
//! An EMA updated at training times `t_0 < t_1 < … < t_n` (images) with decays `β_j` holds
//! `Σ_j w_j θ(t_j)` with `w_j = (1 − β_j) Π_{k>j} β_k` (and `w_0 = Π_{k≥1} β_k` for the value
//! it started from). As in EDM2, where a snapshot's weight `θ(t_j)` stands for the
//! parameters since the previous update, the profile is taken to be piecewise constant:
//! mass `w_j` spread evenly over `(t_{j−1}, t_j]` (with `t_{−1} = 0`). With EDM2's own decays
//! (eq. 127) this reproduces the power-function profile's mass on every interval exactly; with
//! any other rule it is the profile the snapshot really has, and the solver's quality report
//! then says how well a target can be reached from it.

use serde::{Deserialize, Serialize};

use super::profile::Profile;
use crate::error::{Error, Result};

/// The most pieces one profile may have (memory: 16 bytes each; solve time grows with the
/// pieces of every pair of snapshots).
pub const MAX_PIECES: usize = 1 << 20;

/// A piecewise-constant profile over training time: mass `weights[j]` spread evenly over
/// `(edges[j], edges[j + 1]]`. `edges` starts at 0 and increases strictly; the weights are
/// finite and sum to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Tabulated {
    edges: Vec<f64>,
    weights: Vec<f64>,
}

impl Tabulated {
    /// A profile from its edges (`n + 1`, from 0, strictly increasing) and `n` weights
    /// (finite, summing to 1 within 1e-9; they are rescaled to sum to 1 exactly). `field`
    /// names the input in errors.
    pub fn new(edges: Vec<f64>, weights: Vec<f64>, field: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid(field, reason);
        if weights.is_empty() || edges.len() != weights.len() + 1 {
            return Err(bad(format!(
                "{} edges for {} weights: a profile needs one edge more than weights, and at \
                 least one weight",
                edges.len(),
                weights.len()
            )));
        }
        if weights.len() > MAX_PIECES {
            return Err(bad(format!(
                "{} pieces; at most {MAX_PIECES}",
                weights.len()
            )));
        }
        if edges[0] != 0.0 {
            return Err(bad(format!("the first edge is {}, not 0", edges[0])));
        }
        if let Some(k) = edges
            .windows(2)
            .position(|w| !(w[1] > w[0] && w[1].is_finite()))
        {
            return Err(bad(format!(
                "edges[{}] = {} does not follow edges[{k}] = {}: edges must increase strictly",
                k + 1,
                edges[k + 1],
                edges[k]
            )));
        }
        if let Some(k) = weights.iter().position(|w| !w.is_finite()) {
            return Err(bad(format!("weights[{k}] = {} is not finite", weights[k])));
        }
        let total: f64 = weights.iter().sum();
        if (total - 1.0).abs() > 1e-9 {
            return Err(bad(format!("the weights sum to {total}, not 1")));
        }
        let weights = weights.into_iter().map(|w| w / total).collect();
        Ok(Self { edges, weights })
    }

    /// The profile of an EMA updated at `times` (strictly increasing, positive) with decays
    /// `betas` (each in [0, 1]): its first update copies the parameters (whatever its `β`),
    /// every later one is `ema ← β ema + (1 − β) θ`.
    pub fn from_updates(times: &[f64], betas: &[f64], field: &str) -> Result<Self> {
        if times.len() != betas.len() || times.is_empty() {
            return Err(Error::invalid(
                field,
                "one decay per update time, and at least one update",
            ));
        }
        if let Some(k) = betas.iter().position(|b| !(0.0..=1.0).contains(b)) {
            return Err(Error::invalid(
                field,
                format!("decay {} of update {k} is outside [0, 1]", betas[k]),
            ));
        }
        let n = times.len();
        let mut weights = vec![0.0; n];
        // Backwards: the running product of the later updates' decays.
        let mut later = 1.0;
        for j in (1..n).rev() {
            weights[j] = (1.0 - betas[j]) * later;
            later *= betas[j];
        }
        weights[0] = later;
        let edges = std::iter::once(0.0).chain(times.iter().copied()).collect();
        Self::new(edges, weights, field)
    }

    /// What ema-pytorch's `KarrasEMA` (inside `PostHocEMA`) holds after `step` calls of its
    /// `update()`, one per optimizer step of `images_per_step` images: call `s` (from 0) sees
    /// the parameters after `s + 1` steps; every `update_every`-th call (`s ≡ 0`) updates, the
    /// first by copying, later ones with `β = (1 − 1/(s + 2))^(γ + 1)` — the decay EDM2 gives
    /// for one step, applied once per `update_every` steps (lucidrains/ema-pytorch,
    /// `post_hoc_ema.py`). With `update_every` 1 that is (nearly) the power profile of `γ`;
    /// with its default 100 the EMA keeps most of its weight on the first parameters.
    pub fn ema_pytorch(
        gamma: f64,
        update_every: u64,
        images_per_step: u64,
        step: u64,
        field: &str,
    ) -> Result<Self> {
        if update_every == 0 || images_per_step == 0 || step == 0 {
            return Err(Error::invalid(
                field,
                "update_every, images_per_step and the step must be positive",
            ));
        }
        let updates = (step - 1) / update_every + 1;
        if updates as usize > MAX_PIECES {
            return Err(Error::invalid(
                field,
                format!("{updates} updates; at most {MAX_PIECES} per profile"),
            ));
        }
        let calls = (0..updates).map(|k| k * update_every);
        let times: Vec<f64> = calls
            .clone()
            .map(|s| ((s + 1) * images_per_step) as f64)
            .collect();
        let betas: Vec<f64> = calls
            .map(|s| (1.0 - 1.0 / (s as f64 + 2.0)).powf(gamma + 1.0))
            .collect();
        Self::from_updates(&times, &betas, field)
    }

    /// A traditional EMA with constant decay `beta` per update, updated every `interval_nimg`
    /// images up to `nimg` (the first update at `interval_nimg`), started from the initial
    /// parameters. Their weight `β^n` is given to the first interval (the parameters at time
    /// 0 and after the first interval are taken to be alike).
    pub fn constant_beta(beta: f64, interval_nimg: u64, nimg: u64, field: &str) -> Result<Self> {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::invalid(
                field,
                format!("beta {beta} is outside [0, 1)"),
            ));
        }
        if interval_nimg == 0 || nimg < interval_nimg {
            return Err(Error::invalid(
                field,
                format!("interval_nimg {interval_nimg} must be positive and at most nimg {nimg}"),
            ));
        }
        let n = nimg / interval_nimg;
        if n as usize > MAX_PIECES {
            return Err(Error::invalid(
                field,
                format!("{n} updates; at most {MAX_PIECES} per profile"),
            ));
        }
        let times: Vec<f64> = (1..=n).map(|k| (k * interval_nimg) as f64).collect();
        // The initial parameters (weight β^n) and the first update's (1 − β)β^(n−1) both stand
        // for the first interval: β^(n−1) together, which is what a first update that copies
        // gives.
        let betas = vec![beta; n as usize];
        Self::from_updates(&times, &betas, field)
    }

    /// The time the profile ends (its last edge).
    pub fn end(&self) -> f64 {
        *self.edges.last().expect("at least two edges")
    }

    /// Number of pieces.
    pub fn pieces(&self) -> usize {
        self.weights.len()
    }

    /// The density at time `tau`.
    pub fn density(&self, tau: f64) -> f64 {
        if tau <= 0.0 || tau > self.end() {
            return 0.0;
        }
        // The piece whose interval (edges[j], edges[j + 1]] holds tau.
        let j = self.edges.partition_point(|&e| e < tau) - 1;
        self.weights[j] / (self.edges[j + 1] - self.edges[j])
    }

    /// `⟨p, p⟩ = Σ_j w_j² / Δ_j`.
    pub fn norm_squared(&self) -> f64 {
        self.weights
            .iter()
            .zip(self.edges.windows(2))
            .map(|(w, e)| w * w / (e[1] - e[0]))
            .sum()
    }

    /// `⟨p, q⟩` with a power-function profile `q`, exactly:
    /// `Σ_j (w_j / Δ_j) ∫ over (e_j, e_{j+1}] of q`, where the integral of `q` over `[a, b]`
    /// within `[0, t]` is `(b/t)^(γ+1) − (a/t)^(γ+1)`.
    pub fn dot_power(&self, q: Profile) -> f64 {
        let t = q.nimg;
        let g1 = q.gamma + 1.0;
        let mut total = 0.0;
        let mut below = 0.0; // mass of q up to the current edge
        for (w, e) in self.weights.iter().zip(self.edges.windows(2)) {
            if e[0] >= t {
                break;
            }
            let upto = (e[1].min(t) / t).powf(g1);
            total += w / (e[1] - e[0]) * (upto - below);
            below = upto;
        }
        total
    }

    /// `⟨p, q⟩` of two tabulated profiles, exactly, over the union of their edges.
    pub fn dot(&self, other: &Tabulated) -> f64 {
        let (mut i, mut j) = (0, 0);
        let mut total = 0.0;
        while i < self.weights.len() && j < other.weights.len() {
            let (a0, a1) = (self.edges[i], self.edges[i + 1]);
            let (b0, b1) = (other.edges[j], other.edges[j + 1]);
            let overlap = a1.min(b1) - a0.max(b0);
            if overlap > 0.0 {
                total += self.weights[i] / (a1 - a0) * other.weights[j] / (b1 - b0) * overlap;
            }
            if a1 <= b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        total
    }

    /// The profile's relative standard deviation: its standard deviation over time divided by
    /// its end (EDM2's σ_rel, eq. 123, for any profile).
    pub fn sigma_rel(&self) -> f64 {
        let (mut mean, mut second) = (0.0, 0.0);
        for (w, e) in self.weights.iter().zip(self.edges.windows(2)) {
            // Uniform on (a, b]: mean (a + b)/2, second moment (a² + ab + b²)/3.
            mean += w * (e[0] + e[1]) / 2.0;
            second += w * (e[0] * e[0] + e[0] * e[1] + e[1] * e[1]) / 3.0;
        }
        (second - mean * mean).max(0.0).sqrt() / self.end()
    }
}

/// How a snapshot's EMA was really updated, when that differs from EDM2's power-function rule
/// its width names. Stored with the snapshot (JSON, `"kind"` naming the rule) and realised
/// into a [`Tabulated`] profile for each solve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RealisedProfile {
    /// ema-pytorch's `KarrasEMA` (see [`Tabulated::ema_pytorch`]); its `γ` comes from the
    /// snapshot's declared width and its step from `nimg / images_per_step`.
    EmaPytorch {
        /// Calls of `update()` per EMA update (ema-pytorch's `update_every`, default 100).
        update_every: u64,
        /// Training images per optimizer step (one `update()` call each).
        images_per_step: u64,
    },
    /// A traditional EMA with a constant decay per update (see [`Tabulated::constant_beta`]);
    /// give `beta`, or the half-life in images (`β = 0.5^(interval / half_life)`).
    ConstantBeta {
        /// Decay per update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta: Option<f64>,
        /// Half-life in training images.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        half_life_nimg: Option<f64>,
        /// Images between updates.
        interval_nimg: u64,
    },
    /// An explicit piecewise-constant profile (see [`Tabulated::new`]); its last edge must be
    /// the snapshot's `nimg`.
    Tabulated {
        /// Edges from 0, in images.
        edges: Vec<f64>,
        /// Mass of each piece.
        weights: Vec<f64>,
    },
}

impl RealisedProfile {
    /// The profile this rule gives a snapshot taken at `nimg` whose declared exponent is
    /// `gamma` (used by the rules that need one). `field` names the snapshot in errors.
    pub fn realise(&self, nimg: u64, gamma: Option<f64>, field: &str) -> Result<Tabulated> {
        let field = format!("{field}.profile");
        match self {
            RealisedProfile::EmaPytorch {
                update_every,
                images_per_step,
            } => {
                let gamma = gamma.ok_or_else(|| {
                    Error::invalid(
                        &field,
                        "ema_pytorch needs the snapshot's sigma_rel or gamma",
                    )
                })?;
                if *images_per_step == 0 || !nimg.is_multiple_of(*images_per_step) {
                    return Err(Error::invalid(
                        &field,
                        format!(
                            "nimg {nimg} is not a whole number of steps of {images_per_step} images"
                        ),
                    ));
                }
                Tabulated::ema_pytorch(
                    gamma,
                    *update_every,
                    *images_per_step,
                    nimg / images_per_step,
                    &field,
                )
            }
            RealisedProfile::ConstantBeta {
                beta,
                half_life_nimg,
                interval_nimg,
            } => {
                let beta = match (beta, half_life_nimg) {
                    (Some(b), None) => *b,
                    (None, Some(h)) if h.is_finite() && *h > 0.0 => {
                        0.5f64.powf(*interval_nimg as f64 / h)
                    }
                    (None, Some(h)) => {
                        return Err(Error::invalid(
                            &field,
                            format!("half_life_nimg {h} must be positive"),
                        ))
                    }
                    _ => return Err(Error::invalid(&field, "give either beta or half_life_nimg")),
                };
                Tabulated::constant_beta(beta, *interval_nimg, nimg, &field)
            }
            RealisedProfile::Tabulated { edges, weights } => {
                let table = Tabulated::new(edges.clone(), weights.clone(), &field)?;
                if table.end() != nimg as f64 {
                    return Err(Error::invalid(
                        &field,
                        format!(
                            "the last edge is {}, not the snapshot's nimg {nimg}",
                            table.end()
                        ),
                    ));
                }
                Ok(table)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phema::profile::{beta, inner_product};

    fn power(nimg: f64, gamma: f64) -> Profile {
        Profile { nimg, gamma }
    }

    #[test]
    fn edm2_decays_give_the_power_profiles_mass_on_every_interval() {
        // An EMA tracked with eq. 127 every 10 images: its weights are the power profile's
        // mass on each interval, so its inner product with a fine-grained power profile equals
        // the power profile's to the discretisation error, and its σ_rel follows.
        let gamma = 6.94;
        let times: Vec<f64> = (1..=1000).map(|k| k as f64 * 10.0).collect();
        let mut betas = vec![0.0];
        betas.extend(times.windows(2).map(|w| beta(gamma, w[1], w[1] - w[0])));
        let table = Tabulated::from_updates(&times, &betas, "t").unwrap();
        let p = power(10_000.0, gamma);
        for (j, w) in table.weights.iter().enumerate() {
            let (a, b) = (table.edges[j], table.edges[j + 1]);
            let mass = (b / 1e4).powf(gamma + 1.0) - (a / 1e4).powf(gamma + 1.0);
            assert!((w - mass).abs() < 1e-12, "{j}: {w} vs {mass}");
        }
        let exact = inner_product(p, p);
        assert!((table.dot_power(p) / exact - 1.0).abs() < 1e-3);
        assert!((table.norm_squared() / exact - 1.0).abs() < 1e-3);
        assert!((table.sigma_rel() / 0.1 - 1.0).abs() < 1e-2);
    }

    #[test]
    fn inner_products_match_quadrature() {
        let a = Tabulated::ema_pytorch(6.94, 7, 3, 200, "a").unwrap();
        let b = Tabulated::constant_beta(0.97, 5, 450, "b").unwrap();
        let q = power(500.0, 16.97);
        let n = 400_000;
        let h = 600.0 / n as f64;
        let quad =
            |f: &dyn Fn(f64) -> f64| -> f64 { (0..n).map(|i| f((i as f64 + 0.5) * h) * h).sum() };
        let ab = quad(&|t| a.density(t) * b.density(t));
        assert!((a.dot(&b) / ab - 1.0).abs() < 1e-3, "{} vs {ab}", a.dot(&b));
        assert!((b.dot(&a) - a.dot(&b)).abs() < 1e-15);
        let aq = quad(&|t| a.density(t) * q.density(t));
        assert!((a.dot_power(q) / aq - 1.0).abs() < 1e-3);
        let aa = quad(&|t| a.density(t) * a.density(t));
        assert!((a.norm_squared() / aa - 1.0).abs() < 1e-3);
        assert!((a.dot(&a) / a.norm_squared() - 1.0).abs() < 1e-12);
        let total: f64 = (0..n).map(|i| a.density((i as f64 + 0.5) * h) * h).sum();
        assert!((total - 1.0).abs() < 1e-3);
    }

    #[test]
    fn ema_pytorch_with_update_every_100_keeps_its_first_parameters() {
        // The decay is computed for one step but applied once per 100: after 10 000 steps the
        // copy of the first parameters still holds most of the weight.
        let t = Tabulated::ema_pytorch(6.94, 100, 1, 10_000, "e").unwrap();
        assert_eq!(t.pieces(), 100);
        assert!(t.weights[0] > 0.6, "{}", t.weights[0]);
        // Updated every call it is close to the power profile (shifted by one step).
        let every = Tabulated::ema_pytorch(6.94, 1, 1, 10_000, "e").unwrap();
        assert!(
            (every.sigma_rel() / 0.1 - 1.0).abs() < 1e-2,
            "{}",
            every.sigma_rel()
        );
    }

    #[test]
    fn bad_tables_are_refused_with_the_field() {
        for (edges, weights) in [
            (vec![0.0, 1.0], vec![0.5]),
            (vec![0.0, 2.0, 1.0], vec![0.5, 0.5]),
            (vec![1.0, 2.0], vec![1.0]),
            (vec![0.0, 1.0], vec![f64::NAN]),
            (vec![0.0], vec![]),
        ] {
            let e = Tabulated::new(edges, weights, "snapshots[3].profile").unwrap_err();
            assert!(e.to_string().starts_with("snapshots[3].profile: "), "{e}");
        }
        assert!(Tabulated::constant_beta(1.0, 10, 100, "c").is_err());
        assert!(Tabulated::ema_pytorch(1.0, 0, 1, 10, "c").is_err());
    }
}
