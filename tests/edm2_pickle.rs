//! EDM2's own files (issue 25, item 6): `network-snapshot-*.pkl` and the EMAs of
//! `training-state-*.pt`, made by NVlabs/edm2's own code (`scripts/make_edm2_fixtures.py`),
//! import without executing anything and reconstruct to what EDM2's `reconstruct_phema.py`
//! gives on them; pickles that try to call anything are refused by name and store nothing.
//!
//! Fixtures (tests/fixtures/edm2_pkl/): `run/` as EDM2's training loop leaves it (six fp16
//! snapshot pickles at kimg 4, 8, 12 × std 0.050, 0.100, and `training-state-0000012.pt`);
//! `reference.safetensors` (`<std>/<name>`: EDM2's reconstructions at std 0.040, 0.070, 0.130,
//! fp16); `reference_fp32_ema.safetensors` (the training state's fp32 EMAs);
//! `reference.json` (inputs, EDM2's coefficients, buffer names); `malicious/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use hindsight::app::DataDir;
use hindsight::ingest::{import_dir, ingest_edm2, IngestOptions, Source};
use hindsight::materialize::OutDtype;
use hindsight::phema::request::TargetSpec;
use hindsight::phema::Width;
use hindsight::reconstruction::{reconstruct_to_dir, ExportOptions};
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm2_pkl")
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    data: DataDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(&dir.path().join("data")).await.unwrap();
    Env { dir, data }
}

/// `hindsight import --format edm2` of `path` into `run`, through the library.
async fn import_edm2(
    e: &Env,
    path: &Path,
    run: &str,
) -> hindsight::Result<hindsight::ingest::ImportReport> {
    import_dir(
        &e.data,
        path,
        run,
        &Source::Edm2,
        IngestOptions::default(),
        Arc::new(()),
    )
    .await
}

/// What a refusal must leave untouched: blob files, staging files, blob rows, runs.
async fn store_state(e: &Env) -> (usize, usize, usize, usize) {
    (
        e.data.store.list().unwrap().len(),
        e.data.store.temp_files().unwrap().len(),
        e.data.db.blobs().await.unwrap().len(),
        e.data.db.runs().await.unwrap().len(),
    )
}

/// The tensors of a safetensors file: name → (dtype, shape, bytes).
fn tensors(bytes: &[u8]) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                (
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// `__metadata__` of a safetensors file.
fn metadata(bytes: &[u8]) -> BTreeMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// The reference tensors of one std (`<std:.3f>/<name>`), names without the prefix.
fn reference_of(file: &str, std: f64) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let prefix = format!("{std:.3}/");
    tensors(&std::fs::read(fixtures().join(file)).unwrap())
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|n| (n.to_owned(), t)))
        .collect()
}

