//! Images for training and evaluation: a built-in procedural dataset that needs no download,
//! folders or ZIPs of PNGs in EDM2's dataset layout, and IDX files (Fashion-MNIST, see
//! [`idx`]).
//!
//! Image `i` of the procedural set is drawn from an RNG seeded by (seed, i): a soft vertical
//! background gradient and one filled shape whose kind (disc, square, diamond, ring, cross)
//! and hue family are given by its class, with random position, size and shade. Pixels are in
//! [−1, 1] as EDM2 feeds its networks. The images have real structure (edges, flat regions,
//! class-dependent shape) at any resolution from 8 pixels up.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

pub mod idx;

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

/// Images from a folder or a ZIP archive in EDM2's dataset layout: PNG files (any
/// sub-folders), all of one square size, and optionally `dataset.json` with
/// `{"labels": [["path/in/archive.png", class], ...]}`. ZIP members must be stored
/// uncompressed, as EDM2's `dataset_tool.py` writes them. Everything is decoded once into
/// memory (8 bits per channel). A set whose every image is greyscale has one channel (as
/// Fashion-MNIST), any other three (grey images among colour ones are replicated to RGB).
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Image side in pixels.
    pub resolution: usize,
    /// Channels: 1 (every image greyscale) or 3.
    pub channels: usize,
    /// Number of classes (0 without labels).
    pub classes: usize,
    pixels: Vec<u8>,
    labels: Vec<usize>,
}

