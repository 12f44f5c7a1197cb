//! What an external evaluator uploads for one batch of a point, parsed and checked: 8-bit
//! images as an `.npy`, or Inception features with audit images as an `.npz`
//! (`docs/EVALUATORS.md`). Errors name the part of the upload that is wrong (`images`,
//! `features`, `audit_images`, `audit_index`, `body`); nothing here touches the index.

use std::io::Read;

use crate::error::{Error, Result};
use crate::metrics::{npy, FEATURES};

/// How an image array's axes are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[B, H, W, C]` (NumPy, PIL).
    Nhwc,
    /// `[B, C, H, W]` (PyTorch).
    Nchw,
}

impl std::str::FromStr for Layout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nhwc" => Ok(Layout::Nhwc),
            "nchw" => Ok(Layout::Nchw),
            other => Err(Error::invalid(
                "layout",
                format!("{other:?} is not nhwc or nchw"),
            )),
        }
    }
}

/// 8-bit images, channel-planar: `pixels` is `[n, c, side, side]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    /// Row-major `[n, c, side, side]`.
    pub pixels: Vec<u8>,
    /// Images.
    pub n: usize,
    /// Channels (1 or 3).
    pub c: usize,
    /// Height and width.
    pub side: usize,
}

impl Images {
    /// Image `i` as interleaved `[side, side, c]` (what PNG grids take).
    pub fn hwc(&self, i: usize) -> Vec<u8> {
        let plane = self.side * self.side;
        let image = &self.pixels[i * self.c * plane..(i + 1) * self.c * plane];
        let mut out = vec![0u8; self.c * plane];
        for p in 0..plane {
            for ch in 0..self.c {
                out[p * self.c + ch] = image[ch * plane + p];
            }
        }
        out
    }

    /// The images at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Images {
        let size = self.c * self.side * self.side;
        let mut pixels = Vec::with_capacity(rows.len() * size);
        for &r in rows {
            pixels.extend_from_slice(&self.pixels[r * size..(r + 1) * size]);
        }
        Images {
            pixels,
            n: rows.len(),
            c: self.c,
            side: self.side,
        }
    }
}

/// One batch's upload.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchUpload {
    /// The images; the server computes their features.
    Images(Images),
    /// Features computed by the evaluator, with some of the batch's images to audit them.
    Features {
        /// Row-major `[n, 2048]`.
        features: Vec<f32>,
        /// Rows of `features`.
        n: usize,
        /// The audit images.
        audit: Images,
        /// Their positions in the batch.
        audit_index: Vec<usize>,
    },
}

/// Most entries in an uploaded `.npz`.
const MAX_ENTRIES: usize = 8;

/// Reads images from an `.npy` of `uint8` `[B, H, W, C]` or `[B, C, H, W]` (C 1 or 3;
/// square images); `layout` forces the axis order, else it is read from where the 1 or 3
/// is. `field` names the array in errors.
pub fn parse_images(bytes: &[u8], field: &str, layout: Option<Layout>) -> Result<Images> {
    let (shape, values) = npy::read_u8(bytes, field)?;
    let bad = |reason: String| Error::invalid(field, reason);
    if shape.len() != 4 {
        return Err(bad(format!(
            "shape {shape:?}: images are uint8 [B, H, W, C] or [B, C, H, W]"
        )));
    }
    let channels = |v: usize| v == 1 || v == 3;
    let layout = match layout {
        Some(l) => l,
        None => match (channels(shape[3]), channels(shape[1])) {
            (true, false) => Layout::Nhwc,
            (false, true) => Layout::Nchw,
            (true, true) => {
                return Err(bad(format!(
                    "shape {shape:?}: both axis 1 and axis 3 could be channels; say which with \
                     ?layout=nhwc or ?layout=nchw"
                )))
            }
            (false, false) => {
                return Err(bad(format!(
                    "shape {shape:?}: no axis of 1 or 3 channels (images are uint8 \
                     [B, H, W, C] or [B, C, H, W] with C 1 or 3)"
                )))
            }
        },
    };
    let (n, c, h, w) = match layout {
        Layout::Nhwc => (shape[0], shape[3], shape[1], shape[2]),
        Layout::Nchw => (shape[0], shape[1], shape[2], shape[3]),
    };
    if !channels(c) {
        return Err(bad(format!(
            "shape {shape:?}: {c} channels; images have 1 (grey) or 3 (RGB)"
        )));
    }
    if h != w || h < 2 {
        return Err(bad(format!(
            "shape {shape:?}: {h}×{w} images; square images of at least 2×2 are taken"
        )));
    }
    if n == 0 {
        return Err(bad(format!("shape {shape:?}: no images")));
    }
    let pixels = match layout {
        Layout::Nchw => values,
        Layout::Nhwc => {
            let plane = h * w;
            let mut out = vec![0u8; values.len()];
            for (src, dst) in values
                .chunks_exact(c * plane)
                .zip(out.chunks_exact_mut(c * plane))
            {
                for p in 0..plane {
                    for ch in 0..c {
                        dst[ch * plane + p] = src[p * c + ch];
                    }
                }
            }
            out
        }
    };
    Ok(Images {
        pixels,
        n,
        c,
        side: h,
    })
}

