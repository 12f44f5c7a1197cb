//! Sampling images from network weights: resolve the weights and their network configuration
//! (a file, or a stored reconstruction and its run), run EDM's Heun sampler
//! ([`crate::model::sampler`]) over seeds in batches, and write PNGs and a grid.
//! `hindsight generate` calls [`generate_to_dir`]; sweeps will reuse [`Sampler`].
//!
//! Image *i* depends only on seed *i* (its noise and, for class-conditional networks, its
//! class come from streams seeded by it), not on the batch it was generated in.

mod generate;
mod images;
mod seeds;

pub use generate::{generate_to_dir, resolve, GenerateOptions, Sampler, WeightsSource};
pub use images::{encode_png, grid, write_png};
pub use seeds::parse_seeds;
