//! The EDM2 network (Karras et al., "Analyzing and Improving the Training Dynamics of
//! Diffusion Models", arXiv 2312.02696): magnitude-preserving layers (config G), the U-Net,
//! and the preconditioning with the learned log-variance head, in candle.
//!
//! Facts follow NVlabs/edm2 `training/networks_edm2.py`; parameter names equal its state-dict
//! keys (`unet.enc.16x16_block0.conv_res0.weight`, …) so converted EDM2 weights load as they
//! are. Every operation has a backward pass: on the CPU the fused kernels of `cpu` (each
//! with its own), elsewhere the definitions in [`composed`], built from candle ops that have
//! one (no `softmax_last_dim`, `rms_norm`, `layer_norm` or `sdpa`), so the same code trains.
//!
//! Layout, by component (as candle-transformers lays out its models); no two files import each
//! other (`scripts/check-module-cycles.sh` checks):
//! - `config`: [`Edm2Config`], EDM2's arguments and defaults, and named presets.
//! - `cpu`: the CPU kernels: the convolution ([`conv2d_same`], direct or Winograd) and the
//!   fused element-wise, resampling and attention ops, with their shared primitives.
//! - `ops`: the magnitude-preserving operations ([`normalize`], [`mp_silu`], [`mp_sum`],
//!   [`mp_cat`], [`resample`], [`attention`], …), each dispatching to its fused CPU kernel or
//!   to its [`composed`] definition.
//! - `layers`: [`MpFourier`], [`MpConv`] and the residual [`Block`].
//! - `unet`: the [`UNet`].
//! - `precond`: the preconditioned denoiser [`Precond`], the loss [`edm2_loss`] and
//!   [`force_normalize`].
//! - `runtime`: allocator and thread-pool tuning ([`keep_freed_memory`],
//!   [`leave_cores_to_the_compute_pool`], [`on_compute_pool`]) and [`default_device`].
//! - [`sampler`]: EDM's Heun sampler; [`formula`] and [`parity`]: the deterministic test
//!   weights and the comparison with the reference fixtures.

mod config;
mod cpu;
pub mod formula;
mod layers;
mod ops;
pub mod parity;
mod precond;
mod runtime;
pub mod sampler;
mod unet;

pub use config::Edm2Config;
pub use cpu::{
    conv2d_bias_relu, conv2d_same, conv2d_same_act, set_winograd, winograd_applies,
    winograd_enabled, InputAct,
};
pub use layers::{Block, Flavor, Gain, MpConv, MpFourier};
pub use ops::{
    attention, clip, composed, modulated_mp_silu, mp_cat, mp_silu, mp_sum, mp_sum_clip, normalize,
    normalized_attention, resample, softmax_last, Resample,
};
pub use precond::{edm2_loss, force_normalize, Precond};
pub use runtime::{
    default_device, keep_freed_memory, leave_cores_to_the_compute_pool, on_compute_pool,
};
pub use unet::UNet;
