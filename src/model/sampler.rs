//! EDM's deterministic second-order (Heun) sampler as EDM2 uses it (Karras et al. 2022,
//! arXiv 2206.00364, Algorithm 1 with S_churn = 0; NVlabs/edm2 `generate_images.py`).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::Precond;

/// Sampler settings, EDM2's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Denoiser evaluations are `2 · num_steps − 1`.
    pub num_steps: usize,
    /// Lowest noise level before the final step to 0.
    pub sigma_min: f64,
    /// Noise level of the starting point.
    pub sigma_max: f64,
    /// Time-step exponent ρ (eq. 5 of the EDM paper).
    pub rho: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            num_steps: 32,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
        }
    }
}

impl SamplerConfig {
    /// `t_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ` for i < N, then `t_N = 0`,
    /// rounded to f32 as the reference computes them.
    pub fn noise_levels(&self) -> Vec<f32> {
        let n = self.num_steps.max(2);
        let (lo, hi) = (
            self.sigma_min.powf(1.0 / self.rho),
            self.sigma_max.powf(1.0 / self.rho),
        );
        let mut t: Vec<f32> = (0..n)
            .map(|i| (hi + i as f64 / (n - 1) as f64 * (lo - hi)).powf(self.rho) as f32)
            .collect();
        t.push(0.0);
        t
    }
}

/// Runs the sampler from `noise` (unit Gaussian, [N, C, H, W]): returns the generated images.
/// `progress` is called after each step.
pub fn edm_sampler(
    net: &Precond,
    noise: &Tensor,
    class_labels: Option<&Tensor>,
    config: &SamplerConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let batch = noise.dim(0)?;
    let device = noise.device();
    let t = config.noise_levels();
    let denoise = |x: &Tensor, sigma: f32| -> Result<Tensor> {
        let s = Tensor::full(sigma, batch, device)?;
        Ok(net.forward(x, &s, class_labels)?.0)
    };
    let steps = t.len() - 1;
    let mut x = (noise * t[0] as f64)?;
    for i in 0..steps {
        let (t_cur, t_next) = (t[i], t[i + 1]);
        let d_cur = ((&x - denoise(&x, t_cur)?)? / t_cur as f64)?;
        let mut x_next = (&x + (&d_cur * (t_next - t_cur) as f64)?)?;
        if i < steps - 1 {
            let d_prime = ((&x_next - denoise(&x_next, t_next)?)? / t_next as f64)?;
            let slope = ((d_cur * 0.5)? + (d_prime * 0.5)?)?;
            x_next = (&x + (slope * (t_next - t_cur) as f64)?)?;
        }
        x = x_next;
        progress(i + 1, steps);
    }
    Ok(x)
}
