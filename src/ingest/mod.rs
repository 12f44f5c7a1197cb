//! Getting snapshots into the store: one validation shared by every door (the Rust trainer
//! library, directory import, ema-pytorch checkpoints, HTTP upload).
//!
//! Every door ends in [`ingest_file`] (or, for streams, the same steps): header validation,
//! checks against the run's manifest and existing snapshots, a hashed copy into the store, and
//! one transaction that records the snapshot.

mod ema_pytorch;
mod file;
mod header;
mod write;
mod writer;

pub use ema_pytorch::{convert_checkpoint, ingest_ema_pytorch, parse_ema_pytorch_name};
pub use file::{
    ingest_file, ingest_reader, kimg_to_nimg, parse_edm2_name, Hints, Incoming, IngestOptions,
    Ingested,
};
pub use header::{read_header, Header, TensorEntry, MAX_HEADER_BYTES};
pub use write::{write_safetensors, write_safetensors_header, OutTensor, OutTensorInfo};
pub use writer::SnapshotWriter;
