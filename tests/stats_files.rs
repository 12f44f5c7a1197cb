//! Statistics files as NumPy and pickle really write them (tests/fixtures/stats, made by
//! tests/fixtures/make_stats_fixtures.py with NumPy 2.4): EDM2 reference `.pkl` under pickle
//! protocols 2–5 with NumPy 1.x and 2.x module names, float32 and float64, C and Fortran
//! order, either byte order; `numpy.save` of a `{'mu', 'sigma'}` dict (pytorch-fid issue
//! #106); `numpy.savez` / `savez_compressed` `.npz`; and the files that are refused, each
//! saying what it is. Also `hindsight fid` on those files, through the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use hindsight::metrics::{npy, pickle, FeatureStats};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stats")
        .join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap()
}

/// Values written as the integers of their IEEE-754 bits.
fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| f64::from_bits(x.as_u64().unwrap()))
        .collect()
}

#[test]
fn numpy_pickles_of_every_protocol_and_layout_read_to_the_exact_values() {
    let expected = expected();
    let mut read = 0;
    for p in 2..=5 {
        for suffix in ["", "_numpy1"] {
            let name = format!("arrays_p{p}{suffix}.pkl");
            let bytes = std::fs::read(fixture(&name)).unwrap();
            let pickle = pickle::parse(&bytes, &name).unwrap();
            let root = pickle.root();
            for (key, want) in expected["arrays"].as_object().unwrap() {
                let value = root.get(key).unwrap_or_else(|| panic!("{name}: no {key}"));
                let (shape, values) =
                    npy::pickled_f64(value, key).unwrap_or_else(|e| panic!("{name}: {e}"));
                let want_shape: Vec<usize> = want["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(shape, want_shape, "{name}: {key}");
                // Exact: every value is a float32 or float64 read bit for bit.
                assert_eq!(values, floats(&want["values"]), "{name}: {key}");
                read += 1;
            }
        }
    }
    assert_eq!(read, 8 * 5);
}

#[test]
fn edm2_reference_pickles_of_protocols_2_to_5_read_as_statistics() {
    let expected = expected();
    let (mu, sigma) = (floats(&expected["mu"]), floats(&expected["sigma"]));
    for p in 2..=5 {
        let stats = FeatureStats::read(&fixture(&format!("edm2_p{p}.pkl"))).unwrap();
        assert_eq!(stats.mean(), mu, "protocol {p}");
        assert_eq!(stats.covariance(), sigma, "protocol {p}");
    }
    // float32, sigma in Fortran order, protocol 5.
    let stats = FeatureStats::read(&fixture("edm2_p5_f32_fortran.pkl")).unwrap();
    assert_eq!(stats.mean(), floats(&expected["mu_f32"]));
    assert_eq!(stats.covariance(), floats(&expected["sigma_f32"]));
    // Out-of-band buffers: the data is not in the file, and the message says why.
    let err = FeatureStats::read(&fixture("edm2_p5_out_of_band.pkl"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("buffer_callback") && err.contains("out-of-band"),
        "{err}"
    );
}

#[test]
fn npy_of_a_dict_and_numpy_npz_files_read_as_statistics() {
    let expected = expected();
    let (mu, sigma) = (floats(&expected["mu"]), floats(&expected["sigma"]));
    for name in ["ref_dict.npy", "ref_fortran.npz", "ref_compressed.npz"] {
        let stats = FeatureStats::read(&fixture(name)).unwrap();
        assert_eq!(stats.mean(), mu, "{name}");
        assert_eq!(stats.covariance(), sigma, "{name}");
    }
    // By content, not by name: the .npy under another name reads the same.
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("ref.npz");
    std::fs::copy(fixture("ref_dict.npy"), &renamed).unwrap();
    assert_eq!(FeatureStats::read(&renamed).unwrap().mean(), mu);
}

#[test]
fn files_that_are_not_statistics_say_what_they_are_and_what_is_accepted() {
    let accepted = "a .npy of a pickled {'mu', 'sigma'} dict";
    let err = FeatureStats::read(&fixture("plain_array.npy"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a NumPy .npy array of shape [4] float64, not statistics")
            && err.contains(accepted),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.npz", b"", "is empty"),
        (
            "text.pkl",
            b"mu,sigma\n1,2\n",
            "begins with the text \"mu,sigma\\n1,2\\n\"",
        ),
        ("gz.npz", b"\x1f\x8b\x08\x00", "gzip"),
        (
            "list.pkl",
            b"\x80\x04]\x94.",
            "a pickle of a list of 0 with no 'fid' entry",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = FeatureStats::read(&path).unwrap_err().to_string();
        assert!(
            err.contains(needle) && err.contains(accepted),
            "{name}: {err}"
        );
    }
    // A ZIP that is not an .npz lists what it holds.
    let path = dir.path().join("torch.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    for entry in ["archive/data.pkl", "archive/version"] {
        zip.start_file(entry, zip::write::SimpleFileOptions::default())
            .unwrap();
    }
    zip.finish().unwrap();
    let err = FeatureStats::read(&path).unwrap_err().to_string();
    assert!(
        err.contains("archive/data.pkl, archive/version (2 entries; a PyTorch archive"),
        "{err}"
    );
}

/// `hindsight fid` compares a `.npy` of a dict with an `.npz`: both are the fixture's
/// statistics, the second with its mean shifted by 1 in each of 4 dimensions, so FID =
/// |Δμ|² = 4 exactly (the covariance terms cancel).
#[test]
fn hindsight_fid_reads_a_npy_of_a_dict() {
    let expected = expected();
    let (mu, sigma) = (floats(&expected["mu"]), floats(&expected["sigma"]));
    let dir = tempfile::tempdir().unwrap();
    let shifted = dir.path().join("shifted.npz");
    let stats = FeatureStats::from_parts(mu.iter().map(|m| m + 1.0).collect(), sigma, 0).unwrap();
    stats
        .write_npz(std::fs::File::create(&shifted).unwrap())
        .unwrap();
    let npy = fixture("ref_dict.npy");
    let out = common::hindsight_ok(
        dir.path(),
        &[
            "fid",
            npy.to_str().unwrap(),
            shifted.to_str().unwrap(),
            "--json",
        ],
    );
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let fid = json["fid"].as_f64().unwrap();
    assert!((fid - 4.0).abs() < 1e-9, "{out}");
    // A plain array is refused by name, with what it is.
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "fid",
            fixture("plain_array.npy").to_str().unwrap(),
            shifted.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("plain_array.npy: a NumPy .npy array of shape [4] float64, not statistics"),
        "{stderr}"
    );
}
