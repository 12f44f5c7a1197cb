//! EDM's deterministic second-order (Heun) sampler as EDM2 uses it (Karras et al. 2022,
//! arXiv 2206.00364, Algorithm 1 with S_churn = 0; NVlabs/edm2 `generate_images.py`).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::precond::Precond;

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

/// The starting noise of image `seed`: a unit Gaussian of `shape` from an RNG seeded by
/// `seed` alone, so an image depends only on its seed (not on the batch it is generated in).
pub fn seeded_noise(seed: u64, shape: &[usize]) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect()
}

/// The class of image `seed` when none is given: drawn from a stream of its own.
pub fn seeded_class(seed: u64, classes: usize) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC1A5_5E5D_C1A5_5E5D);
    rng.random_range(0..classes.max(1))
}

/// Converts a CHW image in [−1, 1] to 8-bit RGB (HWC), rounding as EDM2 does
/// (`x · 127.5 + 128`, clipped).
pub fn to_rgb8(chw: &[f32], channels: usize, height: usize, width: usize) -> Vec<u8> {
    let mut out = vec![0u8; height * width * channels];
    for c in 0..channels {
        for y in 0..height {
            for x in 0..width {
                let v = chw[c * height * width + y * width + x] * 127.5 + 128.0;
                out[(y * width + x) * channels + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}
