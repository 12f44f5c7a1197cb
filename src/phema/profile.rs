//! Power-function EMA profiles and the closed forms built on them.
//!
//! A power-function EMA of length parameter `γ` observed at training time `t` (in images)
//! averages the weight trajectory `θ(τ)` with the profile (EDM2, eq. 121)
//!
//! ```text
//! p_{γ,t}(τ) = (γ + 1) / t · (τ / t)^γ     for 0 ≤ τ ≤ t,   0 otherwise,
//! ```
//!
//! which integrates to one. Its relative standard deviation (eq. 123) is
//!
//! ```text
//! σ_rel(γ) = sqrt( (γ + 1) / ((γ + 2)² (γ + 3)) ),
//! ```
//!
//! a strictly decreasing map of `γ ∈ (0, ∞)` onto `σ_rel ∈ (0, sqrt(1/12))`.

use crate::error::{Error, Result};

/// The largest exponent accepted, `10⁶` (σ_rel ≈ 1e-6): an average over the last millionth of
/// training, indistinguishable from the raw weights. Larger values only invite overflow.
pub const GAMMA_MAX: f64 = 1e6;

/// The smallest relative standard deviation accepted, `10⁻⁶` (γ ≈ 10⁶); see [`GAMMA_MAX`].
pub const SIGMA_REL_MIN: f64 = 1e-6;

/// The largest valid relative standard deviation, `sqrt(1/12)`: the limit `γ → 0`.
///
/// `σ_rel` must lie strictly inside `(0, SIGMA_REL_MAX)`; EDM2's command line accepts
/// `σ_rel < 0.289`, which lets through values in `[0.28868, 0.289)` whose `γ` is not positive.
pub const SIGMA_REL_MAX: f64 = 0.288_675_134_594_812_9;

/// The largest training time accepted, `2⁶³ − 1` images: what the index stores (a signed
/// 64-bit integer), and far beyond any training run.
pub const MAX_NIMG: u64 = i64::MAX as u64;

/// Rejects a training time above [`MAX_NIMG`]; `field` names it in the error.
pub fn check_nimg(nimg: u64, field: &str) -> Result<()> {
    if nimg <= MAX_NIMG {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("nimg {nimg} is out of range: at most 2^63 - 1 = {MAX_NIMG} images"),
        ))
    }
}

/// Converts an EMA exponent `γ > 0` to its relative standard deviation (EDM2, eq. 123).
///
/// `field` names the input in the error message.
pub fn gamma_to_sigma_rel(gamma: f64, field: &str) -> Result<f64> {
    check_gamma(gamma, field)?;
    Ok(sigma_rel_of_gamma(gamma))
}

/// Converts a relative standard deviation `0 < σ_rel < sqrt(1/12)` to its exponent `γ`
/// (EDM2, eq. 126 and Algorithm 2).
///
/// Equation 123 rearranges to the cubic `γ³ + 7γ² + (16 − s)γ + (12 − s) = 0` with
/// `s = σ_rel⁻²`, whose largest real root is the answer. The cubic is negative at `γ = 0`
/// (because `s > 12`), positive at `γ = sqrt(s)`, and convex on `γ > 0`, so it has exactly one
/// positive root, and Newton's method started at `sqrt(s)` descends onto it monotonically with
/// no overshoot. The iteration stops when a step no longer moves the iterate down, which is
/// convergence to the last bit rather than to a tolerance.
pub fn sigma_rel_to_gamma(sigma_rel: f64, field: &str) -> Result<f64> {
    check_sigma_rel(sigma_rel, field)?;
    Ok(gamma_of_sigma_rel(sigma_rel))
}

/// Rejects anything that is not a finite `σ_rel` inside `(0, sqrt(1/12))` (and at least
/// [`SIGMA_REL_MIN`]). The upper bound is decided by the exponent itself: a `σ_rel` so close
/// to `sqrt(1/12)` that its `γ` rounds to zero or below (the `f64` nearest `sqrt(1/12)`, for
/// one) is refused like any other value outside the range.
pub fn check_sigma_rel(sigma_rel: f64, field: &str) -> Result<()> {
    if sigma_rel.is_finite()
        && sigma_rel > 0.0
        && sigma_rel < SIGMA_REL_MAX
        && gamma_of_sigma_rel(sigma_rel) > 0.0
    {
        if sigma_rel < SIGMA_REL_MIN {
            return Err(Error::invalid(
                field,
                format!(
                    "sigma_rel {sigma_rel} is below the smallest supported value {SIGMA_REL_MIN:e}"
                ),
            ));
        }
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "sigma_rel {sigma_rel} is out of range: it must satisfy 0 < sigma_rel < sqrt(1/12) ≈ 0.288675"
            ),
        ))
    }
}

/// Rejects anything that is not a finite `γ` in `(0, GAMMA_MAX]`.
pub fn check_gamma(gamma: f64, field: &str) -> Result<()> {
    if gamma.is_finite() && gamma > 0.0 && gamma <= GAMMA_MAX {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("gamma {gamma} is out of range: it must satisfy 0 < gamma <= {GAMMA_MAX:e}"),
        ))
    }
}

pub(crate) fn sigma_rel_of_gamma(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0) * (gamma + 2.0) * (gamma + 3.0))).sqrt()
}

pub(crate) fn gamma_of_sigma_rel(sigma_rel: f64) -> f64 {
    let s = 1.0 / (sigma_rel * sigma_rel);
    // The cubic of eq. 126 in a form that keeps the large terms apart until the end.
    let f = |g: f64| (g + 2.0) * (g + 2.0) * (g + 3.0) - s * (g + 1.0);
    let df = |g: f64| (g + 2.0) * (3.0 * g + 8.0) - s;
    let mut g = s.sqrt();
    for _ in 0..200 {
        let step = f(g) / df(g);
        let next = g - step;
        // Convexity makes the exact iteration decrease monotonically; in floating point the
        // first step that fails to decrease marks convergence.
        if next.is_nan() || next >= g || step <= 0.0 {
            break;
        }
        g = next;
    }
    g
}

