//! Winograd's minimal filtering F(2×2, 3×3) for the stride-1 "same" 3×3 convolutions on the
//! CPU (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! The output is cut into 2×2 tiles; the 4×4 input tile `d` under each (rows 2i − 1 … 2i + 2,
//! columns 2j − 1 … 2j + 2, zeros outside the image) and each 3×3 kernel `g` are transformed,
//! `V = Bᵀ d B` and `U = G g Gᵀ`, so that the tile is `Y = Aᵀ [Σ_c U ⊙ V] A`. The sum over
//! channels at each of the 16 transform positions ξ is a matrix product `M_ξ[O, T] = U_ξ[O, C]
//! · V_ξ[C, T]` over the T tiles of a chunk of images: 16 products of 2·O·C·T flops instead of
//! the direct convolution's 2·O·C·9·4T, 2.25× fewer multiplications, with the transforms (a
//! few additions per value, vectorised across tiles) on the side.
//!
//! The transforms only add, subtract and halve (F(2, 3) uses the points 0, ±1 and ∞), so the
//! rounding stays that of the direct product: against a float64 convolution both paths measured
//! 2–4e-7 RMS relative error on the network's layer shapes, and the network's float32
//! gradients came out closer to a float64 run than the reference's own float32 ones
//! (BENCHMARKS.md; `hindsight bench parity` prints both). The weight gradient uses the same
//! transforms through the chain rule ([`Winograd::weight_grad`]); the input gradient is itself
//! a forward-shaped convolution (of `∂y` with the turned kernel), so [`Winograd::forward`]
//! serves it as well.
//!
//! One difference from the direct product: a non-finite input value reaches all four outputs
//! of the 2×2 tiles whose 4×4 windows hold it (through the transforms' sums), not only the
//! outputs whose 3×3 neighbourhood holds it. Outputs next to a NaN or ∞ may therefore be NaN
//! where the direct path gives a finite value; finite inputs are unaffected.

use multiversion::multiversion;
use rayon::prelude::*;

use super::primitives::{sgemm, sum_in_order, with_scratch, InputAct, View};

/// Transform positions per tile (4 × 4).
const XI: usize = 16;

/// Tiles per chunk of images that one thread transforms and multiplies at a time: enough
/// columns for the products to run at speed, few enough that the chunk's transformed inputs
/// and products stay in the core's L2 cache.
const CHUNK_TILES: usize = 128;

/// Most partial weight gradients (groups of chunks summed in parallel, then added in order):
/// enough tasks for the threads, few enough partial sums to add.
const MAX_GROUPS: usize = 16;

/// Deepest product the forward pass hands to `gemm` in one call. `gemm` splits deeper
/// products into blocks whose size depends on the matrix sizes for small ones (M, N ≤ 64), so
/// a chunk's tile count (which depends on the batch) could change how an image's sums are
/// grouped; at this depth or less it never splits, so an image's output is the same bits in
/// any batch (the sampler's seed-per-image guarantee relies on that).
const MAX_DEPTH: usize = 512;

/// Least number of input and of output channels for the Winograd path: the products have
/// depth C (forward) and height O, and below this the direct convolution's deeper product
/// (depth 9·C) is faster than the shallow ones plus the transforms.
pub(super) const MIN_CHANNELS: usize = 16;

/// One 3×3 convolution's shape: `x` [N, C, H, W] → `y` [N, O, H, W], H and W even.
#[derive(Clone, Copy, Debug)]
pub(super) struct Winograd {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) o: usize,
    pub(super) h: usize,
    pub(super) w: usize,
}

impl Winograd {
    /// Whether a k×k convolution of these channels and image size takes this path: k = 3, H
    /// and W even with at least two tiles per image (a product with one column would go to
    /// `gemm`'s matrix–vector path, which sums in another order, so a single 2×2 image would
    /// come out different alone than in a batch), and C, O ≥ [`MIN_CHANNELS`].
    pub(super) fn applies(k: usize, c: usize, o: usize, h: usize, w: usize) -> bool {
        k == 3
            && h.is_multiple_of(2)
            && w.is_multiple_of(2)
            && h * w >= 8
            && c >= MIN_CHANNELS
            && o >= MIN_CHANNELS
    }

    fn th(&self) -> usize {
        self.h / 2
    }

