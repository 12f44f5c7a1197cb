//! The materializer against direct weighted sums, with the EDM2 reference coefficients.

use std::collections::BTreeMap;

use hindsight::format::read_header;
use hindsight::materialize::{materialize, Input, OutDtype};
use hindsight::store::{BlobStore, Checksum};
use safetensors::SafeTensors;

mod common;
use common::snapshot::SnapshotBuilder;

/// Snapshot i: f32 `w` (3×5), f16 `h` (7), and an I64 `step` = i; values from a hash of (i, j).
fn snapshot_bytes(i: usize) -> Vec<u8> {
    let value = |i: usize, j: usize| {
        let mut z = (i as u64 * 1_000_003 + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 31;
        ((z % 20_000) as f32 - 10_000.0) / 4096.0
    };
    let w: Vec<f32> = (0..15).map(|j| value(i, j)).collect();
    let h: Vec<f32> = (0..7).map(|j| value(i, 100 + j)).collect();
    SnapshotBuilder::new()
        .f32("w", &[3, 5], &w)
        .f16("h", &[7], &h)
        .i64("step", &[], &[i as i64])
        .bytes()
}

fn floats(st: &SafeTensors<'_>, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => panic!("{other:?}"),
    }
}

fn setup(n: usize) -> (tempfile::TempDir, BlobStore, Vec<Input>, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let mut inputs = Vec::new();
    let mut files = Vec::new();
    for i in 0..n {
        let bytes = snapshot_bytes(i);
        let (digest, _) = store.put(&bytes[..]).unwrap();
        let header = read_header(&mut &bytes[..], bytes.len() as u64, "snapshot").unwrap();
        inputs.push(Input {
            digest,
            header,
            nimg: (i as u64 + 1) * 1000,
            checksum: Some(Checksum::of(&bytes)),
        });
        files.push(bytes);
    }
    (dir, store, inputs, files)
}

#[test]
fn weighted_sums_match_the_reference_coefficients_to_f32_rounding() {
    // The 30-snapshot case of the EDM2 reference vectors: its coefficients for three targets.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/phema_vectors.json"
    ))
    .unwrap();
    let data: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = data["reconstructions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "irregular-30")
        .unwrap();
    let weights: Vec<Vec<f64>> = case["coefficients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    let (_dir, store, inputs, files) = setup(30);
    let mut outs: Vec<Vec<u8>> = vec![Vec::new(); weights.len()];
    {
        let mut writers: Vec<&mut (dyn std::io::Write + Send)> = outs
            .iter_mut()
            .map(|o| o as &mut (dyn std::io::Write + Send))
            .collect();
        let meta = vec![BTreeMap::new(); weights.len()];
        materialize(
            &store,
            &inputs,
            &weights,
            OutDtype::F32,
            &meta,
            &mut writers,
        )
        .unwrap();
    }
    let parsed: Vec<SafeTensors<'_>> = files
        .iter()
        .map(|f| SafeTensors::deserialize(f).unwrap())
        .collect();
    for (k, out) in outs.iter().enumerate() {
        let st = SafeTensors::deserialize(out).unwrap();
        for name in ["w", "h"] {
            let got = floats(&st, name);
            for (j, g) in got.iter().enumerate() {
                let terms: Vec<f64> = parsed
                    .iter()
                    .zip(&weights[k])
                    .map(|(p, w)| w * floats(p, name)[j])
                    .collect();
                let exact: f64 = terms.iter().sum();
                let scale: f64 = terms.iter().map(|t| t.abs()).sum::<f64>().max(exact.abs());
                assert!(
                    (g - exact).abs() <= 2e-6 * scale + 1e-30,
                    "target {k} {name}[{j}]: {g} vs {exact}"
                );
            }
        }
        // Non-float tensors come from the newest snapshot with a weight.
        let step = st.tensor("step").unwrap();
        assert_eq!(step.data(), &29i64.to_le_bytes());
        let header = read_header(&mut &out[..], out.len() as u64, "out").unwrap();
        assert_eq!(
            header.metadata["copied_from_newest_snapshot"],
            "step (nimg 30000)"
        );
        assert!(header.metadata.contains_key("accumulation"));
    }
}

#[test]
fn half_precision_outputs_and_precision_choice() {
    let (_dir, store, inputs, files) = setup(3);
    let weights = vec![vec![0.25, 0.25, 0.5], vec![-3.0, 2.0, 2.0]];
    for dtype in [OutDtype::F16, OutDtype::BF16] {
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); 2];
        {
            let mut writers: Vec<&mut (dyn std::io::Write + Send)> = outs
                .iter_mut()
                .map(|o| o as &mut (dyn std::io::Write + Send))
                .collect();
            let meta = vec![BTreeMap::from([("target".to_owned(), "x".to_owned())]); 2];
            materialize(&store, &inputs, &weights, dtype, &meta, &mut writers).unwrap();
        }
        for (k, out) in outs.iter().enumerate() {
            let st = SafeTensors::deserialize(out).unwrap();
            let got = floats(&st, "w");
            let want: Vec<f64> = (0..15)
                .map(|j| {
                    files
                        .iter()
                        .zip(&weights[k])
                        .map(|(f, w)| w * floats(&SafeTensors::deserialize(f).unwrap(), "w")[j])
                        .sum()
                })
                .collect();
            let tol = if dtype == OutDtype::F16 { 1e-3 } else { 8e-3 };
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= tol * e.abs().max(1.0),
                    "{dtype:?}: {g} vs {e}"
                );
            }
            let header = read_header(&mut &out[..], out.len() as u64, "out").unwrap();
            assert_eq!(header.metadata["target"], "x");
            // Σ|w| = 7 > 4 for the second target: the whole pass accumulates in f64.
            assert_eq!(header.metadata["accumulation"], "f64");
        }
    }
}

