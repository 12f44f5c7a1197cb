//! One image file to 8-bit RGB pixels, as PIL gives them to pytorch-fid and EDM2.
//!
//! The reference pipelines read images with PIL: pytorch-fid as
//! `Image.open(path).convert('RGB')`, EDM2 (`training/dataset.py`, `_load_raw_image`) as
//! `np.array(PIL.Image.open(f))`, whose greyscale images the Inception detector replicates to
//! three channels. The two agree on greyscale and RGB files; for the modes EDM2 cannot feed
//! its detector (alpha, palettes, 16 bits, CMYK) this module does what `convert('RGB')` does:
//!
//! - **JPEG** (arithmetic-coded ones too) is decoded by libjpeg-turbo's decoder (the `mozjpeg` crate, built from its C
//!   sources; Pillow's wheels bundle libjpeg-turbo): the default integer IDCT and fancy
//!   upsampling give the very pixels PIL gives. Pure-Rust decoders do not: on 133 JPEGs
//!   (4:2:0, 4:2:2, 4:4:4, greyscale, progressive, restart markers, odd sizes, quality
//!   50–100) against Pillow 13.0 with libjpeg-turbo 3.2, mozjpeg differed in no value,
//!   zune-jpeg (the `image` crate's decoder) in 12 % of them (by up to 21), jpeg-decoder in
//!   8 % (by up to 4). On `tests/fixtures/mixed_images` zune-jpeg's pixels move
//!   FID(32 PNG, 32 JPEG) from 227.00 to 227.36 (`jpeg_decoder_choice_moves_fid` in
//!   `tests/images.rs`). A JPEG that stops before its end-of-image
//!   marker is corrupt, as PIL finds it ("image file is truncated"), although libjpeg would
//!   fill the rest with grey. CMYK JPEGs are read as PIL reads them (Adobe's inverted
//!   samples) and converted with PIL's formula, `255 − k' − c'·(255 − k')/255` per channel.
//! - **Everything else** (PNG, WebP, BMP, TIFF, GIF, ICO, PPM/PGM/PBM, TGA, QOI, DDS: the
//!   formats both PIL and the `image` crate read) is decoded by the `image` crate. Its output
//!   equals PIL's on every kind in `tests/fixtures/image_formats` (lossy WebP included).
//! - **Alpha** is dropped, not composited (PIL's `RGBA → RGB`); palettes are expanded
//!   (transparency ignored).
//! - **16 bits**: greyscale is clipped to 255 (`I;16 → RGB` in PIL clips; it does not scale),
//!   colour and grey-with-alpha keep the high byte (PIL unpacks `RGB;16B` that way).
//! - **Animations** (GIF, WebP, APNG): the first frame.
//! - EXIF orientation is not applied (neither reference applies it).
//!
//! Which format a file holds is decided by its content (as PIL does), the extension only
//! where a format has no signature (TGA).

use std::fmt;
use std::io::Cursor;

/// Side of the largest image read, in pixels (per side); larger ones are skipped as
/// unsupported before their pixels are allocated.
pub const MAX_IMAGE_SIDE: usize = 8_192;

/// The image formats read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageFormat {
    /// PNG (APNG: the default image).
    Png,
    /// JPEG (baseline, progressive, greyscale, YCbCr, RGB, CMYK).
    Jpeg,
    /// WebP, lossy and lossless.
    Webp,
    /// Windows bitmap.
    Bmp,
    /// TIFF.
    Tiff,
    /// GIF.
    Gif,
    /// Windows icon (its largest image).
    Ico,
    /// Netpbm: PBM, PGM, PPM, PAM.
    Pnm,
    /// Truevision TGA.
    Tga,
    /// QOI.
    Qoi,
    /// DirectDraw surface.
    Dds,
}

