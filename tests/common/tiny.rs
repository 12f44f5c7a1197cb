//! A data directory for sweep tests: a tiny trained run `tiny` (8×8 RGB EDM2 network,
//! snapshots at 1 and 2 kimg) and reference statistics `proc` of 8 procedural images under
//! the formula Inception weights (any machine runs these).

use std::path::PathBuf;

use hindsight::app::references::{self, ReferenceOrigin};
use hindsight::app::DataDir;
use hindsight::datasets::Dataset;
use hindsight::metrics::{FeatureExtractor, FEATURES};
use hindsight::model::Edm2Config;
use hindsight::train::{self, TrainOptions};

/// A data directory with a tiny trained run `tiny` (8×8 RGB, snapshots at 1 and 2 kimg) and
/// reference statistics `proc` of 8 procedural images under the formula weights.
pub struct Setup {
    /// Removed when dropped.
    pub _dir: tempfile::TempDir,
    /// The data directory.
    pub path: PathBuf,
    /// The formula Inception weights.
    pub weights: PathBuf,
}

pub fn tiny_network() -> Edm2Config {
    Edm2Config {
        model_channels: 8,
        channel_mult: vec![1, 2],
        num_blocks: 1,
        attn_resolutions: vec![],
        logvar_channels: 8,
        ..Edm2Config::new(8, 3, 0)
    }
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let weights = dir.path().join("formula-inception.safetensors");
    super::write_formula_inception(&weights);
    train::run(
        &path,
        TrainOptions {
            run: "tiny".into(),
            network: Some(tiny_network()),
            dataset: Some("procedural".into()),
            resolution: 8,
            classes: 0,
            batch: 16,
            total_kimg: 2,
            snapshot_kimg: 1,
            status_kimg: 1,
            lr: 0.01,
            ref_batches: 2000.0,
            rampup_mimg: 0.0001,
            sigma_rels: vec![0.05, 0.10],
            seed: 0,
            resume: false,
        },
        &(),
    )
    .unwrap();
    let extractor = FeatureExtractor::open(Some(&weights)).unwrap();
    let dataset = Dataset::open("procedural", 8, 0, 0).unwrap();
    let features = extractor
        .dataset_features(&dataset, Some(8), 8, &())
        .unwrap();
    let stats = hindsight::metrics::statistics(&features, FEATURES).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let data = DataDir::open(&path).await.unwrap();
        let origin = ReferenceOrigin {
            name: "proc".into(),
            source: "procedural (8 images)".into(),
            resolution: Some(8),
            channels: Some(3),
        };
        references::store_computed(&data, origin, &stats, &features, &extractor)
            .await
            .unwrap();
    });
    Setup {
        _dir: dir,
        path,
        weights,
    }
}
