//! The inner loops of the CPU kernels ([`super::fused`], and the convolution's input activation
//! and gradient sums), compiled for several instruction sets and picked at run time.
//!
//! The release binary targets baseline x86-64 (SSE2) so that it runs anywhere; compiled that
//! way, the SiLU loops ran four lanes wide and the row reductions one element at a time.
//! `multiversion` builds a copy of each loop for AVX-512 and AVX2 and dispatches on the CPU
//! found at run time (one cached indirect call per loop, which is why every kernel takes a
//! whole plane, row block or chunk). Results are bitwise the same on every path: no fused
//! multiply-add is introduced (Rust never contracts `a * b + c`), and every reduction sums
//! [`LANES`] fixed partial sums in a fixed order.

use multiversion::multiversion;

/// Partial sums per reduction: one AVX-512 vector or two AVX2 ones, so the loop is not bound
/// by the add latency, and a summation order that does not depend on the instruction set.
pub(super) const LANES: usize = 16;

/// `eˣ` in straight-line f32 arithmetic that vectorises (the C library's `expf` is a call per
/// element): range reduction `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-7
/// polynomial for `eʳ`, and `2ⁿ` built from its bits. Within 1 ulp of the correctly rounded
/// value on a sweep of 22 million inputs over the clamped range (the test allows 2). Inputs
/// are clamped to [−87, 88] (results from 1.6e−38 to 1.7e38, no infinities or subnormals),
/// which the callers' `1 + e⁻ˣ` and max-subtracted softmax never notice.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (SSE2 has no vector round).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let er = p * r * r + r + 1.0;
    // `n` is integral and within [−126, 127]: the integer conversion is exact.
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `1 / 0.596`: EDM2 divides SiLU by 0.596 to keep unit magnitude.
const INV_MP_SILU: f32 = 1.0 / 0.596;

/// Magnitude-preserving SiLU, `silu(x) / 0.596` (one division, by `1 + e⁻ˣ`).
#[inline(always)]
pub(super) fn mp_silu(x: f32) -> f32 {
    x * INV_MP_SILU / (1.0 + exp(-x))
}

/// Its derivative, `σ(x)·(1 + x·(1 − σ(x))) / 0.596`.
#[inline(always)]
pub(super) fn mp_silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    s * (1.0 + x * (1.0 - s)) * INV_MP_SILU
}

/// `Σ a_i b_i` over [`LANES`] partial sums (then the tail), in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `y[i] = mp_silu(x[i])`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn mp_silu_map(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = mp_silu(x);
    }
}

/// `o[i] = g[i] · mp_silu'(x[i])`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn mp_silu_backward(o: &mut [f32], x: &[f32], g: &[f32]) {
    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
        *o = g * mp_silu_grad(x);
    }
}

/// `o[i] ← o[i] · mp_silu'(x[i])` (the same arithmetic as [`mp_silu_backward`] with `g = o`).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn mp_silu_backward_in_place(o: &mut [f32], x: &[f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o *= mp_silu_grad(x);
    }
}

/// One plane of the modulated activation: `o[i] = mp_silu(c · y[i])`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn mod_silu_plane(o: &mut [f32], y: &[f32], c: f32) {
    for (o, &y) in o.iter_mut().zip(y) {
        *o = mp_silu(y * c);
    }
}

