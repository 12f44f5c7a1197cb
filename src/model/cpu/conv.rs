//! Stride-1 "same" convolution on the CPU as small GEMMs per image, with its own backward pass
//! (candle's CPU convolution backward is a direct loop).
//!
//! Per image `b`: `y_b[O, H·W] = W[O, C·k²] · cols_b[C·k², H·W]`, where `cols_b` is the
//! image lowered in a per-thread scratch buffer that stays in cache for the products: its
//! im2col matrix (one product), or its kernel-row form (k shifted copies of the image, k
//! products of depth C·k; see [`Geometry::lower`]); 1×1 kernels use the image itself. An
//! activation of the input ([`InputAct`]) is applied per image on the way in. The backward
//! pass is, per image, `∂x_b` = the same convolution of `∂y_b` with the kernel turned by 180°
//! and its channel axes swapped (forward-shaped products again), and `∂W = Σ_b ∂y_b ·
//! cols_bᵀ`, summed over fixed groups of images in a fixed order, so results do not depend
//! on the thread count (bit-identical resumed training relies on that). Images run in
//! parallel on rayon; each product is single-threaded.
//!
//! 3×3 layers with even H and W and at least 16 input and output channels take Winograd's
//! F(2×2, 3×3) instead, for all three products ([`super::winograd`]; 2.25× fewer
//! multiplications), unless `HINDSIGHT_CONV=direct` ([`winograd_enabled`]).

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels;
use super::primitives::{sgemm, slice_f32, sum_in_order, with_scratch, InputAct, View};
use super::winograd::Winograd;
use crate::model::ops::mp_silu;

/// Geometry of one convolution: `x` [N, C, H, W], `w` [O, C, k, k], padding k/2.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    /// Lower images to kernel rows where deep enough (see [`Geometry::by_rows`]).
    rows: bool,
}

impl Geometry {
    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// The Winograd form of this convolution, where it takes that path (see
    /// [`Winograd::applies`] and [`winograd_enabled`]).
    fn winograd(&self) -> Option<Winograd> {
        (winograd_enabled() && Winograd::applies(self.k, self.c, self.o, self.h, self.w)).then_some(
            Winograd {
                n: self.n,
                c: self.c,
                o: self.o,
                h: self.h,
                w: self.w,
            },
        )
    }

