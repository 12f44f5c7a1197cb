//! Features of image sets: the Inception network with the identity of its weights, run over a
//! dataset or over generated images in batches.

use std::path::Path;

use super::inception::{Inception, Preprocess, FEATURES};
use super::stats::FeatureStats;
use super::weights::{load, locate};
use crate::datasets::Dataset;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What the reference statistics table records as the feature network of Inception features.
pub const INCEPTION_NETWORK: &str = "inception-2015-12-05 pool3";

/// The feature network of the fallback metric, for machines without the Inception weights:
/// a fixed random projection of the pixels to 2048 dimensions. Fréchet distance and KID on
/// these features rank image sets by how their pixel statistics differ; they are **not** FID
/// or KID, and never comparable with them.
pub const PIXEL_PROJECTION_NETWORK: &str = "pixel-projection-2048 (fallback, not FID)";

/// The identity recorded as the "weights digest" of pixel-projection features: the projection
/// is fixed by this version string (bump it if the projection ever changes).
const PIXEL_PROJECTION_ID: &str = "pixel-projection-v1-splitmix64-seed-0";

/// Side of the grey image the projection reads (images are box-resized to it).
const PROJECTION_SIDE: usize = 32;

enum Network {
    Inception(Inception),
    /// Row-major `[PROJECTION_SIDE², FEATURES]`, N(0, 1/PROJECTION_SIDE²) entries.
    PixelProjection(Vec<f32>),
}

/// The feature network, ready to run, with what identifies its features.
pub struct FeatureExtractor {
    net: Network,
    /// BLAKE3 of the weights file (features from other weights are never compared); for the
    /// pixel projection, its version string.
    pub digest: String,
    /// The weights file (or "built in").
    pub source: String,
}

impl FeatureExtractor {
    /// Finds (see [`locate`]) and loads the weights, and builds the network on the CPU.
    ///
    /// Also keeps freed memory in the process ([`crate::model::keep_freed_memory`]): the
    /// network allocates large activations per batch, which the allocator would otherwise
    /// return to the kernel and fault in again every time.
    pub fn open(weights: Option<&Path>) -> Result<Self> {
        crate::model::keep_freed_memory();
        let path = locate(weights)?;
        let weights = load(&path)?;
        Ok(Self {
            net: Network::Inception(Inception::new(
                &weights.tensors,
                weights.preprocess,
                &crate::model::default_device(),
            )?),
            digest: weights.digest,
            source: weights.source,
        })
    }

    /// The fallback feature network ([`PIXEL_PROJECTION_NETWORK`]): each image averaged over
    /// its channels, box-resized to 32×32, scaled to [−1, 1] and multiplied by a fixed
    /// Gaussian matrix (splitmix64 from seed 0, Box–Muller) into 2048 features. Needs no
    /// weights.
    pub fn pixel_projection() -> Self {
        let d = PROJECTION_SIDE * PROJECTION_SIDE;
        let mut state = 0u64;
        let mut next = || {
            // splitmix64 (Steele, Lea & Flood 2014): a fixed, portable stream.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let scale = 1.0 / (d as f64).sqrt();
        let mut matrix = Vec::with_capacity(d * FEATURES);
        while matrix.len() < d * FEATURES {
            // Box–Muller: two uniforms in (0, 1] → two standard normals.
            let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            matrix.push((r * t.cos() * scale) as f32);
            matrix.push((r * t.sin() * scale) as f32);
        }
        matrix.truncate(d * FEATURES);
        Self {
            net: Network::PixelProjection(matrix),
            digest: PIXEL_PROJECTION_ID.to_owned(),
            source: "built in (no weights)".to_owned(),
        }
    }

    /// The feature network as the reference statistics table records it:
    /// [`INCEPTION_NETWORK`] or [`PIXEL_PROJECTION_NETWORK`].
    pub fn feature_network(&self) -> &'static str {
        match self.net {
            Network::Inception(_) => INCEPTION_NETWORK,
            Network::PixelProjection(_) => PIXEL_PROJECTION_NETWORK,
        }
    }

