//! Weighted sums of snapshots → new weights, in one streaming pass for all targets.
//!
//! For K targets with weights `w[k][i]` over N snapshot files, every output tensor is
//! `Σ_i w[k][i] · snapshot_i`. The snapshot files share one tensor layout (the run's
//! manifest), so they are read in lockstep, chunk by chunk, each file front to back at
//! explicit offsets (`read`) — every input is checked on the way (its recorded XXH3-128
//! checksum, else its BLAKE3 digest) and a corrupt one fails the whole reconstruction before
//! anything is published. Memory is bounded by a few chunks per worker and target, whatever N
//! and the model size (see [`materialize_with`]).
//!
//! Files: the orchestration and its steps here; `read` (inputs and their checks), `sum`
//! (per-worker sums over fixed groups of inputs, their in-order merge, encoding), `kernels`
//! (vector kernels), `dtype` ([`OutDtype`]).
//!
//! Floating-point tensors (F16, BF16, F32, F64) are averaged, accumulating in f32, or in f64
//! when the weights are large (Σ|w| above [`F64_ACCUMULATION_L1`], where cancellation would
//! otherwise eat f32's precision). Other tensors (step counters, integer buffers) are copied
//! from the newest snapshot with a non-zero weight, as the output's metadata records; with
//! [`Buffers::Copy`], so are the float tensors the snapshots declare as buffers
//! ([`BUFFERS_METADATA_KEY`]), converted to the output type — what EDM2's
//! `reconstruct_phema.py` does with a network's buffers.

use std::collections::BTreeMap;
use std::io::Write;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::{write_safetensors_header, Header, OutTensorInfo, TensorEntry};
use crate::store::{BlobStore, Checksum, Digest};

mod dtype;
mod kernels;
mod read;
mod sum;

pub use dtype::{OutDtype, F64_ACCUMULATION_L1};

/// The `__metadata__` key in which a snapshot declares which of its tensors are buffers (not
/// parameters): a JSON array of tensor names. Written by the Python client's `PowerEMA` and by
/// `hindsight import` of EDM2's pickles; read by [`Buffers::Copy`].
pub const BUFFERS_METADATA_KEY: &str = "hindsight.buffers";

/// What a reconstruction does with the float tensors the snapshots declare as buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Buffers {
    /// Averaged with the same weights as the parameters (the default: every float tensor is
    /// treated alike, and snapshots need not declare their buffers).
    #[default]
    Average,
    /// Copied from the newest snapshot with a non-zero weight, as EDM2's
    /// `reconstruct_phema.py` copies buffers from its last input pickle. Needs every
    /// snapshot to declare its buffers ([`BUFFERS_METADATA_KEY`]).
    Copy,
}

impl Buffers {
    /// The wire name: `average` or `copy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Buffers::Average => "average",
            Buffers::Copy => "copy",
        }
    }
}

/// The buffer names a snapshot's `__metadata__` declares ([`BUFFERS_METADATA_KEY`]), or
/// `None` when it declares none. Errors: a value that is not a JSON array of strings (naming
/// `source`).
pub fn declared_buffers(
    metadata: &BTreeMap<String, String>,
    source: &str,
) -> Result<Option<Vec<String>>> {
    let Some(text) = metadata.get(BUFFERS_METADATA_KEY) else {
        return Ok(None);
    };
    serde_json::from_str::<Vec<String>>(text)
        .map(Some)
        .map_err(|e| {
            Error::invalid(
                source,
                format!("__metadata__ {BUFFERS_METADATA_KEY:?} is not a JSON array of tensor names: {e}"),
            )
        })
}

use dtype::element_size;
use kernels::BATCH_INPUTS;
use read::{Check, Cursor};
use sum::{Acc, PieceCheck, Worker, ENCODE_PIECE};

pub use crate::error::OutOfRange;

/// One input snapshot: its blob, its validated header, and its training time.
#[derive(Clone, Debug)]
pub struct Input {
    /// The blob holding the snapshot's safetensors file.
    pub digest: Digest,
    /// Its header (see [`crate::format::read_header`]).
    pub header: Header,
    /// Its recorded XXH3-128 checksum: verified reads check it (fast); without one they
    /// re-derive the BLAKE3 digest.
    pub checksum: Option<Checksum>,
    /// Training time, to pick the newest snapshot for copied tensors.
    pub nimg: u64,
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
    /// Values beyond the output type's range (f16's ±65504) are clamped to it and listed in
    /// [`Stats::clamped`], instead of failing the pass with [`Error::OutOfRange`].
    pub clamp: bool,
    /// Declared float buffers averaged (default) or copied from the newest input.
    pub buffers: Buffers,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            verify: true,
            progress: &|_| {},
            clamp: false,
            buffers: Buffers::Average,
        }
    }
}

