//! Inputs real users send that used to break hindsight (and a variant of each): tensors in
//! any order and empty tensors, runs whose files disagree, values a dtype cannot hold, files
//! that are not safetensors, numbers beyond the index's range, and ema-pytorch's
//! `update_every`. HTTP cases are in tests/server.rs, the unconditional network in
//! tests/edm2_model.rs and tests/cli_model.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hindsight::app::DataDir;
use hindsight::format::read_header;
use hindsight::ingest::{import_dir, ingest_file, Hints, IngestOptions, Source};
use hindsight::materialize::OutDtype;
use hindsight::phema::request::TargetSpec;
use hindsight::phema::{
    solve, solve_realised, RealisedProfile, Snapshot, SolveOptions, Tabulated, Target, WarningCode,
    Width,
};
use hindsight::reconstruction::{reconstruct_to_dir, ExportOptions};
use hindsight::Error;

mod common;
use common::snapshot::SnapshotBuilder;

/// One tensor to write: name, safetensors dtype, shape, little-endian bytes.
type Tensor = (&'static str, &'static str, Vec<usize>, Vec<u8>);

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i64s(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `tensors` in the given data order, with `nimg` and `sigma_rel` in the metadata.
fn write(path: &Path, tensors: &[Tensor], nimg: u64, sigma_rel: f64) {
    tensors
        .iter()
        .fold(
            SnapshotBuilder::new(),
            |file, (name, dtype, shape, data)| file.raw(name, dtype, shape, data.clone()),
        )
        .meta("nimg", nimg)
        .meta("sigma_rel", sigma_rel)
        .write(path);
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

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn ingest(
        &self,
        run: &str,
        path: &Path,
        options: IngestOptions,
    ) -> hindsight::Result<()> {
        let run = self.data.db.run_or_create(run).await.unwrap();
        ingest_file(
            &self.data.db,
            &self.data.store,
            &run,
            path,
            Hints::default(),
            options,
            |_| {},
        )
        .await
        .map(|_| ())
    }

    /// Reconstructs σ_rel `sigma_rel` of `run` as `dtype` into a fresh directory; returns the
    /// file's bytes.
    async fn reconstruct(
        &self,
        run: &str,
        sigma_rel: f64,
        dtype: OutDtype,
        options: ExportOptions,
    ) -> hindsight::Result<Vec<u8>> {
        let out = tempfile::tempdir_in(self.dir.path()).unwrap();
        let exported = reconstruct_to_dir(
            &self.data,
            run,
            vec![TargetSpec::new(Width::SigmaRel(sigma_rel), None)],
            dtype,
            out.path(),
            options,
            Arc::new(()),
        )
        .await?;
        Ok(std::fs::read(&exported.files[0]).unwrap())
    }
}

fn tensor_f32(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("{name}: {other:?}"),
    }
}

