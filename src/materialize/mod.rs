//! Weighted sums of snapshots → new weights, in one streaming pass for all targets.
//!
//! For K targets with weights `w[k][i]` over N snapshot files, every output tensor is
//! `Σ_i w[k][i] · snapshot_i`. The snapshot files share one tensor layout (the run's
//! manifest), so they are read in lockstep, tensor by tensor, each file front to back through
//! a [`VerifiedReader`] — every input is hashed on the way and a corrupt one fails the whole
//! reconstruction before anything is published. Memory is bounded by one tensor per input
//! being read plus K accumulators for the current tensor, whatever N and the model size.
//!
//! Floating-point tensors (F16, BF16, F32, F64) are averaged, accumulating in f32, or in f64
//! when the weights are large (Σ|w| above [`F64_ACCUMULATION_L1`], where cancellation would
//! otherwise eat f32's precision). Other tensors (step counters, integer buffers) are copied
//! from the newest snapshot with a non-zero weight, as the output's metadata records.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ingest::{write_safetensors_header, Header, OutTensorInfo, TensorEntry};
use crate::store::{BlobStore, Digest};

/// Σ|w| above which accumulation switches from f32 to f64.
pub const F64_ACCUMULATION_L1: f64 = 4.0;

/// Element type of the reconstructed floating-point tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl OutDtype {
    fn name(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
        }
    }

    fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::BF16 => 2,
        }
    }
}

/// One input snapshot: its blob, its validated header, and its training time.
#[derive(Clone, Debug)]
pub struct Input {
    /// The blob holding the snapshot's safetensors file.
    pub digest: Digest,
    /// Its header (see [`crate::ingest::read_header`]).
    pub header: Header,
    /// Training time, to pick the newest snapshot for copied tensors.
    pub nimg: u64,
}

fn element_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

fn decode(dtype: &str, bytes: &[u8], out: &mut [f64]) {
    match dtype {
        "F64" => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        "F32" => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64;
            }
        }
        "F16" => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f64();
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f64();
            }
        }
    }
}

fn encode(dtype: OutDtype, values: &[f64], out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        OutDtype::F32 => out.extend(values.iter().flat_map(|&v| (v as f32).to_le_bytes())),
        OutDtype::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f64(v).to_le_bytes())),
        OutDtype::BF16 => out.extend(values.iter().flat_map(|&v| bf16::from_f64(v).to_le_bytes())),
    }
}

