//! Images for training and evaluation: a built-in procedural dataset that needs no download,
//! folders or ZIPs of images in EDM2's dataset layout ([`folder`]; PNG, JPEG, WebP and the other
//! formats PIL reads, decoded to the pixels PIL gives: [`decode`]), and IDX files
//! (Fashion-MNIST, see [`idx`]).
//!
//! Image `i` of the procedural set is drawn from an RNG seeded by (seed, i): a soft vertical
//! background gradient and one filled shape whose kind (disc, square, diamond, ring, cross)
//! and hue family are given by its class, with random position, size and shade. Pixels are in
//! [−1, 1] as EDM2 feeds its networks. The images have real structure (edges, flat regions,
//! class-dependent shape) at any resolution from 8 pixels up.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

pub mod decode;
pub mod folder;
pub mod idx;

pub use decode::{ImageFormat, Skip};
pub use folder::{FolderReport, ImageFolder, SkippedFile};
pub use idx::IdxImages;

/// Shape kinds, one per class modulo their number.
const KINDS: usize = 5;

/// The procedural dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Procedural {
    /// Image side in pixels.
    pub resolution: usize,
    /// Number of classes (0: unconditional, shapes of every kind).
    pub classes: usize,
    /// Seed of the whole set.
    pub seed: u64,
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

impl Procedural {
    /// Image `index` as CHW f32 in [−1, 1], and its class (0 when unconditional).
    pub fn image(&self, index: u64) -> (Vec<f32>, usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let class = if self.classes > 0 {
            rng.random_range(0..self.classes)
        } else {
            0
        };
        let kind = if self.classes > 0 {
            class % KINDS
        } else {
            rng.random_range(0..KINDS)
        };
        let hue = if self.classes > 0 {
            class as f32 / self.classes as f32 + rng.random_range(-0.04..0.04)
        } else {
            rng.random_range(0.0..1.0)
        };
        let fg = hsv(hue, rng.random_range(0.6..1.0), rng.random_range(0.7..1.0));
        let bg_top = hsv(rng.random_range(0.0..1.0), 0.3, rng.random_range(0.1..0.4));
        let bg_bottom = hsv(rng.random_range(0.0..1.0), 0.3, rng.random_range(0.1..0.4));
        let r = self.resolution as f32;
        let cx = rng.random_range(0.3..0.7) * r;
        let cy = rng.random_range(0.3..0.7) * r;
        let size = rng.random_range(0.18..0.32) * r;
        let n = self.resolution;
        let mut out = vec![0f32; 3 * n * n];
        for y in 0..n {
            let t = y as f32 / (n - 1).max(1) as f32;
            for x in 0..n {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let inside = match kind {
                    0 => dx * dx + dy * dy <= size * size,
                    1 => dx.abs() <= size * 0.85 && dy.abs() <= size * 0.85,
                    2 => dx.abs() + dy.abs() <= size * 1.1,
                    3 => {
                        let d = (dx * dx + dy * dy).sqrt();
                        d <= size && d >= size * 0.55
                    }
                    _ => {
                        (dx.abs() <= size * 0.3 && dy.abs() <= size)
                            || (dy.abs() <= size * 0.3 && dx.abs() <= size)
                    }
                };
                for c in 0..3 {
                    let v = if inside {
                        fg[c]
                    } else {
                        bg_top[c] * (1.0 - t) + bg_bottom[c] * t
                    };
                    out[c * n * n + y * n + x] = v * 2.0 - 1.0;
                }
            }
        }
        (out, class)
    }
}

/// The seed of the data stream (image order, procedural images) of a training run with
/// `training_seed`: derived from it so that data and initialisation draw different numbers.
pub fn data_seed(training_seed: u64) -> u64 {
    training_seed ^ 0x5eed
}

/// One-hot rows `[classes.len(), n]` (f32) for class-conditional networks.
pub fn one_hot(classes: &[usize], n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; classes.len() * n];
    for (i, &c) in classes.iter().enumerate() {
        v[i * n + c] = 1.0;
    }
    Tensor::from_vec(v, (classes.len(), n), device)
}

/// Where training images come from.
#[derive(Clone, Debug)]
pub enum Dataset {
    /// The built-in procedural images.
    Procedural(Procedural),
    /// A folder or ZIP of images, visited in a fresh seeded order every epoch.
    Images(ImageFolder, u64),
    /// An IDX file (Fashion-MNIST), padded to a power-of-two side, visited like a folder.
    Idx(IdxImages, u64),
}

