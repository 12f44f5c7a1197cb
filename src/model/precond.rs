//! EDM2's preconditioning and loss: the denoiser [`Precond`] with its learned log-variance
//! head (NVlabs/edm2 `training/networks_edm2.py`, `Precond`), the training loss [`edm2_loss`]
//! (`training/training_loop.py`, `EDM2Loss`, eq. 21) and the forced weight normalisation that
//! precedes each training step ([`force_normalize`], eq. 47).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::Edm2Config;
use super::layers::{Gain, MpConv, MpFourier};
use super::ops::normalize;
use super::unet::UNet;

/// EDM2's preconditioned denoiser `D(x; σ)` with the learned log-variance head.
pub struct Precond {
    /// The configuration.
    pub config: Edm2Config,
    unet: UNet,
    logvar_fourier: MpFourier,
    logvar_linear: MpConv,
}

impl Precond {
    /// Builds the network from parameters named as in EDM2's state dict.
    pub fn new(vb: VarBuilder, config: &Edm2Config) -> Result<Self> {
        Ok(Self {
            unet: UNet::new(vb.pp("unet"), config)?,
            logvar_fourier: MpFourier::new(vb.pp("logvar_fourier"), config.logvar_channels)?,
            logvar_linear: MpConv::new(vb.pp("logvar_linear"), config.logvar_channels, 1, &[])?,
            config: config.clone(),
        })
    }

    /// The denoised image `D(x; σ)` and the log-variance `u(σ)` (EDM2 eq. 21), for `x`
    /// [N, C, H, W], `sigma` \[N\] and optional `class_labels` [N, label_dim].
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let n = x.dim(0)?;
        let sd = self.config.sigma_data;
        let sigma4 = sigma.reshape((n, 1, 1, 1))?;
        let s2 = (sigma4.sqr()? + sd * sd)?;
        let c_skip = s2.recip()?.affine(sd * sd, 0.0)?;
        let c_out = sigma4.affine(sd, 0.0)?.broadcast_div(&s2.sqrt()?)?;
        let c_in = s2.sqrt()?.recip()?;
        let c_noise = (sigma.log()? / 4.0)?;
        let labels = match (class_labels, self.config.label_dim) {
            (_, 0) => None,
            (Some(l), _) => Some(l.clone()),
            (None, dim) => Some(Tensor::zeros((n, dim), DType::F32, x.device())?),
        };
        let x_in = x.broadcast_mul(&c_in)?;
        let f_x = self.unet.forward(&x_in, &c_noise, labels.as_ref())?;
        let denoised = (x.broadcast_mul(&c_skip)? + f_x.broadcast_mul(&c_out)?)?;
        let logvar = self
            .logvar_linear
            .forward(&self.logvar_fourier.forward(&c_noise)?, Gain::One)?
            .reshape((n, 1, 1, 1))?;
        Ok((denoised, logvar))
    }
}

/// EDM2's training loss (`EDM2Loss`, eq. 21 with the learned uncertainty): per element,
/// `(λ(σ) / e^{u(σ)}) · (D(y + σn; σ) − y)² + u(σ)` with `λ(σ) = (σ² + σ_data²) / (σ·σ_data)²`,
/// for clean images `y` [N, C, H, W], noise levels `sigma` \[N\] and unit noise `noise_unit`.
pub fn edm2_loss(
    net: &Precond,
    images: &Tensor,
    sigma: &Tensor,
    noise_unit: &Tensor,
    class_labels: Option<&Tensor>,
) -> Result<Tensor> {
    let n = images.dim(0)?;
    let sd = net.config.sigma_data;
    let sigma4 = sigma.reshape((n, 1, 1, 1))?;
    let weight = (sigma4.sqr()? + sd * sd)?.broadcast_div(&sigma4.affine(sd, 0.0)?.sqr()?)?;
    let noisy = (images + noise_unit.broadcast_mul(&sigma4)?)?;
    let (denoised, logvar) = net.forward(&noisy, sigma, class_labels)?;
    let scale = weight.broadcast_div(&logvar.exp()?)?;
    (denoised - images)?
        .sqr()?
        .broadcast_mul(&scale)?
        .broadcast_add(&logvar)
}

/// Forced weight normalisation (EDM2 eq. 47 / `MPConv` in training mode): every
/// convolution and linear weight (rank ≥ 2) is replaced by `normalize(w)`; gains and Fourier
/// buffers are left alone. Call before each training step's forward pass.
pub fn force_normalize(params: &[(String, candle_core::Var)]) -> Result<()> {
    for (name, var) in params {
        if name.ends_with(".weight") && var.rank() >= 2 {
            var.set(&normalize(var.as_tensor(), None)?)?;
        }
    }
    Ok(())
}