    fn tw(&self) -> usize {
        self.w / 2
    }

    /// Tiles per image.
    fn tiles(&self) -> usize {
        self.th() * self.tw()
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Images per chunk.
    fn chunk(&self) -> usize {
        CHUNK_TILES.div_ceil(self.tiles()).clamp(1, self.n.max(1))
    }

    /// Floats of the scratch of one plane's transforms: [`input_plane`] takes 2·H·W, 2·tiles
    /// and W more (at most 3·H·W), [`output_plane`] 12·tiles (3·H·W), and
    /// [`output_plane_adjoint`] 4·tiles.
    fn scratch_len(&self) -> usize {
        12 * self.tiles()
    }

    /// `U[ξ][o][c]` = (G g Gᵀ)[ξ] for each kernel `g = w[o][c]` of `w` [O, C, 3, 3].
    pub(super) fn transform_weights(&self, w: &[f32]) -> Vec<f32> {
        let oc = self.o * self.c;
        assert_eq!(w.len(), oc * 9, "winograd: weight size");
        let mut u = vec![0f32; XI * oc];
        for (at, g) in w.chunks_exact(9).enumerate() {
            // G g: 4 rows of 3.
            let mut t = [[0f32; 3]; 4];
            for x in 0..3 {
                let col = lift([g[x], g[3 + x], g[6 + x]]);
                for p in 0..4 {
                    t[p][x] = col[p];
                }
            }
            // (G g) Gᵀ.
            for (p, row) in t.iter().enumerate() {
                for (q, v) in lift(*row).into_iter().enumerate() {
                    u[(4 * p + q) * oc + at] = v;
                }
            }
        }
        u
    }

    /// `y` [N, O, H, W] = the convolution of `act(x)` ([N, C, H, W]) with the kernel whose
    /// transform is `u` ([`Self::transform_weights`]). Chunks of images run in parallel; each
    /// output value depends only on its own image, so the result does not depend on the
    /// thread count.
    pub(super) fn forward(&self, y: &mut [f32], x: &[f32], u: &[f32], act: InputAct) {
        let (c, o, hw) = (self.c, self.o, self.hw());
        assert!(x.len() == self.n * c * hw && y.len() == self.n * o * hw);
        assert_eq!(u.len(), XI * o * c, "winograd: transformed weight size");
        let chunk = self.chunk();
        y.par_chunks_mut(chunk * o * hw)
            .enumerate()
            .for_each(|(ci, yc)| {
                let images = yc.len() / (o * hw);
                let t = images * self.tiles();
                let first = ci * chunk;
                let xc = &x[first * c * hw..(first + images) * c * hw];
                self.with_buffers(images, act, |plane, rows, v, m| {
                    self.transform_input(xc, images, act, plane, rows, v);
                    for xi in 0..XI {
                        let uxi = &u[xi * o * c..(xi + 1) * o * c];
                        let vxi = &v[xi * c * t..(xi + 1) * c * t];
                        let mxi = &mut m[xi * o * t..(xi + 1) * o * t];
                        // In slices of at most MAX_DEPTH channels, so that the summation order
                        // of each output is fixed by C alone (see MAX_DEPTH).
                        for c0 in (0..c).step_by(MAX_DEPTH) {
                            let depth = MAX_DEPTH.min(c - c0);
                            let a = View {
                                data: &uxi[c0..],
                                rows: o,
                                cols: depth,
                                rs: c,
                                cs: 1,
                            };
                            let b = View::row_major(&vxi[c0 * t..(c0 + depth) * t], depth, t);
                            sgemm(mxi, c0 > 0, a, b);
                        }
                    }
                    for (b, yb) in yc.chunks_exact_mut(o * hw).enumerate() {
                        for (oi, plane) in yb.chunks_exact_mut(hw).enumerate() {
                            let at = oi * t + b * self.tiles();
                            output_plane(plane, &m[at..], o * t, rows, self.h, self.w);
                        }
                    }
                });
            });
    }

    /// Runs `f` on this thread's scratch cut into the buffers of one chunk of `images` images:
    /// the activated image, the per-plane transform scratch, `V` [16, C, T] and `M` [16, O, T].
    fn with_buffers<R>(
        &self,
        images: usize,
        act: InputAct,
        f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32], &mut [f32]) -> R,
    ) -> R {
        let t = images * self.tiles();
        let lens = [
            act.plane_len(self.c * self.hw()),
            self.scratch_len(),
            XI * self.c * t,
            XI * self.o * t,
        ];
        with_scratch(lens.iter().sum(), |buf| {
            let (plane, rest) = buf.split_at_mut(lens[0]);
            let (rows, rest) = rest.split_at_mut(lens[1]);
            let (v, m) = rest.split_at_mut(lens[2]);
            f(plane, rows, v, m)
        })
    }

    /// `V[ξ][c][t]` for the `images` images of `xc` ([images, C, H, W]) after `act`; `v` holds
    /// `XI · C · T` floats, T = images · tiles.
    fn transform_input(
        &self,
        xc: &[f32],
        images: usize,
        act: InputAct,
        plane: &mut [f32],
        rows: &mut [f32],
        v: &mut [f32],
    ) {
        let (c, hw) = (self.c, self.hw());
        let t = images * self.tiles();
        for b in 0..images {
            let xb = act.apply(&xc[b * c * hw..(b + 1) * c * hw], plane);
            for (ci, xp) in xb.chunks_exact(hw).enumerate() {
                let at = ci * t + b * self.tiles();
                input_plane(&mut v[at..], c * t, xp, rows, self.h, self.w);
            }
        }
    }

    /// `∂W` [O, C, 3, 3] of the convolution of `act(x)` from `∂y`, through the transforms:
    /// `∂U_ξ[O, C] = Σ_t ∂M_ξ[O, t] · V_ξ[C, t]` with `∂M = A ∂Y Aᵀ` per tile (the adjoint of the
    /// output transform), then `∂g = Gᵀ ∂U G`. Fixed groups of consecutive chunks (at most
    /// [`MAX_GROUPS`]) each sum a partial `∂U` over their chunks in order (products of depth T),
    /// and the groups' sums are then added in group order, so the result does not depend on the
    /// thread count.
    pub(super) fn weight_grad(&self, x: &[f32], gy: &[f32], act: InputAct) -> Vec<f32> {
        let (c, o, hw) = (self.c, self.o, self.hw());
        assert!(x.len() == self.n * c * hw && gy.len() == self.n * o * hw);
        let chunk = self.chunk();
        let oc = o * c;
        let chunks = self.n.div_ceil(chunk);
        let per_group = chunks.div_ceil(MAX_GROUPS);
        let partials: Vec<Vec<f32>> = (0..chunks.div_ceil(per_group))
            .into_par_iter()
            .map(|gi| {
                let mut du = vec![0f32; XI * oc];
                for ci in gi * per_group..((gi + 1) * per_group).min(chunks) {
                    let first = ci * chunk;
                    let images = chunk.min(self.n - first);
                    let t = images * self.tiles();
                    let xc = &x[first * c * hw..(first + images) * c * hw];
                    let gyc = &gy[first * o * hw..(first + images) * o * hw];
                    self.with_buffers(images, act, |plane, rows, v, dm| {
                        self.transform_input(xc, images, act, plane, rows, v);
                        for (b, gyb) in gyc.chunks_exact(o * hw).enumerate() {
                            for (oi, plane) in gyb.chunks_exact(hw).enumerate() {
                                let at = oi * t + b * self.tiles();
                                output_plane_adjoint(
                                    &mut dm[at..],
                                    o * t,
                                    plane,
                                    rows,
                                    self.h,
                                    self.w,
                                );
                            }
                        }
                        let accumulate = ci > gi * per_group;
                        for xi in 0..XI {
                            let dmxi = View::row_major(&dm[xi * o * t..(xi + 1) * o * t], o, t);
                            let vxi = View::row_major(&v[xi * c * t..(xi + 1) * c * t], c, t);
                            sgemm(&mut du[xi * oc..(xi + 1) * oc], accumulate, dmxi, vxi.t());
                        }
                    });
                }
                du
            })
            .collect();
        let du = sum_in_order(&partials, XI * oc);
        // ∂g = Gᵀ ∂U G per kernel.
        let mut gw = vec![0f32; oc * 9];
        for (at, g) in gw.chunks_exact_mut(9).enumerate() {
            let mut t = [[0f32; 4]; 3];
            for p in 0..4 {
                let row: [f32; 4] = std::array::from_fn(|q| du[(4 * p + q) * oc + at]);
                let r = lift_adjoint(row);
                for x in 0..3 {
                    t[x][p] = r[x];
                }
            }
            for x in 0..3 {
                let r = lift_adjoint(t[x]);
                for yy in 0..3 {
                    g[yy * 3 + x] = r[yy];
                }
            }
        }
        gw
    }
}

