//! hindsight: post-hoc EMA of neural-network weights as a service.
//!
//! Training keeps a few power-function EMAs of the weights and saves snapshots of them; after
//! training, an EMA of any length is reconstructed as a least-squares combination of the
//! snapshots (Karras et al., EDM2, arXiv 2312.02696). This crate holds the mathematics, the
//! trainer-side tracker, the snapshot store, the reconstruction engine, the HTTP server and
//! the EDM2 network with its trainer and sampler; the `hindsight` binary is a thin command
//! line over it.
//!
//! Module map (`docs/ARCHITECTURE.md` has the invariants):
//! - [`phema`]: post-hoc EMA mathematics and the tracker (pure: no I/O).
//! - [`store`]: content-addressed blobs (BLAKE3), atomic writes, verification (bytes only).
//! - [`db`]: the SQLite index (sqlx + migrations): runs, manifests, snapshots, blob states,
//!   reconstructions.
//! - [`app`]: the embedded default: index + store under one data directory; verify and gc.
//! - [`format`](mod@format): the safetensors codec (bounded header reader, deterministic writer).
//! - [`ingest`]: every door into the store (files, directories, ema-pytorch, trainers,
//!   uploads), one validation.
//! - [`materialize`]: weighted sums of snapshots into new weights, one streaming pass.
//! - [`reconstruction`]: solve + materialize into the store, cached by a content key; export
//!   to a directory.
//! - [`server`]: the HTTP API (axum): `app(state)`, routes, wire types, errors, auth.
//! - [`model`]: the EDM2 network (magnitude-preserving U-Net, preconditioning) in candle.
//! - [`train`]: the EDM2 training loop, trainer, checkpoints.
//! - [`datasets`]: training and evaluation images: procedural, PNG folders and ZIPs, IDX.
//! - [`metrics`]: FID and KID: the Inception network, feature statistics, Fréchet distance.
//! - [`sample`]: images from weights (EDM's Heun sampler over seeds), PNGs and grids.
//! - [`plot`]: SVG pictures of target and reconstructed profiles.
//! - [`bench`](mod@bench): synthetic workloads and statistics shared by `hindsight bench`, the demo and
//!   the tests.
//! - [`demo`]: what `hindsight demo` trains and sweeps per budget, and what it reuses;
//!   [`fetch`]: checked, atomic downloads (Fashion-MNIST, the Inception weights).
//! - [`progress`]: how long work reports progress; [`error`]: the library's error type.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod bench;
pub mod datasets;
pub mod db;
pub mod demo;
pub mod error;
pub mod fetch;
pub mod format;
pub mod ingest;
pub mod materialize;
pub mod metrics;
pub mod model;
pub mod phema;
pub mod plot;
pub mod progress;
pub mod reconstruction;
pub mod sample;
pub mod server;
pub mod store;
pub mod sweep;
pub mod train;

pub use error::{Error, Result};
