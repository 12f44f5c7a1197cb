//! Dense linear algebra for the Gram systems of the solver.
//!
//! The Gram matrix `A` of power-function profiles is symmetric positive definite but badly
//! scaled (entries go as `1/t`) and ill-conditioned (EDM2 runs reach `cond(A) ≈ 1e9`). We solve
//! with the symmetrically equilibrated matrix `S = D A D`, `D = diag(A_kk^{-1/2})`, which has a
//! unit diagonal, and factor it as `S = L Lᵀ` with a blocked right-looking Cholesky whose
//! trailing updates run through nalgebra's `gemm` (matrixmultiply). Diagonal pivots of `S` are
//! squared distances of each normalised profile from the span of the earlier ones, which turns
//! the singularity test into a plain threshold.
//!
//! Snapshots are sorted by time before the Gram matrix is built, so the snapshots usable for a
//! target at time `T` (those with `nimg ≤ T`) form a leading block, and the Cholesky factor of a
//! leading block is the leading block of the factor: one factorisation serves every target time.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use super::kernels::{self, axpy, dot};

/// Cholesky factor of the equilibrated Gram matrix.
pub(crate) struct GramFactor {
    /// `D_kk = A_kk^{-1/2}`.
    scale: Vec<f64>,
    /// Lower-triangular `L` with `D A D = L Lᵀ`; the strict upper triangle is unused.
    lower: DMatrix<f64>,
}

/// Block size of the factorisation and the triangular solves.
const BLOCK: usize = 32;

/// A pivot of the unit-diagonal matrix below this (times the dimension) means the profile is a
/// linear combination of the earlier ones to working precision.
const PIVOT_EPS: f64 = 4.0 * f64::EPSILON;

impl GramFactor {
    /// Factors `D A D`, given its lower triangle (unit diagonal) in `equilibrated` and
    /// `scale = diag(D)`. On failure returns the (sorted) index of the first dependent profile
    /// and its pivot.
    pub fn new(mut equilibrated: DMatrix<f64>, scale: Vec<f64>) -> Result<Self, (usize, f64)> {
        cholesky_in_place(&mut equilibrated)?;
        Ok(Self {
            scale,
            lower: equilibrated,
        })
    }

    /// Solves `A_m X = B` for the leading `m × m` block, where `rhs` holds `B` (m × k) on entry.
    /// Returns `(X, Z)` with `Z = L_m⁻¹ D_m B`, whose squared column norms are `bᵀ A_m⁻¹ b`.
    pub fn solve(&self, m: usize, rhs: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
        let mut z = DMatrix::from_fn(m, rhs.ncols(), |i, j| rhs[(i, j)] * self.scale[i]);
        forward_substitution(&self.lower, &mut z);
        let mut x = z.clone();
        backward_substitution_transposed(&self.lower, &mut x);
        for (i, mut row) in x.row_iter_mut().enumerate() {
            row *= self.scale[i];
        }
        (x, z)
    }

    /// The 2-norm condition number `λ_max / λ_min` of the leading `m × m` block of the Gram
    /// matrix, from Lanczos iterations on `A_m = D⁻¹ L Lᵀ D⁻¹` and on
    /// `A_m⁻¹ = D L⁻ᵀ L⁻¹ D`, both applied through the factor (backward stable, so both extreme
    /// eigenvalues come out with small relative error).
    pub fn condition_number(&self, m: usize) -> f64 {
        let l = &self.lower;
        let n = l.nrows();
        let d = &self.scale[..m];
        let lambda_max = || {
            largest_eigenvalue(m, Start::Smooth, |v, out| {
                let mut w: Vec<f64> = v.iter().zip(d).map(|(x, s)| x / s).collect();
                kernels::trmv_lower_transposed(l.as_slice(), n, &mut w);
                kernels::trmv_lower(l.as_slice(), n, &w, out.as_mut_slice());
                for (o, s) in out.iter_mut().zip(d) {
                    *o /= s;
                }
            })
        };
        let inv_lambda_min = || {
            largest_eigenvalue(m, Start::Scrambled, |v, out| {
                for i in 0..m {
                    out[i] = v[i] * d[i];
                }
                kernels::trsv_lower(l.as_slice(), n, out.as_mut_slice());
                kernels::trsv_lower_transposed(l.as_slice(), n, out.as_mut_slice());
                for (o, s) in out.iter_mut().zip(d) {
                    *o *= s;
                }
            })
        };
        let (lambda_max, inv_lambda_min) = rayon::join(lambda_max, inv_lambda_min);
        // Mathematically ≥ 1; rounding can leave the 1 × 1 case a hair below.
        (lambda_max * inv_lambda_min).max(1.0)
    }
}