/// Parses one batch's upload: an `.npy` of images, or an `.npz` holding `features`
/// (float32 `[B, 2048]`), `audit_images` (as [`parse_images`]) and optionally
/// `audit_index` (integers `[A]`; default `0 … A−1`). Entries are inflated through caps of
/// `max_bytes`. Errors name the entry.
pub fn parse_batch(bytes: &[u8], layout: Option<Layout>, max_bytes: u64) -> Result<BatchUpload> {
    if bytes.starts_with(b"\x93NUMPY") {
        return Ok(BatchUpload::Images(parse_images(bytes, "images", layout)?));
    }
    if !bytes.starts_with(b"PK\x03\x04") && !bytes.starts_with(b"PK\x05\x06") {
        return Err(Error::invalid(
            "body",
            format!(
                "{} bytes that are neither an .npy of uint8 images nor an .npz of features \
                 and audit images (docs/EVALUATORS.md)",
                bytes.len()
            ),
        ));
    }
    let mut entries = read_npz(
        bytes,
        &["features", "audit_images", "audit_index"],
        max_bytes,
    )?;
    let features_bytes = entries[0].take().ok_or_else(|| {
        Error::invalid(
            "features",
            "the .npz has no features.npy (float32 [B, 2048])",
        )
    })?;
    let (shape, features) = npy::read_f32(&features_bytes, "features")?;
    drop(features_bytes);
    if shape.len() != 2 || shape[1] != FEATURES {
        return Err(Error::invalid(
            "features",
            format!("shape {shape:?}: features are float32 [B, {FEATURES}]"),
        ));
    }
    if let Some(i) = features.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "features",
            format!(
                "row {} holds a non-finite value ({})",
                i / FEATURES,
                features[i]
            ),
        ));
    }
    let n = shape[0];
    let audit_bytes = entries[1].take().ok_or_else(|| {
        Error::invalid(
            "audit_images",
            "the .npz has no audit_images.npy: features come with some of the batch's images, \
             which the server checks them against",
        )
    })?;
    let audit = parse_images(&audit_bytes, "audit_images", layout)?;
    drop(audit_bytes);
    let audit_index = match entries[2].take() {
        None => (0..audit.n).collect(),
        Some(b) => {
            let (shape, values) = npy::read_ints(&b, "audit_index")?;
            if shape.len() != 1 || shape[0] != audit.n {
                return Err(Error::invalid(
                    "audit_index",
                    format!(
                        "shape {shape:?}: one position per audit image ({})",
                        audit.n
                    ),
                ));
            }
            let mut out = Vec::with_capacity(values.len());
            for (j, &v) in values.iter().enumerate() {
                if v < 0 || v as u64 >= n as u64 {
                    return Err(Error::invalid(
                        format!("audit_index[{j}]"),
                        format!("{v} is not a position in the batch's {n} images"),
                    ));
                }
                if out.contains(&(v as usize)) {
                    return Err(Error::invalid(
                        format!("audit_index[{j}]"),
                        format!("{v} is listed twice"),
                    ));
                }
                out.push(v as usize);
            }
            out
        }
    };
    if audit.n > n {
        return Err(Error::invalid(
            "audit_images",
            format!("{} audit images for a batch of {n}", audit.n),
        ));
    }
    Ok(BatchUpload::Features {
        features,
        n,
        audit,
        audit_index,
    })
}