/// `G v` for a 3-vector: (v0, (v0 + v1 + v2)/2, (v0 − v1 + v2)/2, v2).
#[inline(always)]
fn lift([a, b, c]: [f32; 3]) -> [f32; 4] {
    [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c]
}

/// `Gᵀ v` for a 4-vector (the adjoint of [`lift`]).
#[inline(always)]
fn lift_adjoint([a, b, c, d]: [f32; 4]) -> [f32; 3] {
    [a + (b + c) * 0.5, (b - c) * 0.5, (b + c) * 0.5 + d]
}

/// The input transform of one plane `x` [H, W]: `v[ξ · stride + i · tw + j] = (Bᵀ d B)[ξ]` for
/// the 4×4 tile d over rows 2i − 1 … 2i + 2 and columns 2j − 1 … 2j + 2 (zeros outside), with
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`. `scratch` holds
/// [`Winograd::scratch_len`] floats.
///
/// Columns first, on whole image rows: for tile row i and p = 0 … 3, `C_p[i] = row(2i−1) −
/// row(2i+1)`, `row(2i) + row(2i+1)`, `row(2i+1) − row(2i)`, `row(2i) − row(2i+2)`. Then rows:
/// each `C_p` split into its even and odd columns (flat over all tiles), and `V[p][q]` is
/// `odd[j−1] − odd[j]`, `even[j] + odd[j]`, `odd[j] − even[j]`, `even[j] − even[j+1]` for
/// q = 0 … 3, the neighbours past a tile row's ends being padding (0).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn input_plane(v: &mut [f32], stride: usize, x: &[f32], scratch: &mut [f32], h: usize, w: usize) {
    let (th, tw) = (h / 2, w / 2);
    let tiles = th * tw;
    let half = th * w; // floats of one C_p
    let (cols, rest) = scratch.split_at_mut(4 * half);
    let (even, rest) = rest.split_at_mut(tiles);
    let (odd, rest) = rest.split_at_mut(tiles);
    let zeros = &mut rest[..w];
    zeros.fill(0.0);
    for i in 0..th {
        let row = |r: usize| &x[r * w..(r + 1) * w];
        let above = if i > 0 { row(2 * i - 1) } else { &*zeros };
        let below = if i + 1 < th { row(2 * i + 2) } else { &*zeros };
        column_step(
            [above, row(2 * i), row(2 * i + 1), below],
            split4(&mut cols[i * w..], half, w),
        );
    }
    for p in 0..4 {
        deinterleave(even, odd, &cols[p * half..(p + 1) * half]);
        let [v0, v1, v2, v3] = split4(&mut v[4 * p * stride..], stride, tiles);
        map2(v1, even, odd, |e, o| e + o);
        map2(v2, even, odd, |e, o| o - e);
        // Across the flat tile index; each tile row's first (v0) and last (v3) tile fixed after.
        map2(&mut v0[1..], &odd[..tiles - 1], &odd[1..], |a, b| a - b);
        map2(
            &mut v3[..tiles - 1],
            &even[..tiles - 1],
            &even[1..],
            |a, b| a - b,
        );
        for i in 0..th {
            v0[i * tw] = -odd[i * tw];
            v3[i * tw + tw - 1] = even[i * tw + tw - 1];
        }
    }
}

