//! The network configuration, [`Edm2Config`]: the arguments of EDM2's `Precond`, `UNet` and
//! `Block` (NVlabs/edm2 `training/networks_edm2.py`) with their names and defaults, so that an
//! EDM2 configuration reads as it is.

use serde::{Deserialize, Serialize};

/// Network configuration, with EDM2's names and defaults (`Precond` + `UNet` + `Block`
/// arguments). Stored with every run trained by hindsight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edm2Config {
    /// Image side in pixels.
    pub img_resolution: usize,
    /// Image channels (3 for RGB; 4 for EDM2's latent models).
    pub img_channels: usize,
    /// Number of classes; 0 for an unconditional model.
    pub label_dim: usize,
    /// EDM2 runs the U-Net in fp16 on GPUs; hindsight computes in f32 (accepted for
    /// compatibility with EDM2 configs, otherwise ignored).
    #[serde(default)]
    pub use_fp16: bool,
    /// Expected standard deviation of the training data.
    #[serde(default = "defaults::sigma_data")]
    pub sigma_data: f64,
    /// Fourier features of the log-variance head.
    #[serde(default = "defaults::logvar_channels")]
    pub logvar_channels: usize,
    /// Base channel count.
    #[serde(default = "defaults::model_channels")]
    pub model_channels: usize,
    /// Channel multiplier per resolution level.
    #[serde(default = "defaults::channel_mult")]
    pub channel_mult: Vec<usize>,
    /// Multiplier for the noise embedding (default: `channel_mult[0]`).
    #[serde(default)]
    pub channel_mult_noise: Option<usize>,
    /// Multiplier for the embedding (default: the largest of `channel_mult`).
    #[serde(default)]
    pub channel_mult_emb: Option<usize>,
    /// Residual blocks per level.
    #[serde(default = "defaults::num_blocks")]
    pub num_blocks: usize,
    /// Resolutions with self-attention.
    #[serde(default = "defaults::attn_resolutions")]
    pub attn_resolutions: Vec<usize>,
    /// Balance of the noise and class embeddings.
    #[serde(default = "defaults::half")]
    pub label_balance: f64,
    /// Balance of the decoder input and its skip connection.
    #[serde(default = "defaults::half")]
    pub concat_balance: f64,
    /// Channels per attention head.
    #[serde(default = "defaults::channels_per_head")]
    pub channels_per_head: usize,
    /// Dropout probability in the residual branch (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Balance of the residual branch.
    #[serde(default = "defaults::balance")]
    pub res_balance: f64,
    /// Balance of the attention branch.
    #[serde(default = "defaults::balance")]
    pub attn_balance: f64,
    /// Activations are clipped to ±this.
    #[serde(default = "defaults::clip_act")]
    pub clip_act: f64,
}

mod defaults {
    pub fn sigma_data() -> f64 {
        0.5
    }
    pub fn logvar_channels() -> usize {
        128
    }
    pub fn model_channels() -> usize {
        192
    }
    pub fn channel_mult() -> Vec<usize> {
        vec![1, 2, 3, 4]
    }
    pub fn num_blocks() -> usize {
        3
    }
    pub fn attn_resolutions() -> Vec<usize> {
        vec![16, 8]
    }
    pub fn half() -> f64 {
        0.5
    }
    pub fn channels_per_head() -> usize {
        64
    }
    pub fn balance() -> f64 {
        0.3
    }
    pub fn clip_act() -> f64 {
        256.0
    }
}