/// What a materialization did.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Accumulated in f64 rather than f32.
    pub f64_accumulation: bool,
    /// Bytes read from the inputs.
    pub bytes_read: u64,
    /// With [`Options::clamp`]: the tensors whose values were clamped, per target.
    pub clamped: Vec<OutOfRange>,
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
/// The work runs on rayon's pool: for every chunk of 64 Ki elements of a tensor,
/// each worker reads that chunk from its share of the inputs and sums it into its own
/// accumulators, which are then added together and written out. Memory is a few chunks per
/// worker and target (about 2.5 MiB per worker plus 256 KiB per target and worker), whatever
/// the number of snapshots and the size of the model.
///
/// Errors: no input or target, a weight count or metadata count that does not match, a
/// non-finite weight, inputs whose tensors differ, an unreadable or damaged input (verified
/// reads), a failing output; with [`Buffers::Copy`], a newest input that declares no buffers
/// (or names a tensor it does not hold).
pub fn materialize_with(
    store: &BlobStore,
    inputs: &[Input],
    weights: &[Vec<f64>],
    out_dtype: OutDtype,
    metadata: &[BTreeMap<String, String>],
    outputs: &mut [&mut (dyn Write + Send)],
    options: &Options<'_>,
) -> Result<Stats> {
    check_arguments(inputs, weights, metadata, outputs.len())?;
    // One canonical order, by name, whatever order each file keeps its tensors in.
    let layout = canonical_layout(&inputs[0].header);
    let offsets = tensor_offsets(inputs, &layout);
    let f64_accumulation = weights
        .iter()
        .any(|w| w.iter().map(|v| v.abs()).sum::<f64>() > F64_ACCUMULATION_L1);
    // Copied (non-float) tensors come from the newest input any target uses.
    let newest = (0..inputs.len())
        .filter(|&i| weights.iter().any(|w| w[i] != 0.0))
        .max_by_key(|&i| inputs[i].nimg)
        .unwrap_or(inputs.len() - 1);
    let copied_floats = copied_floats(&layout, &inputs[newest], options.buffers)?;
    write_output_headers(
        &layout,
        &copied_floats,
        out_dtype,
        f64_accumulation,
        inputs[newest].nimg,
        metadata,
        outputs,
    )?;
    let mut cursors = open_inputs(store, inputs, &layout, options.verify)?;
    let pass = Pass {
        inputs,
        layout: &layout,
        offsets: &offsets,
        weights,
        out_dtype,
        f64_accumulation,
        newest,
        copied_floats: &copied_floats,
        progress: options.progress,
        clamp: options.clamp,
    };
    let (bytes_read, out_of_range) = pass.run(&mut cursors, outputs)?;
    // Reaching the end of every input checks its digest.
    cursors.into_par_iter().try_for_each(Cursor::finish)?;
    if !out_of_range.is_empty() && !options.clamp {
        return Err(Error::OutOfRange {
            dtype: out_dtype.as_str().to_owned(),
            tensors: out_of_range,
        });
    }
    Ok(Stats {
        f64_accumulation,
        bytes_read,
        clamped: out_of_range,
    })
}

/// Inputs in fixed groups of [`BATCH_INPUTS`]: `groups[g][k]` is target k's weights of group
/// g's inputs.
fn groups_of(weights: &[Vec<f64>], inputs: usize) -> Vec<Vec<&[f64]>> {
    (0..inputs)
        .step_by(BATCH_INPUTS)
        .map(|start| {
            let end = (start + BATCH_INPUTS).min(inputs);
            weights.iter().map(|w| &w[start..end]).collect()
        })
        .collect()
}

/// `copied[t]`: whether float tensor `layout[t]` is a declared buffer to copy from `newest`
/// (all false with [`Buffers::Average`]).
fn copied_floats(layout: &[TensorEntry], newest: &Input, buffers: Buffers) -> Result<Vec<bool>> {
    if buffers == Buffers::Average {
        return Ok(vec![false; layout.len()]);
    }
    let source = format!("snapshot {}", newest.digest);
    let declared = declared_buffers(&newest.header.metadata, &source)?.ok_or_else(|| {
        Error::invalid(
            "buffers",
            format!(
                "\"copy\" needs snapshots that declare their buffers ({BUFFERS_METADATA_KEY:?} \
                 in __metadata__); {source} declares none"
            ),
        )
    })?;
    let declared: std::collections::BTreeSet<&str> = declared.iter().map(String::as_str).collect();
    if let Some(missing) = declared
        .iter()
        .find(|n| !layout.iter().any(|t| t.name == **n))
    {
        return Err(Error::invalid(
            source,
            format!("declares buffer {missing:?}, which it does not hold"),
        ));
    }
    Ok(layout
        .iter()
        .map(|t| t.is_float() && declared.contains(t.name.as_str()))
        .collect())
}

