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
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ingest::{write_safetensors_header, Header, OutTensorInfo, TensorEntry};
use crate::store::{BlobStore, Checksum, ChecksumHasher, Digest};

/// Σ|w| above which accumulation switches from f32 to f64.
pub const F64_ACCUMULATION_L1: f64 = 4.0;

/// Element type of the reconstructed floating-point tensors.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
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
    /// Lower-case name, as in requests and on the command line: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutDtype::F32 => "f32",
            OutDtype::F16 => "f16",
            OutDtype::BF16 => "bf16",
        }
    }

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
    /// Its recorded XXH3-128 checksum: verified reads check it (fast); without one they
    /// re-derive the BLAKE3 digest.
    pub checksum: Option<Checksum>,
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

/// Elements per work chunk: each input is read 64 Ki elements at a time; larger chunks mean
/// fewer synchronisations of the worker threads, smaller ones less memory per target (each
/// worker holds 256 KiB of sums per target).
const CHUNK_ELEMENTS: usize = 64 << 10;

/// How [`materialize_with`] reads and reports.
pub struct Options<'a> {
    /// Hash every input as it is read and fail on a mismatch (the default). Off, a damaged
    /// blob goes unnoticed until `hindsight verify`; reads are then bounded by memory bandwidth
    /// rather than by hashing.
    pub verify: bool,
    /// Called after each chunk with the number of input bytes it read (from worker threads).
    pub progress: &'a (dyn Fn(u64) + Sync),
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            verify: true,
            progress: &|_| {},
        }
    }
}

/// What a materialization did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Accumulated in f64 rather than f32.
    pub f64_accumulation: bool,
    /// Bytes read from the inputs.
    pub bytes_read: u64,
}

/// How an input's bytes are checked as they are read.
enum Check {
    /// Against its recorded XXH3-128 checksum.
    Checksum(Box<ChecksumHasher>, Checksum),
    /// Against its BLAKE3 digest (no checksum recorded).
    Digest(Box<blake3::Hasher>),
}

/// One input being read: an open blob, where the next read starts, and the running hash.
struct Cursor {
    file: File,
    digest: Digest,
    pos: u64,
    check: Option<Check>,
}

impl Cursor {
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, self.pos).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt {
                    expected: self.digest.to_hex(),
                    actual: "(the blob is shorter than its header says)".into(),
                }
            } else {
                Error::io(format!("reading blob {}", self.digest), e)
            }
        })?;
        self.pos += buf.len() as u64;
        match self.check.as_mut() {
            Some(Check::Checksum(h, _)) => h.update(buf),
            Some(Check::Digest(h)) => {
                h.update(buf);
            }
            None => {}
        }
        Ok(())
    }

    /// Checks the checksum or digest of everything read, after reading whatever follows the
    /// last tensor.
    fn finish(mut self) -> Result<()> {
        if self.check.is_none() {
            return Ok(());
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("reading blob {}", self.digest), e))?
            .len();
        if len > self.pos {
            let mut rest = vec![0u8; (len - self.pos) as usize];
            self.read(&mut rest)?;
        }
        match self.check {
            Some(Check::Checksum(h, expected)) => {
                let actual = h.finish();
                if actual != expected {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: format!(
                            "(content changed: checksum {actual}, recorded {expected})"
                        ),
                    });
                }
            }
            Some(Check::Digest(h)) => {
                let actual = Digest::from(h.finalize());
                if actual != self.digest {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: actual.to_hex(),
                    });
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// Running sums for K targets over one chunk: f32, or f64 for large coefficients.
enum Acc {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

impl Acc {
    fn new(f64_accumulation: bool, k: usize, chunk: usize) -> Self {
        if f64_accumulation {
            Acc::F64(vec![vec![0.0; chunk]; k])
        } else {
            Acc::F32(vec![vec![0.0; chunk]; k])
        }
    }