/// A decoded PNG: width, height, whether it is greyscale, and its pixels as RGB (HWC).
fn decode_png(bytes: &[u8], name: &str) -> crate::Result<(usize, usize, bool, Vec<u8>)> {
    let bad = |m: String| crate::Error::invalid(name, m);
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(format!("not a PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in buf[..w * h * channels].chunks_exact(channels) {
        match channels {
            1 | 2 => rgb.extend([px[0]; 3]),
            _ => rgb.extend(&px[..3]),
        }
    }
    Ok((w, h, channels <= 2, rgb))
}

impl ImageFolder {
    /// Loads every PNG under `path` (a directory or a `.zip`).
    pub fn open(path: &std::path::Path) -> crate::Result<Self> {
        let source = path.display().to_string();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut labels_json: Option<Vec<u8>> = None;
        if path.is_dir() {
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let entries = std::fs::read_dir(&dir)
                    .map_err(|e| crate::Error::io(format!("reading {}", dir.display()), e))?;
                for entry in entries {
                    let p = entry
                        .map_err(|e| crate::Error::io(format!("reading {}", dir.display()), e))?
                        .path();
                    let rel = p
                        .strip_prefix(path)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .replace('\\', "/");
                    if p.is_dir() {
                        stack.push(p);
                    } else if rel.to_lowercase().ends_with(".png") || rel == "dataset.json" {
                        let bytes = std::fs::read(&p)
                            .map_err(|e| crate::Error::io(format!("reading {}", p.display()), e))?;
                        if rel == "dataset.json" {
                            labels_json = Some(bytes);
                        } else {
                            files.push((rel, bytes));
                        }
                    }
                }
            }
        } else {
            let file = std::fs::File::open(path)
                .map_err(|e| crate::Error::io(format!("opening {source}"), e))?;
            let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
                .map_err(|e| crate::Error::invalid(&source, format!("not a ZIP archive: {e}")))?;
            for i in 0..archive.len() {
                let mut entry = archive
                    .by_index(i)
                    .map_err(|e| crate::Error::invalid(&source, format!("entry {i}: {e}")))?;
                let name = entry
                    .name()
                    .map_err(|e| crate::Error::invalid(&source, format!("entry {i}: {e}")))?
                    .into_owned();
                if !(name.to_lowercase().ends_with(".png") || name == "dataset.json") {
                    continue;
                }
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| {
                    crate::Error::invalid(
                        &source,
                        format!("{name}: {e} (members must be stored uncompressed)"),
                    )
                })?;
                if name == "dataset.json" {
                    labels_json = Some(bytes);
                } else {
                    files.push((name, bytes));
                }
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        if files.is_empty() {
            return Err(crate::Error::invalid(&source, "no PNG images found"));
        }
        let label_map: Option<std::collections::HashMap<String, usize>> = match labels_json {
            None => None,
            Some(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    crate::Error::invalid(format!("{source}/dataset.json"), e.to_string())
                })?;
                match v.get("labels") {
                    Some(serde_json::Value::Array(items)) => Some(
                        items
                            .iter()
                            .filter_map(|it| {
                                Some((
                                    it.get(0)?.as_str()?.to_owned(),
                                    it.get(1)?.as_u64()? as usize,
                                ))
                            })
                            .collect(),
                    ),
                    _ => None,
                }
            }
        };
        let mut resolution = 0;
        let mut pixels = Vec::new();
        let mut labels = Vec::with_capacity(files.len());
        let mut all_grey = true;
        for (name, bytes) in &files {
            let (w, h, grey, rgb) = decode_png(bytes, &format!("{source}/{name}"))?;
            all_grey &= grey;
            if w != h || (resolution != 0 && w != resolution) {
                return Err(crate::Error::invalid(
                    format!("{source}/{name}"),
                    format!(
                        "is {w}×{h}; every image must be square and of one size ({resolution})"
                    ),
                ));
            }
            resolution = w;
            pixels.extend(rgb);
            if let Some(map) = &label_map {
                labels.push(*map.get(name).ok_or_else(|| {
                    crate::Error::invalid(
                        format!("{source}/dataset.json"),
                        format!("no label for {name}"),
                    )
                })?);
            }
        }
        let classes = labels.iter().max().map_or(0, |m| m + 1);
        let channels = if all_grey {
            // Keep one of the three equal channels.
            pixels = pixels.into_iter().step_by(3).collect();
            1
        } else {
            3
        };
        Ok(Self {
            resolution,
            channels,
            classes,
            pixels,
            labels,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / (self.channels * self.resolution * self.resolution)
    }

    /// Keeps the first `n` images only.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.pixels
            .truncate(n * self.channels * self.resolution * self.resolution);
        self.labels.truncate(n.min(self.labels.len()));
    }

    /// Whether there are none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `index` (as CHW f32 in [−1, 1], `channels` planes) and its class.
    pub fn image(&self, index: usize) -> (Vec<f32>, usize) {
        let (n, channels) = (self.resolution * self.resolution, self.channels);
        let px = &self.pixels[index * channels * n..(index + 1) * channels * n];
        let mut out = vec![0f32; channels * n];
        for (i, pixel) in px.chunks_exact(channels).enumerate() {
            for (c, &v) in pixel.iter().enumerate() {
                out[c * n + i] = v as f32 / 127.5 - 1.0;
            }
        }
        (out, self.labels.get(index).copied().unwrap_or(0))
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
    /// A folder or ZIP of PNGs, visited in a fresh seeded order every epoch.
    Images(ImageFolder, u64),
    /// An IDX file (Fashion-MNIST), padded to a power-of-two side, visited like a folder.
    Idx(IdxImages, u64),
}

/// Images the procedural set offers to metrics (it is endless; evaluation takes this many).
pub const PROCEDURAL_EVAL_IMAGES: usize = 10_000;

impl Dataset {
    /// The dataset `source` names:
    /// - `procedural`, of `resolution` and `classes`;
    /// - `fashion-mnist` / `fashion-mnist-test`: Debian's Fashion-MNIST training (60 000) or
    ///   test (10 000) set (Debian's [`idx::FASHION_MNIST_DIR`], else a download in
    ///   [`idx::fashion_mnist_cache_dir`]), 28×28 padded to 32×32, 10 classes;
    /// - a path to an `*-images-idx3-ubyte[.gz]` file (labels from the file beside it);
    /// - a folder or ZIP of PNGs.
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
                .unwrap_or_else(|| idx::FASHION_MNIST_DIR.into())
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

    /// Channels of every image: 3 for the procedural set, 1 for IDX, 1 or 3 for PNG sets.
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
            Dataset::Images(f, _) => to_u8(f.image(index).0),
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