/// Reconstructs K outputs from the inputs in one pass. `weights[k][i]` is target k's weight of
/// input i; `outputs[k]` receives a complete safetensors file with `metadata[k]` (to which the
/// accumulation precision and the copied tensors are added).
pub fn materialize(
    store: &BlobStore,
    inputs: &[Input],
    weights: &[Vec<f64>],
    out_dtype: OutDtype,
    metadata: &[BTreeMap<String, String>],
    outputs: &mut [&mut dyn Write],
) -> Result<()> {
    let k_count = weights.len();
    if inputs.is_empty() || k_count == 0 {
        return Err(Error::invalid("inputs", "nothing to reconstruct"));
    }
    if outputs.len() != k_count || metadata.len() != k_count {
        return Err(Error::invalid(
            "outputs",
            "one output and one metadata map per target are needed",
        ));
    }
    for (k, w) in weights.iter().enumerate() {
        if w.len() != inputs.len() || w.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                format!("weights[{k}]"),
                format!("{} finite weights are needed, one per input", inputs.len()),
            ));
        }
    }
    // All inputs must share the first one's tensors, in the same order.
    let layout: &[TensorEntry] = &inputs[0].header.tensors;
    for (i, input) in inputs.iter().enumerate().skip(1) {
        let same = input.header.tensors.len() == layout.len()
            && input
                .header
                .tensors
                .iter()
                .zip(layout)
                .all(|(a, b)| a.name == b.name && a.dtype == b.dtype && a.shape == b.shape);
        if !same {
            return Err(Error::invalid(
                format!("inputs[{i}]"),
                "its tensors differ from the first input's",
            ));
        }
    }
    let use_f64 = weights
        .iter()
        .any(|w| w.iter().map(|v| v.abs()).sum::<f64>() > F64_ACCUMULATION_L1);
    // Copied (non-float) tensors come from the newest input any target uses.
    let newest = (0..inputs.len())
        .filter(|&i| weights.iter().any(|w| w[i] != 0.0))
        .max_by_key(|&i| inputs[i].nimg)
        .unwrap_or(inputs.len() - 1);

    // Output headers are known up front.
    let infos: Vec<OutTensorInfo> = layout
        .iter()
        .map(|t| {
            let float = t.is_float();
            let elements: u64 = t.shape.iter().product();
            OutTensorInfo {
                name: t.name.clone(),
                dtype: if float {
                    out_dtype.name().to_owned()
                } else {
                    t.dtype.clone()
                },
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                len: if float {
                    elements * out_dtype.size() as u64
                } else {
                    t.len
                },
            }
        })
        .collect();
    let copied: Vec<&str> = layout
        .iter()
        .filter(|t| !t.is_float())
        .map(|t| t.name.as_str())
        .collect();
    for (k, out) in outputs.iter_mut().enumerate() {
        let mut meta = metadata[k].clone();
        meta.insert(
            "accumulation".into(),
            if use_f64 { "f64" } else { "f32" }.into(),
        );
        if !copied.is_empty() {
            meta.insert(
                "copied_from_newest_snapshot".into(),
                format!("{} (nimg {})", copied.join(","), inputs[newest].nimg),
            );
        }
        write_safetensors_header(out, &infos, &meta)
            .map_err(|e| Error::io("writing a reconstruction", e))?;
    }

    // Lockstep pass over the inputs, each read front to back and hashed on the way.
    let mut readers = inputs
        .iter()
        .map(|input| {
            let mut r = store.open_verified(&input.digest)?;
            let mut skip = vec![0u8; input.header.data_start() as usize];
            r.read_exact(&mut skip)
                .map_err(|e| Error::io(format!("reading blob {}", input.digest), e))?;
            Ok(r)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut raw = Vec::new();
    let mut values = Vec::new();
    let mut encoded = Vec::new();
    for t in layout {
        let n = t.shape.iter().product::<u64>() as usize;
        if !t.is_float() {
            let mut kept = Vec::new();
            for (i, r) in readers.iter_mut().enumerate() {
                raw.resize(t.len as usize, 0);
                r.read_exact(&mut raw)
                    .map_err(|e| Error::io(format!("reading blob {}", inputs[i].digest), e))?;
                if i == newest {
                    kept = raw.clone();
                }
            }
            for out in outputs.iter_mut() {
                out.write_all(&kept)
                    .map_err(|e| Error::io("writing a reconstruction", e))?;
            }
            continue;
        }
        let mut acc = vec![vec![0.0f64; n]; k_count];
        let mut acc32 = vec![vec![0.0f32; if use_f64 { 0 } else { n }]; k_count];
        values.resize(n, 0.0);
        for (i, r) in readers.iter_mut().enumerate() {
            raw.resize(n * element_size(&t.dtype), 0);
            r.read_exact(&mut raw)
                .map_err(|e| Error::io(format!("reading blob {}", inputs[i].digest), e))?;
            if weights.iter().all(|w| w[i] == 0.0) {
                continue;
            }
            decode(&t.dtype, &raw, &mut values);
            for k in 0..k_count {
                let w = weights[k][i];
                if w == 0.0 {
                    continue;
                }
                if use_f64 {
                    acc[k]
                        .par_iter_mut()
                        .zip(values.par_iter())
                        .for_each(|(a, v)| *a += w * v);
                } else {
                    let w = w as f32;
                    acc32[k]
                        .par_iter_mut()
                        .zip(values.par_iter())
                        .for_each(|(a, v)| *a += w * (*v as f32));
                }
            }
        }
        for (k, out) in outputs.iter_mut().enumerate() {
            if !use_f64 {
                for (a, b) in acc[k].iter_mut().zip(&acc32[k]) {
                    *a = *b as f64;
                }
            }
            encode(out_dtype, &acc[k], &mut encoded);
            out.write_all(&encoded)
                .map_err(|e| Error::io("writing a reconstruction", e))?;
        }
    }
    // Reaching the end of every input checks its digest.
    for (i, r) in readers.iter_mut().enumerate() {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)
            .map_err(|e| Error::io(format!("verifying blob {}", inputs[i].digest), e))?;
    }
    Ok(())
}