    /// Sets target k's sums at `start..start + m` to `Σ_b weights[b] · values[b]`.
    fn set_block(
        &mut self,
        k: usize,
        start: usize,
        m: usize,
        values: &[[f32; BLOCK]],
        weights: &[f64],
    ) {
        match self {
            Acc::F32(a) => kernels::combine_f32(&mut a[k][start..start + m], values, weights),
            Acc::F64(a) => kernels::combine_f64(&mut a[k][start..start + m], values, weights),
        }
    }

    /// Adds the workers' partial sums over the first `n` elements, in worker order (so the
    /// result does not depend on scheduling), in parallel over targets and pieces; with
    /// `add` false the first worker's sums replace the total instead of adding to it.
    fn add_partials(&mut self, workers: &[Worker], n: usize, add: bool) {
        match self {
            Acc::F32(total) => {
                let parts: Vec<&[Vec<f32>]> = workers
                    .iter()
                    .map(|w| match &w.acc {
                        Acc::F32(a) => a.as_slice(),
                        Acc::F64(_) => unreachable!("all accumulators share one precision"),
                    })
                    .collect();
                merge_sums(total, &parts, n, add);
            }
            Acc::F64(total) => {
                let parts: Vec<&[Vec<f64>]> = workers
                    .iter()
                    .map(|w| match &w.acc {
                        Acc::F64(a) => a.as_slice(),
                        Acc::F32(_) => unreachable!("all accumulators share one precision"),
                    })
                    .collect();
                merge_sums(total, &parts, n, add);
            }
        }
    }

    /// Encodes target k's sums over `range` (at most [`ENCODE_PIECE`] elements) into `out`.
    fn encode(&self, k: usize, range: std::ops::Range<usize>, dtype: OutDtype, out: &mut [u8]) {
        let mut narrow = [0f32; ENCODE_PIECE];
        let sum: &[f32] = match self {
            Acc::F32(a) => &a[k][range],
            Acc::F64(a) => {
                let narrow = &mut narrow[..range.len()];
                narrow
                    .iter_mut()
                    .zip(&a[k][range])
                    .for_each(|(n, v)| *n = *v as f32);
                narrow
            }
        };
        match dtype {
            OutDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(sum)),
            OutDtype::F16 => {
                let mut halves = [f16::ZERO; ENCODE_PIECE];
                let halves = &mut halves[..sum.len()];
                halves.convert_from_f32_slice(sum);
                out.copy_from_slice(bytemuck::cast_slice(halves));
            }
            OutDtype::BF16 => {
                let mut halves = [bf16::ZERO; ENCODE_PIECE];
                let halves = &mut halves[..sum.len()];
                halves.convert_from_f32_slice(sum);
                out.copy_from_slice(bytemuck::cast_slice(halves));
            }
        }
    }
}

/// `total[k][..n] (+)= Σ_i parts[i][k][..n]`, summed in `parts` order.
fn merge_sums<T: Copy + std::ops::AddAssign + Send + Sync>(
    total: &mut [Vec<T>],
    parts: &[&[Vec<T>]],
    n: usize,
    add: bool,
) {
    total.par_iter_mut().enumerate().for_each(|(k, t)| {
        t[..n]
            .par_chunks_mut(ENCODE_PIECE)
            .enumerate()
            .for_each(|(j, piece)| {
                let start = j * ENCODE_PIECE;
                let end = start + piece.len();
                for (i, p) in parts.iter().enumerate() {
                    let src = &p[k][start..end];
                    if i == 0 && !add {
                        piece.copy_from_slice(src);
                    } else {
                        piece.iter_mut().zip(src).for_each(|(a, b)| *a += *b);
                    }
                }
            })
    });
}

/// Elements per piece of the parallel merge and encode steps.
const ENCODE_PIECE: usize = 4096;

/// Inputs per group: a worker reads a group's chunks, then combines them block by block, so
/// each accumulator is loaded and stored once per group rather than once per input.
const BATCH_INPUTS: usize = 8;
/// Elements combined at a time: a group's values (8 × 2 KiB) and one target's sums stay in
/// L1 cache while every input of the group is added in.
const BLOCK: usize = 512;

