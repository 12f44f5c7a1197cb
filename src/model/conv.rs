//! Stride-1 "same" convolution on the CPU as one small GEMM per image, with its own backward
//! pass (candle's CPU convolution backward is a direct loop).
//!
//! Per image `b`: `y_b[O, H·W] = W[O, C·k²] · cols_b[C·k², H·W]`, where `cols_b` is the
//! image's im2col matrix built in a per-thread scratch buffer that stays in cache for the
//! product (1×1 kernels use the image itself). The backward pass is, per image,
//! `∂x_b` = the same convolution of `∂y_b` with the kernel turned by 180° and its channel
//! axes swapped (one more forward-shaped GEMM), and `∂W = Σ_b ∂y_b · cols_bᵀ`, summed over
//! fixed groups of images in a fixed order, so results do not depend on the thread count
//! (bit-identical resumed training relies on that). Images run in parallel on rayon; each
//! product is single-threaded.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::slice_f32;

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

/// Geometry of one convolution: `x` [N, C, H, W], `w` [O, C, k, k], padding k/2.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
}

impl Geometry {
    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Rows of an im2col matrix: C·k².
    fn kdim(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Copies one im2col row `(dy, dx)` of one channel: `dst[y·W + x] = src[(y + dy − p)·W +
    /// x + dx − p]` where that lies inside the image. The rows of the image that stay inside
    /// are copied as one block (a horizontal shift only wraps entries across row ends, which
    /// are then set to zero); rows that fall in the vertical padding are not written.
    fn shifted_copy(&self, src: &[f32], dst: &mut [f32], dy: usize, dx: usize) {
        let (h, w, p) = (self.h as isize, self.w as isize, (self.k / 2) as isize);
        let (dy, shift) = (dy as isize - p, dx as isize - p);
        let (y0, y1) = ((-dy).max(0), (h - dy).min(h));
        if y0 >= y1 {
            return;
        }
        let offset = dy * w + shift;
        let from = (y0 * w).max(-offset);
        let to = (y1 * w).min(h * w - offset);
        if from < to {
            let (from, to) = (from as usize, to as usize);
            let s = (from as isize + offset) as usize;
            dst[from..to].copy_from_slice(&src[s..s + (to - from)]);
        }
        let border = shift.unsigned_abs().min(self.w);
        if border > 0 {
            for y in y0 as usize..y1 as usize {
                let row = &mut dst[y * self.w..(y + 1) * self.w];
                if shift > 0 {
                    row[self.w - border..].fill(0.0);
                } else {
                    row[..border].fill(0.0);
                }
            }
        }
    }

    /// im2col of one image `x` [C, H·W] into `cols` [C·k², H·W]. Entries in the rows of
    /// vertical padding are never written (the wrapped entries of a horizontal shift are
    /// written as zeros): `cols` must start zeroed and only ever be used for this geometry.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, hw) = (self.k, self.hw());
        for (row, dst) in cols.chunks_exact_mut(hw).enumerate() {
            let (ci, dy, dx) = (row / (k * k), (row / k) % k, row % k);
            self.shifted_copy(&x[ci * hw..(ci + 1) * hw], dst, dy, dx);
        }
    }
}

/// Images per partial weight gradient: the gradient is summed over such fixed groups (in
/// parallel), then the groups in order.
const WEIGHT_GRAD_GROUP: usize = 4;

/// The convolution: arguments `x`, `w`; result `y` [N, O, H, W].
struct Conv {
    g: Geometry,
}

/// `∂x` from `∂y` and `w`: arguments `∂y` [N, O, H, W], `w`; result [N, C, H, W].
struct ConvGradInput {
    g: Geometry,
}