    /// The preprocessing pipeline: `nvidia` or `pytorch-fid` (what the Inception weights call
    /// for), `pixels` for the projection.
    pub fn preprocess_name(&self) -> &'static str {
        match &self.net {
            Network::Inception(net) => match net.preprocess() {
                Preprocess::Nvidia => "nvidia",
                Preprocess::PytorchFid => "pytorch-fid",
            },
            Network::PixelProjection(_) => "pixels",
        }
    }

    /// A short name of the feature network and its weights: `inception-2015-12-05 (nvidia,
    /// <first 12 hex of the digest>)`, or the fallback's name.
    pub fn identity(&self) -> String {
        match self.net {
            Network::Inception(_) => format!(
                "inception-2015-12-05 ({}, {})",
                self.preprocess_name(),
                &self.digest[..12]
            ),
            Network::PixelProjection(_) => PIXEL_PROJECTION_NETWORK.to_owned(),
        }
    }

    /// Features `[n, 2048]` (row-major f32) of `n` images of 8-bit pixels `[C, H, W]` each.
    pub fn features(
        &self,
        pixels: &[u8],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>> {
        match &self.net {
            Network::Inception(net) => {
                let values: Vec<f32> = pixels.iter().map(|&v| v as f32).collect();
                let t = net.features(&values, n, c, h, w)?;
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            }
            Network::PixelProjection(matrix) => {
                if pixels.len() != n * c * h * w || c == 0 || h == 0 || w == 0 {
                    return Err(Error::invalid(
                        "images",
                        format!("{} bytes are not {n} images of {c}×{h}×{w}", pixels.len()),
                    ));
                }
                let side = PROJECTION_SIDE;
                let mut out = vec![0f32; n * FEATURES];
                for (image, row) in pixels
                    .chunks_exact(c * h * w)
                    .zip(out.chunks_exact_mut(FEATURES))
                {
                    for (k, weights) in matrix.chunks_exact(FEATURES).enumerate() {
                        let (y, x) = (k / side, k % side);
                        // Box average over the source pixels this cell covers, all channels.
                        let (y0, y1) = (y * h / side, ((y + 1) * h / side).max(y * h / side + 1));
                        let (x0, x1) = (x * w / side, ((x + 1) * w / side).max(x * w / side + 1));
                        let mut sum = 0u32;
                        for ch in 0..c {
                            for yy in y0..y1 {
                                let line = &image[(ch * h + yy) * w..][..w];
                                sum += line[x0..x1].iter().map(|&v| v as u32).sum::<u32>();
                            }
                        }
                        let count = (c * (y1 - y0) * (x1 - x0)) as f32;
                        let v = sum as f32 / count / 127.5 - 1.0;
                        for (o, &m) in row.iter_mut().zip(weights) {
                            *o += v * m;
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Features of the first `limit` images of `dataset` (all when `None`), `batch` at a
    /// time; `progress` counts images.
    pub fn dataset_features(
        &self,
        dataset: &Dataset,
        limit: Option<usize>,
        batch: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<f32>> {
        let n = limit.map_or(dataset.len(), |l| l.min(dataset.len()));
        if n == 0 {
            return Err(Error::invalid("dataset", "holds no images"));
        }
        let (c, r) = (dataset.channels(), dataset.resolution());
        progress.set_length(n as u64);
        let mut out = Vec::with_capacity(n * FEATURES);
        for start in (0..n).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(n);
            let pixels: Vec<u8> = (start..end).flat_map(|i| dataset.pixels(i)).collect();
            out.extend(self.features(&pixels, end - start, c, r, r)?);
            progress.inc((end - start) as u64);
        }
        Ok(out)
    }
}

/// Statistics of features `[n, d]` (row-major).
pub fn statistics(features: &[f32], d: usize) -> Result<FeatureStats> {
    let mut stats = FeatureStats::new(d);
    stats.add(features)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pixel_projection_is_fixed_and_reads_every_pixel() {
        let a = FeatureExtractor::pixel_projection();
        let b = FeatureExtractor::pixel_projection();
        let (Network::PixelProjection(ma), Network::PixelProjection(mb)) = (&a.net, &b.net) else {
            panic!("not the projection")
        };
        assert_eq!(ma, mb, "the same matrix every time");
        assert_eq!(ma.len(), 1024 * FEATURES);
        // Entries are N(0, 1/1024): mean ≈ 0, variance ≈ 1/1024.
        let n = ma.len() as f64;
        let mean = ma.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = ma.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-4, "{mean}");
        assert!((var * 1024.0 - 1.0).abs() < 0.01, "{var}");
        // Same image, same features; a changed pixel changes them; grey 1×32×32 and the same
        // grey replicated to 3 channels agree.
        let grey: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
        let f1 = a.features(&grey, 1, 1, 32, 32).unwrap();
        assert_eq!(f1.len(), FEATURES);
        assert_eq!(f1, b.features(&grey, 1, 1, 32, 32).unwrap());
        let mut other = grey.clone();
        other[517] ^= 0x40;
        assert_ne!(f1, a.features(&other, 1, 1, 32, 32).unwrap());
        let rgb: Vec<u8> = grey.iter().chain(&grey).chain(&grey).copied().collect();
        let f3 = a.features(&rgb, 1, 3, 32, 32).unwrap();
        assert!(f1.iter().zip(&f3).all(|(x, y)| (x - y).abs() < 1e-5));
        // Two images in one call are the two calls.
        let two: Vec<u8> = grey.iter().chain(&other).copied().collect();
        let f2 = a.features(&two, 2, 1, 32, 32).unwrap();
        assert_eq!(&f2[..FEATURES], &f1[..]);
        assert!(
            a.features(&grey, 2, 1, 32, 32).is_err(),
            "a wrong count is refused"
        );
        assert_eq!(a.feature_network(), PIXEL_PROJECTION_NETWORK);
        assert!(a.identity().contains("not FID"));
    }
}
