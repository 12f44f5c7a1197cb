//! The two vector kernels that the triangular solves, triangular products and the Cholesky
//! panels spend their time in, compiled for several instruction sets and picked at run time.
//!
//! The release binary targets baseline x86-64 (SSE2) so that it runs anywhere; these loops
//! are twice as fast with AVX2 and faster still with AVX-512, so `multiversion` builds one
//! copy per target and dispatches on the CPU found at run time. Results are bitwise the same
//! on every path: no fused multiply-add is introduced (Rust never contracts `a * b + c`), and
//! the dot product's summation order is fixed by its explicit partial sums.

use multiversion::multiversion;

/// `y ← y + alpha · x` over the common length.
#[inline(always)]
fn axpy_inline(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `Σ a_i b_i` with 32 independent partial sums (four AVX-512 vectors, eight AVX2 ones), so
/// the loop is not bound by the add latency, and the summation order, fixed here, gives the
/// same bits on every instruction set.
#[inline(always)]
fn dot_inline(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 32;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0.0f64; LANES];
    let split = len / LANES * LANES;
    for (x, y) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        tail += x * y;
    }
    // Pairwise reduction of the partial sums.
    let mut width = LANES / 2;
    while width > 0 {
        for k in 0..width {
            acc[k] += acc[k + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `y ← y + alpha · x` over the common length.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    axpy_inline(alpha, x, y)
}

// The single-vector triangular routines below take the lower triangle `L` of a column-major
// matrix with leading dimension `ld` and work on its leading `m × m` block, `m = x.len()`.

/// `x ← L⁻¹ x` (forward substitution, column-oriented: contiguous axpys).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn trsv_lower(l: &[f64], ld: usize, x: &mut [f64]) {
    let m = x.len();
    for j in 0..m {
        let col = &l[j * ld..j * ld + m];
        let v = x[j] / col[j];
        x[j] = v;
        axpy_inline(-v, &col[j + 1..], &mut x[j + 1..]);
    }
}

/// `x ← L⁻ᵀ x` (backward substitution with contiguous dot products down the columns).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn trsv_lower_transposed(l: &[f64], ld: usize, x: &mut [f64]) {
    let m = x.len();
    for j in (0..m).rev() {
        let col = &l[j * ld..j * ld + m];
        let d = dot_inline(&col[j + 1..], &x[j + 1..]);
        x[j] = (x[j] - d) / col[j];
    }
}

/// `y ← L x`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn trmv_lower(l: &[f64], ld: usize, x: &[f64], y: &mut [f64]) {
    let m = x.len();
    y.fill(0.0);
    for (j, &xj) in x.iter().enumerate() {
        axpy_inline(xj, &l[j * ld + j..j * ld + m], &mut y[j..]);
    }
}

/// `x ← Lᵀ x` (row `j` of `Lᵀ` reads only `x[j..]`, so it can be done in place top-down).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn trmv_lower_transposed(l: &[f64], ld: usize, x: &mut [f64]) {
    let m = x.len();
    for j in 0..m {
        x[j] = dot_inline(&l[j * ld + j..j * ld + m], &x[j..]);
    }
}

// Multi-right-hand-side kernels. `r` holds `R = Xᵀ` column-major with `k` rows (one per
// right-hand side): the `k` values belonging to unknown `i` are `r[i*k..(i+1)*k]`, so the
// inner loops run contiguously over all right-hand sides at once.

/// Forward substitution within the diagonal block `[k0, k0 + kb)`: `X_block ← L_block⁻¹ X_block`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn block_forward_rows(
    l: &[f64],
    ld: usize,
    k0: usize,
    kb: usize,
    r: &mut [f64],
    k: usize,
) {
    for j in k0..k0 + kb {
        let inv = 1.0 / l[j * ld + j];
        let (head, tail) = r.split_at_mut((j + 1) * k);
        let xj = &mut head[j * k..];
        for v in xj.iter_mut() {
            *v *= inv;
        }
        for i in j + 1..k0 + kb {
            let lij = l[j * ld + i];
            let off = (i - j - 1) * k;
            axpy_inline(-lij, xj, &mut tail[off..off + k]);
        }
    }
}

/// Backward substitution within the diagonal block `[k0, end)`: `X_block ← L_block⁻ᵀ X_block`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2", "aarch64+neon"))]
pub(crate) fn block_backward_rows(
    l: &[f64],
    ld: usize,
    k0: usize,
    end: usize,
    r: &mut [f64],
    k: usize,
) {
    for j in (k0..end).rev() {
        let (head, tail) = r.split_at_mut((j + 1) * k);
        let xj = &mut head[j * k..];
        for i in j + 1..end {
            let lij = l[j * ld + i];
            let off = (i - j - 1) * k;
            axpy_inline(-lij, &tail[off..off + k], xj);
        }
        let inv = 1.0 / l[j * ld + j];
        for v in xj.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_plain_loops() {
        for len in [0, 1, 7, 8, 9, 31, 64, 100] {
            let a: Vec<f64> = (0..len).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..len).map(|i| (i as f64 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot_inline(&a, &b) - plain).abs() <= 1e-13 * (1.0 + plain.abs()));
            // Triangular routines against dense nalgebra on a small well-conditioned matrix.
            if len > 0 {
                let l = nalgebra::DMatrix::from_fn(len, len, |i, j| {
                    if i > j {
                        a[i] * b[j] * 0.3
                    } else if i == j {
                        2.0 + a[i].abs()
                    } else {
                        f64::NAN // the upper triangle must never be read
                    }
                });
                let lower = l.map(|v| if v.is_nan() { 0.0 } else { v });
                let x0 = nalgebra::DVector::from_fn(len, |i, _| b[i] + 0.5);
                let mut x = x0.as_slice().to_vec();
                trsv_lower(l.as_slice(), len, &mut x);
                let expect = lower.solve_lower_triangular(&x0).unwrap();
                assert!((nalgebra::DVector::from_vec(x) - &expect).norm() < 1e-12 * expect.norm());
                let mut x = x0.as_slice().to_vec();
                trsv_lower_transposed(l.as_slice(), len, &mut x);
                let expect = lower.transpose().solve_upper_triangular(&x0).unwrap();
                assert!((nalgebra::DVector::from_vec(x) - &expect).norm() < 1e-12 * expect.norm());
                let mut y = vec![0.0; len];
                trmv_lower(l.as_slice(), len, x0.as_slice(), &mut y);
                assert!((nalgebra::DVector::from_vec(y) - &lower * &x0).norm() < 1e-12);
                let mut x = x0.as_slice().to_vec();
                trmv_lower_transposed(l.as_slice(), len, &mut x);
                assert!((nalgebra::DVector::from_vec(x) - lower.transpose() * &x0).norm() < 1e-12);
            }
            let mut y = b.clone();
            axpy(-2.5, &a, &mut y);
            for i in 0..len {
                assert_eq!(y[i], b[i] + -2.5 * a[i]);
            }
        }
    }
}
