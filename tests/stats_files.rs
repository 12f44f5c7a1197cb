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

/// `POST /references` with the uploads of issue "Reliability 2": each used to abort the
/// server (a stack overflow on a tokio worker) or take gigabytes; each is now a 400 naming the
/// limit, answered from the blocking pool. A `.npy` of a dict is parsed (and refused only for
/// its dimension: imports must be 2048-d), and more than 2048 dimensions are refused before
/// `sigma` is read.
#[test]
fn uploads_that_used_to_abort_the_server_are_refused() {
    use axum::http::StatusCode;
    use common::http::{post_bytes, send};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repeat = |head: &[u8], run: &[u8], n: usize, tail: &[u8]| -> Vec<u8> {
        let mut b = head.to_vec();
        for _ in 0..n {
            b.extend_from_slice(run);
        }
        b.extend_from_slice(tail);
        b
    };
    let mut marks = repeat(b"\x80\x02", b"(", 100_000, b"");
    marks.extend(std::iter::repeat_n(b'l', 100_000));
    marks.push(b'.');
    // mu of 4096 values and an empty sigma.npy: refused on mu alone, as float64 while it
    // inflates (more bytes than 2048 float64 take), as float32 by its dimension.
    let wide = |f32: bool| {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("mu.npy", options).unwrap();
        if f32 {
            npy::write_f32(&mut zip, &[4096], &[0.0; 4096]).unwrap();
        } else {
            npy::write_f64(&mut zip, &[4096], &[0.0; 4096]).unwrap();
        }
        zip.start_file("sigma.npy", options).unwrap();
        zip.finish().unwrap().into_inner()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "50 000 TUPLE1",
            repeat(b"\x80\x02)", b"\x85", 50_000, b"."),
            "(the pickle depth limit)",
        ),
        ("100 000 MARK/LIST", marks, "(the pickle depth limit)"),
        (
            "1 000 000 BINPERSID",
            repeat(b"\x80\x02N", b"Q", 1_000_000, b"."),
            "(the pickle depth limit)",
        ),
        (
            "a .npy of a 4-d dict",
            std::fs::read(fixture("ref_dict.npy")).unwrap(),
            "4-dimensional statistics",
        ),
        (
            "a 4096-d float64 .npz",
            wide(false),
            "more than a 2048-value float64 mu needs (the .npz entry size limit)",
        ),
        (
            "a 4096-d float32 .npz",
            wide(true),
            "4096-dimensional statistics, more than the 2048 read here",
        ),
    ];
    rt.block_on(async {
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        let config = hindsight::server::ServerConfig {
            sweep_worker: None,
            ..Default::default()
        };
        let app = hindsight::server::app(hindsight::server::AppState::new(data, config));
        for (name, bytes, needle) in cases {
            let (status, _, body) = send(&app, post_bytes("/references?name=x", bytes)).await;
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
            assert!(body.contains(needle), "{name}: {body}");
        }
    });
}
