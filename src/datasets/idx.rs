//! The IDX format of MNIST and Fashion-MNIST (LeCun et al.; Xiao, Rasul & Vollgraf,
//! arXiv 1708.07747), gzip-compressed or not: a big-endian header — two zero bytes, a type
//! byte (0x08: unsigned bytes), the number of dimensions — each dimension as a big-endian
//! u32, then the data. Images are `[n, rows, cols]`, labels `[n]`.
//!
//! Debian's `dataset-fashion-mnist` installs Fashion-MNIST at
//! `/usr/share/datasets/fashion-mnist/` (`train-images-idx3-ubyte.gz`, 60 000 images;
//! `t10k-…`, 10 000; 28×28 grey, 10 classes, MIT licence).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where Debian's package puts Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's public location (Zalando Research's), used when Debian's package is not
/// installed; `$HINDSIGHT_FASHION_MNIST_URL` names a mirror instead.
pub const FASHION_MNIST_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// Fashion-MNIST's four files with the MD5s its authors publish (github.com/zalandoresearch/
/// fashion-mnist, README "Get the data"; torchvision checks the same).
pub const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
];

/// Where a download of Fashion-MNIST is kept: `~/.cache/hindsight/fashion-mnist`.
pub fn fashion_mnist_cache_dir() -> PathBuf {
    crate::fetch::cache_dir().join("fashion-mnist")
}