/// Blocked right-looking Cholesky of a symmetric positive definite matrix with unit diagonal,
/// in place (lower triangle).
fn cholesky_in_place(s: &mut DMatrix<f64>) -> Result<(), (usize, f64)> {
    let n = s.nrows();
    let threshold = PIVOT_EPS * n.max(16) as f64;
    let mut k = 0;
    while k < n {
        let kb = BLOCK.min(n - k);
        // Diagonal block, left-looking by columns so that every inner loop is a contiguous axpy.
        {
            let data = s.as_mut_slice();
            for j in k..k + kb {
                for p in k..j {
                    let f = data[p * n + j];
                    let (head, tail) = data.split_at_mut(j * n);
                    axpy(-f, &head[p * n + j..p * n + k + kb], &mut tail[j..k + kb]);
                }
                let d = data[j * n + j];
                // NaN fails this test too, which is what we want.
                if d.is_nan() || d <= threshold {
                    return Err((j, d));
                }
                let r = d.sqrt();
                data[j * n + j] = r;
                let inv = 1.0 / r;
                for v in &mut data[j * n + j + 1..j * n + k + kb] {
                    *v *= inv;
                }
            }
        }
        let rest = n - k - kb;
        if rest == 0 {
            break;
        }
        // Panel: L21 = S21 L11⁻ᵀ, column by column in place: column j of L21 is
        // (S21[:, j] − Σ_{p<j} L21[:, p] L11[j, p]) / L11[j, j], long contiguous axpys.
        {
            let data = s.as_mut_slice();
            for j in k..k + kb {
                for p in k..j {
                    let f = data[p * n + j];
                    let (head, tail) = data.split_at_mut(j * n);
                    axpy(-f, &head[p * n + k + kb..p * n + n], &mut tail[k + kb..n]);
                }
                let inv = 1.0 / data[j * n + j];
                for v in &mut data[j * n + k + kb..j * n + n] {
                    *v *= inv;
                }
            }
        }
        // Trailing update of the lower triangle only: S22 −= L21 L21ᵀ, one gemm per block
        // column (rows from the block's diagonal down), half the flops of the full square.
        let panel = s.view((k + kb, k), (rest, kb)).clone_owned();
        let mut c = 0;
        while c < rest {
            let cb = BLOCK.min(rest - c);
            let panel_t = panel.rows(c, cb).transpose();
            s.view_mut((k + kb + c, k + kb + c), (rest - c, cb)).gemm(
                -1.0,
                &panel.rows(c, rest - c),
                &panel_t,
                1.0,
            );
            c += cb;
        }
        k += kb;
    }
    Ok(())
}

/// Column `j` of the square matrix `l`, rows `rows`, as a contiguous slice.
fn column(l: &DMatrix<f64>, j: usize, rows: std::ops::Range<usize>) -> &[f64] {
    let ld = l.nrows();
    &l.as_slice()[j * ld + rows.start..j * ld + rows.end]
}

