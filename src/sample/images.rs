//! Writing sampled images: PNG files (written under a temporary name, then renamed) and a
//! grid of many images in one picture.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes 8-bit HWC pixels (`channels` 1 for grey, 3 for RGB) as a PNG at `path`, so that
/// the name never points at a partial file.
pub fn write_png(
    path: &Path,
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> Result<()> {
    let tmp = path.with_extension("png.partial");
    let io = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    let png = |e: png::EncodingError| {
        Error::io(
            format!("writing {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    };
    let bytes = encode_png(pixels, width, height, channels).map_err(png)?;
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Encodes 8-bit HWC pixels (`channels` 1 for grey, 3 for RGB) as PNG bytes.
pub fn encode_png(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(if channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(pixels)?;
    }
    Ok(out)
}

/// Lays out square `side`×`side` HWC images of `channels` channels in a grid, in order, as
/// square as possible (columns = ⌈√n⌉); returns the pixels, width and height.
pub fn grid(images: &[Vec<u8>], side: usize, channels: usize) -> (Vec<u8>, usize, usize) {
    let cols = (images.len() as f64).sqrt().ceil().max(1.0) as usize;
    let rows = images.len().div_ceil(cols);
    let row_len = side * channels;
    let mut out = vec![0u8; rows * side * cols * row_len];
    for (k, img) in images.iter().enumerate() {
        let (gy, gx) = (k / cols, k % cols);
        for y in 0..side {
            let dst = ((gy * side + y) * cols * side + gx * side) * channels;
            out[dst..dst + row_len].copy_from_slice(&img[y * row_len..(y + 1) * row_len]);
        }
    }
    (out, cols * side, rows * side)
}
