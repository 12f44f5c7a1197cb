//! Ingest into the store + index: validation for every file, idempotence, conflicts, manifest
//! checks, dedupe, and garbage collection that never removes what an ingest is about to use.
//! Every refusal must leave the store and the index exactly as they were.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hindsight::app::DataDir;
use hindsight::db::BlobState;
use hindsight::ingest::{ingest_file, Hints, IngestOptions};
use hindsight::phema::Width;
use hindsight::Error;

mod common;
use common::snapshot::SnapshotBuilder;

/// Writes a safetensors file with f32 tensors `w` (2×3) and `b` (3), filled from `seed`, plus an
/// I64 step counter, and optional `__metadata__`, as the `safetensors` crate writes it.
fn write_snapshot(path: &Path, seed: f32, shape_w: &[usize], meta: &[(&str, &str)]) {
    let n: usize = shape_w.iter().product();
    let w: Vec<f32> = (0..n).map(|i| seed + i as f32).collect();
    let b: Vec<f32> = (0..3).map(|i| seed * 2.0 + i as f32).collect();
    SnapshotBuilder::new()
        .f32("net.w", shape_w, &w)
        .f32("net.b", &[3], &b)
        .i64("step", &[], &[7])
        .metas(meta)
        .write_with_safetensors_crate(path);
}

struct Env {
    _dir: tempfile::TempDir,
    input: PathBuf,
    data: DataDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let data = DataDir::open(&dir.path().join("data")).await.unwrap();
    Env {
        _dir: dir,
        input,
        data,
    }
}

/// Everything a refusal must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    blobs_on_disk: usize,
    temp_files: usize,
    blob_rows: Vec<(String, BlobState)>,
    snapshots: usize,
}

async fn state(e: &Env, run: &str) -> Snapshot {
    let run_id = e.data.db.run(run).await.unwrap().map(|r| r.id);
    Snapshot {
        blobs_on_disk: e.data.store.list().unwrap().len(),
        temp_files: e.data.store.temp_files().unwrap().len(),
        blob_rows: e
            .data
            .db
            .blobs()
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.digest, b.state))
            .collect(),
        snapshots: match run_id {
            Some(id) => e.data.db.snapshots(id).await.unwrap().len(),
            None => 0,
        },
    }
}

async fn ingest(
    e: &Env,
    run: &str,
    file: &Path,
    options: IngestOptions,
) -> hindsight::Result<bool> {
    let run = e.data.db.run_or_create(run).await.unwrap();
    ingest_file(
        &e.data.db,
        &e.data.store,
        &run,
        file,
        Hints::default(),
        options,
        |_| {},
    )
    .await
    .map(|r| r.inserted)
}

