//! The arithmetic of a pass: per-worker weighted sums over fixed groups of inputs, their
//! in-order merge, and encoding into the output dtype. Fixed groups and a fixed merge order
//! make the result independent of the number of threads.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::dtype::{element_size, OutDtype};
use super::kernels::{self, BATCH_INPUTS, BLOCK};
use super::read::Cursor;
use crate::error::Result;

/// Running sums for K targets over one chunk: f32, or f64 for large coefficients.
pub(super) enum Acc {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

impl Acc {
    pub(super) fn new(f64_accumulation: bool, k: usize, chunk: usize) -> Self {
        if f64_accumulation {
            Acc::F64(vec![vec![0.0; chunk]; k])
        } else {
            Acc::F32(vec![vec![0.0; chunk]; k])
        }
    }

    /// Sets target k's sums at `start..start + m` to `Σ_b weights[b] · values[b]`.
    fn set_block(
        &mut self,
        k: usize,
        start: usize,
        m: usize,
        values: &[[f32; BLOCK]],
        weights: &[f64],
    ) {
        match self {
            Acc::F32(a) => kernels::combine_f32(&mut a[k][start..start + m], values, weights),
            Acc::F64(a) => kernels::combine_f64(&mut a[k][start..start + m], values, weights),
        }
    }

    /// Adds the workers' partial sums over the first `n` elements, in worker order (so the
    /// result does not depend on scheduling), in parallel over targets and pieces; with
    /// `add` false the first worker's sums replace the total instead of adding to it.
    pub(super) fn add_partials(&mut self, workers: &[Worker], n: usize, add: bool) {
        match self {
            Acc::F32(total) => {
                let parts: Vec<&[Vec<f32>]> = workers
                    .iter()
                    .map(|w| match &w.acc {
                        Acc::F32(a) => a.as_slice(),
                        Acc::F64(_) => unreachable!("all accumulators share one precision"),
                    })
                    .collect();
                merge_sums(total, &parts, n, add);
            }
            Acc::F64(total) => {
                let parts: Vec<&[Vec<f64>]> = workers
                    .iter()
                    .map(|w| match &w.acc {
                        Acc::F64(a) => a.as_slice(),
                        Acc::F32(_) => unreachable!("all accumulators share one precision"),
                    })
                    .collect();
                merge_sums(total, &parts, n, add);
            }
        }
    }

    /// Encodes target k's sums over `range` (at most [`ENCODE_PIECE`] elements) into `out`,
    /// clamping to the output type's largest finite value when `clamp` is set, and returns
    /// what the range held that the output type cannot (see [`PieceCheck`]).
    pub(super) fn encode(
        &self,
        k: usize,
        range: std::ops::Range<usize>,
        dtype: OutDtype,
        clamp: bool,
        out: &mut [u8],
    ) -> PieceCheck {
        let mut narrow = [0f32; ENCODE_PIECE];
        let narrow = &mut narrow[..range.len()];
        let sum: &[f32] = match self {
            Acc::F32(a) => &a[k][range],
            Acc::F64(a) => {
                narrow
                    .iter_mut()
                    .zip(&a[k][range])
                    .for_each(|(n, v)| *n = *v as f32);
                narrow
            }
        };
        let check = PieceCheck::of(sum, dtype);
        // Only a piece with values out of range pays for a clamped copy.
        let clamped: Vec<f32>;
        let sum = if clamp && check.out_of_range > 0 {
            let limit = dtype.max_finite();
            clamped = sum.iter().map(|v| v.clamp(-limit, limit)).collect();
            &clamped
        } else {
            sum
        };
        match dtype {
            OutDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(sum)),
            OutDtype::F16 => {
                let mut halves = [f16::ZERO; ENCODE_PIECE];
                let halves = &mut halves[..sum.len()];
                halves.convert_from_f32_slice(sum);
                out.copy_from_slice(bytemuck::cast_slice(halves));
            }
            OutDtype::BF16 => {
                let mut halves = [bf16::ZERO; ENCODE_PIECE];
                let halves = &mut halves[..sum.len()];
                halves.convert_from_f32_slice(sum);
                out.copy_from_slice(bytemuck::cast_slice(halves));
            }
        }
        check
    }
}

/// What a piece of sums held that its output type cannot: non-finite sums (from a NaN or ±∞
/// in an input, or a sum beyond f32), and finite sums too large for the type (f16's
/// ±65504, rounded: |v| ≥ 65520 becomes ±∞).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct PieceCheck {
    /// Sums that are NaN or ±∞.
    pub non_finite: u64,
    /// Finite sums the output type turns into ±∞.
    pub out_of_range: u64,
    /// The largest finite |sum| among those out of range.
    pub max_abs: f32,
}