impl ImageFormat {
    /// Every format, in display order.
    pub const ALL: [ImageFormat; 11] = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Webp,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::Gif,
        ImageFormat::Ico,
        ImageFormat::Pnm,
        ImageFormat::Tga,
        ImageFormat::Qoi,
        ImageFormat::Dds,
    ];

    /// The format's usual name: `PNG`, `JPEG`, `WebP`, …
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Webp => "WebP",
            ImageFormat::Bmp => "BMP",
            ImageFormat::Tiff => "TIFF",
            ImageFormat::Gif => "GIF",
            ImageFormat::Ico => "ICO",
            ImageFormat::Pnm => "PNM",
            ImageFormat::Tga => "TGA",
            ImageFormat::Qoi => "QOI",
            ImageFormat::Dds => "DDS",
        }
    }

    fn of(format: image::ImageFormat) -> Option<Self> {
        Some(match format {
            image::ImageFormat::Png => ImageFormat::Png,
            image::ImageFormat::Jpeg => ImageFormat::Jpeg,
            image::ImageFormat::WebP => ImageFormat::Webp,
            image::ImageFormat::Bmp => ImageFormat::Bmp,
            image::ImageFormat::Tiff => ImageFormat::Tiff,
            image::ImageFormat::Gif => ImageFormat::Gif,
            image::ImageFormat::Ico => ImageFormat::Ico,
            image::ImageFormat::Pnm => ImageFormat::Pnm,
            image::ImageFormat::Tga => ImageFormat::Tga,
            image::ImageFormat::Qoi => ImageFormat::Qoi,
            image::ImageFormat::Dds => ImageFormat::Dds,
            _ => return None,
        })
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What became of a file's pixels on the way to 8-bit RGB, beyond decoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conversions {
    /// It had an alpha channel, dropped.
    pub alpha_dropped: bool,
    /// It was 16-bit greyscale, clipped to 0–255 as PIL clips it.
    pub grey16_clipped: bool,
    /// It was a CMYK JPEG, converted as PIL converts it.
    pub cmyk: bool,
}

/// One decoded image.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Whether the file holds greyscale (one channel, with or without alpha; a greyscale
    /// JPEG): its three channels below are equal.
    pub grey: bool,
    /// Pixels, row-major `[height, width, 3]`, RGB, 8 bits.
    pub rgb: Vec<u8>,
    /// The file's format.
    pub format: ImageFormat,
    /// Conversions applied.
    pub conversions: Conversions,
}

/// Why a file is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its content is no image format, and its name does not claim one.
    NotAnImage,
    /// An image this reader does not take (a format without an 8-bit reading, an image larger
    /// than [`MAX_IMAGE_SIDE`]), with what it is.
    Unsupported(String),
    /// It claims an image format (by content or extension) and does not decode, with the
    /// decoder's complaint.
    Corrupt(String),
    /// It could not be read (permissions, an I/O error, a ZIP member that does not inflate).
    Unreadable(String),
}

impl Skip {
    /// The kind as JSON writes it: `not_an_image`, `unsupported`, `corrupt`, `unreadable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Skip::NotAnImage => "not_an_image",
            Skip::Unsupported(_) => "unsupported",
            Skip::Corrupt(_) => "corrupt",
            Skip::Unreadable(_) => "unreadable",
        }
    }

    /// The detail (empty for [`Skip::NotAnImage`]).
    pub fn detail(&self) -> &str {
        match self {
            Skip::NotAnImage => "",
            Skip::Unsupported(d) | Skip::Corrupt(d) | Skip::Unreadable(d) => d,
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotAnImage => f.write_str("not an image"),
            Skip::Unsupported(d) => write!(f, "unsupported: {d}"),
            Skip::Corrupt(d) => write!(f, "corrupt: {d}"),
            Skip::Unreadable(d) => write!(f, "unreadable: {d}"),
        }
    }
}

/// Decodes the file `name` (used for its extension only) holding `bytes`, as described in the
/// module docs.
///
/// Errors: the [`Skip`] that says why the file is not an image this reader uses.
pub fn decode(bytes: &[u8], name: &str) -> Result<DecodedImage, Skip> {
    let by_name = image::ImageFormat::from_path(name).ok();
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        // TGA has no signature: its extension is all there is to go on.
        Err(_) if by_name == Some(image::ImageFormat::Tga) => image::ImageFormat::Tga,
        Err(_) => {
            return Err(match by_name {
                Some(f) => Skip::Corrupt(format!(
                    "named as {} but its content is no image format",
                    f.extensions_str()
                        .first()
                        .unwrap_or(&"an image")
                        .to_uppercase()
                )),
                None => Skip::NotAnImage,
            })
        }
    };
    let Some(ours) = ImageFormat::of(format) else {
        return Err(Skip::Unsupported(format!(
            "{format:?} images are not read (no 8-bit reading that matches PIL's)"
        )));
    };
    if ours == ImageFormat::Jpeg {
        return decode_jpeg(bytes);
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE as u32);
    limits.max_image_height = Some(MAX_IMAGE_SIDE as u32);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => Skip::Unsupported(format!(
            "{e} (at most {MAX_IMAGE_SIDE} pixels a side are read)"
        )),
        image::ImageError::Unsupported(e) => Skip::Unsupported(e.to_string()),
        e => Skip::Corrupt(format!("{ours}: {e}")),
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (grey, rgb, conversions) = to_rgb(img, ours)?;
    Ok(DecodedImage {
        width,
        height,
        grey,
        rgb,
        format: ours,
        conversions,
    })
}