/// The first input's tensors by name: the order every output lists them in and every pass
/// reads them in.
fn canonical_layout(header: &Header) -> Vec<TensorEntry> {
    let mut layout = header.tensors.clone();
    layout.sort_by(|a, b| a.name.cmp(&b.name));
    layout
}

/// `offsets[i][t]`: where tensor `layout[t]`'s bytes start in input `i`'s file.
fn tensor_offsets(inputs: &[Input], layout: &[TensorEntry]) -> Vec<Vec<u64>> {
    inputs
        .iter()
        .map(|input| {
            let by_name: std::collections::HashMap<&str, &TensorEntry> = input
                .header
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect();
            layout
                .iter()
                .map(|t| input.header.data_start() + by_name[t.name.as_str()].offset)
                .collect()
        })
        .collect()
}

/// Whether reading `header`'s tensors in `layout`'s order visits its data front to back (empty
/// tensors aside), so that it can be hashed as it is read.
fn reads_in_file_order(header: &Header, layout: &[TensorEntry]) -> bool {
    let by_name: std::collections::HashMap<&str, &TensorEntry> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut next = 0;
    for t in layout {
        let entry = by_name[t.name.as_str()];
        if entry.len == 0 {
            continue;
        }
        if entry.offset != next {
            return false;
        }
        next += entry.len;
    }
    next == header.data_len
}

/// Checks the counts and the weights, and that every input has the first one's tensors (the
/// same names, dtypes and shapes; their order in the files may differ).
fn check_arguments(
    inputs: &[Input],
    weights: &[Vec<f64>],
    metadata: &[BTreeMap<String, String>],
    outputs: usize,
) -> Result<()> {
    let k_count = weights.len();
    if inputs.is_empty() || k_count == 0 {
        return Err(Error::invalid("inputs", "nothing to reconstruct"));
    }
    if outputs != k_count || metadata.len() != k_count {
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
    let layout = canonical_layout(&inputs[0].header);
    for (i, input) in inputs.iter().enumerate().skip(1) {
        let other = canonical_layout(&input.header);
        let same = other.len() == layout.len()
            && other
                .iter()
                .zip(&layout)
                .all(|(a, b)| a.name == b.name && a.dtype == b.dtype && a.shape == b.shape);
        if !same {
            return Err(Error::invalid(
                format!("inputs[{i}]"),
                "its tensors differ from the first input's",
            ));
        }
    }
    Ok(())
}

/// Writes every output's header, which is known up front: float tensors in `out_dtype`,
/// others as they are; the metadata gains the accumulation precision and which tensors were
/// copied from the newest snapshot (at `newest_nimg`): non-float ones and `copied_floats`.
fn write_output_headers(
    layout: &[TensorEntry],
    copied_floats: &[bool],
    out_dtype: OutDtype,
    f64_accumulation: bool,
    newest_nimg: u64,
    metadata: &[BTreeMap<String, String>],
    outputs: &mut [&mut (dyn Write + Send)],
) -> Result<()> {
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
        .zip(copied_floats)
        .filter(|(t, &c)| !t.is_float() || c)
        .map(|(t, _)| t.name.as_str())
        .collect();
    for (out, meta) in outputs.iter_mut().zip(metadata) {
        let mut meta = meta.clone();
        meta.insert(
            "accumulation".into(),
            if f64_accumulation { "f64" } else { "f32" }.into(),
        );
        if !copied.is_empty() {
            meta.insert(
                "copied_from_newest_snapshot".into(),
                format!("{} (nimg {newest_nimg})", copied.join(",")),
            );
        }
        write_safetensors_header(out, &infos, &meta)
            .map_err(|e| Error::io("writing a reconstruction", e))?;
    }
    Ok(())
}

/// Opens every input. With `verify`, an input whose tensors the pass reads in file order is
/// checked as the pass reads it (its header now, for the hash); any other is checked whole
/// here, before the pass (in parallel), and read unchecked by it.
fn open_inputs(
    store: &BlobStore,
    inputs: &[Input],
    layout: &[TensorEntry],
    verify: bool,
) -> Result<Vec<Cursor>> {
    inputs
        .par_iter()
        .map(|input| {
            let file = store.open_blob(&input.digest)?;
            let check = verify.then(|| match input.checksum {
                Some(c) => Check::Checksum(Box::default(), c),
                None => Check::Digest(Box::default()),
            });
            let mut cursor = Cursor::new(file, input.digest, check);
            if verify && !reads_in_file_order(&input.header, layout) {
                return cursor.verify_all();
            }
            let mut head = vec![0u8; input.header.data_start() as usize];
            cursor.read(&mut head)?;
            Ok(cursor)
        })
        .collect()
}

/// One pass over the inputs' tensor data, writing every output's data section.
struct Pass<'a> {
    inputs: &'a [Input],
    /// Tensors in the order they are read and written.
    layout: &'a [TensorEntry],
    /// `offsets[i][t]`: where tensor `t` starts in input `i`.
    offsets: &'a [Vec<u64>],
    weights: &'a [Vec<f64>],
    out_dtype: OutDtype,
    f64_accumulation: bool,
    /// The input copied tensors come from.
    newest: usize,
    /// Per layout tensor: a float buffer copied from `newest` rather than averaged.
    copied_floats: &'a [bool],
    progress: &'a (dyn Fn(u64) + Sync),
    clamp: bool,
}