    /// Rows of an im2col matrix: C·k².
    fn kdim(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Writes one im2col row `(dy, dx)` of one channel: `dst[y·W + x] = src[(y + dy − p)·W +
    /// x + dx − p]` where that lies inside the image, 0 where it falls in the padding. The rows
    /// of the image that stay inside are copied as one block (a horizontal shift only wraps
    /// entries across row ends, which are then set to zero).
    fn shifted_copy(&self, src: &[f32], dst: &mut [f32], dy: usize, dx: usize) {
        let (h, w, p) = (self.h as isize, self.w as isize, (self.k / 2) as isize);
        let (dy, shift) = (dy as isize - p, dx as isize - p);
        let (y0, y1) = ((-dy).max(0), (h - dy).min(h));
        if y0 >= y1 {
            dst.fill(0.0);
            return;
        }
        // Rows in the vertical padding.
        dst[..y0 as usize * self.w].fill(0.0);
        dst[y1 as usize * self.w..].fill(0.0);
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

    /// im2col of one image `x` [C, H·W] into `cols` [C·k², H·W]; every entry is written, so
    /// `cols` may hold anything before.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, hw) = (self.k, self.hw());
        for (row, dst) in cols.chunks_exact_mut(hw).enumerate() {
            let (ci, dy, dx) = (row / (k * k), (row / k) % k, row % k);
            self.shifted_copy(&x[ci * hw..(ci + 1) * hw], dst, dy, dx);
        }
    }

    /// Whether one image is lowered to kernel rows (see [`Self::lower`]) rather than im2col:
    /// where the op chose it, for k > 1, and where each of the k products is still deep
    /// (C·k ≥ [`ROWS_MIN_DEPTH`]).
    fn by_rows(&self) -> bool {
        self.rows && self.k > 1 && self.c * self.k >= ROWS_MIN_DEPTH
    }

    /// Products per image: k kernel rows, or one.
    fn parts(&self) -> usize {
        if self.by_rows() {
            self.k
        } else {
            1
        }
    }

    /// Rows of each product's right-hand side: C·k, C·k², or C (1×1).
    fn part_depth(&self) -> usize {
        self.kdim() / self.parts()
    }

    /// Columns of one row of the kernel-row form: the image's H rows and k − 1 rows of padding.
    fn row_len(&self) -> usize {
        (self.h + self.k - 1) * self.w
    }

    /// Floats one lowered image takes (none for 1×1: the image is its own matrix).
    fn lowered_len(&self) -> usize {
        if self.k == 1 {
            0
        } else if self.by_rows() {
            self.c * self.k * self.row_len()
        } else {
            self.kdim() * self.hw()
        }
    }

    /// Lowers one image `x` [C, H·W] into `buf` ([`Self::lowered_len`] floats, contents
    /// unspecified before). Kernel-row form: row `c·k + dx` holds channel c shifted by
    /// `dx − p` columns (zeros shifted in) with p zero rows above and below, so that for kernel
    /// row `dy` the product's right-hand side [C·k, H·W] is this buffer viewed from column
    /// `dy·W` — k copies of the image instead of im2col's k², and k products of depth C·k.
    fn lower(&self, x: &[f32], buf: &mut [f32]) {
        if self.k == 1 {
            return;
        }
        if !self.by_rows() {
            return self.im2col(x, buf);
        }
        let (k, hw, w, p) = (self.k, self.hw(), self.w, self.k / 2);
        for (row, dst) in buf.chunks_exact_mut(self.row_len()).enumerate() {
            let (ci, dx) = (row / k, row % k);
            dst[..p * w].fill(0.0);
            dst[(p + self.h) * w..].fill(0.0);
            // dy = p: no vertical shift.
            self.shifted_copy(
                &x[ci * hw..(ci + 1) * hw],
                &mut dst[p * w..(p + self.h) * w],
                p,
                dx,
            );
        }
    }

    /// The right-hand side [depth, H·W] of product `part` for one image: the image itself
    /// (1×1), its im2col, or kernel row `part` of its kernel-row form.
    fn part<'a>(&self, x: &'a [f32], lowered: &'a [f32], part: usize) -> View<'a> {
        let (hw, depth) = (self.hw(), self.part_depth());
        if self.k == 1 {
            View::row_major(x, depth, hw)
        } else if self.by_rows() {
            View {
                data: &lowered[part * self.w..],
                rows: depth,
                cols: hw,
                rs: self.row_len(),
                cs: 1,
            }
        } else {
            View::row_major(lowered, depth, hw)
        }
    }

    /// The weight `w` [O, C, k, k] as the products' left-hand sides, [parts][O, depth]: the
    /// weight itself, or per kernel row `dy` the matrix `[o, c·k + dx] = w[o, c, dy, dx]`.
    fn weight_parts(&self, w: &[f32]) -> Vec<f32> {
        if !self.by_rows() {
            return w.to_vec();
        }
        let k = self.k;
        let mut out = vec![0f32; w.len()];
        for (i, &v) in w.iter().enumerate() {
            let (o, c, dy, dx) = (i / self.kdim(), (i / (k * k)) % self.c, (i / k) % k, i % k);
            out[(dy * self.o + o) * self.c * k + c * k + dx] = v;
        }
        out
    }

    /// `y_b` [O, H·W] = the convolution of one image, from its lowered form and the weight's
    /// parts.
    fn image_product(&self, yb: &mut [f32], wparts: &[f32], x: &[f32], lowered: &[f32]) {
        let depth = self.part_depth();
        for part in 0..self.parts() {
            let a = View::row_major(&wparts[part * self.o * depth..], self.o, depth);
            sgemm(yb, part > 0, a, self.part(x, lowered, part));
        }
    }
}

/// Whether 3×3 convolutions may use Winograd's F(2×2, 3×3) where it applies
/// ([`winograd_applies`]): yes unless the environment variable `HINDSIGHT_CONV` is `direct`
/// (read on first use), which keeps every convolution on the direct GEMM path — for
/// comparisons, or to reproduce the rounding of runs made before Winograd was added;
/// [`set_winograd`] overrides it.
pub fn winograd_enabled() -> bool {
    match WINOGRAD.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = match std::env::var("HINDSIGHT_CONV").as_deref() {
                Ok("direct") => false,
                Ok("winograd") | Err(_) => true,
                Ok(other) => {
                    tracing::warn!(
                        "HINDSIGHT_CONV={other:?} is neither \"winograd\" nor \"direct\"; \
                         using winograd"
                    );
                    true
                }
            };
            // A concurrent `set_winograd` wins over the environment.
            let _ = WINOGRAD.compare_exchange(
                UNSET,
                if on { ON } else { OFF },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            WINOGRAD.load(Ordering::Relaxed) == ON
        }
    }
}

