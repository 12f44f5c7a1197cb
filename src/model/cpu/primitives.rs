//! The building blocks shared by the CPU kernels ([`super::conv`], [`super::winograd`],
//! [`super::fused`]): strided matrix views and the one single-threaded GEMM ([`sgemm`], through
//! the `gemm` crate), each compute thread's scratch buffer ([`with_scratch`]), the in-order sum
//! of partial weight gradients ([`sum_in_order`]), the activation a convolution applies to its
//! input on the way in ([`InputAct`]), and the f32 slice of a custom op's argument
//! ([`slice_f32`]).
//!
//! They sit below the kernels that use them (and above only the inner loops of
//! [`super::kernels`]), so that no two kernel files depend on each other.

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

use super::kernels;

/// A row-major or strided f32 matrix view: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> View<'a> {
    pub(super) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    pub(super) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m, n] (row-major) = (accumulate ? dst : 0) + a[m, k] · b[k, n]`, single-threaded.
#[allow(unsafe_code)] // the one call into the `gemm` crate, behind bounds checks
pub(super) fn sgemm(dst: &mut [f32], accumulate: bool, a: View<'_>, b: View<'_>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() == m * n && a.in_bounds() && b.in_bounds());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every element the views and `dst` describe inside their
    // slices; `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

thread_local! {
    /// Each compute thread's buffer for a lowered image (and its activation), kept between
    /// calls (it grows to the largest geometry seen): allocating and zeroing one per task
    /// cost more than the copy itself.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of `len` floats (contents unspecified). `f` must
/// not call back into anything that uses the scratch buffer (it runs no parallel work).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// `Σ parts` element-wise (each `len` floats), added in the order of `parts` for every
/// element, in parallel over blocks of elements: partial weight gradients summed so that the
/// result does not depend on how many threads computed them.
pub(super) fn sum_in_order(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut total = vec![0f32; len];
    total
        .par_chunks_mut(1 << 12)
        .enumerate()
        .for_each(|(j, chunk)| {
            let at = j << 12;
            for part in parts {
                kernels::add_assign(chunk, &part[at..at + chunk.len()]);
            }
        });
    total
}

/// A point-wise activation of the convolution's input, applied inside the convolution (per
/// image, in cache) instead of as an op of its own: the activated tensor is never stored, and
/// the graph has one node (and one gradient to accumulate) fewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputAct {
    /// The input as it is.
    Identity,
    /// [`crate::model::mp_silu`] of the input.
    MpSilu,
}

impl InputAct {
    /// Floats of scratch the activation of an image of `len` floats needs.
    pub(super) fn plane_len(self, len: usize) -> usize {
        match self {
            InputAct::Identity => 0,
            InputAct::MpSilu => len,
        }
    }

    /// The image `xb` [C, H·W] as the convolution sees it: `xb` itself, or its activation
    /// written into `plane`.
    pub(super) fn apply<'a>(self, xb: &'a [f32], plane: &'a mut [f32]) -> &'a [f32] {
        match self {
            InputAct::Identity => xb,
            InputAct::MpSilu => {
                kernels::mp_silu_map(plane, xb);
                plane
            }
        }
    }
}

/// The elements of a contiguous f32 tensor (the custom ops of `model` take no strided input).
pub(super) fn slice_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: needs a contiguous f32 tensor"),
    }
}