/// Images the procedural set offers to metrics (it is endless; evaluation takes this many).
pub const PROCEDURAL_EVAL_IMAGES: usize = 10_000;

/// The dataset family a `source` names, where hindsight knows it: `procedural` (the built-in
/// images) or `fashion-mnist` (its training and test sets, by name or as Debian's or the
/// download cache's files), also with the `" (first N images)"` reference statistics add.
/// `None` for anything else (a user's folder, an idx file elsewhere, imported statistics):
/// what those hold is not known here.
pub fn family(source: &str) -> Option<&'static str> {
    let name = source.split(" (first ").next().unwrap_or(source);
    if name == "procedural" {
        return Some("procedural");
    }
    if name == "fashion-mnist" || name == "fashion-mnist-test" {
        return Some("fashion-mnist");
    }
    let path = std::path::Path::new(name);
    let in_fashion_dir = path.parent().is_some_and(|dir| {
        dir == std::path::Path::new(idx::FASHION_MNIST_DIR)
            || dir == idx::fashion_mnist_install_dir()
            || dir == idx::fashion_mnist_cache_dir()
    });
    let fashion_file = idx::FASHION_MNIST_FILES
        .iter()
        .any(|(f, _)| path.file_name().is_some_and(|n| n == *f));
    (in_fashion_dir && fashion_file).then_some("fashion-mnist")
}

impl Dataset {
    /// The dataset `source` names:
    /// - `procedural`, of `resolution` and `classes`;
    /// - `fashion-mnist` / `fashion-mnist-test`: Debian's Fashion-MNIST training (60 000) or
    ///   test (10 000) set (Debian's [`idx::FASHION_MNIST_DIR`], else a download in
    ///   [`idx::fashion_mnist_cache_dir`]), 28×28 padded to 32×32, 10 classes;
    /// - a path to an `*-images-idx3-ubyte[.gz]` file (labels from the file beside it);
    /// - a folder or ZIP of images ([`ImageFolder`]).
    ///
    /// Image sets bring their own size, channels and classes. `training_seed` is the run's
    /// seed; the stream's comes from [`data_seed`].
    pub fn open(
        source: &str,
        resolution: usize,
        classes: usize,
        training_seed: u64,
    ) -> crate::Result<Self> {
        let seed = data_seed(training_seed);
        let fashion = |file: &str| {
            idx::fashion_mnist_dir()
                .unwrap_or_else(idx::fashion_mnist_install_dir)
                .join(file)
        };
        let idx_file = match source {
            "procedural" => {
                return Ok(Dataset::Procedural(Procedural {
                    resolution,
                    classes,
                    seed,
                }))
            }
            "fashion-mnist" => Some(fashion("train-images-idx3-ubyte.gz")),
            "fashion-mnist-test" => Some(fashion("t10k-images-idx3-ubyte.gz")),
            path if path.contains("-images-idx3-ubyte") => Some(path.into()),
            _ => None,
        };
        match idx_file {
            Some(path) => {
                if !path.is_file() && source.starts_with("fashion-mnist") {
                    return Err(crate::Error::NotFound(format!(
                        "Fashion-MNIST is not at {} nor in {}: install Debian's \
                         dataset-fashion-mnist (apt-get install dataset-fashion-mnist), let \
                         `hindsight demo` download it, or give the path of an \
                         *-images-idx3-ubyte.gz file",
                        path.display(),
                        idx::fashion_mnist_cache_dir().display()
                    )));
                }
                Ok(Dataset::Idx(IdxImages::open(&path)?, seed))
            }
            None => Ok(Dataset::Images(
                ImageFolder::open(std::path::Path::new(source))?,
                seed,
            )),
        }
    }

    /// Keeps the first `n` images of an image set (the procedural set is endless).
    pub fn truncate(&mut self, n: usize) {
        match self {
            Dataset::Procedural(_) => {}
            Dataset::Images(f, _) => f.truncate(n),
            Dataset::Idx(x, _) => x.truncate(n),
        }
    }

    /// The seed of the data stream.
    pub fn seed(&self) -> u64 {
        match self {
            Dataset::Procedural(p) => p.seed,
            Dataset::Images(_, seed) | Dataset::Idx(_, seed) => *seed,
        }
    }