/// `∂W` from `x` and `∂y`: arguments `x`, `∂y`; result [O, C, k, k].
struct ConvGradWeight {
    g: Geometry,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "hindsight-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let x = slice_f32(s1, l1, "conv2d input")?;
        let w = slice_f32(s2, l2, "conv2d weight")?;
        let (hw, kd) = (g.hw(), g.kdim());
        let wm = View::row_major(w, g.o, kd);
        let mut y = vec![0f32; g.n * g.o * hw];
        y.par_chunks_mut(g.o * hw).enumerate().for_each_init(
            || vec![0f32; if g.k == 1 { 0 } else { kd * hw }],
            |cols, (b, yb)| {
                let xb = &x[b * g.c * hw..(b + 1) * g.c * hw];
                if g.k == 1 {
                    sgemm(yb, false, wm, View::row_major(xb, g.c, hw));
                } else {
                    g.im2col(xb, cols);
                    sgemm(yb, false, wm, View::row_major(cols, kd, hw));
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.h, g.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(&w.contiguous()?, &ConvGradInput { g: self.g })?;
        let gw = x
            .contiguous()?
            .apply_op2_no_bwd(&grad, &ConvGradWeight { g: self.g })?;
        Ok((Some(gx), Some(gw)))
    }
}

impl CustomOp2 for ConvGradInput {
    fn name(&self) -> &'static str {
        "hindsight-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let gy = slice_f32(s1, l1, "conv2d gradient")?;
        let w = slice_f32(s2, l2, "conv2d weight")?;
        let (hw, k) = (g.hw(), g.k);
        let mut gx = vec![0f32; g.n * g.c * hw];
        if k == 1 {
            let wt = View::row_major(w, g.o, g.c).t(); // [C, O]
            gx.par_chunks_mut(g.c * hw)
                .enumerate()
                .for_each(|(b, gxb)| {
                    let gyb = View::row_major(&gy[b * g.o * hw..(b + 1) * g.o * hw], g.o, hw);
                    sgemm(gxb, false, wt, gyb);
                });
        } else {
            // A stride-1 "same" convolution's input gradient is the same kind of convolution of
            // ∂y with the kernel turned by 180° and its channel axes swapped:
            // ∂x[c] = Σ_o rot180(W[o, c]) ⋆ ∂y[o]. One more forward-shaped GEMM per image
            // (depth O·k²) instead of a thin product (depth O) and a col2im scatter.
            let mut flipped = vec![0f32; g.c * g.o * k * k];
            for o in 0..g.o {
                for c in 0..g.c {
                    for i in 0..k * k {
                        flipped[(c * g.o + o) * k * k + (k * k - 1 - i)] =
                            w[(o * g.c + c) * k * k + i];
                    }
                }
            }
            let back = Geometry {
                c: g.o,
                o: g.c,
                ..g
            };
            let kd = back.kdim();
            let wm = View::row_major(&flipped, g.c, kd);
            gx.par_chunks_mut(g.c * hw).enumerate().for_each_init(
                || vec![0f32; kd * hw],
                |cols, (b, gxb)| {
                    back.im2col(&gy[b * g.o * hw..(b + 1) * g.o * hw], cols);
                    sgemm(gxb, false, wm, View::row_major(cols, kd, hw));
                },
            );
        }
        Ok((CpuStorage::F32(gx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

impl CustomOp2 for ConvGradWeight {
    fn name(&self) -> &'static str {
        "hindsight-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let x = slice_f32(s1, l1, "conv2d input")?;
        let gy = slice_f32(s2, l2, "conv2d gradient")?;
        let (hw, kd) = (g.hw(), g.kdim());
        // Per fixed group of images, ∂W_groupᵀ[C·k², O] = Σ_b cols_b · ∂y_bᵀ, computed
        // transposed: with the deep axis (H·W) contiguous in both inputs `gemm` runs up to 2x
        // faster than ∂y_b · cols_bᵀ.
        let group = WEIGHT_GRAD_GROUP;
        let transposed = hw >= 128;
        let groups: Vec<Vec<f32>> = (0..g.n.div_ceil(group))
            .into_par_iter()
            .map(|gi| {
                let mut acc = vec![0f32; kd * g.o];
                let mut cols = vec![0f32; if g.k == 1 { 0 } else { kd * hw }];
                let images = gi * group..((gi + 1) * group).min(g.n);
                for (i, b) in images.enumerate() {
                    let xb = &x[b * g.c * hw..(b + 1) * g.c * hw];
                    let gyb = View::row_major(&gy[b * g.o * hw..(b + 1) * g.o * hw], g.o, hw);
                    let colsb = if g.k == 1 {
                        View::row_major(xb, g.c, hw)
                    } else {
                        g.im2col(xb, &mut cols);
                        View::row_major(&cols, kd, hw)
                    };
                    if transposed {
                        sgemm(&mut acc, i > 0, colsb, gyb.t());
                    } else {
                        sgemm(&mut acc, i > 0, gyb, colsb.t());
                    }
                }
                acc
            })
            .collect();
        let mut gw = vec![0f32; g.o * kd];
        for part in &groups {
            if transposed {
                for (o, row) in gw.chunks_exact_mut(kd).enumerate() {
                    for (r, v) in row.iter_mut().enumerate() {
                        *v += part[r * g.o + o];
                    }
                }
            } else {
                gw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
        }
        Ok((CpuStorage::F32(gw), Shape::from((g.o, g.c, g.k, g.k))))
    }
}

/// `conv2d(x, w)` with stride 1 and padding k/2 for an odd square kernel; on devices other
/// than the CPU (or other dtypes), candle's own convolution.
pub fn conv2d_same(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    if !x.device().is_cpu()
        || kh != kw
        || kh % 2 == 0
        || ci != c
        || x.dtype() != candle_core::DType::F32
        || w.dtype() != candle_core::DType::F32
    {
        return x.conv2d(w, kh / 2, 1, 1, 1);
    }
    let g = Geometry {
        n,
        c,
        h,
        w: wd,
        o,
        k: kh,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv { g })
}