/// The entries `names` (`name.npy` in the archive) of an `.npz`, each inflated through a cap
/// of `max_bytes`; entries not named are refused.
pub fn read_npz(bytes: &[u8], names: &[&str], max_bytes: u64) -> Result<Vec<Option<Vec<u8>>>> {
    let bad = |reason: String| Error::invalid("body", reason);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable .npz (ZIP archive): {e}")))?;
    if archive.len() > MAX_ENTRIES {
        return Err(bad(format!(
            "an .npz of {} entries; at most {MAX_ENTRIES}",
            archive.len()
        )));
    }
    let found: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    for f in &found {
        let stem = f.strip_suffix(".npy").unwrap_or(f);
        if !names.contains(&stem) {
            return Err(bad(format!(
                "the .npz holds {f:?}; it takes {}",
                names
                    .iter()
                    .map(|n| format!("{n}.npy"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let file = format!("{name}.npy");
        if archive.index_for_name(&file).is_none() {
            out.push(None);
            continue;
        }
        let mut entry = archive
            .by_name(&file)
            .map_err(|e| Error::invalid(*name, format!("{file}: {e}")))?;
        let mut data = Vec::new();
        (&mut entry)
            .take(max_bytes + 1)
            .read_to_end(&mut data)
            .map_err(|e| Error::invalid(*name, format!("{file} does not inflate: {e}")))?;
        if data.len() as u64 > max_bytes {
            return Err(Error::invalid(
                *name,
                format!("{file} inflates past {max_bytes} bytes, the upload limit"),
            ));
        }
        out.push(Some(data));
    }
    Ok(out)
}

/// The relative L2 difference `‖a − b‖₂ / ‖b‖₂` of two feature rows (`b` the server's).
pub fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_u8(shape: &[usize], values: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        npy::write_u8(&mut out, shape, values).unwrap();
        out
    }

    #[test]
    fn layouts_are_read_from_the_channel_axis() {
        // Two 2×2 RGB images, HWC: pixel p of image i has channels (i, p, ch).
        let hwc: Vec<u8> = (0..2u8)
            .flat_map(|i| (0..4u8).flat_map(move |p| (0..3u8).map(move |ch| i * 100 + p * 10 + ch)))
            .collect();
        let a = parse_images(&npy_u8(&[2, 2, 2, 3], &hwc), "images", None).unwrap();
        assert_eq!((a.n, a.c, a.side), (2, 3, 2));
        assert_eq!(a.hwc(1), hwc[12..].to_vec());
        let chw = a.pixels.clone();
        let b = parse_images(&npy_u8(&[2, 3, 2, 2], &chw), "images", None).unwrap();
        assert_eq!(a, b);
        let e = parse_images(&npy_u8(&[2, 3, 3, 3], &[0; 54]), "images", None).unwrap_err();
        assert!(e.to_string().contains("layout"), "{e}");
        let e = parse_images(&npy_u8(&[2, 4, 2, 4], &[0; 64]), "images", None).unwrap_err();
        assert!(e.to_string().starts_with("images: "), "{e}");
        let e = parse_images(&npy_u8(&[1, 2, 4, 3], &[0; 24]), "images", None).unwrap_err();
        assert!(e.to_string().contains("square"), "{e}");
    }

    #[test]
    fn garbage_and_wrong_dtypes_are_refused_by_name() {
        let e = parse_batch(&[7u8; 1000], None, 1 << 20).unwrap_err();
        assert!(e.to_string().starts_with("body: "), "{e}");
        let mut f32s = Vec::new();
        npy::write_f32(&mut f32s, &[1, 2, 2, 1], &[0.0; 4]).unwrap();
        let e = parse_batch(&f32s, None, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("uint8"), "{e}");
        assert_eq!(relative_difference(&[1.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((relative_difference(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
    }
}
