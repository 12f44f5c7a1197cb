//! Getting snapshots into the store: one validation shared by every door (the Rust trainer
//! library, directory import, ema-pytorch checkpoints, HTTP upload).
//!
//! Every door ends in [`ingest_reader`] (files through [`ingest_file`]): header validation
//! ([`crate::format::read_header`]), checks against the run's manifest and existing
//! snapshots, a hashed copy into the store, and one transaction that records the snapshot.
//!
//! - `file`: one safetensors file or stream ([`ingest_file`], [`ingest_reader`]): the copy
//!   into the store, the claim → publish → record order, the journal line.
//! - `resolve`: a snapshot's time, width and update rule from [`Hints`], `__metadata__` or an
//!   EDM2 file name ([`parse_edm2_name`]).
//! - `finite`: the NaN/Inf scan of `--check-finite`, as the bytes stream by.
//! - `run`: [`RunForIngest`], the run a snapshot goes into (created up front, or lazily when
//!   the first snapshot is recorded).
//! - `import`: a directory of files ([`import_dir`]), a few in flight at once.
//! - `ema_pytorch`: `PostHocEMA` checkpoint folders, converted to safetensors first.
//! - `edm2`: EDM2's own `network-snapshot-*.pkl` / `phema-*.pkl` pickles and the EMAs of its
//!   `training-state-*.pt`, read without executing anything, converted to safetensors first.
//! - `trainer`: [`SnapshotWriter`], the door for Rust training loops.
//! - `rebuild`: [`rebuild_index`], a new index from the store's journal and blobs.

mod edm2;
mod ema_pytorch;
mod file;
mod finite;
mod import;
mod rebuild;
mod resolve;
mod run;
mod same;
mod trainer;

pub use edm2::{
    ingest_edm2, parse_edm2_file_name, parse_snapshot_pickle, read_legacy_storage,
    snapshot_tensors, tensor_data, write_converted, Edm2File, Edm2Tensor, Storage, TrainingState,
    MAX_EDM2_PICKLE_BYTES, MAX_MODULES, MAX_MODULE_DEPTH, SNAPSHOT_GLOBALS, TRAINING_STATE_GLOBALS,
};
pub use ema_pytorch::{
    convert_checkpoint, ingest_ema_pytorch, parse_ema_pytorch_name, EmaPytorchSettings,
};
pub use file::{ingest_file, ingest_reader, CutShort, Incoming, IngestOptions, Ingested};
pub use import::{import_dir, ImportReport, Source};
pub use rebuild::{rebuild_index, RebuildReport};
pub use resolve::{kimg_to_nimg, parse_edm2_name, Hints};
pub use run::RunForIngest;
pub use trainer::SnapshotWriter;
