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

use super::kernels::{self, axpy};

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
    /// `scale = diag(D)`. Returns the factor of the matrix without its dependent rows and
    /// columns, and the (sorted) indices of those, which the factor no longer has.
    pub fn new(mut equilibrated: DMatrix<f64>, scale: Vec<f64>) -> (Self, Vec<usize>) {
        let skipped = cholesky_in_place(&mut equilibrated);
        if skipped.is_empty() {
            let factor = Self {
                scale,
                lower: equilibrated,
            };
            return (factor, skipped);
        }
        let kept: Vec<usize> = (0..scale.len())
            .filter(|i| skipped.binary_search(i).is_err())
            .collect();
        let m = kept.len();
        let lower = DMatrix::from_fn(m, m, |i, j| {
            if i >= j {
                equilibrated[(kept[i], kept[j])]
            } else {
                0.0
            }
        });
        let scale = kept.iter().map(|&i| scale[i]).collect();
        (Self { scale, lower }, skipped)
    }

    /// Solves `A_m X = B` for the leading `m × m` block, where `rhs` holds `B` (m × k).
    /// Returns `X` and, per column, `q = bᵀ A_m⁻¹ b = ‖L_m⁻¹ D_m b‖²`.
    pub fn solve(&self, m: usize, rhs: &DMatrix<f64>) -> (DMatrix<f64>, Vec<f64>) {
        let k = rhs.ncols();
        // R = (D B)ᵀ, k × m: all right-hand sides of one unknown are contiguous.
        let mut r = DMatrix::from_fn(k, m, |t, i| rhs[(i, t)] * self.scale[i]);
        forward_substitution_rows(&self.lower, &mut r);
        let q = r.row_iter().map(|row| row.norm_squared()).collect();
        backward_substitution_rows(&self.lower, &mut r);
        let x = DMatrix::from_fn(m, k, |i, t| r[(t, i)] * self.scale[i]);
        (x, q)
    }

    /// `λ_max` of the leading `m × m` block of the Gram matrix, by Lanczos iterations on
    /// `A_m = D⁻¹ L Lᵀ D⁻¹` applied through the factor.
    pub fn largest_eigenvalue(&self, m: usize) -> f64 {
        let l = self.lower.as_slice();
        let n = self.lower.nrows();
        let d = &self.scale[..m];
        largest_eigenvalue(m, Start::Smooth, |v, out| {
            let mut w: Vec<f64> = v.iter().zip(d).map(|(x, s)| x / s).collect();
            kernels::trmv_lower_transposed(l, n, &mut w);
            kernels::trmv_lower(l, n, &w, out.as_mut_slice());
            for (o, s) in out.iter_mut().zip(d) {
                *o /= s;
            }
        })
    }

    /// `1 / λ_min` of the leading `m × m` block of the Gram matrix, by Lanczos iterations on
    /// `A_m⁻¹ = D L⁻ᵀ L⁻¹ D` applied through the factor. Both runs are backward stable, so
    /// the extreme eigenvalues come out with small relative errors (the smallest to about
    /// cond · ε at worst).
    pub fn inverse_smallest_eigenvalue(&self, m: usize) -> f64 {
        let l = self.lower.as_slice();
        let n = self.lower.nrows();
        let d = &self.scale[..m];
        largest_eigenvalue(m, Start::Scrambled, |v, out| {
            for i in 0..m {
                out[i] = v[i] * d[i];
            }
            kernels::trsv_lower(l, n, out.as_mut_slice());
            kernels::trsv_lower_transposed(l, n, out.as_mut_slice());
            for (o, s) in out.iter_mut().zip(d) {
                *o *= s;
            }
        })
    }
}

/// `λ_max · (1 / λ_min)`, clamped to at least 1.
pub(crate) fn condition_number(lambda_max: f64, inverse_lambda_min: f64) -> f64 {
    (lambda_max * inverse_lambda_min).max(1.0)
}