/// Solves `L_n X = B` in place, where `L_n` is the leading `n × n` block of the lower
/// triangle of `l` and `n = B.nrows()` (blocked, updates through `gemm`).
fn forward_substitution(l: &DMatrix<f64>, b: &mut DMatrix<f64>) {
    let n = b.nrows();
    let cols = b.ncols();
    let mut k = 0;
    while k < n {
        let kb = BLOCK.min(n - k);
        for c in 0..cols {
            let x = &mut b.as_mut_slice()[c * n..(c + 1) * n];
            for j in k..k + kb {
                let v = x[j] / l[(j, j)];
                x[j] = v;
                axpy(-v, column(l, j, j + 1..k + kb), &mut x[j + 1..k + kb]);
            }
        }
        let rest = n - k - kb;
        if rest > 0 {
            let solved = b.view((k, 0), (kb, cols)).clone_owned();
            b.view_mut((k + kb, 0), (rest, cols)).gemm(
                -1.0,
                &l.view((k + kb, k), (rest, kb)),
                &solved,
                1.0,
            );
        }
        k += kb;
    }
}

/// Solves `L_nᵀ X = B` in place, with `L_n` as in [`forward_substitution`].
fn backward_substitution_transposed(l: &DMatrix<f64>, b: &mut DMatrix<f64>) {
    let n = b.nrows();
    let cols = b.ncols();
    let mut end = n;
    while end > 0 {
        let kb = BLOCK.min(end);
        let k = end - kb;
        for c in 0..cols {
            let x = &mut b.as_mut_slice()[c * n..(c + 1) * n];
            for j in (k..end).rev() {
                let d = dot(&x[j + 1..end], column(l, j, j + 1..end));
                x[j] = (x[j] - d) / l[(j, j)];
            }
        }
        if k > 0 {
            // Rows above the block: B_top −= L_blockᵀ X_block, with L_block = L[k..end, 0..k].
            let solved = b.view((k, 0), (kb, cols)).clone_owned();
            let l_block_t = l.view((k, 0), (kb, k)).transpose();
            b.view_mut((0, 0), (k, cols))
                .gemm(-1.0, &l_block_t, &solved, 1.0);
        }
        end = k;
    }
}

/// Where to start a Lanczos run.
#[derive(Clone, Copy)]
enum Start {
    /// Smooth and positive: overlaps well with the top eigenvector of a Gram matrix of
    /// positive profiles (Perron vector).
    Smooth,
    /// Deterministic pseudo-random signs: overlaps with oscillating eigenvectors (the top
    /// eigenvectors of the inverse), which a smooth start barely touches.
    Scrambled,
}