/// Whether a stride-1 "same" convolution of `c` input and `o` output channels, k×k kernel and
/// H×W images takes the Winograd path when it is enabled: k = 3, H and W even (H·W ≥ 8), C and
/// O ≥ 16.
pub fn winograd_applies(k: usize, c: usize, o: usize, h: usize, w: usize) -> bool {
    Winograd::applies(k, c, o, h, w)
}

/// Turns the Winograd path on or off for the whole process (`hindsight bench conv` times
/// both in one run).
pub fn set_winograd(enabled: bool) {
    WINOGRAD.store(if enabled { ON } else { OFF }, Ordering::Relaxed);
}

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static WINOGRAD: AtomicU8 = AtomicU8::new(UNSET);

/// Least depth C·k of the kernel-row products (below it, im2col's one deeper product wins).
const ROWS_MIN_DEPTH: usize = 48;

/// Least H·W for which the forward-shaped products (the convolution and its input gradient)
/// lower to kernel rows. Measured on 2 cores (BENCHMARKS.md): at 16×16 kernel rows ran the
/// convolution 3–7% faster and the input gradient 1–7%; at 8×8 (64 positions, im2col small
/// enough to stay in cache) its three products per image lost 3–10%. The weight gradient
/// gains 8–15% from kernel rows at both sizes and always uses them.
const ROWS_MIN_POSITIONS: usize = 128;

/// Images per partial weight gradient: the gradient is summed over such fixed groups (in
/// parallel), then the groups in order.
const WEIGHT_GRAD_GROUP: usize = 4;

// The tensor-level half of `InputAct` lives here rather than with the type in `primitives`:
// `apply_to` dispatches through `ops::mp_silu` (fused kernel or composed ops), and the
// primitives that the fused kernels build on must not depend on those kernels.
impl InputAct {
    /// Floats of scratch the activated image needs.
    fn plane(self, g: &Geometry) -> usize {
        self.plane_len(g.c * g.hw())
    }

    /// `act(x)` as a tensor of its own (where the convolution does not apply it itself).
    pub fn apply_to(self, x: &Tensor) -> Result<Tensor> {
        match self {
            InputAct::Identity => Ok(x.clone()),
            InputAct::MpSilu => mp_silu(x),
        }
    }
}

/// The convolution of `act(x)`: arguments `x`, `w`; result `y` [N, O, H, W].
struct Conv {
    g: Geometry,
    act: InputAct,
}

/// `∂x` from `∂y`, `w` and `x` (for the activation's derivative): arguments `∂y` [N, O, H, W],
/// `w`, `x`; result [N, C, H, W].
struct ConvGradInput {
    g: Geometry,
    act: InputAct,
}

