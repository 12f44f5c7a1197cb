//! Image folders and ZIP archives in EDM2's dataset layout, in every format
//! [`decode`](super::decode) reads, with a report of what was used and what was not.
//!
//! EDM2 (`training/dataset.py`) takes the files whose extension PIL knows, in sorted order,
//! labels from `dataset.json`; pytorch-fid takes `bmp jpg jpeg pgm png ppm tif tiff webp`.
//! Here every file is tried by its content, in sorted path order, and a file that is not used
//! is never dropped silently: [`FolderReport`] names it with the reason.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::decode::{decode, ImageFormat, Skip};
use crate::error::{Error, Result};

/// Largest file read, in bytes (256 MiB); larger ones are skipped as unsupported.
pub const MAX_FILE_BYTES: u64 = 1 << 28;

/// Skipped files a summary line names; the rest are counted.
const NAMED_IN_SUMMARY: usize = 10;

/// A file that is not used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedFile {
    /// Its path inside the folder or archive (`/`-separated).
    pub name: String,
    /// Why it is not used.
    pub skip: Skip,
}

impl std::fmt::Display for SkippedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.skip)
    }
}

/// What reading a folder found besides the images: the files skipped, and the conversions
/// PIL's `convert('RGB')` rules applied (counted over every image read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FolderReport {
    /// Files not used, in path order (`dataset.json` is used, never listed).
    pub skipped: Vec<SkippedFile>,
    /// Images with an alpha channel, dropped.
    pub alpha_dropped: usize,
    /// 16-bit greyscale images, clipped to 0–255 (as PIL clips them).
    pub grey16_clipped: usize,
    /// CMYK JPEGs, converted as PIL converts them.
    pub cmyk: usize,
}

impl FolderReport {
    /// `skipped 2 files: a.txt (not an image), b.jpg (corrupt: …)`, naming the first 10; `None`
    /// when nothing was skipped.
    pub fn skipped_summary(&self) -> Option<String> {
        let n = self.skipped.len();
        if n == 0 {
            return None;
        }
        let named: Vec<String> = self
            .skipped
            .iter()
            .take(NAMED_IN_SUMMARY)
            .map(ToString::to_string)
            .collect();
        let more = match n.saturating_sub(NAMED_IN_SUMMARY) {
            0 => String::new(),
            m => format!(", and {m} more"),
        };
        Some(format!(
            "skipped {n} file{}: {}{more}",
            if n == 1 { "" } else { "s" },
            named.join(", ")
        ))
    }

    /// Sentences about the conversions applied, one per kind that occurred.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let plural = |n: usize| if n == 1 { "image" } else { "images" };
        if self.alpha_dropped > 0 {
            notes.push(format!(
                "{} {} with an alpha channel: alpha dropped, as PIL's convert('RGB') does",
                self.alpha_dropped,
                plural(self.alpha_dropped)
            ));
        }
        if self.grey16_clipped > 0 {
            notes.push(format!(
                "{} 16-bit greyscale {}: values clipped to 255, as PIL's convert('RGB') does \
                 (it does not scale them)",
                self.grey16_clipped,
                plural(self.grey16_clipped)
            ));
        }
        if self.cmyk > 0 {
            notes.push(format!(
                "{} CMYK JPEG {}: converted to RGB as PIL converts them",
                self.cmyk,
                plural(self.cmyk)
            ));
        }
        notes
    }
}

/// Images from a folder or a ZIP archive in EDM2's dataset layout: image files (any
/// sub-folders; every format of [`decode`](super::decode), told by content), all of one
/// square size, and optionally `dataset.json` at the top with
/// `{"labels": [["path/in/archive.png", class], ...]}`. ZIP members may be stored (as EDM2's
/// `dataset_tool.py` writes them) or deflated. Files are taken in sorted path order, as EDM2
/// takes them; files that do not decode are skipped and listed in [`report`](Self::report).
/// Everything is decoded once into memory (8 bits per channel). A set whose every image is
/// greyscale has one channel (as Fashion-MNIST), any other three (grey images among colour
/// ones are replicated to RGB).
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Image side in pixels.
    pub resolution: usize,
    /// Channels: 1 (every image greyscale) or 3.
    pub channels: usize,
    /// Number of classes (0 without labels).
    pub classes: usize,
    /// HWC pixels of every image, one after another.
    pixels: Vec<u8>,
    labels: Vec<usize>,
    /// The format of each image.
    formats: Vec<ImageFormat>,
    report: FolderReport,
}

/// Where the files come from.
enum Source {
    /// Paths of the files under a directory, by their `/`-separated relative names.
    Dir(Vec<(String, std::path::PathBuf)>),
    /// An archive and its members' indices, by name.
    Zip(
        zip::ZipArchive<std::io::BufReader<std::fs::File>>,
        Vec<(String, usize)>,
    ),
}

