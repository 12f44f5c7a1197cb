//! The safetensors codec every part of hindsight shares: a bounded, validating header reader
//! ([`read_header`]) and a deterministic writer ([`write_safetensors`]).
//!
//! Format (huggingface/safetensors): an 8-byte little-endian header length `n`, `n` bytes of
//! JSON mapping tensor names to `{dtype, shape, data_offsets}` (plus an optional
//! `__metadata__` map of strings), then the tensors' bytes.
//!
//! `ingest` reads the header of every incoming file before storing a byte of it;
//! `materialize` reads its inputs' headers and writes its outputs' with
//! [`write_safetensors_header`]; `reconstruction`, training checkpoints, the trainer door and
//! `generate` use the same two functions. Neither `ingest` nor `materialize` imports the other:
//! they meet here.

mod header;
mod write;

pub use header::{read_header, Header, TensorEntry, MAX_HEADER_BYTES};
pub use write::{write_safetensors, write_safetensors_header, OutTensor, OutTensorInfo};
