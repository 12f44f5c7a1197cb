//! Training EDM2 networks into the store (NVlabs/edm2 `training/training_loop.py`).
//!
//! - [`run`]: the training loop (batches, EMA updates, snapshot and checkpoint cadence,
//!   `stats.jsonl`), what `hindsight train` calls.
//! - [`Trainer`]: one optimisation step — the EDM2 loss with learned uncertainty, Adam with
//!   EDM2's inverse-square-root learning-rate schedule, forced weight normalisation, non-finite
//!   gradients zeroed — and its state.
//! - `checkpoint`: the whole training state in one safetensors file, for `--resume`.
//! - `adam`: the Adam update (composed, and fused on the CPU).
//!
//! The training data come from [`crate::datasets`].

mod adam;
pub mod checkpoint;
mod run;
mod trainer;

pub use run::{run, TrainOptions, TrainSummary};
pub use trainer::{learning_rate, StepStats, TrainConfig, Trainer};