/// 8-bit RGB of a decoded image, with PIL's `convert('RGB')` rules (module docs).
fn to_rgb(
    img: image::DynamicImage,
    format: ImageFormat,
) -> Result<(bool, Vec<u8>, Conversions), Skip> {
    use image::DynamicImage as D;
    let high = |v: u16| (v >> 8) as u8;
    let alpha = Conversions {
        alpha_dropped: true,
        ..Conversions::default()
    };
    let none = Conversions::default();
    Ok(match img {
        D::ImageLuma8(i) => (true, i.iter().flat_map(|&v| [v; 3]).collect(), none),
        D::ImageLumaA8(i) => (true, i.chunks(2).flat_map(|p| [p[0]; 3]).collect(), alpha),
        D::ImageRgb8(i) => (false, i.into_raw(), none),
        D::ImageRgba8(i) => (
            false,
            i.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
            alpha,
        ),
        D::ImageLuma16(i) => (
            true,
            i.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
            Conversions {
                grey16_clipped: true,
                ..none
            },
        ),
        D::ImageLumaA16(i) => (
            true,
            i.chunks(2).flat_map(|p| [high(p[0]); 3]).collect(),
            alpha,
        ),
        D::ImageRgb16(i) => (false, i.iter().map(|&v| high(v)).collect(), none),
        D::ImageRgba16(i) => (
            false,
            i.chunks(4)
                .flat_map(|p| [high(p[0]), high(p[1]), high(p[2])])
                .collect(),
            alpha,
        ),
        other => {
            return Err(Skip::Unsupported(format!(
                "{format} with {:?} pixels (floating point): no 8-bit reading matches PIL's",
                other.color()
            )))
        }
    })
}

/// A JPEG through libjpeg-turbo's decoder (see the module docs).
fn decode_jpeg(bytes: &[u8]) -> Result<DecodedImage, Skip> {
    end_of_image(bytes).map_err(|e| Skip::Corrupt(format!("JPEG: {e}")))?;
    // libjpeg reports fatal errors through a callback that must not return; the mozjpeg crate
    // unwinds out of it, and the unwinding is caught here.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, u8, Vec<u8>)> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = decompress.size();
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("{w}×{h} is larger than {MAX_IMAGE_SIDE} pixels a side"),
            ));
        }
        let (channels, mut started) = match decompress.image()? {
            mozjpeg::Format::RGB(s) => (3, s),
            mozjpeg::Format::Gray(s) => (1, s),
            mozjpeg::Format::CMYK(s) => (4, s),
        };
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok((w, h, channels, pixels))
    });
    let (width, height, channels, pixels) = match decoded {
        Ok(Ok(d)) => d,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            return Err(Skip::Unsupported(format!("JPEG: {e}")))
        }
        Ok(Err(e)) => return Err(Skip::Corrupt(format!("JPEG: {e}"))),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            let message = message.trim_start_matches("libjpeg fatal error: ");
            return Err(Skip::Corrupt(format!("JPEG: {message}")));
        }
    };
    let mut conversions = Conversions::default();
    let rgb = match channels {
        1 => pixels.iter().flat_map(|&v| [v; 3]).collect(),
        3 => pixels,
        _ => {
            conversions.cmyk = true;
            pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect()
        }
    };
    if rgb.len() != width * height * 3 {
        return Err(Skip::Corrupt(format!(
            "JPEG: {} bytes of pixels for {width}×{height}",
            rgb.len()
        )));
    }
    Ok(DecodedImage {
        width,
        height,
        grey: channels == 1,
        rgb,
        format: ImageFormat::Jpeg,
        conversions,
    })
}

/// PIL's reading of a CMYK JPEG pixel: the samples are taken as Adobe writes them (inverted,
/// PIL's raw mode `CMYK;I`), then `CMYK → RGB` as Pillow's `cmyk2rgb`: each channel is
/// `nk − x·nk/255` with `nk = 255 − k`, the product rounded as `MULDIV255`.
fn cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let nk = px[3] as u32;
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let channel = |raw: u8| (nk - muldiv255(255 - raw as u32, nk)) as u8;
    [channel(px[0]), channel(px[1]), channel(px[2])]
}

