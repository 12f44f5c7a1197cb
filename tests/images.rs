//! Image folders as users have them (pytorch-fid #50: JPEGs beside PNGs were skipped without
//! a word) and KID on small sets (torch-fidelity #8, #45: a zero standard error), against
//! PIL's pixels and PyTorch's features written by `scripts/image_reference.py`.
//!
//! Fixtures: `tests/fixtures/image_formats/` (one file per format and pixel mode) with PIL's
//! `convert('RGB')` of each in `image_formats.safetensors`; `tests/fixtures/mixed_images/`
//! (32 PNG + 32 JPEG, 32×32, from Fashion-MNIST) with PIL's pixels and NVIDIA Inception
//! features from PyTorch in `mixed_images.safetensors`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hindsight::datasets::decode::decode;
use hindsight::datasets::{Dataset, ImageFolder, ImageFormat};
use hindsight::metrics::{FeatureExtractor, FEATURES};

mod common;
use common::{real_inception_weights, run_with_stdin};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Tensors (raw bytes and shape) and metadata of a safetensors fixture.
struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
    metadata: HashMap<String, String>,
}

fn load(name: &str) -> Fixture {
    let bytes = std::fs::read(fixtures().join(name)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    Fixture { tensors, metadata }
}

/// `max |got − want| / max |want|`.
fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn every_format_decodes_to_pils_pixels() {
    let fixture = load("image_formats.safetensors");
    let modes: HashMap<String, String> = serde_json::from_str(&fixture.metadata["modes"]).unwrap();
    let dir = fixtures().join("image_formats");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), fixture.tensors.len(), "{names:?}");
    for name in &names {
        let (shape, want) = &fixture.tensors[name];
        let img = decode(&std::fs::read(dir.join(name)).unwrap(), name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!([img.height, img.width, 3], shape[..], "{name}");
        let differing = img.rgb.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{name} ({}): values differing from PIL's",
            modes[name]
        );
        // Greyscale as PIL's mode says, but for a 16-bit grey-with-alpha PNG (PIL widens it
        // to RGBA) and an 8-bit BMP (a palette of greys to both).
        let grey = ["L", "LA", "I;16", "I"].contains(&modes[name].as_str());
        let widened = name == "grey_alpha16.png";
        let palette = name == "grey.bmp";
        assert_eq!(
            img.grey,
            (grey || widened) && !palette,
            "{name}: {}",
            modes[name]
        );
    }
    eprintln!(
        "{} files equal to PIL {} (libjpeg-turbo {})",
        names.len(),
        fixture.metadata["pillow"],
        fixture.metadata["libjpeg_turbo"]
    );
}

/// The mixed folder's file names (sorted), PIL's pixels `[64, 32, 32, 3]` and, when written,
/// PyTorch's features.
fn mixed() -> (Vec<String>, Vec<u8>, Option<Vec<f32>>) {
    let fixture = load("mixed_images.safetensors");
    let names: Vec<String> = serde_json::from_str(&fixture.metadata["names"]).unwrap();
    let (shape, pixels) = fixture.tensors["pixels_u8"].clone();
    assert_eq!(shape, [names.len(), 32, 32, 3]);
    let features = fixture.tensors.get("features").map(|(_, b)| f32s(b));
    (names, pixels, features)
}

/// HWC pixels of images `[n, 32, 32, 3]` as the CHW rows a folder yields.
fn chw(hwc: &[u8]) -> Vec<u8> {
    let n = 32 * 32;
    let mut out = vec![0; hwc.len()];
    for (img, src) in out.chunks_exact_mut(3 * n).zip(hwc.chunks_exact(3 * n)) {
        for (i, px) in src.chunks_exact(3).enumerate() {
            for c in 0..3 {
                img[c * n + i] = px[c];
            }
        }
    }
    out
}

