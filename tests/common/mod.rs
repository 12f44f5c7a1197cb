//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod snapshot;
pub mod tiny;

// The API client over TCP, at the path the tests have always used.
#[allow(unused_imports)]
pub use self::http::http;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use hindsight::phema::{Snapshot, Target, Width};

/// Runs the `hindsight` binary with `args`, `stdin` as its standard input and `data_dir` as
/// `HINDSIGHT_DATA_DIR`; returns its exit status and output.
pub fn run_with_stdin(args: &[&str], stdin: &str, data_dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(args)
        .env("HINDSIGHT_DATA_DIR", data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Snapshots at the given times, one per width at each time.
pub fn snapshots(times: &[u64], sigma_rels: &[f64]) -> Vec<Snapshot> {
    times
        .iter()
        .flat_map(|&t| {
            sigma_rels.iter().map(move |&s| Snapshot {
                nimg: t,
                width: Width::SigmaRel(s),
            })
        })
        .collect()
}

/// A σ_rel target at `nimg` (or the last snapshot when `None`).
pub fn target(sigma_rel: f64, nimg: Option<u64>) -> Target {
    Target {
        width: Width::SigmaRel(sigma_rel),
        nimg,
    }
}

/// Asserts `|got − expect| ≤ tol · max(1, |expect|)`.
#[track_caller]
pub fn assert_close(got: f64, expect: f64, tol: f64) {
    assert!(
        (got - expect).abs() <= tol * expect.abs().max(1.0),
        "got {got:e}, expected {expect:e} (tolerance {tol:e})"
    );
}

/// The repository's `tests/fixtures/<name>`, or the file `$var` names.
pub fn fixture(var: &str, default: &str) -> std::path::PathBuf {
    std::env::var_os(var)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(default)
        })
}

/// pytorch-fid Inception tensors with the formula weights of `metrics_fixtures.json` (the
/// parity fixture's), by pytorch-fid name.
pub fn formula_inception_tensors() -> std::collections::HashMap<String, candle_core::Tensor> {
    use hindsight::model::formula::{self, Kind};
    let path = fixture("HINDSIGHT_MODEL_FIXTURES_JSON", "metrics_fixtures.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let spec = json["fid_inception"]["weight_spec"].as_object().unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (key, s) in spec {
        let shape: Vec<usize> = serde_json::from_value(s["shape"].clone()).unwrap();
        let kind: Kind = serde_json::from_value(s["kind"].clone()).unwrap();
        let values = formula::values(
            key,
            shape.iter().product(),
            kind,
            s["scale"].as_f64().unwrap_or(1.0),
            s["offset"].as_f64().unwrap_or(0.0),
        );
        tensors.insert(
            key.clone(),
            candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap(),
        );
    }
    tensors
}

/// Writes the formula Inception weights as a safetensors file (which hindsight reads as
/// pytorch-fid weights): a stand-in where the real weights are not needed.
pub fn write_formula_inception(path: &std::path::Path) {
    candle_core::safetensors::save(&formula_inception_tensors(), path).unwrap();
}

/// The real Inception weights (NVIDIA's, as `metrics::locate_weights` finds them), or `None`
/// with the reason printed — unless `HINDSIGHT_REQUIRE_FID_WEIGHTS=1` (set by `.ci/run`, which
/// fetches them), where their absence fails the test.
pub fn real_inception_weights() -> Option<std::path::PathBuf> {
    match hindsight::metrics::locate_weights(None) {
        Ok(p) => Some(p),
        Err(e) if std::env::var("HINDSIGHT_REQUIRE_FID_WEIGHTS").as_deref() == Ok("1") => {
            panic!("HINDSIGHT_REQUIRE_FID_WEIGHTS=1 but {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED (no Inception weights here; CI has them): {e}");
            None
        }
    }
}

/// Whether Debian's Fashion-MNIST is installed; like [`real_inception_weights`], its absence
/// skips with a printed reason unless `HINDSIGHT_REQUIRE_FID_WEIGHTS=1`.
pub fn fashion_mnist_present() -> bool {
    let dir = std::path::Path::new(hindsight::datasets::idx::FASHION_MNIST_DIR);
    if dir.join("t10k-images-idx3-ubyte.gz").is_file() {
        return true;
    }
    let reason = format!(
        "Fashion-MNIST is not in {} (apt-get install dataset-fashion-mnist)",
        dir.display()
    );
    if std::env::var("HINDSIGHT_REQUIRE_FID_WEIGHTS").as_deref() == Ok("1") {
        panic!("HINDSIGHT_REQUIRE_FID_WEIGHTS=1 but {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

/// Runs `hindsight --data-dir data ARGS`, fails the test (with its stderr) unless it
/// succeeds, and returns its standard output.
pub fn hindsight_ok(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hindsight {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes the first `n` Fashion-MNIST training images (Debian's copy) as an uncompressed IDX
/// file at `path`, with no labels beside it (so a network trained on it is unconditional).
pub fn write_fashion_mnist_slice(path: &Path, n: usize) {
    use std::io::Read;
    let gz =
        Path::new(hindsight::datasets::idx::FASHION_MNIST_DIR).join("train-images-idx3-ubyte.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let mut out = raw[..16].to_vec();
    out[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    out.extend_from_slice(&raw[16..16 + n * 28 * 28]);
    std::fs::write(path, out).unwrap();
}
