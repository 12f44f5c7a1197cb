//! Reading a network configuration from a JSON file (`--network`).

use std::path::Path;

use super::Edm2Config;
use crate::error::{Error, Result};

impl Edm2Config {
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

impl Edm2Config {
    /// TEMPORARY until the model split lands.
    pub fn small(img_resolution: usize, img_channels: usize, label_dim: usize) -> Self {
        serde_json::from_value(serde_json::json!({
            "img_resolution": img_resolution, "img_channels": img_channels, "label_dim": label_dim,
            "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
            "attn_resolutions": [img_resolution / 2], "channels_per_head": 32, "logvar_channels": 16
        }))
        .expect("valid configuration")
    }
}