#[test]
fn mixed_png_and_jpeg_folder_gives_pils_pixels() {
    let (names, pixels, _) = mixed();
    let folder = ImageFolder::open(&fixtures().join("mixed_images")).unwrap();
    assert_eq!(
        (folder.len(), folder.resolution, folder.channels),
        (64, 32, 3)
    );
    assert_eq!(folder.summary(), "64 images (32 PNG, 32 JPEG)");
    assert!(folder.report().skipped.is_empty(), "{:?}", folder.report());
    let want = chw(&pixels);
    let per_image = 3 * 32 * 32;
    for (i, name) in names.iter().enumerate() {
        let got = folder.pixels(i);
        let differing = got
            .iter()
            .zip(&want[i * per_image..(i + 1) * per_image])
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "{name}: values differing from PIL's");
    }

    // The same files in a ZIP, some stored and some deflated, in another order.
    let dir = tempfile::tempdir().unwrap();
    let zip_path = dir.path().join("mixed.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).unwrap());
    for (k, name) in names.iter().rev().enumerate() {
        let method = if k % 2 == 0 {
            zip::CompressionMethod::Stored
        } else {
            zip::CompressionMethod::Deflated
        };
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        zip.start_file(format!("images/{name}"), options).unwrap();
        let bytes = std::fs::read(fixtures().join("mixed_images").join(name)).unwrap();
        std::io::Write::write_all(&mut zip, &bytes).unwrap();
    }
    zip.finish().unwrap();
    let zipped = ImageFolder::open(&zip_path).unwrap();
    assert_eq!(zipped.summary(), folder.summary());
    assert!((0..64).all(|i| zipped.pixels(i) == folder.pixels(i)));
}

/// The mixed fixture copied to a temporary folder.
fn copy_mixed(names: &[String], into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for name in names {
        std::fs::copy(fixtures().join("mixed_images").join(name), into.join(name)).unwrap();
    }
}