/// Largest eigenvalue of a symmetric positive definite operator by the Lanczos method with
/// full reorthogonalisation. Stops when the Ritz residual is below `1e-4` relative; the Ritz
/// value's own error goes as the squared residual over the spectral gap, far smaller.
fn largest_eigenvalue(
    n: usize,
    start: Start,
    mut op: impl FnMut(&DVector<f64>, &mut DVector<f64>),
) -> f64 {
    const TOL: f64 = 1e-4;
    let max_iter = n.min(120);
    let mut q = DVector::from_fn(n, |i, _| match start {
        Start::Smooth => 1.0 + 0.5 * ((i as f64 + 1.0) * 0.754_877_666).sin(),
        Start::Scrambled => {
            // SplitMix64 finaliser of the index: a fixed, well-mixed sign pattern.
            let mut z = (i as u64)
                .wrapping_add(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        }
    });
    q /= q.norm();
    let mut basis: Vec<DVector<f64>> = Vec::with_capacity(max_iter);
    let mut alpha: Vec<f64> = Vec::with_capacity(max_iter);
    let mut beta: Vec<f64> = Vec::with_capacity(max_iter);
    let mut w = DVector::zeros(n);
    let mut theta = 0.0;
    for k in 0..max_iter {
        op(&q, &mut w);
        let a = q.dot(&w);
        basis.push(q.clone());
        alpha.push(a);
        // Full reorthogonalisation, twice ("twice is enough").
        for _ in 0..2 {
            for v in &basis {
                let c = v.dot(&w);
                w.axpy(-c, v, 1.0);
            }
        }
        let b = w.norm();
        let m = k + 1;
        let t = DMatrix::from_fn(m, m, |i, j| {
            if i == j {
                alpha[i]
            } else if i == j + 1 || j == i + 1 {
                beta[i.min(j)]
            } else {
                0.0
            }
        });
        let eig = SymmetricEigen::new(t);
        let (imax, &top) = eig
            .eigenvalues
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .expect("non-empty");
        theta = top;
        let residual = b * eig.eigenvectors[(m - 1, imax)].abs();
        if residual <= TOL * theta.abs() || b <= f64::EPSILON * theta.abs() || m == n {
            break;
        }
        beta.push(b);
        q = &w / b;
    }
    theta
}

#[cfg(test)]
mod tests {
    use super::*;

    impl GramFactor {
        fn from_gram(a: DMatrix<f64>) -> Result<Self, (usize, f64)> {
            let n = a.nrows();
            let scale: Vec<f64> = (0..n).map(|k| a[(k, k)].sqrt().recip()).collect();
            let s = DMatrix::from_fn(n, n, |i, j| a[(i, j)] * scale[i] * scale[j]);
            Self::new(s, scale)
        }
    }

    fn spd(n: usize) -> DMatrix<f64> {
        // A Hilbert-like matrix plus a diagonal: SPD, moderately conditioned.
        DMatrix::from_fn(n, n, |i, j| {
            1.0 / (i + j + 1) as f64 + if i == j { 1.0 + i as f64 * 0.01 } else { 0.0 }
        })
    }

    #[test]
    fn factor_and_solve_against_nalgebra() {
        for n in [1, 5, 63, 64, 65, 150] {
            let a = spd(n);
            let b = DMatrix::from_fn(n, 3, |i, j| (i * 7 + j * 3) as f64 % 5.0 - 2.0);
            let f = GramFactor::from_gram(a.clone()).unwrap();
            let (x, z) = f.solve(n, &b);
            let expect = a.clone().cholesky().unwrap().solve(&b);
            assert!((&x - &expect).norm() <= 1e-12 * expect.norm(), "n={n}");
            // Column norms of Z are bᵀ A⁻¹ b.
            for c in 0..3 {
                let bc = b.column(c);
                let q = bc.dot(&expect.column(c));
                assert!((z.column(c).norm_squared() - q).abs() <= 1e-12 * q.abs().max(1.0));
            }
            // Leading blocks give the solution of the leading system.
            if n > 10 {
                let m = n / 2;
                let (xm, _) = f.solve(m, &b.rows(0, m).clone_owned());
                let am = a.view((0, 0), (m, m)).clone_owned();
                let em = am.cholesky().unwrap().solve(&b.rows(0, m).clone_owned());
                assert!((&xm - &em).norm() <= 1e-12 * em.norm());
            }
        }
    }

    #[test]
    fn condition_number_matches_full_eigendecomposition() {
        for n in [1, 2, 40, 130] {
            let a = spd(n);
            let eig = SymmetricEigen::new(a.clone()).eigenvalues;
            let expect = eig.max() / eig.min();
            let f = GramFactor::from_gram(a).unwrap();
            let got = f.condition_number(n);
            // Documented accuracy: about 1e-8 relative; assert 1e-6.
            assert!(
                ((got - expect) / expect).abs() < 1e-6,
                "n={n}: {got} vs {expect}"
            );
        }
    }

    #[test]
    fn dependent_columns_are_reported() {
        let v = [1.0, 2.0, 3.0];
        let a = DMatrix::from_fn(3, 3, |i, j| {
            v[i] * v[j] + if i == j && i == 0 { 1.0 } else { 0.0 }
        });
        assert_eq!(GramFactor::from_gram(a).err().map(|e| e.0), Some(2));
    }
}