#[tokio::test(flavor = "multi_thread")]
async fn import_is_idempotent_and_dedupes_across_runs() {
    let e = env().await;
    let a = e.input.join("phema-0001048-0.050.safetensors");
    let b = e.input.join("phema-0001048-0.100.safetensors");
    write_snapshot(&a, 1.0, &[2, 3], &[]);
    write_snapshot(&b, 2.0, &[2, 3], &[]);
    assert!(ingest(&e, "r", &a, IngestOptions::default()).await.unwrap());
    assert!(ingest(&e, "r", &b, IngestOptions::default()).await.unwrap());
    let before = state(&e, "r").await;
    assert_eq!((before.blobs_on_disk, before.snapshots), (2, 2));
    // Same files again: nothing changes.
    assert!(!ingest(&e, "r", &a, IngestOptions::default()).await.unwrap());
    assert_eq!(state(&e, "r").await, before);
    // The same content in another run is stored once.
    assert!(ingest(&e, "other", &a, IngestOptions::default())
        .await
        .unwrap());
    assert_eq!(e.data.store.list().unwrap().len(), 2);
    let rows = e
        .data
        .db
        .snapshots(e.data.db.run("r").await.unwrap().unwrap().id)
        .await
        .unwrap();
    assert_eq!(rows[0].nimg, 1048576);
    assert!(rows.iter().all(|r| r.tensor_count == 3));
    assert_eq!(rows[0].dtypes, serde_json::json!({"F32": 9, "I64": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_names_the_time_and_width() {
    let e = env().await;
    let f = e.input.join("anything.safetensors");
    write_snapshot(&f, 1.0, &[2, 3], &[("nimg", "123456"), ("gamma", "6.94")]);
    ingest(&e, "r", &f, IngestOptions::default()).await.unwrap();
    let run = e.data.db.run("r").await.unwrap().unwrap();
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    assert_eq!(rows[0].nimg, 123456);
    assert!((rows[0].gamma - 6.94).abs() < 1e-12);
    assert!(rows[0].metadata.to_string().contains("123456"));
    // Both widths, as reconstructions write them: accepted when they agree, else refused.
    let both = e.input.join("both.safetensors");
    let gamma = hindsight::phema::sigma_rel_to_gamma(0.1, "x")
        .unwrap()
        .to_string();
    write_snapshot(
        &both,
        2.0,
        &[2, 3],
        &[("nimg", "200000"), ("sigma_rel", "0.1"), ("gamma", &gamma)],
    );
    ingest(&e, "r", &both, IngestOptions::default())
        .await
        .unwrap();
    let clash = e.input.join("clash.safetensors");
    write_snapshot(
        &clash,
        3.0,
        &[2, 3],
        &[("nimg", "300000"), ("sigma_rel", "0.1"), ("gamma", "16.97")],
    );
    let err = ingest(&e, "r", &clash, IngestOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disagree"), "{err}");
    // Neither name nor metadata: a clear refusal.
    let g = e.input.join("mystery.safetensors");
    write_snapshot(&g, 1.0, &[2, 3], &[]);
    let err = ingest(&e, "r", &g, IngestOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot tell"), "{err}");
    // Explicit hints win over both.
    let run = e.data.db.run("r").await.unwrap().unwrap();
    let hints = Hints {
        nimg: Some(999),
        width: Some(Width::SigmaRel(0.2)),
        profile: None,
    };
    let r = ingest_file(
        &e.data.db,
        &e.data.store,
        &run,
        &g,
        hints,
        IngestOptions::default(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((r.nimg, r.sigma_rel), (999, 0.2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_different_file_at_a_stored_time_and_width_is_a_conflict() {
    let e = env().await;
    let a = e.input.join("phema-0001048-0.050.safetensors");
    write_snapshot(&a, 1.0, &[2, 3], &[]);
    ingest(&e, "r", &a, IngestOptions::default()).await.unwrap();
    let before = state(&e, "r").await;
    let other = e.input.join("copy").join("phema-0001048-0.050.safetensors");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    write_snapshot(&other, 5.0, &[2, 3], &[]);
    let err = ingest(&e, "r", &other, IngestOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("already has a different snapshot"),
        "{err}"
    );
    assert_eq!(state(&e, "r").await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn tensors_must_match_the_run_manifest() {
    let e = env().await;
    let a = e.input.join("phema-0001048-0.050.safetensors");
    write_snapshot(&a, 1.0, &[2, 3], &[]);
    ingest(&e, "r", &a, IngestOptions::default()).await.unwrap();
    let before = state(&e, "r").await;
    let b = e.input.join("phema-0002097-0.050.safetensors");
    write_snapshot(&b, 1.0, &[3, 2], &[]);
    let err = ingest(&e, "r", &b, IngestOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("net.w: F32 [3, 2] where the run has F32 [2, 3]"),
        "{err}"
    );
    assert_eq!(state(&e, "r").await, before);
    let run = e.data.db.run("r").await.unwrap().unwrap();
    assert_eq!(e.data.db.manifest(run.id).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_files_leave_nothing_behind() {
    let e = env().await;
    let good = e.input.join("phema-0001048-0.050.safetensors");
    write_snapshot(&good, 1.0, &[2, 3], &[]);
    ingest(&e, "r", &good, IngestOptions::default())
        .await
        .unwrap();
    let before = state(&e, "r").await;
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short", bytes[..5].to_vec(), "too short"),
        (
            "truncated",
            bytes[..bytes.len() - 4].to_vec(),
            "past the end",
        ),
        (
            "trailing",
            [bytes.clone(), vec![0; 3]].concat(),
            "trailing bytes",
        ),
        (
            "huge-header",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "exceeds the limit",
        ),
        (
            "not-json",
            {
                let mut b = bytes.clone();
                b[8] = b'!';
                b
            },
            "invalid safetensors header",
        ),
        (
            "header-past-end",
            {
                let mut b = bytes[..8 + header_len / 2].to_vec();
                b[..8].copy_from_slice(&(header_len as u64).to_le_bytes());
                b
            },
            "runs past the end",
        ),
    ];
    for (name, content, needle) in cases {
        let path = e
            .input
            .join(format!("phema-0002097-0.050-{name}.safetensors"));
        std::fs::write(&path, content).unwrap();
        let err = ingest(&e, "r", &path, IngestOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{name}: {err}");
        assert_eq!(state(&e, "r").await, before, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finite_refuses_nan() {
    let e = env().await;
    let path = e.input.join("phema-0001048-0.050.safetensors");
    write_snapshot(&path, f32::NAN, &[2, 3], &[]);
    let before = state(&e, "r").await;
    let err = ingest(&e, "r", &path, IngestOptions { check_finite: true })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite") && err.contains("net."), "{err}");
    assert_eq!(state(&e, "r").await.blobs_on_disk, before.blobs_on_disk);
    assert_eq!(state(&e, "r").await.temp_files, 0);
    // Without the flag the file is stored as it is.
    assert!(ingest(&e, "r", &path, IngestOptions::default())
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_only_unreferenced_blobs_and_spares_inflight_ingests() {
    let e = env().await;
    let a = e.input.join("phema-0001048-0.050.safetensors");
    write_snapshot(&a, 1.0, &[2, 3], &[]);
    ingest(&e, "r", &a, IngestOptions::default()).await.unwrap();
    let referenced = e.data.store.list().unwrap()[0];

    // An orphan: stored and claimed but never referenced (a crashed ingest).
    let (orphan, size) = e.data.store.put(&b"orphan"[..]).unwrap();
    e.data
        .db
        .claim_blob(&orphan.to_hex(), size, None)
        .await
        .unwrap();
    // Within the grace period it is left alone: it may be an ingest in flight.
    assert!(e
        .data
        .db
        .gc_mark(Duration::from_secs(3600))
        .await
        .unwrap()
        .is_empty());
    // After it, it goes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let marked = e.data.db.gc_mark(Duration::ZERO).await.unwrap();
    assert_eq!(marked, vec![orphan.to_hex()]);

    // An ingest of the same content claims it between GC's mark and sweep phases: the sweep
    // must then leave the file alone.
    e.data
        .db
        .claim_blob(&orphan.to_hex(), size, None)
        .await
        .unwrap();
    let store = e.data.store.clone();
    let removed = e
        .data
        .db
        .gc_sweep(&orphan.to_hex(), move || store.remove(&orphan).map(|_| ()))
        .await
        .unwrap();
    assert!(!removed);
    assert!(e.data.store.contains(&orphan));
    assert_eq!(
        e.data.db.blob_state(&orphan.to_hex()).await.unwrap(),
        Some(BlobState::Pending)
    );

    // Abandoned for good: marked and swept; the referenced blob survives every pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        e.data.db.gc_mark(Duration::ZERO).await.unwrap(),
        vec![orphan.to_hex()]
    );
    let store = e.data.store.clone();
    assert!(e
        .data
        .db
        .gc_sweep(&orphan.to_hex(), move || store.remove(&orphan).map(|_| ()))
        .await
        .unwrap());
    assert!(!e.data.store.contains(&orphan));
    assert_eq!(e.data.db.blob_state(&orphan.to_hex()).await.unwrap(), None);
    assert_eq!(e.data.store.list().unwrap(), vec![referenced]);
    assert_eq!(
        e.data.db.blob_state(&referenced.to_hex()).await.unwrap(),
        Some(BlobState::Valid)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trainer_writes_its_emas_as_snapshots() {
    use hindsight::ingest::SnapshotWriter;
    use hindsight::phema::PowerEma;
    use safetensors::SafeTensors;

    let e = env().await;
    let mut w = vec![0.0f32; 6];
    let mut b = vec![1.0f32; 4];
    let mut ema = PowerEma::with_default_widths(0, [("net.w", &w[..]), ("net.b", &b[..])]).unwrap();
    let config = serde_json::json!({"lr": 0.01, "batch": 64});
    let writer = SnapshotWriter::new(&e.data, "trained", &config, &ema, &[vec![2, 3], vec![4]])
        .await
        .unwrap();
    for step in 1..=20u64 {
        w.iter_mut().for_each(|v| *v += 0.5);
        b.iter_mut().for_each(|v| *v -= 0.25);
        ema.update(step * 64, &[&w, &b]).unwrap();
        if step % 10 == 0 {
            let written = writer.write(&ema).await.unwrap();
            assert_eq!(written.len(), 2);
            assert!(written.iter().all(|r| r.inserted && r.nimg == step * 64));
        }
    }
    // Writing the same state again is a no-op.
    assert!(writer
        .write(&ema)
        .await
        .unwrap()
        .iter()
        .all(|r| !r.inserted));
    let run = e.data.db.run("trained").await.unwrap().unwrap();
    assert_eq!(run.metadata, config);
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows.iter()
            .map(|r| (r.nimg, r.sigma_rel))
            .collect::<Vec<_>>(),
        [(640, 0.05), (640, 0.1), (1280, 0.05), (1280, 0.1)]
    );
    // The stored tensors are the tracker's values, with their shapes.
    let last = rows
        .iter()
        .find(|r| r.nimg == 1280 && r.sigma_rel == 0.05)
        .unwrap();
    let bytes = std::fs::read(e.data.store.path(&last.digest.parse().unwrap())).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let stored = file.tensor("net.w").unwrap();
    assert_eq!(stored.shape(), [2, 3]);
    let values: Vec<f32> = stored
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, ema.ema(0.05).unwrap().tensors[0]);
    // Shapes must fit the tracked tensors.
    let err = SnapshotWriter::new(&e.data, "trained", &config, &ema, &[vec![3, 3], vec![4]])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("shapes.net.w:"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ema_pytorch_checkpoint_folders_import() {
    use hindsight::ingest::{ingest_ema_pytorch, EmaPytorchSettings};
    use safetensors::SafeTensors;

    let e = env().await;
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ema-pytorch");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 6);
    let run = e.data.db.run_or_create("ema").await.unwrap();
    let settings = |sigma_rels: &[f64]| EmaPytorchSettings {
        sigma_rels: sigma_rels.to_vec(),
        images_per_step: 64,
        update_every: 100,
    };
    let sigma_rels = settings(&[0.05, 0.28]);
    for f in &files {
        let r = ingest_ema_pytorch(
            &e.data.db,
            &e.data.store,
            &run,
            f,
            &sigma_rels,
            IngestOptions::default(),
        )
        .await
        .unwrap();
        assert!(r.inserted);
    }
    let rows = e.data.db.snapshots(run.id).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.nimg, r.sigma_rel))
            .collect::<Vec<_>>(),
        [
            (64_000, 0.05),
            (64_000, 0.28),
            (128_000, 0.05),
            (128_000, 0.28),
            (192_000, 0.05),
            (192_000, 0.28)
        ]
    );
    // Each snapshot records the update rule its EMA really followed.
    assert!(rows.iter().all(|r| r.profile
        == Some(serde_json::json!(
            {"kind": "ema_pytorch", "update_every": 100, "images_per_step": 64}
        ))));
    // Model names without the wrapper's prefix; bookkeeping buffers left out.
    let manifest = e.data.db.manifest(run.id).await.unwrap();
    let names: Vec<&str> = manifest.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["net.0.bias", "net.0.weight", "net.2.weight"]);
    assert!(manifest.iter().all(|m| m.dtype == "F16"));
    // Values as the fixture script wrote them: index/2 + step/1024 + element/8, in fp16.
    let r = rows
        .iter()
        .find(|r| r.nimg == 128_000 && r.sigma_rel == 0.28)
        .unwrap();
    let bytes = std::fs::read(e.data.store.path(&r.digest.parse().unwrap())).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("net.0.weight").unwrap();
    assert_eq!(w.shape(), [4, 3]);
    let values: Vec<f32> = w
        .data()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let expect: Vec<f32> = (0..12)
        .map(|i| 0.5 + 2000.0 / 1024.0 + i as f32 / 8.0)
        .collect();
    assert_eq!(values, expect);
    // Re-import is a no-op; an index without a width is refused and leaves nothing.
    let before = state(&e, "ema").await;
    let again = ingest_ema_pytorch(
        &e.data.db,
        &e.data.store,
        &run,
        &files[0],
        &sigma_rels,
        IngestOptions::default(),
    )
    .await
    .unwrap();
    assert!(!again.inserted);
    let err = ingest_ema_pytorch(
        &e.data.db,
        &e.data.store,
        &run,
        &files[5],
        &settings(&[0.05]),
        IngestOptions::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("EMA index 1 but only 1 sigma_rels"), "{err}");
    // Not a checkpoint at all.
    let junk = e.input.join("0.5.pt");
    std::fs::write(&junk, b"not a zip").unwrap();
    let err = ingest_ema_pytorch(
        &e.data.db,
        &e.data.store,
        &run,
        &junk,
        &sigma_rels,
        IngestOptions::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a readable PyTorch checkpoint"), "{err}");
    assert_eq!(state(&e, "ema").await, before);
}
