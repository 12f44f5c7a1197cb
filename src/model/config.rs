//! The network configuration, [`Edm2Config`]: the arguments of EDM2's `Precond`, `UNet` and
//! `Block` (NVlabs/edm2 `training/networks_edm2.py`) with their names and defaults, so that an
//! EDM2 configuration reads as it is, and the named presets that hindsight builds networks
//! from ([`Edm2Config::new`], [`Edm2Config::small`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Network configuration, with EDM2's names and defaults (`Precond` + `UNet` + `Block`
/// arguments). Stored with every run trained by hindsight. Build one from a preset
/// ([`Edm2Config::new`], [`Edm2Config::small`]) or deserialise EDM2's JSON.
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

impl Edm2Config {
    /// EDM2's defaults for images of `img_resolution`² pixels with `img_channels` channels and
    /// `label_dim` classes (0: unconditional): every other field at its serde default, as a
    /// JSON object naming only these three fields deserialises (`model_channels` 192,
    /// `channel_mult` [1, 2, 3, 4], 3 blocks per level, attention at 16×16 and 8×8).
    pub fn new(img_resolution: usize, img_channels: usize, label_dim: usize) -> Self {
        Self {
            img_resolution,
            img_channels,
            label_dim,
            use_fp16: false,
            sigma_data: defaults::sigma_data(),
            logvar_channels: defaults::logvar_channels(),
            model_channels: defaults::model_channels(),
            channel_mult: defaults::channel_mult(),
            channel_mult_noise: None,
            channel_mult_emb: None,
            num_blocks: defaults::num_blocks(),
            attn_resolutions: defaults::attn_resolutions(),
            label_balance: defaults::half(),
            concat_balance: defaults::half(),
            channels_per_head: defaults::channels_per_head(),
            dropout: 0.0,
            res_balance: defaults::balance(),
            attn_balance: defaults::balance(),
            clip_act: defaults::clip_act(),
        }
    }

    /// A small network that trains on a CPU: `model_channels` 32, `channel_mult` [1, 2], one
    /// block per level, attention at half the image resolution with 32 channels per head, and
    /// 16 Fourier features in the log-variance head; everything else as in [`Self::new`].
    /// `small(16, 3, 10)` is the configuration of the committed reference fixture
    /// (`tests/fixtures/edm2_unet.json`) and of `hindsight bench train`.
    pub fn small(img_resolution: usize, img_channels: usize, label_dim: usize) -> Self {
        Self {
            model_channels: 32,
            channel_mult: vec![1, 2],
            num_blocks: 1,
            attn_resolutions: vec![img_resolution / 2],
            channels_per_head: 32,
            logvar_channels: 16,
            ..Self::new(img_resolution, img_channels, label_dim)
        }
    }

    /// Reads a configuration written as JSON with EDM2's names (unknown fields are refused);
    /// errors name the file and the field (`net.json: channel_mult: invalid type: …`).
    pub fn read(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| Error::invalid(format!("{source}: {}", e.path()), e.inner().to_string()))
    }
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

#[cfg(test)]
mod tests {
    use super::Edm2Config;

    /// The configuration that `json` deserialises to.
    fn parsed(json: serde_json::Value) -> Edm2Config {
        serde_json::from_value(json).expect("a valid configuration")
    }

    #[test]
    fn new_is_the_serde_defaults() {
        for (r, c, l) in [(16, 3, 10), (32, 1, 0), (64, 4, 1000)] {
            let json = serde_json::json!({"img_resolution": r, "img_channels": c, "label_dim": l});
            assert_eq!(Edm2Config::new(r, c, l), parsed(json));
        }
    }

    #[test]
    fn small_is_the_small_json_configuration() {
        for (r, c, l) in [(16, 3, 10), (32, 1, 0)] {
            let json = serde_json::json!({
                "img_resolution": r, "img_channels": c, "label_dim": l,
                "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
                "attn_resolutions": [r / 2], "channels_per_head": 32, "logvar_channels": 16
            });
            assert_eq!(Edm2Config::small(r, c, l), parsed(json));
        }
    }

    #[test]
    fn small_16_3_10_is_the_reference_fixture_configuration() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/edm2_unet.json"
        ));
        let fixture: serde_json::Value = serde_json::from_str(text).expect("the fixture's JSON");
        let mut json = fixture["edm2_unet"]["config"].clone();
        json["sigma_data"] = fixture["edm2_unet"]["sigma_data"].clone();
        assert_eq!(Edm2Config::small(16, 3, 10), parsed(json));
    }
}