impl Pass<'_> {
    /// Runs the pass; returns the bytes read and the tensors whose sums the output type could
    /// not hold. Outputs are written by their own thread, one chunk behind the arithmetic.
    fn run(
        &self,
        cursors: &mut [Cursor],
        outputs: &mut [&mut (dyn Write + Send)],
    ) -> Result<(u64, Vec<OutOfRange>)> {
        let k_count = self.weights.len();
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(2);
        let (recycle_send, recycle) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
        std::thread::scope(|scope| {
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
            let result = self.compute(cursors, &send, &recycle, k_count);
            drop(send);
            let written = writer
                .join()
                .map_err(|panic| Error::panicked("the reconstruction's output writer", &*panic))?;
            // A send fails only when the writer stopped: the pass then ends early with Ok and
            // the writer's error is the one reported.
            let done = result?;
            written.map(|()| done)
        })
    }

    /// Reads and sums every tensor, handing each chunk's encoded outputs to `send`; stops
    /// early (Ok) when the writer has gone away.
    fn compute(
        &self,
        cursors: &mut [Cursor],
        send: &std::sync::mpsc::SyncSender<Vec<Vec<u8>>>,
        recycle: &std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
        k_count: usize,
    ) -> Result<(u64, Vec<OutOfRange>)> {
        // Inputs form fixed groups of BATCH_INPUTS, whatever the number of threads: a group's
        // partial sums are added to the total in group order, so the output's bits do not
        // depend on the machine (the reconstruction id promises the same bytes for the same
        // inputs).
        let inputs = cursors.len();
        // A copied float buffer is the sum with weight 1 on the newest input and 0 elsewhere:
        // exact (x·1 + 0 = x in f32 and f64), and converted to the output type as any sum.
        let one_hot: Vec<Vec<f64>> = (0..k_count)
            .map(|_| {
                (0..inputs)
                    .map(|i| if i == self.newest { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let averaged = groups_of(self.weights, inputs);
        let copying = groups_of(&one_hot, inputs);
        let chunk = CHUNK_ELEMENTS;
        let wave = rayon::current_num_threads().clamp(1, averaged.len());
        let mut workers: Vec<Worker> = (0..wave)
            .map(|_| Worker::new(self.f64_accumulation, k_count, chunk))
            .collect();
        let mut total = Acc::new(self.f64_accumulation, k_count, chunk);
        let mut bytes_read = 0u64;
        let mut out_of_range = Vec::new();
        for (t, tensor) in self.layout.iter().enumerate() {
            for (cursor, offsets) in cursors.iter_mut().zip(self.offsets) {
                cursor.seek(offsets[t]);
            }
            if !tensor.is_float() {
                bytes_read += tensor.len * cursors.len() as u64;
                if send.send(self.copy_tensor(tensor, cursors)?).is_err() {
                    return Ok((bytes_read, out_of_range));
                }
                continue;
            }
            let group_weights = if self.copied_floats[t] {
                &copying
            } else {
                &averaged
            };
            let elements = tensor.shape.iter().product::<u64>() as usize;
            let in_size = element_size(&tensor.dtype);
            let mut checks = vec![PieceCheck::default(); k_count];
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
                            worker.accumulate(group, w, &tensor.dtype, n)?;
                            (self.progress)((n * in_size * group.len()) as u64);
                            Ok::<_, Error>(())
                        })?;
                    total.add_partials(&workers[..groups], n, first > 0);
                }
                let buffers = recycle
                    .try_recv()
                    .unwrap_or_else(|_| vec![Vec::new(); k_count]);
                let (buffers, chunk_checks) = self.encode(&total, buffers, n);
                for (check, piece) in checks.iter_mut().zip(chunk_checks) {
                    *check = check.merge(piece);
                }
                if checks.iter().any(|c| c.non_finite > 0) {
                    return Err(self.diagnose_non_finite(cursors, t, done, n));
                }
                bytes_read += (n * in_size * cursors.len()) as u64;
                done += n;
                if send.send(buffers).is_err() {
                    return Ok((bytes_read, out_of_range));
                }
            }
            for (target, check) in checks.iter().enumerate() {
                if check.out_of_range > 0 {
                    out_of_range.push(OutOfRange {
                        target,
                        tensor: tensor.name.clone(),
                        elements: check.out_of_range,
                        max_abs: check.max_abs as f64,
                    });
                }
            }
        }
        Ok((bytes_read, out_of_range))
    }

    /// A non-float tensor: read from every input (keeping the hashes whole), the newest
    /// input's bytes for every output.
    fn copy_tensor(&self, t: &TensorEntry, cursors: &mut [Cursor]) -> Result<Vec<Vec<u8>>> {
        let mut kept = Vec::new();
        let mut raw = vec![0u8; t.len as usize];
        for (i, c) in cursors.iter_mut().enumerate() {
            c.read(&mut raw)?;
            if i == self.newest {
                kept.clone_from(&raw);
            }
        }
        Ok(vec![kept; self.weights.len()])
    }

    /// Encodes the first `n` sums of every target into `buffers` in the output dtype; returns
    /// them with each target's [`PieceCheck`].
    fn encode(
        &self,
        total: &Acc,
        mut buffers: Vec<Vec<u8>>,
        n: usize,
    ) -> (Vec<Vec<u8>>, Vec<PieceCheck>) {
        let out_size = self.out_dtype.size();
        let checks = buffers
            .par_iter_mut()
            .enumerate()
            .map(|(k, buf)| {
                buf.resize(n * out_size, 0);
                buf.par_chunks_mut(ENCODE_PIECE * out_size)
                    .enumerate()
                    .map(|(j, out)| {
                        let start = j * ENCODE_PIECE;
                        let range = start..start + out.len() / out_size;
                        total.encode(k, range, self.out_dtype, self.clamp, out)
                    })
                    .reduce(PieceCheck::default, PieceCheck::merge)
            })
            .collect();
        (buffers, checks)
    }

    /// The error for a chunk (`n` elements from `done` of tensor `t`) whose sum is not
    /// finite: the first input with a weight that holds a NaN or ±∞ there, read again to
    /// name it; or, when every input is finite, the weighted sum itself overflowing.
    fn diagnose_non_finite(&self, cursors: &[Cursor], t: usize, done: usize, n: usize) -> Error {
        let tensor = &self.layout[t];
        let size = element_size(&tensor.dtype);
        for (i, (cursor, input)) in cursors.iter().zip(self.inputs).enumerate() {
            if self.weights.iter().all(|w| w[i] == 0.0) {
                continue;
            }
            let mut raw = vec![0u8; n * size];
            let at = self.offsets[i][t] + (done * size) as u64;
            if std::os::unix::fs::FileExt::read_exact_at(&cursor.file, &mut raw, at).is_err() {
                continue;
            }
            let position = raw
                .chunks_exact(size)
                .position(|e| match tensor.dtype.as_str() {
                    "F64" => !f64::from_le_bytes(e.try_into().expect("8 bytes")).is_finite(),
                    "F32" => !f32::from_le_bytes(e.try_into().expect("4 bytes")).is_finite(),
                    "F16" => u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00,
                    _ => u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80,
                });
            if let Some(k) = position {
                return Error::NonFinite {
                    snapshot: input.digest.to_hex(),
                    nimg: input.nimg,
                    tensor: tensor.name.clone(),
                    element: (done + k) as u64,
                };
            }
        }
        Error::invalid(
            format!("tensors.{}", tensor.name),
            "the weighted sum exceeds the range of f32 (the snapshots' values are finite but \
             too large)",
        )
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use half::slice::HalfFloatSliceExt;

    #[test]
    fn combining_gives_the_bits_of_the_sequential_sum() {
        use super::kernels::{self, BATCH_INPUTS, BLOCK};
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