#[test]
fn the_cli_counts_formats_and_names_what_it_skips() {
    let (names, _, _) = mixed();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    copy_mixed(&names, &images);
    std::fs::write(images.join("notes.txt"), "how these were made\n").unwrap();
    // A JPEG cut in half, as an interrupted copy leaves it.
    let jpeg = std::fs::read(images.join("img_01.jpg")).unwrap();
    std::fs::write(images.join("bad.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("ref.npz");
    let args = [
        "ref-stats",
        images.to_str().unwrap(),
        "--pixel-projection",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = run_with_stdin(&args, "", &data);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("no warning in {stderr}"));
    assert!(
        warning.contains(
            "64 images (32 PNG, 32 JPEG); skipped 2 files: bad.jpg (corrupt: JPEG: truncated"
        ) && warning.contains("notes.txt (not an image)"),
        "{warning}"
    );
    assert!(
        stderr.contains("64 images (32×32, 3 channel(s))"),
        "{stderr}"
    );
    assert!(out.is_file());

    // Nothing that decodes: an error naming what was found.
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::rename(images.join("notes.txt"), junk.join("notes.txt")).unwrap();
    std::fs::rename(images.join("bad.jpg"), junk.join("bad.jpg")).unwrap();
    let args = [
        "ref-stats",
        junk.to_str().unwrap(),
        "--pixel-projection",
        "--out",
        "x.npz",
    ];
    let run = run_with_stdin(&args, "", &data);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("no images found")
            && stderr.contains("bad.jpg (corrupt: JPEG: truncated")
            && stderr.contains("notes.txt (not an image)"),
        "{stderr}"
    );
}

#[test]
fn mixed_folder_features_match_pytorch_on_nvidias_weights() {
    let Some(weights) = real_inception_weights() else {
        return;
    };
    let (_, _, features) = mixed();
    let want = features.expect("mixed_images.safetensors holds features (written with WEIGHTS)");
    let extractor = FeatureExtractor::open(Some(&weights)).unwrap();
    let folder = fixtures().join("mixed_images");
    let dataset = Dataset::open(folder.to_str().unwrap(), 32, 0, 0).unwrap();
    let got = extractor.dataset_features(&dataset, None, 16, &()).unwrap();
    assert_eq!(got.len(), 64 * FEATURES);
    let e = max_rel(&got, &want);
    eprintln!("mixed PNG/JPEG folder, real weights: max error {e:.2e} relative to PyTorch's");
    assert!(e <= 1e-4, "{e:e}");
}

#[test]
fn kid_of_six_against_six_images_has_a_real_standard_error() {
    let Some(weights) = real_inception_weights() else {
        return;
    };
    let (names, _, _) = mixed();
    let dir = tempfile::tempdir().unwrap();
    let is_png = |n: &&String| n.to_lowercase().ends_with(".png");
    let pngs: Vec<String> = names.iter().filter(is_png).take(6).cloned().collect();
    let jpegs: Vec<String> = names
        .iter()
        .filter(|n| !is_png(n))
        .take(6)
        .cloned()
        .collect();
    copy_mixed(&pngs, &dir.path().join("a"));
    copy_mixed(&jpegs, &dir.path().join("b"));
    let side = |s: &str| dir.path().join(s).to_str().unwrap().to_owned();
    let (a, b) = (side("a"), side("b"));
    let weights = weights.to_str().unwrap();
    let args = ["fid", &a, &b, "--weights", weights, "--json"];
    let run = run_with_stdin(&args, "", &dir.path().join("data"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let kid = &json["kid"];
    assert_eq!(kid["method"], "jackknife", "{json}");
    assert_eq!(kid["sizes"], serde_json::json!([6, 6]));
    let (mean, se) = (
        kid["mean"].as_f64().unwrap(),
        kid["std_error"].as_f64().unwrap(),
    );
    eprintln!("KID of 6 PNG against 6 JPEG images: {mean:.6} ± {se:.6}");
    // The subsets' spread gave 5e-17 here; a jackknife error is of the order of the estimate.
    assert!(se > 1e-3 && se > 0.05 * mean.abs(), "{json}");
    assert_eq!(json["read_a"]["formats"], serde_json::json!({"PNG": 6}));
    assert_eq!(json["read_b"]["formats"], serde_json::json!({"JPEG": 6}));
    let warnings = json["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("jackknife")),
        "{json}"
    );
    assert!(
        stderr.contains("warning: KID: the smaller set (6 features) is no larger than the subset"),
        "{stderr}"
    );
}

/// How far FID moves when the JPEGs are decoded by the `image` crate's own decoder
/// (zune-jpeg) instead of libjpeg-turbo's. Measured with NVIDIA's weights on the mixed
/// fixture (32×32 Fashion-MNIST images, JPEG quality 75–90): see the printed figures and the
/// note in `src/datasets/decode.rs`. A measurement, run on request:
/// `cargo test --release --test images -- --ignored jpeg_decoder`.
#[test]
#[ignore = "a measurement with the real weights; .ci/run runs it with --ignored"]
fn jpeg_decoder_choice_moves_fid() {
    let Some(weights) = real_inception_weights() else {
        return;
    };
    let (names, _, _) = mixed();
    let extractor = FeatureExtractor::open(Some(&weights)).unwrap();
    let dir = fixtures().join("mixed_images");
    let (mut png, mut ours, mut zune) = (Vec::new(), Vec::new(), Vec::new());
    let (mut differing, mut values) = (0, 0);
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let img = decode(&bytes, name).unwrap();
        if img.format == ImageFormat::Png {
            png.extend(chw(&img.rgb));
            continue;
        }
        let other = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8()
            .into_raw();
        differing += img.rgb.iter().zip(&other).filter(|(a, b)| a != b).count();
        values += other.len();
        ours.extend(chw(&img.rgb));
        zune.extend(chw(&other));
    }
    let stats = |pixels: &[u8]| {
        let n = pixels.len() / (3 * 32 * 32);
        let f = extractor.features(pixels, n, 3, 32, 32).unwrap();
        hindsight::metrics::statistics(&f, FEATURES).unwrap()
    };
    let (png, ours, zune) = (stats(&png), stats(&ours), stats(&zune));
    let fid = |a, b| hindsight::metrics::frechet_distance_of(a, b).unwrap();
    let (with_ours, with_zune, between) = (fid(&png, &ours), fid(&png, &zune), fid(&ours, &zune));
    eprintln!(
        "zune-jpeg differs from libjpeg-turbo in {differing} of {values} values; FID(32 PNG, 32 \
         JPEG) {with_ours:.4} with libjpeg-turbo's pixels, {with_zune:.4} with zune-jpeg's \
         ({:+.4}); FID between the two decodings of the same JPEGs {between:.4}",
        with_zune - with_ours
    );
    assert!(differing > 0 && between > 0.0);
}
