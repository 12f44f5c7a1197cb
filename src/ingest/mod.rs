//! Getting snapshots into the store: one validation shared by every door (the Rust trainer
//! library, directory import, ema-pytorch checkpoints, HTTP upload).
//!
//! This part holds the safetensors header validation; the doors arrive with the index.

mod header;

pub use header::{read_header, Header, TensorEntry, MAX_HEADER_BYTES};