/// The column step of the input transform for one tile row, from its image rows 2i − 1 …
/// 2i + 2 (`above`, `top`, `bottom`, `below`; zeros past the image): `c0 = above − bottom`,
/// `c1 = top + bottom`, `c2 = bottom − top`, `c3 = top − below`, in blocks of [`BLOCK`] (one
/// loop for all four: the rows are only 8 or 16 long at these image sizes).
#[inline(always)]
fn column_step([above, top, bottom, below]: [&[f32]; 4], [c0, c1, c2, c3]: [&mut [f32]; 4]) {
    let n = c0.len();
    let (above, top, bottom, below) = (&above[..n], &top[..n], &bottom[..n], &below[..n]);
    let (c1, c2, c3) = (&mut c1[..n], &mut c2[..n], &mut c3[..n]);
    let mut k = 0;
    while k + BLOCK <= n {
        let load = |s: &[f32]| -> [f32; BLOCK] { s[k..k + BLOCK].try_into().expect("a block") };
        let (a, b, c, d) = (load(above), load(top), load(bottom), load(below));
        let mut out = [[0f32; BLOCK]; 4];
        for l in 0..BLOCK {
            out[0][l] = a[l] - c[l];
            out[1][l] = b[l] + c[l];
            out[2][l] = c[l] - b[l];
            out[3][l] = b[l] - d[l];
        }
        for (dst, src) in [&mut *c0, &mut *c1, &mut *c2, &mut *c3]
            .into_iter()
            .zip(&out)
        {
            dst[k..k + BLOCK].copy_from_slice(src);
        }
        k += BLOCK;
    }
    for k in k..n {
        let (a, b, c, d) = (above[k], top[k], bottom[k], below[k]);
        c0[k] = a - c;
        c1[k] = b + c;
        c2[k] = c - b;
        c3[k] = b - d;
    }
}