/// Blocked right-looking Cholesky of a symmetric positive semi-definite matrix with unit
/// diagonal, in place (lower triangle), skipping dependent columns.
///
/// A column whose pivot falls to `PIVOT_EPS · max(n, 16)` or below (its profile is a linear
/// combination of the earlier kept ones to working precision) is zeroed and reported. A zero
/// column contributes nothing to later columns, and no later column reads row `j`'s entries of
/// earlier columns, so deleting the skipped rows and columns afterwards leaves exactly the
/// factor of the matrix without them: one pass, however many columns are skipped.
fn cholesky_in_place(s: &mut DMatrix<f64>) -> Vec<usize> {
    let n = s.nrows();
    let threshold = PIVOT_EPS * n.max(16) as f64;
    let mut skipped = Vec::new();
    let mut k = 0;
    while k < n {
        let kb = BLOCK.min(n - k);
        let first_skipped_here = skipped.len();
        // Diagonal block, left-looking by columns so that every inner loop is a contiguous axpy.
        {
            let data = s.as_mut_slice();
            for j in k..k + kb {
                for p in k..j {
                    let f = data[p * n + j];
                    if f != 0.0 {
                        let (head, tail) = data.split_at_mut(j * n);
                        axpy(-f, &head[p * n + j..p * n + k + kb], &mut tail[j..k + kb]);
                    }
                }
                let d = data[j * n + j];
                // NaN fails this test too, which is what we want.
                if d.is_nan() || d <= threshold {
                    data[j * n + j..j * n + n].fill(0.0);
                    skipped.push(j);
                    continue;
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
                if skipped[first_skipped_here..].contains(&j) {
                    continue; // already zeroed down to row n
                }
                for p in k..j {
                    let f = data[p * n + j];
                    if f != 0.0 {
                        let (head, tail) = data.split_at_mut(j * n);
                        axpy(-f, &head[p * n + k + kb..p * n + n], &mut tail[k + kb..n]);
                    }
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
    skipped
}

/// Solves `L_m X = B` in place for many right-hand sides held transposed: `r` is `Bᵀ`
/// (k × m, with `m` the leading block used). Blocked: in-block work runs over all right-hand
/// sides at once, and the update below each block is one gemm.
fn forward_substitution_rows(l: &DMatrix<f64>, r: &mut DMatrix<f64>) {
    let (k, m) = r.shape();
    let ld = l.nrows();
    let mut k0 = 0;
    while k0 < m {
        let kb = BLOCK.min(m - k0);
        kernels::block_forward_rows(l.as_slice(), ld, k0, kb, r.as_mut_slice(), k);
        let rest = m - k0 - kb;
        if rest > 0 {
            // R[:, below] −= R[:, block] · L[below, block]ᵀ
            let solved = r.columns(k0, kb).clone_owned();
            let l_t = l.view((k0 + kb, k0), (rest, kb)).transpose();
            r.columns_mut(k0 + kb, rest).gemm(-1.0, &solved, &l_t, 1.0);
        }
        k0 += kb;
    }
}

/// Solves `L_mᵀ X = B` in place for many right-hand sides held transposed (see
/// [`forward_substitution_rows`]).
fn backward_substitution_rows(l: &DMatrix<f64>, r: &mut DMatrix<f64>) {
    let (k, m) = r.shape();
    let ld = l.nrows();
    let mut end = m;
    while end > 0 {
        let kb = BLOCK.min(end);
        let k0 = end - kb;
        kernels::block_backward_rows(l.as_slice(), ld, k0, end, r.as_mut_slice(), k);
        if k0 > 0 {
            // R[:, above] −= R[:, block] · L[block, above]
            let solved = r.columns(k0, kb).clone_owned();
            r.columns_mut(0, k0)
                .gemm(-1.0, &solved, &l.view((k0, 0), (kb, k0)), 1.0);
        }
        end = k0;
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
        fn from_gram(a: DMatrix<f64>) -> (Self, Vec<usize>) {
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
            let f = GramFactor::from_gram(a.clone()).0;
            let (x, qs) = f.solve(n, &b);
            let expect = a.clone().cholesky().unwrap().solve(&b);
            assert!((&x - &expect).norm() <= 1e-12 * expect.norm(), "n={n}");
            // The reported q are bᵀ A⁻¹ b.
            for (c, got) in qs.iter().enumerate() {
                let q = b.column(c).dot(&expect.column(c));
                assert!((got - q).abs() <= 1e-12 * q.abs().max(1.0));
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
            let f = GramFactor::from_gram(a).0;
            let got = condition_number(f.largest_eigenvalue(n), f.inverse_smallest_eigenvalue(n));
            // Documented accuracy: about 1e-8 relative; assert 1e-6.
            assert!(
                ((got - expect) / expect).abs() < 1e-6,
                "n={n}: {got} vs {expect}"
            );
        }
    }

    #[test]
    fn dependent_columns_are_skipped_in_one_pass() {
        // Columns 2 and 5 are combinations of earlier ones (5 in a later block when BLOCK is
        // small, in the same block otherwise); the factor is that of the matrix without them.
        let n = 80;
        let base = spd(n);
        let mut a = base.clone();
        let combo = |a: &mut DMatrix<f64>, j: usize, x: usize, y: usize| {
            // Make column/row j equal to 0.5 col x + 0.5 col y exactly, in Gram terms.
            let v = (a.column(x) + a.column(y)) * 0.5;
            a.set_column(j, &v);
            a.set_row(j, &v.transpose());
            a[(j, j)] = 0.25 * (a[(x, x)] + 2.0 * a[(x, y)] + a[(y, y)]);
        };
        combo(&mut a, 2, 0, 1);
        combo(&mut a, 45, 3, 40);
        let (f, skipped) = GramFactor::from_gram(a.clone());
        assert_eq!(skipped, vec![2, 45]);
        let kept: Vec<usize> = (0..n).filter(|i| !skipped.contains(i)).collect();
        let reduced = DMatrix::from_fn(kept.len(), kept.len(), |i, j| a[(kept[i], kept[j])]);
        let b = DMatrix::from_fn(kept.len(), 2, |i, j| (i + j) as f64 % 3.0 - 1.0);
        let (x, _) = f.solve(kept.len(), &b);
        let expect = reduced.cholesky().unwrap().solve(&b);
        assert!((&x - &expect).norm() <= 1e-9 * expect.norm());
    }
}
