//! Power-function EMA tracking during training (EDM2, eq. 127).
//!
//! After an update at time `t_next` that follows the previous one by `t_delta` images, each EMA
//! becomes `β · ema + (1 − β) · θ` with `β = (1 − t_delta/t_next)^(γ+1)`. Chaining updates at
//! `t_1 < t_2 < … < t_n` gives the value seen at `t_i` the weight
//! `(t_i^(γ+1) − t_{i−1}^(γ+1)) / t_n^(γ+1)`, which is exactly the mass the power-function
//! profile `p_{γ,t_n}` puts on `(t_{i−1}, t_i]`. So updates may come at any interval (every
//! step, every k-th step, irregularly) and the EMA stays the declared profile evaluated on the
//! update grid, as long as each update is told the true number of images since the last one.
//! (Counting updates instead of images, as ema-pytorch does when `update_every > 1`, realises
//! a much wider profile than the one declared.)

use serde::{Deserialize, Serialize};

use super::profile::{beta, gamma_of_sigma_rel};
use super::solve::Width;
use crate::error::{Error, Result};

/// The widths EDM2 tracks during training.
pub const DEFAULT_SIGMA_RELS: [f64; 2] = [0.05, 0.10];

/// One tracked EMA: its width and one buffer per tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackedEma {
    /// Relative standard deviation of the profile.
    pub sigma_rel: f64,
    /// Exponent of the profile.
    pub gamma: f64,
    /// Averaged values, one buffer per tensor, in the tracker's tensor order.
    pub tensors: Vec<Vec<f32>>,
}

/// Tracks power-function EMAs of a fixed set of named `f32` tensors.
///
/// ```
/// use hindsight::phema::PowerEma;
///
/// let mut weights = vec![0.0f32; 4];
/// let mut ema = PowerEma::with_default_widths(0, [("w", &weights[..])])?;
/// for step in 1..=100u64 {
///     weights.iter_mut().for_each(|w| *w += 1.0); // a training step
///     if step % 10 == 0 {
///         // Every 10th step is fine: β accounts for the 10 × 64 images since the last update.
///         ema.update(step * 64, &[&weights[..]])?;
///     }
/// }
/// let narrow = &ema.ema(0.05).unwrap().tensors[0];
/// let wide = &ema.ema(0.10).unwrap().tensors[0];
/// assert!(wide[0] < narrow[0] && narrow[0] < weights[0]);
/// # Ok::<(), hindsight::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerEma {
    names: Vec<String>,
    lens: Vec<usize>,
    emas: Vec<TrackedEma>,
    nimg: u64,
}