/// Scratch of one worker: raw chunks of its group of inputs (8-byte aligned), one block of
/// their values as f32, and the group's sums.
struct Worker {
    raw: Vec<Vec<u64>>,
    values: Vec<[f32; BLOCK]>,
    acc: Acc,
}

impl Worker {
    fn new(f64_accumulation: bool, k: usize, chunk: usize) -> Self {
        Self {
            raw: Vec::new(),
            values: vec![[0.0; BLOCK]; BATCH_INPUTS],
            acc: Acc::new(f64_accumulation, k, chunk),
        }
    }

    /// Reads `n` elements of `dtype` from each cursor in `group` (at most [`BATCH_INPUTS`])
    /// and sets this worker's sums to their weighted sum.
    fn accumulate(
        &mut self,
        group: &mut [Cursor],
        weights: &[&[f64]],
        dtype: &str,
        n: usize,
    ) -> Result<()> {
        debug_assert!(group.len() <= BATCH_INPUTS);
        let size = element_size(dtype);
        let words = (n * size).div_ceil(8);
        if self.raw.len() < group.len() {
            self.raw.resize_with(group.len(), Vec::new);
        }
        for (cursor, raw) in group.iter_mut().zip(&mut self.raw) {
            if raw.len() < words {
                raw.resize(words, 0);
            }
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(raw);
            cursor.read(&mut bytes[..n * size])?;
        }
        let count = group.len();
        for start in (0..n).step_by(BLOCK) {
            let m = BLOCK.min(n - start);
            for (raw, values) in self.raw[..count].iter().zip(&mut self.values) {
                let bytes: &[u8] = bytemuck::cast_slice(raw);
                let bytes = &bytes[start * size..(start + m) * size];
                let values = &mut values[..m];
                match dtype {
                    "F16" => kernels::f16_to_f32(bytemuck::cast_slice(bytes), values),
                    "BF16" => bytemuck::cast_slice::<u8, bf16>(bytes).convert_to_f32_slice(values),
                    "F32" => values.copy_from_slice(bytemuck::cast_slice(bytes)),
                    // F64 inputs are rounded to f32 before the sum; outputs are at most f32.
                    _ => values
                        .iter_mut()
                        .zip(bytemuck::cast_slice::<u8, f64>(bytes))
                        .for_each(|(v, x)| *v = *x as f32),
                }
            }
            for (k, w) in weights.iter().enumerate() {
                self.acc.set_block(k, start, m, &self.values[..count], w);
            }
        }
        Ok(())
    }
}

/// [`materialize_with`] with the default [`Options`] (verified reads, no progress).
pub fn materialize(
    store: &BlobStore,
    inputs: &[Input],
    weights: &[Vec<f64>],
    out_dtype: OutDtype,
    metadata: &[BTreeMap<String, String>],
    outputs: &mut [&mut (dyn Write + Send)],
) -> Result<Stats> {
    materialize_with(
        store,
        inputs,
        weights,
        out_dtype,
        metadata,
        outputs,
        &Options::default(),
    )
}