/// Where an installed Fashion-MNIST is looked for: `$HINDSIGHT_FASHION_MNIST_DIR` when set
/// (a copy elsewhere), else Debian's [`FASHION_MNIST_DIR`].
pub fn fashion_mnist_install_dir() -> PathBuf {
    std::env::var_os("HINDSIGHT_FASHION_MNIST_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(FASHION_MNIST_DIR), PathBuf::from)
}

/// The directory holding all four Fashion-MNIST files: [`fashion_mnist_install_dir`], else
/// the download cache; `None` when neither does.
pub fn fashion_mnist_dir() -> Option<PathBuf> {
    [fashion_mnist_install_dir(), fashion_mnist_cache_dir()]
        .into_iter()
        .find(|d| FASHION_MNIST_FILES.iter().all(|(f, _)| d.join(f).is_file()))
}

/// Downloads Fashion-MNIST's files from `base_url` into `dest`, each checked against
/// `checksums` (MD5, as [`FASHION_MNIST_FILES`]) before it is kept; files already there are
/// kept. `progress` counts bytes.
///
/// Errors: [`Error::Download`] (unreachable, cut short, wrong checksum: nothing of that file
/// is kept), I/O errors writing `dest`.
pub fn download_fashion_mnist(
    base_url: &str,
    checksums: &[(&str, &str)],
    dest: &Path,
    progress: &dyn crate::progress::Progress,
) -> Result<()> {
    for (file, md5) in checksums {
        let path = dest.join(file);
        if path.is_file() {
            continue;
        }
        progress.set_message(file.to_string());
        progress.set_position(0);
        let url = format!("{}/{file}", base_url.trim_end_matches('/'));
        let bytes =
            crate::fetch::get_checked(&url, 64 << 20, crate::fetch::Checksum::Md5(md5), progress)?;
        crate::fetch::write_atomically(&path, &bytes)?;
    }
    Ok(())
}

/// Largest IDX file read (uncompressed): 60 000 images of 28×28 are 47 MB.
const MAX_BYTES: u64 = 1 << 31;

/// Square grey images from an IDX file, zero-padded to a power-of-two side, with their labels
/// when the labels file sits beside them.
#[derive(Clone, Debug)]
pub struct IdxImages {
    /// Image side after padding (32 for 28×28).
    pub resolution: usize,
    /// Classes (0 without labels).
    pub classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

/// Reads an IDX file whole (gunzipping `.gz`): its dimensions and bytes.
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let source = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {source}"), e))?;
    let mut raw = Vec::new();
    let reader: Box<dyn Read> = if source.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    reader
        .take(MAX_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| Error::invalid(&source, format!("cannot read: {e}")))?;
    let bad = |m: String| Error::invalid(&source, format!("not an IDX file of bytes: {m}"));
    if raw.len() < 4 || raw[0] != 0 || raw[1] != 0 || raw[2] != 0x08 {
        return Err(bad("the magic number is not 0x0000 08 __".into()));
    }
    let ndims = raw[3] as usize;
    let start = 4 + 4 * ndims;
    if raw.len() < start || ndims == 0 {
        return Err(bad(format!("{ndims} dimensions and a short header")));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|k| {
            u32::from_be_bytes(raw[4 + 4 * k..8 + 4 * k].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("dimensions overflow".into()))?;
    if raw.len() - start != count {
        return Err(bad(format!(
            "dimensions {dims:?} need {count} bytes, the file has {}",
            raw.len() - start
        )));
    }
    Ok((dims, raw.split_off(start)))
}

/// The labels file beside an images file (`…-images-idx3-ubyte…` → `…-labels-idx1-ubyte…`).
fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name.replace("-images-idx3-", "-labels-idx1-");
    (labels != name).then(|| images.with_file_name(labels))
}

impl IdxImages {
    /// Reads `path` (an `*-images-idx3-ubyte[.gz]` file) and its labels if present, padding
    /// each image with zeros (Fashion-MNIST's background) to the next power-of-two side.
    pub fn open(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let (dims, pixels) = read_idx(path)?;
        let [n, rows, cols] = dims[..] else {
            return Err(Error::invalid(
                &source,
                format!("images have 3 dimensions [n, rows, cols], not {dims:?}"),
            ));
        };
        if rows != cols || rows == 0 {
            return Err(Error::invalid(
                &source,
                format!("images are {rows}×{cols}; square ones are needed"),
            ));
        }
        let side = rows.next_power_of_two();
        let pad = (side - rows) / 2;
        let mut padded = vec![0u8; n * side * side];
        for (src, dst) in pixels
            .chunks_exact(rows * cols)
            .zip(padded.chunks_exact_mut(side * side))
        {
            for y in 0..rows {
                let d = (y + pad) * side + pad;
                dst[d..d + cols].copy_from_slice(&src[y * cols..(y + 1) * cols]);
            }
        }
        let labels = match labels_path(path).filter(|p| p.is_file()) {
            Some(p) => {
                let (ldims, labels) = read_idx(&p)?;
                if ldims != [n] {
                    return Err(Error::invalid(
                        p.display().to_string(),
                        format!("{ldims:?} labels for {n} images"),
                    ));
                }
                labels
            }
            None => Vec::new(),
        };
        let classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
        Ok(Self {
            resolution: side,
            classes,
            pixels: padded,
            labels,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / (self.resolution * self.resolution)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` images only.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.pixels.truncate(n * self.resolution * self.resolution);
        self.labels.truncate(n.min(self.labels.len()));
    }

    /// Image `index`'s pixels (one channel, row-major) and its class (0 without labels).
    pub fn pixels(&self, index: usize) -> (&[u8], usize) {
        let n = self.resolution * self.resolution;
        (
            &self.pixels[index * n..(index + 1) * n],
            self.labels.get(index).map_or(0, |&l| l as usize),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pads_and_finds_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 3];
        images.extend(1..=18u8);
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 2];
        labels.extend([4u8, 9]);
        let path = dir.path().join("t-images-idx3-ubyte.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut gz, &images).unwrap();
        gz.finish().unwrap();
        std::fs::write(dir.path().join("t-labels-idx1-ubyte.gz"), {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &labels).unwrap();
            gz.finish().unwrap()
        })
        .unwrap();
        let set = IdxImages::open(&path).unwrap();
        assert_eq!((set.len(), set.resolution, set.classes), (2, 4, 10));
        let (first, class) = set.pixels(0);
        // 3×3 padded to 4×4: the image sits at the top left (padding (4 − 3) / 2 = 0 rows).
        assert_eq!(first, [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0, 0]);
        assert_eq!(class, 4);
        assert_eq!(set.pixels(1).1, 9);
        // Damaged files say so.
        std::fs::write(dir.path().join("x-images-idx3-ubyte"), [0, 0, 8, 3, 0, 0]).unwrap();
        assert!(IdxImages::open(&dir.path().join("x-images-idx3-ubyte")).is_err());
    }
}