/// `∂W` from `x` and `∂y`: arguments `x`, `∂y`; result [O, C, k, k].
struct ConvGradWeight {
    g: Geometry,
    act: InputAct,
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
        let hw = g.hw();
        let mut y = vec![0f32; g.n * g.o * hw];
        let act = self.act;
        if let Some(wg) = g.winograd() {
            wg.forward(&mut y, x, &wg.transform_weights(w), act);
            return Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.h, g.w))));
        }
        let g = Geometry {
            rows: hw >= ROWS_MIN_POSITIONS,
            ..g
        };
        let wparts = g.weight_parts(w);
        let (plane, lowered) = (act.plane(&g), g.lowered_len());
        y.par_chunks_mut(g.o * hw).enumerate().for_each(|(b, yb)| {
            let xb = &x[b * g.c * hw..(b + 1) * g.c * hw];
            with_scratch(plane + lowered, |buf| {
                let (a, lowered) = buf.split_at_mut(plane);
                let xb = act.apply(xb, a);
                g.lower(xb, lowered);
                g.image_product(yb, &wparts, xb, lowered);
            });
        });
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
        // No input gradient for an input that no parameter led to (the network's first layer).
        let (g, act) = (self.g, self.act);
        let x = x.contiguous()?;
        let gx = if x.track_op() {
            let op = ConvGradInput { g, act };
            Some(grad.apply_op3_no_bwd(&w.contiguous()?, &x, &op)?)
        } else {
            None
        };
        let gw = x.apply_op2_no_bwd(&grad, &ConvGradWeight { g, act })?;
        Ok((gx, Some(gw)))
    }
}