/// Reconstructs K outputs from the inputs in one pass. `weights[k][i]` is target k's weight of
/// input i; `outputs[k]` receives a complete safetensors file with `metadata[k]` (to which the
/// accumulation precision and the copied tensors are added).
///
/// The work runs on rayon's pool: for every chunk of [`CHUNK_ELEMENTS`] elements of a tensor,
/// each worker reads that chunk from its share of the inputs and sums it into its own
/// accumulators, which are then added together and written out. Memory is a few chunks per
/// worker and target (about 2.5 MiB per worker plus 256 KiB per target and worker), whatever
/// the number of snapshots and the size of the model.
pub fn materialize_with(
    store: &BlobStore,
    inputs: &[Input],
    weights: &[Vec<f64>],
    out_dtype: OutDtype,
    metadata: &[BTreeMap<String, String>],
    outputs: &mut [&mut (dyn Write + Send)],
    options: &Options<'_>,
) -> Result<Stats> {
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
    let f64_accumulation = weights
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
            if f64_accumulation { "f64" } else { "f32" }.into(),
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

    // Every input is read front to back (the header too, for the hash), in chunks.
    let mut cursors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let file = store.open_blob(&input.digest)?;
        let mut cursor = Cursor {
            file,
            digest: input.digest,
            pos: 0,
            check: options.verify.then(|| match input.checksum {
                Some(c) => Check::Checksum(Box::default(), c),
                None => Check::Digest(Box::default()),
            }),
        };
        let mut head = vec![0u8; input.header.data_start() as usize];
        cursor.read(&mut head)?;
        cursors.push(cursor);
    }
    // Inputs form fixed groups of BATCH_INPUTS, whatever the number of threads: a group's
    // partial sums are added to the total in group order, so the output's bits do not depend
    // on the machine (the reconstruction id promises the same bytes for the same inputs).
    let group_weights: Vec<Vec<&[f64]>> = (0..inputs.len())
        .step_by(BATCH_INPUTS)
        .map(|start| {
            let end = (start + BATCH_INPUTS).min(inputs.len());
            weights.iter().map(|w| &w[start..end]).collect()
        })
        .collect();
    let chunk = CHUNK_ELEMENTS;
    let wave = rayon::current_num_threads().clamp(1, group_weights.len());
    let mut workers: Vec<Worker> = (0..wave)
        .map(|_| Worker::new(f64_accumulation, k_count, chunk))
        .collect();
    let mut total = Acc::new(f64_accumulation, k_count, chunk);
    let mut bytes_read = 0u64;
    // Outputs are written by their own thread, one chunk behind the arithmetic.
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(2);
    let (recycle_send, recycle) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
    std::thread::scope(|scope| -> Result<()> {
        let writer = scope.spawn(move || -> Result<()> {
            for buffers in receive {
                for (out, b) in outputs.iter_mut().zip(&buffers) {
                    out.write_all(b)
                        .map_err(|e| Error::io("writing a reconstruction", e))?;
                }
                let _ = recycle_send.send(buffers);
            }
            Ok(())
        });
        let result = (|| -> Result<()> {
            for t in layout {
                if !t.is_float() {
                    let mut kept = Vec::new();
                    let mut raw = vec![0u8; t.len as usize];
                    for (i, c) in cursors.iter_mut().enumerate() {
                        c.read(&mut raw)?;
                        if i == newest {
                            kept.clone_from(&raw);
                        }
                    }
                    bytes_read += t.len * inputs.len() as u64;
                    if send.send(vec![kept; k_count]).is_err() {
                        return Ok(()); // the writer failed; its error is reported below
                    }
                    continue;
                }
                let elements = t.shape.iter().product::<u64>() as usize;
                let in_size = element_size(&t.dtype);
                let mut done = 0;
                while done < elements {
                    let n = (elements - done).min(chunk);
                    for first in (0..group_weights.len()).step_by(wave) {
                        let groups = (group_weights.len() - first).min(wave);
                        let inputs_from = first * BATCH_INPUTS;
                        let inputs_to = ((first + groups) * BATCH_INPUTS).min(cursors.len());
                        workers[..groups]
                            .par_iter_mut()
                            .zip(cursors[inputs_from..inputs_to].par_chunks_mut(BATCH_INPUTS))
                            .zip(group_weights[first..first + groups].par_iter())
                            .try_for_each(|((worker, group), w)| {
                                worker.accumulate(group, w, &t.dtype, n)?;
                                (options.progress)((n * in_size * group.len()) as u64);
                                Ok::<_, Error>(())
                            })?;
                        total.add_partials(&workers[..groups], n, first > 0);
                    }
                    let mut buffers = recycle
                        .try_recv()
                        .unwrap_or_else(|_| vec![Vec::new(); k_count]);
                    let out_size = out_dtype.size();
                    let total = &total;
                    buffers.par_iter_mut().enumerate().for_each(|(k, buf)| {
                        buf.resize(n * out_size, 0);
                        buf.par_chunks_mut(ENCODE_PIECE * out_size)
                            .enumerate()
                            .for_each(|(j, out)| {
                                let start = j * ENCODE_PIECE;
                                let range = start..start + out.len() / out_size;
                                total.encode(k, range, out_dtype, out);
                            });
                    });
                    bytes_read += (n * in_size * inputs.len()) as u64;
                    done += n;
                    if send.send(buffers).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        drop(send);
        let written = writer
            .join()
            .map_err(|_| Error::Database("the output writer panicked".into()))?;
        result.and(written)
    })?;
    // Reaching the end of every input checks its digest.
    cursors.into_par_iter().try_for_each(Cursor::finish)?;
    Ok(Stats {
        f64_accumulation,
        bytes_read,
    })
}

/// Vector kernels, compiled for several instruction sets and picked at run time.
mod kernels {
    use multiversion::multiversion;

    /// Lanes per step of the combine kernels (one 512-bit register of f32).
    const LANES: usize = 16;

    /// The non-zero weights of a batch and their value rows (at most [`super::BATCH_INPUTS`]).
    fn terms<'a, T: Copy + Default>(
        values: &'a [[f32; super::BLOCK]],
        w: &[f64],
        convert: impl Fn(f64) -> T,
    ) -> (
        [T; super::BATCH_INPUTS],
        [&'a [f32; super::BLOCK]; super::BATCH_INPUTS],
        usize,
    ) {
        let mut ws = [T::default(); super::BATCH_INPUTS];
        let mut vs = [&values[0]; super::BATCH_INPUTS];
        let mut n = 0;
        for (v, &w) in values.iter().zip(w) {
            if w != 0.0 {
                ws[n] = convert(w);
                vs[n] = v;
                n += 1;
            }
        }
        (ws, vs, n)
    }

    /// `acc = Σ_b w[b] · values[b]` over `acc.len()` elements, inputs with weight 0 skipped,
    /// each element summed in input order (mul, then add: the same bits on every instruction
    /// set). A register of sums takes the whole batch before it is stored once, instead of
    /// a load and store of `acc` per input.
    #[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
    pub fn combine_f32(acc: &mut [f32], values: &[[f32; super::BLOCK]], w: &[f64]) {
        let (ws, vs, n) = terms(values, w, |w| w as f32);
        let full = acc.len() / LANES * LANES;
        for (j, out) in acc[..full].chunks_exact_mut(LANES).enumerate() {
            let mut sum = [0f32; LANES];
            for t in 0..n {
                let v = &vs[t][j * LANES..(j + 1) * LANES];
                for (s, x) in sum.iter_mut().zip(v) {
                    *s += ws[t] * *x;
                }
            }
            out.copy_from_slice(&sum);
        }
        for (i, out) in acc.iter_mut().enumerate().skip(full) {
            let mut sum = 0f32;
            for t in 0..n {
                sum += ws[t] * vs[t][i];
            }
            *out = sum;
        }
    }

    /// IEEE binary16 bits → f32, exactly as the F16C instruction converts (every value; NaNs
    /// keep their payload and come out quiet). Branch-free, so each instruction-set version
    /// is vectorised: `half`'s slice conversion calls its F16C routine once per 8 values.
    #[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
    pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        for (d, &h) in dst.iter_mut().zip(src) {
            *d = f16_bits_to_f32(h);
        }
    }

    /// One value of [`f16_to_f32`].
    #[inline(always)]
    pub fn f16_bits_to_f32(h: u16) -> f32 {
        let h = u32::from(h);
        let sign = (h & 0x8000) << 16;
        let exp = h & 0x7c00;
        let man = h & 0x03ff;
        // Normal: rebias the exponent (15 → 127) and widen the mantissa.
        let normal = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
        // Subnormal or zero: man · 2⁻²⁴, exact in f32 (no subnormal arithmetic involved).
        let small = (man as f32 * f32::from_bits(0x3380_0000)).to_bits();
        // Infinity or NaN (quieted).
        let special = 0x7f80_0000 | (man << 13) | if man != 0 { 0x0040_0000 } else { 0 };
        let bits = if exp == 0 {
            small
        } else if exp == 0x7c00 {
            special
        } else {
            normal
        };
        f32::from_bits(bits | sign)
    }

    /// [`combine_f32`] with f64 sums.
    #[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
    pub fn combine_f64(acc: &mut [f64], values: &[[f32; super::BLOCK]], w: &[f64]) {
        let (ws, vs, n) = terms(values, w, |w| w);
        const L: usize = LANES / 2;
        let full = acc.len() / L * L;
        for (j, out) in acc[..full].chunks_exact_mut(L).enumerate() {
            let mut sum = [0f64; L];
            for t in 0..n {
                let v = &vs[t][j * L..(j + 1) * L];
                for (s, x) in sum.iter_mut().zip(v) {
                    *s += ws[t] * f64::from(*x);
                }
            }
            out.copy_from_slice(&sum);
        }
        for (i, out) in acc.iter_mut().enumerate().skip(full) {
            let mut sum = 0f64;
            for t in 0..n {
                sum += ws[t] * f64::from(vs[t][i]);
            }
            *out = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use half::slice::HalfFloatSliceExt;

    #[test]
    fn combining_gives_the_bits_of_the_sequential_sum() {
        use super::{kernels, BATCH_INPUTS, BLOCK};
        let mut values = vec![[0f32; BLOCK]; BATCH_INPUTS];
        let mut x = 0x1234_5678_u32;
        for row in values.iter_mut() {
            for v in row.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = (x as f32 / u32::MAX as f32 - 0.5) * 3.0;
            }
        }
        let w = [0.3, 0.0, -1.7, 2.5e-3, 0.0, 1.0, -0.25, 0.125];
        for (inputs, m) in [(8, BLOCK), (8, 37), (3, 100), (1, 16), (5, 1)] {
            let (values, w) = (&values[..inputs], &w[..inputs]);
            let mut got = vec![f32::NAN; m];
            kernels::combine_f32(&mut got, values, w);
            let mut got64 = vec![f64::NAN; m];
            kernels::combine_f64(&mut got64, values, w);
            for i in 0..m {
                let (mut s, mut s64) = (0f32, 0f64);
                for (row, &wb) in values.iter().zip(w) {
                    if wb != 0.0 {
                        s += wb as f32 * row[i];
                        s64 += wb * f64::from(row[i]);
                    }
                }
                assert_eq!(
                    got[i].to_bits(),
                    s.to_bits(),
                    "f32 inputs {inputs} m {m} i {i}"
                );
                assert_eq!(
                    got64[i].to_bits(),
                    s64.to_bits(),
                    "f64 inputs {inputs} m {m} i {i}"
                );
            }
        }
    }

    #[test]
    fn f16_decoding_matches_half_for_every_value() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut ours = vec![0f32; all.len()];
        super::kernels::f16_to_f32(&all, &mut ours);
        let mut theirs = vec![0f32; all.len()];
        bytemuck::cast_slice::<u16, f16>(&all).convert_to_f32_slice(&mut theirs);
        for (h, (a, b)) in all.iter().zip(ours.iter().zip(&theirs)) {
            assert_eq!(a.to_bits(), b.to_bits(), "f16 bits {h:#06x}: {a} vs {b}");
            assert_eq!(
                a.to_bits(),
                super::kernels::f16_bits_to_f32(*h).to_bits(),
                "{h:#06x}"
            );
        }
    }
}