/// Checks that a JPEG stream reaches its end-of-image marker (EOI), walking the marker
/// segments and the entropy-coded data between them (where `0xFF` is followed by a stuffed
/// `0x00` or a restart marker). A file that ends first is truncated: libjpeg would quietly
/// fill its missing rows with grey, PIL refuses it. Linear in the length, no allocation.
fn end_of_image(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("no start-of-image marker".into());
    }
    let truncated = || Err("truncated: the file ends before the end-of-image marker".to_owned());
    let mut i = 2;
    loop {
        // The next marker: fill bytes 0xFF, then its code. libjpeg tolerates stray bytes
        // before a marker (with a warning), and so does this walk.
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return truncated();
        };
        i += 1;
        match code {
            0xD9 => return Ok(()),
            // Markers without a length: restart markers, TEM, and a stuffed zero met outside
            // of a scan.
            0x00 | 0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(i), bytes.get(i + 1)) else {
            return truncated();
        };
        let length = u16::from_be_bytes([hi, lo]) as usize;
        if length < 2 {
            return Err(format!(
                "a marker segment at byte {} has length {length}",
                i - 2
            ));
        }
        i += length;
        if i > bytes.len() {
            return truncated();
        }
        if code == 0xDA {
            // Start of scan: entropy-coded data up to the next marker that is not a stuffed
            // zero or a restart marker.
            loop {
                while i < bytes.len() && bytes[i] != 0xFF {
                    i += 1;
                }
                match bytes.get(i + 1) {
                    None => return truncated(),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, colour: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(colour);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .unwrap()
            .write_image_data(data)
            .unwrap();
        out
    }

    #[track_caller]
    fn check(bytes: &[u8], name: &str, expect: Result<(bool, &[u8]), &str>) {
        match (decode(bytes, name), expect) {
            (Ok(img), Ok((grey, rgb))) => {
                assert_eq!((img.grey, img.rgb.as_slice()), (grey, rgb), "{name}")
            }
            (Err(skip), Err(want)) => {
                let got = skip.to_string();
                assert!(got.starts_with(want), "{name}: {got:?} is not {want:?}…")
            }
            (got, want) => panic!("{name}: {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn pixels_and_refusals() {
        // Grey replicated; alpha dropped without compositing.
        check(
            &png(2, 1, png::ColorType::Grayscale, &[7, 200]),
            "g.png",
            Ok((true, &[7, 7, 7, 200, 200, 200])),
        );
        check(
            &png(1, 1, png::ColorType::Rgba, &[10, 20, 30, 0]),
            "a.png",
            Ok((false, &[10, 20, 30])),
        );
        // The content decides, not the extension.
        check(
            &png(1, 1, png::ColorType::Rgb, &[1, 2, 3]),
            "actually-a-png.JPG",
            Ok((false, &[1, 2, 3])),
        );
        check(b"hello", "notes.txt", Err("not an image"));
        check(b"hello", "notes", Err("not an image"));
        check(
            b"hello",
            "x.Jpeg",
            Err("corrupt: named as JPG but its content"),
        );
        let mut bad = png(1, 1, png::ColorType::Rgb, &[1, 2, 3]);
        bad.truncate(bad.len() - 20);
        check(&bad, "t.png", Err("corrupt: PNG: "));
        check(
            &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16],
            "j.jpg",
            Err("corrupt: JPEG: truncated"),
        );
        check(&[0xFF, 0xD8, 0xFF, 0xD9], "j.jpg", Err("corrupt: JPEG: "));
    }

    #[test]
    fn cmyk_follows_pil() {
        // Adobe-inverted samples: 255 is no ink. No ink at all is white, full black ink black.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // Full cyan, no black: no red.
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
        // Half black (k' = 127 → nk = 127), no colour ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 127]), [127, 127, 127]);
    }

    #[test]
    fn end_of_image_walks_segments_and_scans() {
        // SOI, an APP1 segment that holds an EOI of its own (an EXIF thumbnail's), SOS with
        // stuffed 0xFF 0x00 and a restart marker in its data, then the file's EOI.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1, 0, 6, 0xFF, 0xD9, 0, 0];
        jpeg.extend([
            0xFF, 0xDA, 0, 4, 1, 2, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56,
        ]);
        assert_eq!(
            end_of_image(&[jpeg.as_slice(), &[0xFF, 0xD9]].concat()),
            Ok(())
        );
        // Cut anywhere before the last marker: truncated, the thumbnail's EOI notwithstanding.
        for cut in 2..jpeg.len() {
            assert!(end_of_image(&jpeg[..cut]).is_err(), "cut at {cut}");
        }
        assert!(end_of_image(b"\x89PNG").is_err());
    }
}