impl PowerEma {
    /// Starts tracking at training time `nimg` (usually 0) from the current values of the
    /// tensors, with one EMA per width (see [`DEFAULT_SIGMA_RELS`]).
    pub fn new<'a>(
        widths: &[Width],
        nimg: u64,
        tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    ) -> Result<Self> {
        if widths.is_empty() {
            return Err(Error::invalid("widths", "at least one EMA width is needed"));
        }
        let mut names = Vec::new();
        let mut values: Vec<&[f32]> = Vec::new();
        for (name, data) in tensors {
            if names.iter().any(|n| n == name) {
                return Err(Error::invalid(
                    format!("tensors.{name}"),
                    "appears more than once",
                ));
            }
            names.push(name.to_owned());
            values.push(data);
        }
        let mut emas: Vec<TrackedEma> = Vec::with_capacity(widths.len());
        for (i, w) in widths.iter().enumerate() {
            let (sigma_rel, gamma) = w.resolve(&format!("widths[{i}]"))?;
            if emas.iter().any(|e| e.gamma == gamma) {
                return Err(Error::invalid(
                    format!("widths[{i}]"),
                    "the same width is listed twice",
                ));
            }
            emas.push(TrackedEma {
                sigma_rel,
                gamma,
                tensors: values.iter().map(|v| v.to_vec()).collect(),
            });
        }
        Ok(Self {
            lens: values.iter().map(|v| v.len()).collect(),
            names,
            emas,
            nimg,
        })
    }

    /// Restores a tracker saved as its parts (names, EMAs, time), e.g. from a training
    /// checkpoint. Every EMA must hold one buffer per name, with equal lengths across EMAs.
    pub fn from_parts(names: Vec<String>, emas: Vec<TrackedEma>, nimg: u64) -> Result<Self> {
        let Some(first) = emas.first() else {
            return Err(Error::invalid("emas", "at least one EMA is needed"));
        };
        let lens: Vec<usize> = first.tensors.iter().map(Vec::len).collect();
        if lens.len() != names.len() {
            return Err(Error::invalid(
                "emas",
                format!("{} buffers for {} names", lens.len(), names.len()),
            ));
        }
        for (i, e) in emas.iter().enumerate() {
            let ok = e.tensors.len() == lens.len()
                && e.tensors.iter().zip(&lens).all(|(t, &n)| t.len() == n)
                && (e.gamma - gamma_of_sigma_rel(e.sigma_rel)).abs()
                    <= 1e-9 * e.gamma.abs().max(1.0);
            if !ok {
                return Err(Error::invalid(
                    format!("emas[{i}]"),
                    "buffers or width disagree with the first EMA",
                ));
            }
        }
        Ok(Self {
            names,
            lens,
            emas,
            nimg,
        })
    }

    /// Tracks `DEFAULT_SIGMA_RELS` (0.05 and 0.10).
    pub fn with_default_widths<'a>(
        nimg: u64,
        tensors: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    ) -> Result<Self> {
        let widths = DEFAULT_SIGMA_RELS.map(Width::SigmaRel);
        Self::new(&widths, nimg, tensors)
    }

    /// Folds the current parameter values in at training time `nimg` (images seen so far,
    /// including the batch just trained on). `params` must list the tensors in the order given
    /// to [`PowerEma::new`], with the same lengths.
    pub fn update(&mut self, nimg: u64, params: &[&[f32]]) -> Result<()> {
        if nimg <= self.nimg {
            return Err(Error::invalid(
                "nimg",
                format!(
                    "{nimg} does not advance past the last update at {}; training time must increase",
                    self.nimg
                ),
            ));
        }
        if params.len() != self.names.len() {
            return Err(Error::invalid(
                "params",
                format!(
                    "{} tensors given, {} tracked",
                    params.len(),
                    self.names.len()
                ),
            ));
        }
        for ((p, &len), name) in params.iter().zip(&self.lens).zip(&self.names) {
            if p.len() != len {
                return Err(Error::invalid(
                    format!("params.{name}"),
                    format!("{} elements given, {len} tracked", p.len()),
                ));
            }
        }
        let t_next = nimg as f64;
        let t_delta = (nimg - self.nimg) as f64;
        for ema in &mut self.emas {
            // Weight of the new value; `lerp` form keeps the update exact when β = 0.
            let w = (1.0 - beta(ema.gamma, t_next, t_delta)) as f32;
            for (buf, p) in ema.tensors.iter_mut().zip(params) {
                for (e, &x) in buf.iter_mut().zip(p.iter()) {
                    *e += w * (x - *e);
                }
            }
        }
        self.nimg = nimg;
        Ok(())
    }

    /// Training time of the last update.
    pub fn nimg(&self) -> u64 {
        self.nimg
    }

    /// Tensor names in tracking order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The tracked EMAs.
    pub fn emas(&self) -> &[TrackedEma] {
        &self.emas
    }

    /// The EMA of the given width, if tracked.
    pub fn ema(&self, sigma_rel: f64) -> Option<&TrackedEma> {
        let gamma = gamma_of_sigma_rel(sigma_rel);
        self.emas
            .iter()
            .find(|e| (e.gamma - gamma).abs() <= 1e-12 * gamma)
    }
}

/// The realised relative standard deviation of discrete weights `w_i` placed at times `t_i`:
/// the standard deviation of the weighted times divided by the last time, which is how EDM2
/// defines `σ_rel` of a profile (eq. 123). For checking what a tracker actually averages.
pub fn realised_sigma_rel(times: &[f64], weights: &[f64]) -> f64 {
    let t_end = times.iter().copied().fold(f64::MIN, f64::max);
    let total: f64 = weights.iter().sum();
    let mean: f64 = times.iter().zip(weights).map(|(t, w)| w * t).sum::<f64>() / total;
    let var: f64 = times
        .iter()
        .zip(weights)
        .map(|(t, w)| w * (t - mean).powi(2))
        .sum::<f64>()
        / total;
    var.sqrt() / t_end
}