#[test]
fn a_corrupt_input_fails_the_reconstruction() {
    // One flipped bit in a tensor, and one in the header, caught by the recorded checksum and,
    // for a blob without one, by its digest.
    for (offset_from_end, with_checksum) in [(1, true), (1, false), (0, true), (0, false)] {
        let (_dir, store, mut inputs, _files) = setup(3);
        if !with_checksum {
            inputs[1].checksum = None;
        }
        let path = store.path(&inputs[1].digest);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = if offset_from_end == 0 {
            10
        } else {
            bytes.len() - offset_from_end
        };
        bytes[at] ^= 1;
        std::fs::remove_file(&path).unwrap(); // blobs are read-only
        std::fs::write(&path, bytes).unwrap();
        let mut out = Vec::new();
        let mut writers: Vec<&mut (dyn std::io::Write + Send)> = vec![&mut out];
        let err = materialize(
            &store,
            &inputs,
            &[vec![0.2, 0.3, 0.5]],
            OutDtype::F32,
            &[BTreeMap::new()],
            &mut writers,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(&inputs[1].digest.to_hex()), "{err}");
        assert!(err.contains("corrupt"), "{err}");
        if with_checksum {
            assert!(err.contains("checksum"), "{err}");
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let (_dir, store, inputs, _files) = setup(2);
    let mut out = Vec::new();
    let mut writers: Vec<&mut (dyn std::io::Write + Send)> = vec![&mut out];
    let meta = [BTreeMap::new()];
    let e = materialize(
        &store,
        &inputs,
        &[vec![1.0]],
        OutDtype::F32,
        &meta,
        &mut writers,
    );
    assert!(e.unwrap_err().to_string().starts_with("weights[0]:"));
    let e = materialize(
        &store,
        &inputs,
        &[vec![f64::NAN, 1.0]],
        OutDtype::F32,
        &meta,
        &mut writers,
    );
    assert!(e.is_err());
    let mut other = inputs.clone();
    other[1].header.tensors[0].shape = vec![5, 3];
    let e = materialize(
        &store,
        &other,
        &[vec![0.5, 0.5]],
        OutDtype::F32,
        &meta,
        &mut writers,
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("differ from the first input"));
}

/// Snapshot i of a "model" with tensors larger than one work chunk (64 Ki elements): f16
/// `big` (150 001 elements, odd on purpose), bf16 `mid` (70 000), f32 `small` (3).
fn large_snapshot(i: usize) -> Vec<u8> {
    let value = |j: usize| {
        let mut z = (i as u64 * 7_000_003 + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 33;
        ((z % 4096) as f32 - 2048.0) / 1024.0
    };
    let big: Vec<f32> = (0..150_001).map(value).collect();
    let mid: Vec<f32> = (0..70_000).map(|j| value(200_000 + j)).collect();
    let small: Vec<f32> = (0..3).map(|j| value(300_000 + j)).collect();
    SnapshotBuilder::new()
        .f16("big", &[150_001], &big)
        .bf16("mid", &[700, 100], &mid)
        .f32("small", &[3], &small)
        .bytes()
}

fn run_on_threads(
    threads: usize,
    store: &BlobStore,
    inputs: &[Input],
    weights: &[Vec<f64>],
) -> Vec<Vec<u8>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); weights.len()];
        let mut writers: Vec<&mut (dyn std::io::Write + Send)> = outs
            .iter_mut()
            .map(|o| o as &mut (dyn std::io::Write + Send))
            .collect();
        let meta = vec![BTreeMap::new(); weights.len()];
        materialize(store, inputs, weights, OutDtype::F32, &meta, &mut writers).unwrap();
        drop(writers);
        outs
    })
}

