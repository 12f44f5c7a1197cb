//! Sampling images from network weights: resolve the weights and their network configuration
//! (a file, or a stored reconstruction and its run), run EDM's Heun sampler
//! ([`crate::model::sampler`]) over seeds in batches, and write PNGs and a grid.
//!
//! - `generate`: [`Sampler`] (a loaded network on the compute device; the sweep workers use it
//!   too), [`resolve`] (which weights, which network) and [`generate_to_dir`], what
//!   `hindsight generate` calls.
//! - `images`: PNG encoding and writing (temporary name, then rename) and [`grid`].
//! - `seeds`: [`parse_seeds`], seed lists such as `0-63` or `1,5,9`.
//!
//! Image *i* depends only on seed *i* (its noise and, for class-conditional networks, its
//! class come from streams seeded by it), not on the batch it was generated in.

mod generate;
mod images;
mod seeds;

pub use generate::{generate_to_dir, resolve, GenerateOptions, Sampler, WeightsSource};
pub use images::{encode_png, grid, write_png};
pub use seeds::parse_seeds;