impl candle_core::CustomOp3 for ConvGradInput {
    fn name(&self) -> &'static str {
        "hindsight-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let gy = slice_f32(s1, l1, "conv2d gradient")?;
        let w = slice_f32(s2, l2, "conv2d weight")?;
        let x = slice_f32(s3, l3, "conv2d input")?;
        if x.len() != g.n * g.c * g.hw() || gy.len() != g.n * g.o * g.hw() {
            candle_core::bail!("conv2d gradient: shapes do not match the geometry {g:?}");
        }
        // ∂x_b = act'(x_b) ⊙ ∂(act x)_b, in place after each image's product.
        let act_grad = |b: usize, gxb: &mut [f32]| {
            if self.act == InputAct::MpSilu {
                let xb = &x[b * g.c * g.hw()..(b + 1) * g.c * g.hw()];
                kernels::mp_silu_backward_in_place(gxb, xb);
            }
        };
        let (hw, k) = (g.hw(), g.k);
        let mut gx = vec![0f32; g.n * g.c * hw];
        if k == 1 {
            let wt = View::row_major(w, g.o, g.c).t(); // [C, O]
            gx.par_chunks_mut(g.c * hw)
                .enumerate()
                .for_each(|(b, gxb)| {
                    let gyb = View::row_major(&gy[b * g.o * hw..(b + 1) * g.o * hw], g.o, hw);
                    sgemm(gxb, false, wt, gyb);
                    act_grad(b, gxb);
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
                rows: hw >= ROWS_MIN_POSITIONS,
                ..g
            };
            if let Some(wg) = back.winograd() {
                wg.forward(
                    &mut gx,
                    gy,
                    &wg.transform_weights(&flipped),
                    InputAct::Identity,
                );
                if self.act != InputAct::Identity {
                    gx.par_chunks_mut(g.c * hw)
                        .enumerate()
                        .for_each(|(b, gxb)| act_grad(b, gxb));
                }
                return Ok((CpuStorage::F32(gx), Shape::from((g.n, g.c, g.h, g.w))));
            }
            let wparts = back.weight_parts(&flipped);
            gx.par_chunks_mut(g.c * hw)
                .enumerate()
                .for_each(|(b, gxb)| {
                    let gyb = &gy[b * g.o * hw..(b + 1) * g.o * hw];
                    with_scratch(back.lowered_len(), |lowered| {
                        back.lower(gyb, lowered);
                        back.image_product(gxb, &wparts, gyb, lowered);
                    });
                    act_grad(b, gxb);
                });
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
        if let Some(wg) = g.winograd() {
            let gw = wg.weight_grad(x, gy, self.act);
            return Ok((CpuStorage::F32(gw), Shape::from((g.o, g.c, g.k, g.k))));
        }
        let (hw, kd) = (g.hw(), g.kdim());
        let g = Geometry { rows: true, ..g };
        // Per fixed group of images and per product (kernel row), ∂W_groupᵀ[depth, O] =
        // Σ_b cols_b · ∂y_bᵀ with cols_b that product's right-hand side, computed
        // transposed: with the deep axis (H·W) contiguous in both inputs `gemm` runs up to 2x
        // faster than ∂y_b · cols_bᵀ (8×8 3×3 layers: 86–119 → 108–146 GFLOP/s on 2 cores).
        // 1×1 layers with few positions keep the direct form (M = O is the larger side there).
        let group = WEIGHT_GRAD_GROUP;
        let transposed = g.k > 1 || hw >= 128;
        let act = self.act;
        let (plane, lowered_len) = (act.plane(&g), g.lowered_len());
        // One block of the sums per product: [parts][depth, O] (transposed) or [O, C].
        let block = g.part_depth() * g.o;
        let groups: Vec<Vec<f32>> = (0..g.n.div_ceil(group))
            .into_par_iter()
            .map(|gi| {
                let mut acc = vec![0f32; kd * g.o];
                let images = gi * group..((gi + 1) * group).min(g.n);
                for (i, b) in images.enumerate() {
                    let xb = &x[b * g.c * hw..(b + 1) * g.c * hw];
                    let gyb = View::row_major(&gy[b * g.o * hw..(b + 1) * g.o * hw], g.o, hw);
                    with_scratch(plane + lowered_len, |buf| {
                        let (a, lowered) = buf.split_at_mut(plane);
                        let xb = act.apply(xb, a);
                        g.lower(xb, lowered);
                        for (part, acc) in acc.chunks_exact_mut(block).enumerate() {
                            let rhs = g.part(xb, lowered, part);
                            if transposed {
                                sgemm(acc, i > 0, rhs, gyb.t());
                            } else {
                                sgemm(acc, i > 0, gyb, rhs.t());
                            }
                        }
                    });
                }
                acc
            })
            .collect();
        // The groups' sums added in group order (element-wise, so in parallel over elements),
        // then, for the transposed products, one transpose into [O, C·k²].
        let total = sum_in_order(&groups, g.o * kd);
        let gw = if transposed {
            let (k, depth) = (g.k, g.part_depth());
            let mut gw = vec![0f32; g.o * kd];
            for (r, row) in total.chunks_exact(g.o).enumerate() {
                // Row r of part r / depth: its column of the weight [O, C·k²].
                let (part, r) = (r / depth, r % depth);
                let column = if g.by_rows() {
                    (r / k) * k * k + part * k + r % k
                } else {
                    r
                };
                for (o, &v) in row.iter().enumerate() {
                    gw[o * kd + column] = v;
                }
            }
            gw
        } else {
            total
        };
        Ok((CpuStorage::F32(gw), Shape::from((g.o, g.c, g.k, g.k))))
    }
}

/// `conv2d(x, w)` with stride 1 and padding k/2 for an odd square kernel; on devices other
/// than the CPU (or other dtypes), candle's own convolution.
pub fn conv2d_same(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    conv2d_same_act(x, w, InputAct::Identity)
}

/// [`conv2d_same`] of `act(x)`; on the CPU the activation is applied inside the convolution.
pub fn conv2d_same_act(x: &Tensor, w: &Tensor, act: InputAct) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    if !x.device().is_cpu()
        || kh != kw
        || kh % 2 == 0
        || ci != c
        || x.dtype() != candle_core::DType::F32
        || w.dtype() != candle_core::DType::F32
    {
        return act.apply_to(x)?.conv2d(w, kh / 2, 1, 1, 1);
    }
    let g = Geometry {
        n,
        c,
        h,
        w: wd,
        o,
        k: kh,
        rows: false,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv { g, act })
}