impl PieceCheck {
    /// Checks `sum` against `dtype`. The common case, every value in range, costs one
    /// vectorisable pass (the largest magnitude); only a piece that fails it is counted.
    fn of(sum: &[f32], dtype: OutDtype) -> Self {
        // `f32::max` ignores NaN, so NaN is looked for separately.
        let largest = sum.iter().fold(0f32, |m, v| m.max(v.abs()));
        let nan = sum.iter().fold(false, |any, v| any | v.is_nan());
        let limit = dtype.overflow_threshold();
        if !nan && largest < limit {
            return Self::default();
        }
        let mut check = Self::default();
        for v in sum {
            let a = v.abs();
            if !a.is_finite() {
                check.non_finite += 1;
            } else if a >= limit {
                check.out_of_range += 1;
                check.max_abs = check.max_abs.max(a);
            }
        }
        check
    }

    /// Both pieces' counts.
    pub(super) fn merge(self, other: Self) -> Self {
        Self {
            non_finite: self.non_finite + other.non_finite,
            out_of_range: self.out_of_range + other.out_of_range,
            max_abs: self.max_abs.max(other.max_abs),
        }
    }
}

/// `total[k][..n] (+)= Σ_i parts[i][k][..n]`, summed in `parts` order.
fn merge_sums<T: Copy + std::ops::AddAssign + Send + Sync>(
    total: &mut [Vec<T>],
    parts: &[&[Vec<T>]],
    n: usize,
    add: bool,
) {
    total.par_iter_mut().enumerate().for_each(|(k, t)| {
        t[..n]
            .par_chunks_mut(ENCODE_PIECE)
            .enumerate()
            .for_each(|(j, piece)| {
                let start = j * ENCODE_PIECE;
                let end = start + piece.len();
                for (i, p) in parts.iter().enumerate() {
                    let src = &p[k][start..end];
                    if i == 0 && !add {
                        piece.copy_from_slice(src);
                    } else {
                        piece.iter_mut().zip(src).for_each(|(a, b)| *a += *b);
                    }
                }
            })
    });
}

/// Elements per piece of the parallel merge and encode steps.
pub(super) const ENCODE_PIECE: usize = 4096;

/// Scratch of one worker: raw chunks of its group of inputs (8-byte aligned), one block of
/// their values as f32, and the group's sums.
pub(super) struct Worker {
    raw: Vec<Vec<u64>>,
    values: Vec<[f32; BLOCK]>,
    acc: Acc,
}

impl Worker {
    pub(super) fn new(f64_accumulation: bool, k: usize, chunk: usize) -> Self {
        Self {
            raw: Vec::new(),
            values: vec![[0.0; BLOCK]; BATCH_INPUTS],
            acc: Acc::new(f64_accumulation, k, chunk),
        }
    }

    /// Reads `n` elements of `dtype` from each cursor in `group` (at most [`BATCH_INPUTS`])
    /// and sets this worker's sums to their weighted sum.
    pub(super) fn accumulate(
        &mut self,
        group: &mut [Cursor],
        weights: &[&[f64]],
        dtype: &str,
        n: usize,
    ) -> Result<()> {
        debug_assert!(group.len() <= BATCH_INPUTS);
        let size = element_size(dtype);
        let words = (n * size).div_ceil(8);
        if self.raw.len() < group.len() {
            self.raw.resize_with(group.len(), Vec::new);
        }
        for (cursor, raw) in group.iter_mut().zip(&mut self.raw) {
            if raw.len() < words {
                raw.resize(words, 0);
            }
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(raw);
            cursor.read(&mut bytes[..n * size])?;
        }
        let count = group.len();
        for start in (0..n).step_by(BLOCK) {
            let m = BLOCK.min(n - start);
            for (raw, values) in self.raw[..count].iter().zip(&mut self.values) {
                let bytes: &[u8] = bytemuck::cast_slice(raw);
                let bytes = &bytes[start * size..(start + m) * size];
                let values = &mut values[..m];
                match dtype {
                    "F16" => kernels::f16_to_f32(bytemuck::cast_slice(bytes), values),
                    "BF16" => bytemuck::cast_slice::<u8, bf16>(bytes).convert_to_f32_slice(values),
                    "F32" => values.copy_from_slice(bytemuck::cast_slice(bytes)),
                    // F64 inputs are rounded to f32 before the sum; outputs are at most f32.
                    _ => values
                        .iter_mut()
                        .zip(bytemuck::cast_slice::<u8, f64>(bytes))
                        .for_each(|(v, x)| *v = *x as f32),
                }
            }
            for (k, w) in weights.iter().enumerate() {
                self.acc.set_block(k, start, m, &self.values[..count], w);
            }
        }
        Ok(())
    }
}