/// The backward pass of one plane of [`mod_silu_plane`] in one sweep: `gy[i] = g[i] ·
/// mp_silu'(c·y[i]) · c`, and the returned `∂c = Σ g[i] · mp_silu'(c·y[i]) · y[i]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn mod_silu_plane_backward(gy: &mut [f32], y: &[f32], g: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut co = gy.chunks_exact_mut(LANES);
    let mut cy = y.chunks_exact(LANES);
    let mut cg = g.chunks_exact(LANES);
    for ((o, y), g) in (&mut co).zip(&mut cy).zip(&mut cg) {
        for k in 0..LANES {
            let t = g[k] * mp_silu_grad(y[k] * c);
            o[k] = t * c;
            acc[k] += t * y[k];
        }
    }
    let mut tail = 0f32;
    for ((o, &y), &g) in co
        .into_remainder()
        .iter_mut()
        .zip(cy.remainder())
        .zip(cg.remainder())
    {
        let t = g * mp_silu_grad(y * c);
        *o = t * c;
        tail += t * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `o[i] = s · x[i]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn scale(o: &mut [f32], x: &[f32], s: f32) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = s * x;
    }
}

/// `o[i] += x[i]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn add_assign(o: &mut [f32], x: &[f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o += x;
    }
}

/// `o[i] = clamp(wa · a[i] + wb · b[i], −c, c)` (`c` may be infinite).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn lincomb_clip(o: &mut [f32], a: &[f32], b: &[f32], wa: f32, wb: f32, c: f32) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o = (wa * a + wb * b).clamp(-c, c);
    }
}

/// The backward pass of [`lincomb_clip`]: with `m[i]` 1 where `|wa·a[i] + wb·b[i]| ≤ c`,
/// else 0, `ga[i] = wa · g[i] · m[i]` and `gb[i] = wb · g[i] · m[i]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn lincomb_clip_backward(
    (ga, gb): (&mut [f32], &mut [f32]),
    g: &[f32],
    a: &[f32],
    b: &[f32],
    wa: f32,
    wb: f32,
    c: f32,
) {
    for i in 0..ga
        .len()
        .min(gb.len())
        .min(g.len())
        .min(a.len())
        .min(b.len())
    {
        let inside = (wa * a[i] + wb * b[i]).abs() <= c;
        let g = if inside { g[i] } else { 0.0 };
        ga[i] = wa * g;
        gb[i] = wb * g;
    }
}

/// Rows of `rows` (each `row` long) ← `softmax(s · row)`, in separate vectorisable passes
/// per row (lane-wise maximum, exponentials, lane-wise sum, scaling).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn softmax_rows(rows: &mut [f32], row: usize, s: f32) {
    for r in rows.chunks_exact_mut(row) {
        let mut maxes = [f32::NEG_INFINITY; LANES];
        let mut chunks = r.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &v) in maxes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&maxes)
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        r.iter_mut().for_each(|v| *v = exp(s * (*v - max)));
        let mut sums = [0f32; LANES];
        let mut chunks = r.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &v) in sums.iter_mut().zip(c) {
                *a += v;
            }
        }
        let sum: f32 = sums.iter().chain(chunks.remainder()).sum();
        let inv = 1.0 / sum;
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The softmax backward pass per row, from its output `w` and its gradient `g`:
/// `o = s · w ⊙ (g − Σ g·w)` (`s` the scale the scores were multiplied by). `o` may be `g`'s
/// storage: pass `None` for `g` to update `o` in place.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn softmax_rows_backward(
    o: &mut [f32],
    g: Option<&[f32]>,
    w: &[f32],
    row: usize,
    s: f32,
) {
    match g {
        None => {
            for (o, w) in o.chunks_exact_mut(row).zip(w.chunks_exact(row)) {
                let d = dot(o, w);
                o.iter_mut()
                    .zip(w)
                    .for_each(|(o, &w)| *o = s * w * (*o - d));
            }
        }
        Some(g) => {
            for ((o, w), g) in o
                .chunks_exact_mut(row)
                .zip(w.chunks_exact(row))
                .zip(g.chunks_exact(row))
            {
                let d = dot(g, w);
                for ((o, &w), &g) in o.iter_mut().zip(w).zip(g) {
                    *o = s * w * (g - d);
                }
            }
        }
    }
}