impl Source {
    /// Lists the files under `path` (a directory or a ZIP archive).
    fn open(path: &Path, source: &str) -> Result<Self> {
        if path.is_dir() {
            let mut files = Vec::new();
            let mut stack = vec![path.to_path_buf()];
            // Folders already listed, by canonical path: a symbolic link that loops is
            // listed once.
            let mut seen = std::collections::HashSet::new();
            while let Some(dir) = stack.pop() {
                if !seen.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
                    continue;
                }
                let entries = std::fs::read_dir(&dir)
                    .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
                for entry in entries {
                    let p = entry
                        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
                        .path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        let rel = p
                            .strip_prefix(path)
                            .unwrap_or(&p)
                            .to_string_lossy()
                            .replace('\\', "/");
                        files.push((rel, p));
                    }
                }
            }
            files.sort();
            return Ok(Source::Dir(files));
        }
        let file =
            std::fs::File::open(path).map_err(|e| Error::io(format!("opening {source}"), e))?;
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| Error::invalid(source, format!("not a folder nor a ZIP archive: {e}")))?;
        let mut members = Vec::new();
        for i in 0..archive.len() {
            let entry = archive
                .by_index_raw(i)
                .map_err(|e| Error::invalid(source, format!("entry {i}: {e}")))?;
            if entry.is_dir() {
                continue;
            }
            let name = entry
                .name()
                .map_err(|e| Error::invalid(source, format!("entry {i}: {e}")))?
                .into_owned();
            members.push((name, i));
        }
        members.sort();
        Ok(Source::Zip(archive, members))
    }

    /// The files' names, in order.
    fn names(&self) -> Vec<String> {
        match self {
            Source::Dir(files) => files.iter().map(|(n, _)| n.clone()).collect(),
            Source::Zip(_, members) => members.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// The bytes of file `k` (in [`names`](Self::names) order), at most [`MAX_FILE_BYTES`].
    fn read(&mut self, k: usize) -> std::result::Result<Vec<u8>, Skip> {
        let too_big = |n: u64| {
            Skip::Unsupported(format!(
                "{n} bytes; files over {} MiB are not read",
                MAX_FILE_BYTES >> 20
            ))
        };
        let mut bytes = Vec::new();
        match self {
            Source::Dir(files) => {
                let file = std::fs::File::open(&files[k].1)
                    .map_err(|e| Skip::Unreadable(e.to_string()))?;
                let len = file
                    .metadata()
                    .map_err(|e| Skip::Unreadable(e.to_string()))?
                    .len();
                if len > MAX_FILE_BYTES {
                    return Err(too_big(len));
                }
                file.take(MAX_FILE_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(|e| Skip::Unreadable(e.to_string()))?;
            }
            Source::Zip(archive, members) => {
                let entry = archive
                    .by_index(members[k].1)
                    .map_err(|e| Skip::Unreadable(e.to_string()))?;
                if entry.size() > MAX_FILE_BYTES {
                    return Err(too_big(entry.size()));
                }
                entry
                    .take(MAX_FILE_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(|e| {
                        Skip::Unreadable(format!("{e} (members must be stored or deflated)"))
                    })?;
            }
        }
        Ok(bytes)
    }
}

/// Class labels by file name from `dataset.json` (`None` when it has no `labels` list).
fn parse_labels(bytes: &[u8], source: &str) -> Result<Option<HashMap<String, usize>>> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(format!("{source}/dataset.json"), e.to_string()))?;
    Ok(match v.get("labels") {
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
    })
}

impl ImageFolder {
    /// Loads every image under `path` (a directory or a `.zip`).
    ///
    /// Errors: `path` cannot be listed or is neither a folder nor a ZIP archive; no file
    /// decodes (the message names what was found); an image is not square or not of the
    /// others' size; `dataset.json` is malformed or lacks a used image's label.
    pub fn open(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let mut files = Source::open(path, &source)?;
        let names = files.names();
        let mut label_map = None;
        let mut resolution = 0;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let mut formats = Vec::new();
        let mut report = FolderReport::default();
        let mut used_names = Vec::new();
        let mut all_grey = true;
        for (k, name) in names.iter().enumerate() {
            let file_name = name.rsplit('/').next().unwrap_or(name);
            if name == "dataset.json" {
                let bytes = files.read(k).map_err(|skip| {
                    Error::invalid(format!("{source}/dataset.json"), skip.to_string())
                })?;
                label_map = parse_labels(&bytes, &source)?;
                continue;
            }
            let decoded = if file_name.starts_with("._") {
                // macOS metadata (AppleDouble) beside the file it describes.
                Err(Skip::NotAnImage)
            } else {
                files.read(k).and_then(|bytes| decode(&bytes, name))
            };
            let img = match decoded {
                Ok(img) => img,
                Err(skip) => {
                    report.skipped.push(SkippedFile {
                        name: name.clone(),
                        skip,
                    });
                    continue;
                }
            };
            let (w, h) = (img.width, img.height);
            if w != h || (resolution != 0 && w != resolution) {
                return Err(Error::invalid(
                    format!("{source}/{name}"),
                    format!(
                        "is {w}×{h}; every image must be square and of one size ({resolution})"
                    ),
                ));
            }
            resolution = w;
            all_grey &= img.grey;
            report.alpha_dropped += usize::from(img.conversions.alpha_dropped);
            report.grey16_clipped += usize::from(img.conversions.grey16_clipped);
            report.cmyk += usize::from(img.conversions.cmyk);
            pixels.extend(img.rgb);
            formats.push(img.format);
            used_names.push(name.clone());
        }
        if formats.is_empty() {
            let found = match names.len() {
                0 => "no files".to_owned(),
                _ => report
                    .skipped_summary()
                    .unwrap_or_else(|| "only dataset.json".to_owned()),
            };
            return Err(Error::invalid(
                &source,
                format!(
                    "no images found (PNG, JPEG, WebP, BMP, TIFF, GIF and more are read): \
                     {found}"
                ),
            ));
        }
        if let Some(map) = &label_map {
            for name in &used_names {
                labels.push(*map.get(name).ok_or_else(|| {
                    Error::invalid(
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
            formats,
            report,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.formats.len()
    }

    /// Keeps the first `n` images only.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.pixels
            .truncate(n * self.channels * self.resolution * self.resolution);
        self.labels.truncate(n.min(self.labels.len()));
        self.formats.truncate(n);
    }

    /// Whether there are none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The files skipped and the conversions applied while reading.
    pub fn report(&self) -> &FolderReport {
        &self.report
    }

    /// Images per format (formats with none left out), in [`ImageFormat::ALL`] order.
    pub fn format_counts(&self) -> Vec<(ImageFormat, usize)> {
        ImageFormat::ALL
            .into_iter()
            .map(|f| (f, self.formats.iter().filter(|&&g| g == f).count()))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// `64 images (32 PNG, 32 JPEG)`.
    pub fn summary(&self) -> String {
        let n = self.len();
        let kinds: Vec<String> = self
            .format_counts()
            .into_iter()
            .map(|(f, k)| format!("{k} {f}"))
            .collect();
        format!(
            "{n} image{} ({})",
            if n == 1 { "" } else { "s" },
            kinds.join(", ")
        )
    }

    /// What was read, as JSON: `{"images": 64, "formats": {"PNG": 32, "JPEG": 32},
    /// "skipped_count": 2, "skipped": [{"file": "a.txt", "reason": "not_an_image",
    /// "detail": ""}, …], "alpha_dropped": 0, "grey16_clipped": 0, "cmyk": 0}`. `skipped`
    /// lists the first 100 files skipped; `skipped_count` counts them all.
    pub fn report_json(&self) -> serde_json::Value {
        let formats: serde_json::Map<String, serde_json::Value> = self
            .format_counts()
            .into_iter()
            .map(|(f, n)| (f.name().to_owned(), n.into()))
            .collect();
        let skipped: Vec<serde_json::Value> = self
            .report
            .skipped
            .iter()
            .take(100)
            .map(|s| {
                serde_json::json!({
                    "file": s.name, "reason": s.skip.kind(), "detail": s.skip.detail(),
                })
            })
            .collect();
        serde_json::json!({
            "images": self.len(),
            "formats": formats,
            "skipped_count": self.report.skipped.len(),
            "skipped": skipped,
            "alpha_dropped": self.report.alpha_dropped,
            "grey16_clipped": self.report.grey16_clipped,
            "cmyk": self.report.cmyk,
        })
    }

    /// Image `index` as 8-bit pixels `[channels, resolution, resolution]`.
    pub fn pixels(&self, index: usize) -> Vec<u8> {
        let (n, channels) = (self.resolution * self.resolution, self.channels);
        let px = &self.pixels[index * channels * n..(index + 1) * channels * n];
        let mut out = vec![0u8; channels * n];
        for (i, pixel) in px.chunks_exact(channels).enumerate() {
            for (c, &v) in pixel.iter().enumerate() {
                out[c * n + i] = v;
            }
        }
        out
    }

    /// Image `index` (as CHW f32 in [−1, 1], `channels` planes) and its class.
    pub fn image(&self, index: usize) -> (Vec<f32>, usize) {
        let out = self
            .pixels(index)
            .iter()
            .map(|&v| v as f32 / 127.5 - 1.0)
            .collect();
        (out, self.labels.get(index).copied().unwrap_or(0))
    }
}
