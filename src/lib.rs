//! hindsight: post-hoc EMA of neural-network weights as a service.
//!
//! Training keeps a few power-function EMAs of the weights and saves snapshots of them; after
//! training, an EMA of any length is reconstructed as a least-squares combination of the
//! snapshots (Karras et al., EDM2, arXiv 2312.02696). This crate holds the mathematics, the
//! trainer-side tracker, and (as the project grows) the snapshot store, the reconstruction
//! engine, the HTTP server and the EDM2 network.
//!
//! Module map:
//! - [`model`]: the EDM2 network (magnitude-preserving U-Net, preconditioning) in candle.
//! - [`phema`]: post-hoc EMA mathematics and the tracker (pure: no I/O).
//! - [`app`]: the embedded default: index + store under one data directory.
//! - [`db`]: the SQLite index (sqlx + migrations): runs, manifests, snapshots, blob states.
//! - [`ingest`]: validation of incoming snapshots (safetensors headers).
//! - [`materialize`]: weighted sums of snapshots into new weights, one streaming pass.
//! - [`reconstruction`]: solve + materialize into the store, cached by a content key.
//! - [`server`]: the HTTP API (axum): `app(state)`, routes, errors, auth.
//! - [`store`]: content-addressed blobs (BLAKE3), atomic writes, verification (bytes only).
//! - [`plot`]: SVG pictures of target and reconstructed profiles.
//! - [`bench`]: synthetic workloads shared by `hindsight bench` and the tests.
//! - [`train`]: EDM2 training loop (loss, Adam, schedule), procedural dataset.
//! - [`error`]: the library's error type.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod bench;
pub mod db;
pub mod error;
pub mod ingest;
pub mod materialize;
pub mod model;
pub mod phema;
pub mod plot;
pub mod reconstruction;
pub mod server;
pub mod store;
pub mod train;

pub use error::{Error, Result};