/// fp16 bits as a monotone integer, so that the difference of two is their distance in ulps.
fn ordered(bits: u16) -> i32 {
    let v = (bits & 0x7fff) as i32;
    if bits & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

fn f16_bits(data: &[u8]) -> Vec<u16> {
    data.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

async fn stored_file(e: &Env, run: &str, nimg: i64, sigma_rel: f64) -> Vec<u8> {
    let run = e.data.db.run(run).await.unwrap().unwrap();
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    let row = rows
        .iter()
        .find(|r| r.nimg == nimg && (r.sigma_rel - sigma_rel).abs() < 1e-12)
        .unwrap_or_else(|| panic!("no snapshot at {nimg} {sigma_rel}"));
    std::fs::read(e.data.store.path(&row.digest.parse().unwrap())).unwrap()
}

/// The six snapshot pickles import (the training state beside them is left to a run of its
/// own), fp16 as stored, with EDM2's time rule and the buffer names; a re-import is a no-op;
/// reconstructions at EDM2's reference stds match `reconstruct_phema.py` to 1 fp16 ulp and its
/// coefficients to 1e-9 of the largest.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_pickles_import_and_reconstruct_as_edm2_does() {
    let e = env().await;
    let refj = reference();
    let run_dir = fixtures().join("run");
    let report = import_edm2(&e, &run_dir, "edm2").await.unwrap();
    assert_eq!((report.inserted, report.present), (6, 0));
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    let run = e.data.db.run("edm2").await.unwrap().unwrap();
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    let slots: Vec<(i64, f64)> = rows.iter().map(|r| (r.nimg, r.sigma_rel)).collect();
    let expect: Vec<(i64, f64)> = refj["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["nimg"].as_i64().unwrap(), i["std"].as_f64().unwrap()))
        .collect();
    // kimg 4, 8, 12 → nimg 4096, 8192, 12288: EDM2's (kimg·1000 + 999) // 1024 · 1024.
    assert_eq!(slots, expect);
    assert_eq!(expect[0].0, 4096);

    // Names, dtypes (fp16 kept) and shapes are what EDM2's state_dict() gives; the last
    // snapshot's bytes equal the fp32 EMA of the training state rounded to fp16, as EDM2's
    // `.to(torch.float16)` rounds it.
    let buffers: Vec<String> = refj["buffers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_owned())
        .collect();
    for std in [0.05, 0.1] {
        let file = stored_file(&e, "edm2", 12288, std).await;
        let got = tensors(&file);
        let fp32 = reference_of("reference_fp32_ema.safetensors", std);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            fp32.keys().collect::<Vec<_>>()
        );
        for (name, (dtype, shape, data)) in &got {
            assert_eq!(dtype, "F16", "{name}");
            let (_, fshape, fdata) = &fp32[name];
            assert_eq!(shape, fshape, "{name}");
            let rounded: Vec<u8> = fdata
                .chunks_exact(4)
                .flat_map(|c| {
                    f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            assert_eq!(data, &rounded, "{name}");
        }
        let meta = metadata(&file);
        assert_eq!(meta["nimg"], "12288");
        assert_eq!(meta["source"], "edm2-pickle");
        let declared: Vec<String> = serde_json::from_str(&meta["hindsight.buffers"]).unwrap();
        assert_eq!(declared, buffers);
    }

    // Re-importing is a no-op: no new rows, blobs or files.
    let before = store_state(&e).await;
    let again = import_edm2(&e, &run_dir, "edm2").await.unwrap();
    assert_eq!((again.inserted, again.present), (0, 6));
    assert_eq!(store_state(&e).await, before);

    // Reconstruct at EDM2's reference stds, fp16 out.
    let out_stds: Vec<f64> = refj["out_stds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let out = e.dir.path().join("out");
    let exported = reconstruct_to_dir(
        &e.data,
        "edm2",
        out_stds
            .iter()
            .map(|&s| TargetSpec::new(Width::SigmaRel(s), None))
            .collect(),
        OutDtype::F16,
        &out,
        ExportOptions::default(),
        Arc::new(()),
    )
    .await
    .unwrap();
    // Coefficients: EDM2's solve_posthoc_coefficients, [input][output], inputs in (nimg, std)
    // order as the run's snapshots are.
    let coefs = refj["coefficients"].as_array().unwrap();
    for (j, solution) in exported.solutions.iter().enumerate() {
        assert_eq!(solution.nimg, 12288);
        let edm2: Vec<f64> = coefs.iter().map(|row| row[j].as_f64().unwrap()).collect();
        let scale = edm2.iter().fold(0f64, |m, c| m.max(c.abs()));
        for (i, (&ours, &theirs)) in solution.coefficients.iter().zip(&edm2).enumerate() {
            assert!(
                (ours - theirs).abs() <= 1e-9 * scale,
                "std {} input {i}: {ours} vs EDM2 {theirs}",
                out_stds[j]
            );
        }
    }
    let mut worst = 0;
    let mut differing = 0usize;
    let mut total = 0usize;
    for (j, path) in exported.files.iter().enumerate() {
        let got = tensors(&std::fs::read(path).unwrap());
        let want = reference_of("reference.safetensors", out_stds[j]);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, (dtype, shape, data)) in &got {
            let (wdtype, wshape, wdata) = &want[name];
            assert_eq!((dtype, shape), (wdtype, wshape), "{name}");
            for (a, b) in f16_bits(data).into_iter().zip(f16_bits(wdata)) {
                let d = (ordered(a) - ordered(b)).abs();
                total += 1;
                if d > 0 {
                    differing += 1;
                }
                worst = worst.max(d);
                assert!(
                    d <= 1,
                    "std {} {name}: {} vs EDM2 {} ({d} ulp)",
                    out_stds[j],
                    f16::from_bits(a),
                    f16::from_bits(b)
                );
            }
        }
    }
    eprintln!("{differing} of {total} fp16 values differ from EDM2's by 1 ulp (worst {worst})");
}

/// The training state's `ema` part: one fp32 snapshot per std, equal to the EMAs EDM2 held
/// (bytes), without `hindsight.buffers` (a state dict does not say which entries are buffers).
#[tokio::test(flavor = "multi_thread")]
async fn training_state_emas_import_as_fp32_snapshots() {
    let e = env().await;
    let path = fixtures().join("run/training-state-0000012.pt");
    let report = import_edm2(&e, &path, "state").await.unwrap();
    assert_eq!((report.inserted, report.present), (2, 0));
    for std in [0.05, 0.1] {
        let file = stored_file(&e, "state", 12288, std).await;
        let got = tensors(&file);
        let want = reference_of("reference_fp32_ema.safetensors", std);
        assert_eq!(got, want, "std {std}");
        let meta = metadata(&file);
        assert_eq!(meta["source"], "edm2-training-state");
        assert!(!meta.contains_key("hindsight.buffers"));
    }
    // Again: nothing new.
    let run = e.data.db.run("state").await.unwrap().unwrap();
    let again = ingest_edm2(
        &e.data.db,
        &e.data.store,
        &run,
        &path,
        IngestOptions::default(),
    )
    .await
    .unwrap();
    assert!(again.iter().all(|r| !r.inserted));
}

/// A `phema-*.pkl` in a folder is skipped (a reconstruction, not an EMA snapshot) but imports
/// when given as the file; a folder of nothing EDM2 writes says what it expected.
#[tokio::test(flavor = "multi_thread")]
async fn phema_pickles_import_only_when_named() {
    let e = env().await;
    let dir = e.dir.path().join("phema");
    std::fs::create_dir_all(&dir).unwrap();
    let phema = dir.join("phema-0000012-0.070.pkl");
    std::fs::copy(
        fixtures().join("run/network-snapshot-0000012-0.050.pkl"),
        &phema,
    )
    .unwrap();
    let err = import_edm2(&e, &dir, "p").await.unwrap_err().to_string();
    assert!(
        err.contains("imported only when given as the file"),
        "{err}"
    );
    let report = import_edm2(&e, &phema, "p").await.unwrap();
    assert_eq!(report.inserted, 1);
    let run = e.data.db.run("p").await.unwrap().unwrap();
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    assert_eq!((rows[0].nimg, rows[0].sigma_rel), (12288, 0.07));
}

/// Pickles that would run `os.system`, `builtins.exec`, `posix.system` (through GLOBAL and
/// STACK_GLOBAL) or rebuild unknown classes are refused, each naming the global and the file;
/// nothing is stored, no run is created, and the payload's file does not appear.
#[tokio::test(flavor = "multi_thread")]
async fn pickles_that_call_globals_are_refused_and_store_nothing() {
    let side_effect = Path::new("/tmp/hindsight-edm2-malicious-pickle-ran");
    let _ = std::fs::remove_file(side_effect);
    let e = env().await;
    let before = store_state(&e).await;
    let dir = fixtures().join("malicious");
    let report = import_edm2(&e, &dir, "bad").await.unwrap();
    assert_eq!(report.inserted + report.present, 0);
    assert!(report.run_removed);
    let refused: BTreeMap<String, String> = report
        .refused
        .iter()
        .map(|(n, e)| (n.clone(), e.chain_text()))
        .collect();
    for (file, global) in [
        ("network-snapshot-0000004-0.050.pkl", "`os.system`"),
        ("network-snapshot-0000004-0.100.pkl", "`builtins.exec`"),
        ("network-snapshot-0000008-0.050.pkl", "`posix.system`"),
        (
            "network-snapshot-0000008-0.100.pkl",
            "`copyreg._reconstructor`",
        ),
        (
            "network-snapshot-0000012-0.050.pkl",
            "`evil_module.Payload`",
        ),
    ] {
        let err = &refused[file];
        assert!(err.contains(global), "{file}: {err}");
        assert!(err.contains(file), "{file}: {err}");
        assert!(err.contains("nothing was run or stored"), "{err}");
    }
    assert_eq!(store_state(&e).await, before);
    assert!(e.data.db.run("bad").await.unwrap().is_none());
    assert!(!side_effect.exists());

    // Into an existing run: refused the same, the run's rows and blobs unchanged.
    import_edm2(
        &e,
        &fixtures().join("run/network-snapshot-0000004-0.050.pkl"),
        "good",
    )
    .await
    .unwrap();
    let before = store_state(&e).await;
    let run = e.data.db.run("good").await.unwrap().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "pkl") {
            let err = ingest_edm2(
                &e.data.db,
                &e.data.store,
                &run,
                &path,
                IngestOptions::default(),
            )
            .await
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("refused: the pickle names the global"),
                "{err}"
            );
        }
    }
    assert_eq!(store_state(&e).await, before);
    assert_eq!(e.data.db.snapshots(run.id).await.unwrap().len(), 1);
    assert!(!side_effect.exists());
}

/// `hindsight import DIR` picks the EDM2 format by itself for a folder of EDM2's files and
/// prints the usual summary line.
#[test]
fn the_command_line_detects_edm2_folders() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("import")
        .arg(fixtures().join("run"))
        .args(["--run", "edm2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("run edm2: 6 imported, 0 already present, 0 refused"),
        "{stdout}"
    );
}

/// `"buffers": "copy"` takes the declared buffers from the newest weighted snapshot, as
/// `reconstruct_phema.py` copies them from its last input: EDM2's buffers, bit for bit; the
/// parameters are the same as with `average`. A run of training-state EMAs (no buffer
/// declaration) is refused `copy` by name.
#[tokio::test(flavor = "multi_thread")]
async fn copying_buffers_reproduces_edm2s_buffers_exactly() {
    use hindsight::materialize::Buffers;

    let e = env().await;
    let refj = reference();
    for (dir, run) in [
        (fixtures().join("run"), "edm2"),
        (fixtures().join("run/training-state-0000012.pt"), "state"),
    ] {
        import_edm2(&e, &dir, run).await.unwrap();
    }
    let buffers: Vec<&str> = refj["buffers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    let out_stds: Vec<f64> = refj["out_stds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let targets = || {
        out_stds
            .iter()
            .map(|&s| TargetSpec::new(Width::SigmaRel(s), None))
            .collect::<Vec<_>>()
    };
    let copy = ExportOptions {
        buffers: Buffers::Copy,
        ..ExportOptions::default()
    };
    let exported = reconstruct_to_dir(
        &e.data,
        "edm2",
        targets(),
        OutDtype::F16,
        &e.dir.path().join("copy"),
        copy,
        Arc::new(()),
    )
    .await
    .unwrap();
    let averaged = reconstruct_to_dir(
        &e.data,
        "edm2",
        targets(),
        OutDtype::F16,
        &e.dir.path().join("average"),
        ExportOptions::default(),
        Arc::new(()),
    )
    .await
    .unwrap();
    for (j, (path, avg)) in exported.files.iter().zip(&averaged.files).enumerate() {
        let got = tensors(&std::fs::read(path).unwrap());
        let avg = tensors(&std::fs::read(avg).unwrap());
        let want = reference_of("reference.safetensors", out_stds[j]);
        for name in &buffers {
            assert_eq!(got[*name], want[*name], "std {} buffer {name}", out_stds[j]);
        }
        for (name, t) in &got {
            if !buffers.contains(&name.as_str()) {
                assert_eq!(t, &avg[name], "std {} {name}", out_stds[j]);
            }
        }
    }
    let err = reconstruct_to_dir(
        &e.data,
        "state",
        targets(),
        OutDtype::F32,
        &e.dir.path().join("state"),
        copy,
        Arc::new(()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("declares none"), "{err}");
}