#[test]
fn multi_chunk_tensors_many_inputs_and_thread_count_independence() {
    // 21 inputs = three groups of up to 8; tensors span several chunks.
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let files: Vec<Vec<u8>> = (0..21).map(large_snapshot).collect();
    let inputs: Vec<Input> = files
        .iter()
        .enumerate()
        .map(|(i, bytes)| Input {
            digest: store.put(&bytes[..]).unwrap().0,
            header: read_header(&mut &bytes[..], bytes.len() as u64, "snapshot").unwrap(),
            nimg: i as u64,
            // Half the inputs verify by checksum, half by digest (blobs without one).
            checksum: (i % 2 == 0).then(|| Checksum::of(bytes)),
        })
        .collect();
    // A plain average, a cancelling combination (f64 path), and one using a single input.
    let average = vec![1.0 / 21.0; 21];
    let cancelling: Vec<f64> = (0..21)
        .map(|i| if i % 2 == 0 { 1.5 } else { -1.25 })
        .collect();
    let single: Vec<f64> = (0..21).map(|i| if i == 13 { 1.0 } else { 0.0 }).collect();
    for weights in [
        vec![average.clone(), single.clone()],
        vec![cancelling.clone(), average],
    ] {
        let one = run_on_threads(1, &store, &inputs, &weights);
        let three = run_on_threads(3, &store, &inputs, &weights);
        assert_eq!(
            one, three,
            "the bytes must not depend on the number of threads"
        );
        let parsed: Vec<SafeTensors<'_>> = files
            .iter()
            .map(|f| SafeTensors::deserialize(f).unwrap())
            .collect();
        let columns: Vec<Vec<Vec<f64>>> = ["big", "mid", "small"]
            .iter()
            .map(|name| parsed.iter().map(|p| floats(p, name)).collect())
            .collect();
        for (k, out) in one.iter().enumerate() {
            let st = SafeTensors::deserialize(out).unwrap();
            for (t, name) in ["big", "mid", "small"].iter().enumerate() {
                let got = floats(&st, name);
                assert_eq!(got.len(), columns[t][0].len());
                for (j, g) in got.iter().enumerate() {
                    let terms = columns[t].iter().zip(&weights[k]).map(|(c, w)| w * c[j]);
                    let exact: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum();
                    assert!(
                        (g - exact).abs() <= 2e-6 * scale + 1e-12,
                        "target {k} {name}[{j}]: {g} vs {exact}"
                    );
                }
            }
            if weights[k] == single {
                // Weight exactly 1 on one input reproduces it exactly.
                assert_eq!(floats(&st, "big"), columns[0][13]);
            }
        }
    }
}
