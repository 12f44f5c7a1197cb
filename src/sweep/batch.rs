//! One batch of a point: sample its seeds with the reconstructed network, take the Inception
//! features of the 8-bit images, and (for the first batch) lay the first images out in a grid.

use std::ops::Range;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::FeatureExtractor;
use crate::model::sampler::SamplerConfig;
use crate::sample::{encode_png, grid, Sampler};

/// Images in a point's grid picture.
pub const GRID_IMAGES: usize = 16;

/// What a batch produced.
pub struct BatchOutput {
    /// Features `[n, 2048]`, row-major.
    pub features: Vec<f32>,
    /// PNG of the first images, when asked for.
    pub grid_png: Option<Vec<u8>>,
    /// Seconds spent sampling.
    pub sample_s: f64,
    /// Seconds spent on features.
    pub features_s: f64,
}

/// 8-bit HWC images to one CHW block, as the feature network reads them.
fn hwc_to_chw(images: &[Vec<u8>], c: usize, side: usize) -> Vec<u8> {
    let plane = side * side;
    let mut out = vec![0u8; images.len() * c * plane];
    for (img, dst) in images.iter().zip(out.chunks_exact_mut(c * plane)) {
        for p in 0..plane {
            for ch in 0..c {
                dst[ch * plane + p] = img[p * c + ch];
            }
        }
    }
    out
}

/// Samples `seeds` (one image per seed, each depending on its seed only) and takes their
/// features; with `with_grid`, also a PNG of the first [`GRID_IMAGES`].
pub fn compute_batch(
    sampler: &Sampler,
    extractor: &FeatureExtractor,
    seeds: Range<u64>,
    config: &SamplerConfig,
    with_grid: bool,
) -> Result<BatchOutput> {
    let seeds: Vec<u64> = seeds.collect();
    let started = Instant::now();
    let images = sampler.sample(&seeds, None, config, || {})?;
    let sample_s = started.elapsed().as_secs_f64();
    let (c, side) = (
        sampler.network().img_channels,
        sampler.network().img_resolution,
    );
    let started = Instant::now();
    let features =
        extractor.features(&hwc_to_chw(&images, c, side), images.len(), c, side, side)?;
    let features_s = started.elapsed().as_secs_f64();
    let grid_png = if with_grid {
        let shown = &images[..images.len().min(GRID_IMAGES)];
        let (pixels, w, h) = grid(shown, side, c);
        Some(encode_png(&pixels, w, h, c).map_err(|e| {
            Error::io(
                "encoding an image grid",
                std::io::Error::other(e.to_string()),
            )
        })?)
    } else {
        None
    };
    Ok(BatchOutput {
        features,
        grid_png,
        sample_s,
        features_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwc_to_chw_moves_channels_to_planes() {
        // One 2×2 RGB image: pixel p has channels (10p, 10p+1, 10p+2).
        let img: Vec<u8> = (0..4)
            .flat_map(|p| [10 * p, 10 * p + 1, 10 * p + 2])
            .collect();
        let chw = hwc_to_chw(&[img], 3, 2);
        assert_eq!(chw, [0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]);
    }
}