    /// Examples `first..first + n` of the stream as a batch: images `[n, C, R, R]` in
    /// [−1, 1] and, for class-conditional data, one-hot labels `[n, classes]`.
    pub fn batch(
        &self,
        first: u64,
        n: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (c, r) = (self.channels(), self.resolution());
        let mut pixels = Vec::with_capacity(n * c * r * r);
        let mut classes = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let (img, class) = self.example(first + i);
            pixels.extend(img);
            classes.push(class);
        }
        let images = Tensor::from_vec(pixels, (n, c, r, r), device)?;
        let labels = match self.classes() {
            0 => None,
            c => Some(one_hot(&classes, c, device)?),
        };
        Ok((images, labels))
    }

    /// Channels of every image: 3 for the procedural set, 1 for IDX, 1 or 3 for image folders.
    pub fn channels(&self) -> usize {
        match self {
            Dataset::Procedural(_) => 3,
            Dataset::Images(f, _) => f.channels,
            Dataset::Idx(..) => 1,
        }
    }

    /// Image side.
    pub fn resolution(&self) -> usize {
        match self {
            Dataset::Procedural(p) => p.resolution,
            Dataset::Images(f, _) => f.resolution,
            Dataset::Idx(x, _) => x.resolution,
        }
    }

    /// Classes.
    pub fn classes(&self) -> usize {
        match self {
            Dataset::Procedural(p) => p.classes,
            Dataset::Images(f, _) => f.classes,
            Dataset::Idx(x, _) => x.classes,
        }
    }

    /// Images for evaluation: the set's size ([`PROCEDURAL_EVAL_IMAGES`] for the endless
    /// procedural set).
    pub fn len(&self) -> usize {
        match self {
            Dataset::Procedural(_) => PROCEDURAL_EVAL_IMAGES,
            Dataset::Images(f, _) => f.len(),
            Dataset::Idx(x, _) => x.len(),
        }
    }

    /// The image folder behind the set, if it is one (its report says what was read).
    pub fn folder(&self) -> Option<&ImageFolder> {
        match self {
            Dataset::Images(f, _) => Some(f),
            _ => None,
        }
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `index` (in the set's own order, not the training stream's) as 8-bit pixels,
    /// `[C, R, R]`: what FID sees.
    pub fn pixels(&self, index: usize) -> Vec<u8> {
        let to_u8 = |chw: Vec<f32>| -> Vec<u8> {
            chw.iter()
                .map(|v| (v * 127.5 + 128.0).clamp(0.0, 255.0) as u8)
                .collect()
        };
        match self {
            Dataset::Procedural(p) => to_u8(p.image(index as u64).0),
            Dataset::Images(f, _) => f.pixels(index),
            Dataset::Idx(x, _) => x.pixels(index).0.to_vec(),
        }
    }

    /// The `i`-th training example of the endless stream: image sets are visited in a fresh
    /// seeded order every epoch.
    pub fn example(&self, i: u64) -> (Vec<f32>, usize) {
        let shuffled = |n: usize, seed: u64| -> usize {
            use rand::seq::SliceRandom;
            let epoch = i / n as u64;
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F));
            order.shuffle(&mut rng);
            order[(i % n as u64) as usize]
        };
        match self {
            Dataset::Procedural(p) => p.image(i),
            Dataset::Images(f, seed) => f.image(shuffled(f.len(), *seed)),
            Dataset::Idx(x, seed) => {
                let (pixels, class) = x.pixels(shuffled(x.len(), *seed));
                let image = pixels.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
                (image, class)
            }
        }
    }
}

#[cfg(test)]
mod family_tests {
    use super::family;

    #[test]
    fn families_are_known_by_name_and_by_fashion_mnist_files() {
        for (source, expected) in [
            ("procedural", Some("procedural")),
            ("procedural (first 500 images)", Some("procedural")),
            ("fashion-mnist", Some("fashion-mnist")),
            (
                "fashion-mnist-test (first 500 images)",
                Some("fashion-mnist"),
            ),
            (
                "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
                Some("fashion-mnist"),
            ),
            // What hindsight cannot know: a slice elsewhere, a user's folder, an upload.
            ("/tmp/fm-slice-images-idx3-ubyte", None),
            ("/data/cifar10", None),
            ("procedural-looking/folder", None),
            ("stats.npz", None),
        ] {
            assert_eq!(family(source), expected, "{source}");
        }
    }
}