/// Elements per block of the element-wise helpers: one AVX vector. The rows and planes here
/// are 8 to a few hundred floats long, where the compiler's own vector loops (32 wide,
/// unrolled) would mostly run their 4-wide remainder loop.
const BLOCK: usize = 8;

/// `o[i] = f(a[i], b[i])` over the shortest of the three, in blocks of [`BLOCK`].
#[inline(always)]
fn map2(o: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    let mut oc = o.chunks_exact_mut(BLOCK);
    let mut ac = a.chunks_exact(BLOCK);
    let mut bc = b.chunks_exact(BLOCK);
    for ((o, a), b) in (&mut oc).zip(&mut ac).zip(&mut bc) {
        for l in 0..BLOCK {
            o[l] = f(a[l], b[l]);
        }
    }
    let rest = oc.into_remainder().iter_mut();
    for ((o, &a), &b) in rest.zip(ac.remainder()).zip(bc.remainder()) {
        *o = f(a, b);
    }
}

/// `o[i] = f(a[i], b[i], c[i])` over the shortest of the four, in blocks of [`BLOCK`].
#[inline(always)]
fn map3(o: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    let mut oc = o.chunks_exact_mut(BLOCK);
    let mut ac = a.chunks_exact(BLOCK);
    let mut bc = b.chunks_exact(BLOCK);
    let mut cc = c.chunks_exact(BLOCK);
    for (((o, a), b), c) in (&mut oc).zip(&mut ac).zip(&mut bc).zip(&mut cc) {
        for l in 0..BLOCK {
            o[l] = f(a[l], b[l], c[l]);
        }
    }
    let rest = oc.into_remainder().iter_mut();
    for (((o, &a), &b), &c) in rest
        .zip(ac.remainder())
        .zip(bc.remainder())
        .zip(cc.remainder())
    {
        *o = f(a, b, c);
    }
}

/// `even[i] = s[2i]`, `odd[i] = s[2i + 1]` (a plain loop: the compiler vectorises it with
/// lane permutations).
#[inline(always)]
fn deinterleave(even: &mut [f32], odd: &mut [f32], s: &[f32]) {
    let n = even.len().min(odd.len()).min(s.len() / 2);
    let (even, odd, s) = (&mut even[..n], &mut odd[..n], &s[..2 * n]);
    for i in 0..n {
        even[i] = s[2 * i];
        odd[i] = s[2 * i + 1];
    }
}

/// `d[2i] = even[i]`, `d[2i + 1] = odd[i]` (as [`deinterleave`]).
#[inline(always)]
fn interleave(d: &mut [f32], even: &[f32], odd: &[f32]) {
    let n = even.len().min(odd.len()).min(d.len() / 2);
    let (even, odd, d) = (&even[..n], &odd[..n], &mut d[..2 * n]);
    for i in 0..n {
        d[2 * i] = even[i];
        d[2 * i + 1] = odd[i];
    }
}

/// Four disjoint `len`-long slices of `s`, `step` apart.
#[inline(always)]
fn split4(s: &mut [f32], step: usize, len: usize) -> [&mut [f32]; 4] {
    let (a, rest) = s.split_at_mut(step);
    let (b, rest) = rest.split_at_mut(step);
    let (c, d) = rest.split_at_mut(step);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut d[..len]]
}