/// `Σ x²` over the middle axis of one `[mid, inner]` slice `x`, into `sums` (`inner` of
/// them), accumulated in f64: a weight's fan-in reaches thousands of terms, and PyTorch's
/// norm is more accurate than a plain f32 running sum. With `inner == 1` (a weight's rows)
/// the sum runs over [`LANES`] partial sums.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn sum_squares(x: &[f32], sums: &mut [f64]) {
    if sums.len() == 1 {
        let mut acc = [0f64; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for k in 0..LANES {
                let v = f64::from(c[k]);
                acc[k] += v * v;
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        sums[0] = acc.iter().sum::<f64>() + tail;
        return;
    }
    sums.fill(0.0);
    for row in x.chunks_exact(sums.len()) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| {
            let v = f64::from(v);
            *s += v * v;
        });
    }
}

/// `Σ g·x` over the middle axis of one `[mid, inner]` slice, like [`sum_squares`].
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn sum_products(x: &[f32], g: &[f32], sums: &mut [f64]) {
    if sums.len() == 1 {
        let mut acc = [0f64; LANES];
        let mut cx = x.chunks_exact(LANES);
        let mut cg = g.chunks_exact(LANES);
        for (a, b) in (&mut cx).zip(&mut cg) {
            for k in 0..LANES {
                acc[k] += f64::from(a[k]) * f64::from(b[k]);
            }
        }
        let tail: f64 = cx
            .remainder()
            .iter()
            .zip(cg.remainder())
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        sums[0] = acc.iter().sum::<f64>() + tail;
        return;
    }
    sums.fill(0.0);
    for (xr, gr) in x.chunks_exact(sums.len()).zip(g.chunks_exact(sums.len())) {
        for ((s, &x), &g) in sums.iter_mut().zip(xr).zip(gr) {
            *s += f64::from(g) * f64::from(x);
        }
    }
}

/// `o[m, i] = a[i] · x[m, i] − b[i] · g[m, i]`-style row scaling for one `[mid, inner]`
/// slice: `o = g ⊙ a − x ⊙ b` with `a`, `b` broadcast along the rows (the normalisation's
/// backward pass; its forward pass is this with `g = x`, `b = 0`, which [`scale_rows`] does).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn normalize_backward_rows(o: &mut [f32], x: &[f32], g: &[f32], a: &[f32], b: &[f32]) {
    let inner = a.len();
    for ((o, x), g) in o
        .chunks_exact_mut(inner)
        .zip(x.chunks_exact(inner))
        .zip(g.chunks_exact(inner))
    {
        for ((((o, &x), &g), &a), &b) in o.iter_mut().zip(x).zip(g).zip(a).zip(b) {
            *o = g * a - x * b;
        }
    }
}

/// `o[m, i] = x[m, i] · d[i]` for one `[mid, inner]` slice (`inner = d.len()`); with
/// `inner == 1`, every element times `d[0]`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn scale_rows(o: &mut [f32], x: &[f32], d: &[f32]) {
    if d.len() == 1 {
        let s = d[0];
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * s);
        return;
    }
    for (o, x) in o.chunks_exact_mut(d.len()).zip(x.chunks_exact(d.len())) {
        for ((o, &x), &d) in o.iter_mut().zip(x).zip(d) {
            *o = x * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    /// Distance in units in the last place between two positive finite floats.
    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_reference_on_its_range() {
        // Every 97th float from −87 to 88 (≈ 22 million inputs), both signs, and the ends.
        let mut worst = (0u32, 0f32);
        let mut check = |x: f32| {
            let want = f64::from(x).exp() as f32;
            let d = ulps(exp(x), want);
            if d > worst.0 {
                worst = (d, x);
            }
        };
        for bits in (0..=88f32.to_bits()).step_by(97) {
            let x = f32::from_bits(bits);
            check(x);
            if x <= 87.0 {
                check(-x);
            }
        }
        for x in [-87.0, 88.0, 0.0, -0.0, 1.0, -1.0, 0.5, -0.5] {
            check(x);
        }
        eprintln!("worst: {} ulp at x = {}", worst.0, worst.1);
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        // Clamped outside the range: finite, positive, monotone at the ends.
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert_eq!(exp(1000.0), exp(88.0));
        assert!(exp(88.0).is_finite() && exp(-87.0) > 0.0);
        assert!(exp(f32::NAN).is_nan(), "NaN propagates");
    }
}