/// One power-function EMA profile: exponent `gamma`, observed at training time `nimg`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// Training time in images at which the EMA is read out (`t` in the paper).
    pub nimg: f64,
    /// Exponent `γ > 0` of the power function.
    pub gamma: f64,
}

impl Profile {
    /// The profile's density at time `tau` (EDM2, eq. 121).
    pub fn density(&self, tau: f64) -> f64 {
        if tau < 0.0 || tau > self.nimg {
            return 0.0;
        }
        (self.gamma + 1.0) / self.nimg * (tau / self.nimg).powf(self.gamma)
    }

    /// `⟨p, p⟩ = (γ + 1)² / ((2γ + 1) t)`, the special case `a = b` of [`inner_product`].
    pub fn norm_squared(&self) -> f64 {
        let g1 = self.gamma + 1.0;
        g1 * g1 / ((2.0 * self.gamma + 1.0) * self.nimg)
    }
}

/// The L2 inner product `⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ` of two power-function profiles in
/// closed form (EDM2, eq. 151 and Algorithm 3).
///
/// With `t_a ≤ t_b` the integral runs over `[0, t_a]` and evaluates to
/// `(γ_a + 1)(γ_b + 1) / (γ_a + γ_b + 1) · (t_a / t_b)^γ_b / t_b`; the other order is symmetric.
/// The time ratio is formed once and raised to the power, which keeps the relative error near
/// `γ · ε` (forming `exp(γ (ln t_a − ln t_b))` instead loses about `γ · ln(t) · ε`).
pub fn inner_product(a: Profile, b: Profile) -> f64 {
    let (early, late) = if a.nimg <= b.nimg { (a, b) } else { (b, a) };
    let scale = (a.gamma + 1.0) * (b.gamma + 1.0) / (a.gamma + b.gamma + 1.0);
    scale * (early.nimg / late.nimg).powf(late.gamma) / late.nimg
}

/// The EMA decay `β` that tracks a power-function profile during training (EDM2, eq. 127):
/// `β = (1 − t_delta / t_next)^(γ + 1)`, where `t_next` is the training time after the update
/// and `t_delta` the number of images since the previous update.
///
/// Computed as `exp((γ + 1) · ln(1 − t_delta/t_next))` with `ln_1p`, which stays accurate when
/// `t_delta ≪ t_next` (late in training), where `1 − x` would round away most of `x`.
pub fn beta(gamma: f64, t_next: f64, t_delta: f64) -> f64 {
    debug_assert!(t_next > 0.0 && t_delta > 0.0 && t_delta <= t_next);
    if t_delta >= t_next {
        return 0.0;
    }
    ((gamma + 1.0) * (-t_delta / t_next).ln_1p()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_identity_to_a_few_ulps() {
        for i in 1..2000 {
            let sigma = SIGMA_REL_MAX * i as f64 / 2000.0;
            let gamma = gamma_of_sigma_rel(sigma);
            let back = sigma_rel_of_gamma(gamma);
            assert!(
                ((back - sigma) / sigma).abs() < 1e-13,
                "σ {sigma} → γ {gamma} → σ {back}"
            );
        }
    }

    #[test]
    fn out_of_range_is_an_error_not_nan() {
        for bad in [0.0, -0.1, 0.2887, 0.289, 0.5, f64::NAN, f64::INFINITY] {
            let err = sigma_rel_to_gamma(bad, "x").unwrap_err().to_string();
            assert!(err.starts_with("x: "), "{err}");
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(gamma_to_sigma_rel(bad, "g").is_err());
        }
    }

    #[test]
    fn inner_product_matches_quadrature() {
        let a = Profile {
            nimg: 3.0e6,
            gamma: 6.94,
        };
        let b = Profile {
            nimg: 5.0e6,
            gamma: 16.97,
        };
        // Midpoint rule over [0, t_a], fine enough for 1e-6.
        let n = 200_000;
        let h = a.nimg / n as f64;
        let quad: f64 = (0..n)
            .map(|i| {
                let tau = (i as f64 + 0.5) * h;
                a.density(tau) * b.density(tau) * h
            })
            .sum();
        let exact = inner_product(a, b);
        assert!(((quad - exact) / exact).abs() < 1e-6, "{quad} vs {exact}");
        assert_eq!(inner_product(a, b), inner_product(b, a));
        assert!((inner_product(a, a) / a.norm_squared() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn extreme_widths_stay_finite() {
        for sigma in [SIGMA_REL_MIN, 1e-4, 0.2886] {
            let g = sigma_rel_to_gamma(sigma, "s").unwrap();
            assert!(
                g.is_finite() && g > 0.0 && g <= 1.01 * GAMMA_MAX,
                "{sigma} -> {g}"
            );
            let p = Profile {
                nimg: 1e9,
                gamma: g,
            };
            let q = Profile {
                nimg: 2e9,
                gamma: g,
            };
            assert!(inner_product(p, q).is_finite() && p.norm_squared().is_finite());
            assert!(beta(g, 2e9, 64.0).is_finite());
        }
        assert!(sigma_rel_to_gamma(1e-200, "s").is_err());
        assert!(gamma_to_sigma_rel(GAMMA_MAX, "g").is_ok());
        assert!(gamma_to_sigma_rel(2.0 * GAMMA_MAX, "g").is_err());
    }

    #[test]
    fn first_update_copies_the_weights() {
        assert_eq!(beta(6.94, 2048.0, 2048.0), 0.0);
    }
}