/// The output transform of one plane: `y` [H, W] from `m[ξ · stride + i · tw + j]`, each 2×2
/// tile `Aᵀ m A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`: per row p of m, its two column
/// combinations (flat over tiles), then the row combinations into four flat arrays (one per
/// output position of the tile), interleaved into the image rows at the end. `scratch` holds
/// 12 · tiles floats.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn output_plane(y: &mut [f32], m: &[f32], stride: usize, scratch: &mut [f32], h: usize, w: usize) {
    let (th, tw) = (h / 2, w / 2);
    let tiles = th * tw;
    let (cols, out) = scratch.split_at_mut(8 * tiles);
    for p in 0..4 {
        let mp = |q: usize| &m[(4 * p + q) * stride..(4 * p + q) * stride + tiles];
        let (e, o) = cols[2 * p * tiles..(2 * p + 2) * tiles].split_at_mut(tiles);
        map3(e, mp(0), mp(1), mp(2), |a, b, c| a + b + c);
        map3(o, mp(1), mp(2), mp(3), |a, b, c| a - b - c);
    }
    let at = |a: usize| &cols[a * tiles..(a + 1) * tiles];
    let [y00, y01, y10, y11] = split4(out, tiles, tiles);
    // Output column x of the tile: rows 0 and 1 from the column combinations x of rows p.
    for (x, top, bottom) in [(0, &mut *y00, &mut *y10), (1, &mut *y01, &mut *y11)] {
        map3(top, at(x), at(2 + x), at(4 + x), |a, b, c| a + b + c);
        map3(bottom, at(2 + x), at(4 + x), at(6 + x), |a, b, c| a - b - c);
    }
    for (i, rows) in y.chunks_exact_mut(2 * w).enumerate() {
        let (top, bottom) = rows.split_at_mut(w);
        let k = i * tw..(i + 1) * tw;
        interleave(top, &y00[k.clone()], &y01[k.clone()]);
        interleave(bottom, &y10[k.clone()], &y11[k]);
    }
}

/// The adjoint of [`output_plane`]: `m[ξ · stride + i · tw + j] = (A g Aᵀ)[ξ]` for each 2×2
/// tile g of the plane `gy` [H, W]; `tmp` (4 · tiles floats) holds the tiles' four values
/// as flat arrays.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn output_plane_adjoint(
    m: &mut [f32],
    stride: usize,
    gy: &[f32],
    tmp: &mut [f32],
    h: usize,
    w: usize,
) {
    let (th, tw) = (h / 2, w / 2);
    let tiles = th * tw;
    {
        let [g00, g01, g10, g11] = split4(tmp, tiles, tiles);
        for (i, rows) in gy.chunks_exact(2 * w).enumerate() {
            let (top, bottom) = rows.split_at(w);
            let at = i * tw;
            for (row, even, odd) in [(top, &mut *g00, &mut *g01), (bottom, &mut *g10, &mut *g11)] {
                for ((pair, e), o) in row
                    .chunks_exact(2)
                    .zip(&mut even[at..at + tw])
                    .zip(&mut odd[at..at + tw])
                {
                    *e = pair[0];
                    *o = pair[1];
                }
            }
        }
    }
    let g: [&[f32]; 4] = std::array::from_fn(|a| &tmp[a * tiles..(a + 1) * tiles]);
    // Rows p of A g (A's rows: (1, 0), (1, 1), (1, −1), (0, −1)), then the same on columns.
    for p in 0..4 {
        let [o0, o1, o2, o3] = split4(&mut m[4 * p * stride..], stride, tiles);
        for k in 0..tiles {
            let (a0, a1) = (g[0][k], g[2][k]); // column 0 of rows 0, 1 of the tile
            let (b0, b1) = (g[1][k], g[3][k]); // column 1
            let (c0, c1) = match p {
                0 => (a0, b0),
                1 => (a0 + a1, b0 + b1),
                2 => (a0 - a1, b0 - b1),
                _ => (-a1, -b1),
            };
            o0[k] = c0;
            o1[k] = c0 + c1;
            o2[k] = c0 - c1;
            o3[k] = -c1;
        }
    }
}