// ---- 1. A snapshot is its set of tensors, not their layout ----------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_that_store_their_tensors_in_different_orders_reconstruct() {
    let e = env().await;
    let a = |v: f32| ("a", "F32", vec![4], f32s(&[v, v + 1.0, v + 2.0, v + 3.0]));
    let z = |v: i64| ("z", "I64", vec![2], i64s(&[v, v + 1]));
    // [a, z] as a by-name writer stores them; [z, a] as safetensors.torch.save_file does.
    write(&e.path("s1.safetensors"), &[a(1.0), z(10)], 1 << 20, 0.05);
    write(&e.path("s2.safetensors"), &[z(20), a(5.0)], 2 << 20, 0.05);
    for f in ["s1", "s2"] {
        e.ingest(
            "r",
            &e.path(&format!("{f}.safetensors")),
            IngestOptions::default(),
        )
        .await
        .unwrap();
    }
    let bytes = e
        .reconstruct("r", 0.05, OutDtype::F32, ExportOptions::default())
        .await
        .unwrap();
    // σ_rel 0.05 at the last snapshot is that snapshot exactly; its integers come along.
    assert_eq!(tensor_f32(&bytes, "a"), [5.0, 6.0, 7.0, 8.0]);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("z").unwrap().data(), &i64s(&[20, 21])[..]);
    // One canonical order in the output: by name.
    let header = read_header(&mut &bytes[..], bytes.len() as u64, "out").unwrap();
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "z"]);

    // Variant: a width between the two snapshots mixes both, whatever their layouts.
    let mixed = e
        .reconstruct("r", 0.2, OutDtype::F32, ExportOptions::default())
        .await
        .unwrap();
    let got = tensor_f32(&mixed, "a");
    assert!(got[0] > 1.0 && got[0] < 5.0, "{got:?}");
    assert!(
        (0..4).all(|i| (got[i] - (got[0] + i as f32)).abs() < 1e-5),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_snapshot_stored_out_of_order_is_still_caught() {
    let e = env().await;
    let a = |v: f32| ("a", "F32", vec![4], f32s(&[v; 4]));
    let z = ("z", "I64", vec![2], i64s(&[3, 4]));
    write(
        &e.path("s1.safetensors"),
        &[z.clone(), a(1.0)],
        1 << 20,
        0.05,
    );
    write(&e.path("s2.safetensors"), &[z, a(2.0)], 1 << 20, 0.10);
    for f in ["s1", "s2"] {
        e.ingest(
            "r",
            &e.path(&format!("{f}.safetensors")),
            IngestOptions::default(),
        )
        .await
        .unwrap();
    }
    // Flip a byte of one stored (out-of-order) snapshot.
    let run = e.data.db.run("r").await.unwrap().unwrap();
    let victim = &e.data.db.snapshots(run.id).await.unwrap()[0];
    let path = e.data.store.path(&victim.digest.parse().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let err = e
        .reconstruct("r", 0.07, OutDtype::F32, ExportOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&victim.digest), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_tensors_reconstruct_every_time_with_their_dtypes_and_shapes() {
    let e = env().await;
    // `e` and `e2` hold no elements and share offset 0 with `w`.
    let tensors = |v: f32| -> Vec<Tensor> {
        vec![
            ("e", "F32", vec![0], vec![]),
            ("e2", "F32", vec![0], vec![]),
            ("w", "F32", vec![2], f32s(&[v, -v])),
            // Variant: an empty integer tensor of rank 2.
            ("k", "I64", vec![0, 3], vec![]),
        ]
    };
    write(&e.path("s1.safetensors"), &tensors(1.0), 1 << 20, 0.05);
    write(&e.path("s2.safetensors"), &tensors(3.0), 2 << 20, 0.10);
    for f in ["s1", "s2"] {
        e.ingest(
            "r",
            &e.path(&format!("{f}.safetensors")),
            IngestOptions::default(),
        )
        .await
        .unwrap();
    }
    let mut first = None;
    for _ in 0..5 {
        let bytes = e
            .reconstruct(
                "r",
                0.08,
                OutDtype::F16,
                ExportOptions {
                    recompute: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, dtype, shape) in [
            ("e", safetensors::Dtype::F16, vec![0]),
            ("e2", safetensors::Dtype::F16, vec![0]),
            ("k", safetensors::Dtype::I64, vec![0, 3]),
        ] {
            let t = st.tensor(name).unwrap();
            assert_eq!((t.dtype(), t.shape()), (dtype, &shape[..]), "{name}");
        }
        let w = tensor_f32(&bytes, "w");
        assert!(w[0] > 1.0 && w[0].is_finite() && w[1] == -w[0], "{w:?}");
        // The same bytes every time.
        assert_eq!(*first.get_or_insert(bytes.clone()), bytes);
    }
}

// ---- 2. A run's manifest is not a race; files without tensors are refused ------------------

/// A folder whose files disagree: `b` lacks `lm_head.weight`, `c` has F16 where the others
/// have F32, `a` and `d` agree. Returns the folder.
fn disagreeing_folder(dir: &Path, first: &str) -> PathBuf {
    let folder = dir.join(format!("folder-{first}"));
    std::fs::create_dir_all(&folder).unwrap();
    let full = |v: f32| -> Vec<Tensor> {
        vec![
            ("body.weight", "F32", vec![3], f32s(&[v; 3])),
            ("lm_head.weight", "F32", vec![2], f32s(&[v; 2])),
        ]
    };
    let files: Vec<(&str, Vec<Tensor>)> = vec![
        ("a", full(1.0)),
        ("b", vec![("body.weight", "F32", vec![3], f32s(&[2.0; 3]))]),
        (
            "c",
            vec![
                ("body.weight", "F16", vec![3], vec![0; 6]),
                ("lm_head.weight", "F32", vec![2], f32s(&[3.0; 2])),
            ],
        ),
        ("d", full(4.0)),
    ];
    for (k, (name, tensors)) in files.into_iter().enumerate() {
        // `first` names the file that sorts first.
        let prefix = if name == first { "0" } else { "1" };
        write(
            &folder.join(format!("{prefix}{name}.safetensors")),
            &tensors,
            (k as u64 + 1) << 20,
            0.05,
        );
    }
    folder
}

#[tokio::test(flavor = "multi_thread")]
async fn importing_files_that_disagree_gives_the_same_run_every_time() {
    for (first, stored, refused) in [
        // The first file by name that is accepted defines the manifest.
        ("a", vec!["0a", "1d"], vec!["1b", "1c"]),
        // Variant: the odd one out sorts first, so it defines the manifest.
        ("b", vec!["0b"], vec!["1a", "1c", "1d"]),
    ] {
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            let e = env().await;
            let folder = disagreeing_folder(e.dir.path(), first);
            let report = import_dir(
                &e.data,
                &folder,
                "r",
                &Source::Safetensors,
                IngestOptions::default(),
                Arc::new(()),
            )
            .await
            .unwrap();
            let run = e.data.db.run("r").await.unwrap().unwrap();
            let manifest: Vec<String> = e
                .data
                .db
                .manifest(run.id)
                .await
                .unwrap()
                .iter()
                .map(|m| format!("{} {}", m.name, m.dtype))
                .collect();
            let mut names: Vec<String> = report
                .refused
                .iter()
                .map(|(n, _)| n.trim_end_matches(".safetensors").to_owned())
                .collect();
            names.sort();
            assert_eq!(names, refused, "first {first}");
            assert_eq!(report.inserted, stored.len(), "first {first}");
            outcomes.push((manifest, names));
        }
        assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_with_metadata_but_no_tensors_is_refused() {
    let e = env().await;
    write(&e.path("empty.safetensors"), &[], 1 << 20, 0.05);
    let err = e
        .ingest("r", &e.path("empty.safetensors"), IngestOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("holds no tensors"), "{err}");
    // Variant: no metadata either (`{}` as the whole header).
    let mut bare = 8u64.to_le_bytes().to_vec();
    bare.extend_from_slice(b"{}      ");
    std::fs::write(e.path("bare.safetensors"), bare).unwrap();
    let err = e
        .ingest("r2", &e.path("bare.safetensors"), IngestOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("holds no tensors"), "{err}");
    // Nothing stored, so the run is never left unusable.
    assert!(e.data.store.list().unwrap().is_empty());
}

// ---- 3. Values the output type cannot hold ----------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn values_beyond_f16_are_refused_or_clamped_on_request() {
    let e = env().await;
    let big = |path: &str, nimg: u64, sigma: f64| {
        write(
            &e.path(path),
            &[
                ("big", "F32", vec![4], f32s(&[7e4, 1e5, -1e5, 1.0])),
                ("small", "F32", vec![2], f32s(&[0.5, -0.25])),
            ],
            nimg,
            sigma,
        )
    };
    big("s1.safetensors", 1 << 20, 0.05);
    big("s2.safetensors", 2 << 20, 0.10);
    for f in ["s1", "s2"] {
        e.ingest(
            "r",
            &e.path(&format!("{f}.safetensors")),
            IngestOptions::default(),
        )
        .await
        .unwrap();
    }
    // σ_rel 0.10 at the end is the last snapshot alone (weight exactly 1).
    let err = e
        .reconstruct("r", 0.10, OutDtype::F16, ExportOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::OutOfRange { .. }), "{text}");
    for needle in ["tensor big", "3 element(s)", "1.0000e5", "f32 or bf16"] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert!(!text.contains("tensor small"), "{text}");
    // Nothing of it stayed in the store.
    let stored = e.data.store.list().unwrap().len();
    assert_eq!(stored, 2, "only the two snapshots");
    // Clamped on request: the largest f16 value, and the file says so.
    let bytes = e
        .reconstruct(
            "r",
            0.10,
            OutDtype::F16,
            ExportOptions {
                clamp: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tensor_f32(&bytes, "big"), [65504.0, 65504.0, -65504.0, 1.0]);
    let header = read_header(&mut &bytes[..], bytes.len() as u64, "out").unwrap();
    let note = &header.metadata["clamped_out_of_range"];
    assert!(note.contains("big:3:1e5"), "{note}");
    // Its report carries a warning and the list.
    let row = e
        .data
        .db
        .reconstruction(&header.metadata["hindsight_reconstruction"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.report.clamped[0].elements, 3);
    assert!(row
        .report
        .warnings
        .iter()
        .any(|w| w.code == hindsight::phema::WarningCode::ClampedOutOfRange));
    // On the wire the code is the same enum's name.
    let wire = serde_json::to_value(&row.report).unwrap();
    assert!(wire["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["code"] == "clamped_out_of_range"));
    // Variant: bf16 holds them without clamping.
    let bytes = e
        .reconstruct("r", 0.07, OutDtype::BF16, ExportOptions::default())
        .await
        .unwrap();
    let header = read_header(&mut &bytes[..], bytes.len() as u64, "out").unwrap();
    assert!(!header.metadata.contains_key("clamped_out_of_range"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_finite_value_stored_without_check_finite_fails_naming_snapshot_and_tensor() {
    let e = env().await;
    write(
        &e.path("good.safetensors"),
        &[("w", "F32", vec![3], f32s(&[1.0, 2.0, 3.0]))],
        1 << 20,
        0.05,
    );
    write(
        &e.path("nan.safetensors"),
        &[("w", "F32", vec![3], f32s(&[1.0, f32::NAN, 3.0]))],
        2 << 20,
        0.05,
    );
    // Variant: an infinity in an F16 tensor of another run.
    let mut inf = vec![0u8; 6];
    inf[4..6].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    write(
        &e.path("inf.safetensors"),
        &[("h", "F16", vec![3], inf)],
        1 << 20,
        0.05,
    );
    for (run, f) in [("r", "good"), ("r", "nan"), ("h", "inf")] {
        e.ingest(
            run,
            &e.path(&format!("{f}.safetensors")),
            IngestOptions::default(),
        )
        .await
        .unwrap();
    }
    let nan_digest = e
        .data
        .db
        .snapshots(e.data.db.run("r").await.unwrap().unwrap().id)
        .await
        .unwrap()[1]
        .digest
        .clone();
    let err = e
        .reconstruct("r", 0.05, OutDtype::F32, ExportOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::NonFinite { .. }), "{text}");
    assert!(
        text.contains(&nan_digest) && text.contains("tensor w"),
        "{text}"
    );
    assert!(text.contains("element 1"), "{text}");
    let err = e
        .reconstruct("h", 0.05, OutDtype::F32, ExportOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("tensor h holds a non-finite value (element 2)"),
        "{err}"
    );
}

// ---- 4. Files that are not safetensors say what they are -------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_git_lfs_pointer_is_named_as_such() {
    let e = env().await;
    std::fs::write(
        e.path("x.safetensors"),
        "version https://git-lfs.github.com/spec/v1\n\
         oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n\
         size 3473920848\n",
    )
    .unwrap();
    let err = e
        .ingest("r", &e.path("x.safetensors"), IngestOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a safetensors file: it is a Git LFS pointer")
            && err.contains("git lfs pull"),
        "{err}"
    );
    assert!(!err.contains("exceeds the limit"), "{err}");
    // Variants: a web page, and a PyTorch checkpoint renamed.
    std::fs::write(
        e.path("page.safetensors"),
        "<!DOCTYPE html>\n<html>sign in</html>",
    )
    .unwrap();
    let err = e
        .ingest("r", &e.path("page.safetensors"), IngestOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("it is an HTML page"), "{err}");
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend([0u8; 200]);
    std::fs::write(e.path("model.safetensors"), zip).unwrap();
    let err = e
        .ingest("r", &e.path("model.safetensors"), IngestOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("it is a ZIP archive (a PyTorch checkpoint"),
        "{err}"
    );
}

// ---- 5. Numbers beyond the index's range are input errors ------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn times_beyond_the_index_and_blank_run_names_are_refused_by_name() {
    let e = env().await;
    let w = || vec![("w", "F32", vec![1], f32s(&[1.0]))];
    write(&e.path("far.safetensors"), &w(), 1 << 63, 0.05);
    let err = e
        .ingest("r", &e.path("far.safetensors"), IngestOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("nimg 9223372036854775808 is out of range"),
        "{err}"
    );
    // Variant: the solver refuses such times too (targets and snapshots).
    let snapshots = [Snapshot {
        nimg: u64::MAX,
        width: Width::SigmaRel(0.05),
    }];
    let err = solve(&snapshots, &[], &SolveOptions::default()).unwrap_err();
    assert!(err.to_string().starts_with("snapshots[0].nimg: "), "{err}");
    // The σ_rel nearest sqrt(1/12) has no positive γ: refused like any other out of range.
    let err = Width::SigmaRel(0.288_675_134_594_812_87)
        .resolve("x")
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    for name in ["   ", "\t", " run", "run ", "a\u{7}b"] {
        let err = e.data.db.run_or_create(name).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{name:?}: {err}");
    }
}

// ---- 6. EMAs updated by other rules: the solver uses the profile they really have ---------------

/// A deterministic parameter trajectory with structure at every scale: θ(step) for step 1..=n.
fn trajectory(n: usize) -> Vec<f64> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut value = 0.0;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            value += (state % 2001) as f64 / 1000.0 - 1.0;
            value
        })
        .collect()
}

/// ema-pytorch's KarrasEMA on a scalar, as its `update()` runs (one call per step): returns
/// the EMA after each call.
fn ema_pytorch_trajectory(theta: &[f64], gamma: f64, update_every: usize) -> Vec<f64> {
    let mut ema = 0.0;
    theta
        .iter()
        .enumerate()
        .map(|(s, &value)| {
            if s % update_every == 0 {
                if s == 0 {
                    ema = value;
                }
                let beta = (1.0 - 1.0 / (s as f64 + 2.0)).powf(gamma + 1.0);
                ema = beta * ema + (1.0 - beta) * value;
            }
            ema
        })
        .collect()
}

/// The true power-function EMA of `theta` at `steps` steps: each step's parameters weigh the
/// profile's mass over that step.
fn true_ema(theta: &[f64], gamma: f64, steps: usize) -> f64 {
    let t = steps as f64;
    (1..=steps)
        .map(|k| {
            let mass = (k as f64 / t).powf(gamma + 1.0) - ((k - 1) as f64 / t).powf(gamma + 1.0);
            mass * theta[k - 1]
        })
        .sum()
}

#[test]
fn ema_pytorch_update_every_is_taken_into_account() {
    let steps = 20_000;
    let theta = trajectory(steps);
    let scale = theta.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let sigma_rels = [0.05, 0.28];
    let gammas: Vec<f64> = sigma_rels
        .iter()
        .map(|&s| hindsight::phema::sigma_rel_to_gamma(s, "s").unwrap())
        .collect();
    let target_gamma = hindsight::phema::sigma_rel_to_gamma(0.10, "t").unwrap();
    let truth = true_ema(&theta, target_gamma, steps);
    let target = [Target {
        width: Width::SigmaRel(0.10),
        nimg: None,
    }];
    for update_every in [100, 1] {
        // Snapshots every 1000 steps of both EMAs (one image per step).
        let mut snapshots = Vec::new();
        let mut realised = Vec::new();
        let mut values = Vec::new();
        for (&sigma_rel, &gamma) in sigma_rels.iter().zip(&gammas) {
            let ema = ema_pytorch_trajectory(&theta, gamma, update_every);
            for step in (1000..=steps).step_by(1000) {
                snapshots.push(Snapshot {
                    nimg: step as u64,
                    width: Width::SigmaRel(sigma_rel),
                });
                let profile = RealisedProfile::EmaPytorch {
                    update_every: update_every as u64,
                    images_per_step: 1,
                };
                realised.push(Some(
                    profile.realise(step as u64, Some(gamma), "s").unwrap(),
                ));
                values.push(ema[step - 1]);
            }
        }
        let apply = |w: &[f64]| w.iter().zip(&values).map(|(w, v)| w * v).sum::<f64>();
        let assumed = &solve(&snapshots, &target, &SolveOptions::default()).unwrap()[0];
        let real =
            &solve_realised(&snapshots, &realised, &target, &SolveOptions::default()).unwrap()[0];
        let miss = |w: &[f64]| (apply(w) - truth).abs() / scale;
        eprintln!(
            "update_every {update_every}: as power functions error {:.3} gain {:.2} miss {:.3}; \
             realised error {:.3} gain {:.2} miss {:.3}",
            assumed.relative_error,
            assumed.noise_gain,
            miss(&assumed.coefficients),
            real.relative_error,
            real.noise_gain,
            miss(&real.coefficients)
        );
        if update_every == 100 {
            // Taken for power functions, the snapshots promise a good σ_rel 0.10 (0.7 % error)
            // and deliver something far from it (measured: 0.70 of the trajectory's scale).
            // With their real profiles the report tells the truth: a large profile error, and
            // weights that cancel by the ten thousands (the EMAs hold mostly their first
            // parameters; only huge differences of them isolate the recent ones), which
            // amplify any noise in the stored weights as much.
            assert!(assumed.relative_error < 0.05, "{}", assumed.relative_error);
            assert!(
                miss(&assumed.coefficients) > 0.3,
                "{}",
                miss(&assumed.coefficients)
            );
            assert!(real.relative_error > 0.2, "{}", real.relative_error);
            assert!(real.noise_gain > 1000.0, "{}", real.noise_gain);
            let codes: Vec<WarningCode> = real.warnings.iter().map(|w| w.code).collect();
            assert!(
                codes.contains(&WarningCode::LargeProfileError)
                    && codes.contains(&WarningCode::LargeNoiseGain),
                "{codes:?}"
            );
        } else {
            // Updated every step ema-pytorch's EMAs are (nearly) the power functions: both
            // solves are good and land near the true EMA.
            assert!(real.relative_error < 0.05, "{}", real.relative_error);
            assert!(
                miss(&real.coefficients) < 0.02,
                "{}",
                miss(&real.coefficients)
            );
        }
    }
}

#[test]
fn constant_beta_emas_reconstruct_with_an_honest_report() {
    // Variant: "traditional" EMAs with half-lives of 500 and 3000 steps, saved every 1000.
    let steps = 20_000;
    let theta = trajectory(steps);
    let scale = theta.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut snapshots = Vec::new();
    let mut realised = Vec::new();
    let mut values = Vec::new();
    for half_life in [500.0, 3000.0] {
        let beta = 0.5f64.powf(1.0 / half_life);
        let mut ema = 0.0;
        let trajectory: Vec<f64> = theta
            .iter()
            .map(|&v| {
                ema = beta * ema + (1.0 - beta) * v;
                ema
            })
            .collect();
        for step in (1000..=steps).step_by(1000) {
            let profile = RealisedProfile::ConstantBeta {
                beta: None,
                half_life_nimg: Some(half_life),
                interval_nimg: 1,
            };
            let table = profile.realise(step as u64, None, "s").unwrap();
            snapshots.push(Snapshot {
                nimg: step as u64,
                width: Width::SigmaRel(table.sigma_rel().min(0.288)),
            });
            realised.push(Some(table));
            values.push(trajectory[step - 1]);
        }
    }
    for sigma_rel in [0.03, 0.10] {
        let target = [Target {
            width: Width::SigmaRel(sigma_rel),
            nimg: None,
        }];
        let s =
            &solve_realised(&snapshots, &realised, &target, &SolveOptions::default()).unwrap()[0];
        let gamma = hindsight::phema::sigma_rel_to_gamma(sigma_rel, "t").unwrap();
        let got: f64 = s.coefficients.iter().zip(&values).map(|(w, v)| w * v).sum();
        let miss = (got - true_ema(&theta, gamma, steps)).abs() / scale;
        // The report bounds what it delivers (the trajectory's scale times the profile error,
        // with room for the weights' amplification).
        assert!(
            miss <= s.relative_error * s.coefficient_l1 + 0.01,
            "σ_rel {sigma_rel}: miss {miss}, reported {}",
            s.relative_error
        );
    }
    // The tabulated profile of a constant-β EMA has the σ_rel of its half-life.
    // (An exponential's standard deviation is its mean age, half-life / ln 2.)
    let t = Tabulated::constant_beta(0.5f64.powf(1.0 / 500.0), 1, 20_000, "c").unwrap();
    let expected = 500.0 / std::f64::consts::LN_2 / 20_000.0;
    assert!(
        (t.sigma_rel() / expected - 1.0).abs() < 0.01,
        "{}",
        t.sigma_rel()
    );
}
