//! Eigen-decomposition of small symmetric tridiagonal matrices (the Lanczos matrix T) by the
//! implicit QL algorithm with Wilkinson-like shifts (EISPACK `tql2`, as in JAMA).

/// Eigenvalues in ascending order and eigenvectors of the symmetric tridiagonal matrix with
/// diagonal `diag` and off-diagonal `off` (`off.len() + 1 == diag.len()`). The eigenvector of
/// `values[i]` is column i: `vectors[row][i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TridiagonalEigen {
    /// Eigenvalues, ascending.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors as columns, row-major.
    pub vectors: Vec<Vec<f64>>,
}

/// Diagonalises the symmetric tridiagonal matrix (`diag`, `off`). Panics only on a length mismatch,
/// which callers inside this module never produce.
pub fn tridiagonal_eigen(diag: &[f64], off: &[f64]) -> TridiagonalEigen {
    let n = diag.len();
    assert_eq!(off.len() + 1, n.max(1), "tridiagonal: off-diagonal length");
    let mut d = diag.to_vec();
    let mut e = vec![0.0; n];
    e[..n.saturating_sub(1)].copy_from_slice(off);
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(i == j)).collect())
        .collect();
    let eps = f64::EPSILON;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _iter in 0..100 {
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for row in v.iter_mut() {
                        let h = row[i + 1];
                        row[i + 1] = s * row[i] + c * h;
                        row[i] = c * row[i] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
    TridiagonalEigen {
        values: order.iter().map(|&i| d[i]).collect(),
        vectors: v
            .iter()
            .map(|row| order.iter().map(|&i| row[i]).collect())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::testing::{jacobi_eigen, normals};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn matches_jacobi_on_random_tridiagonals() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for n in [1usize, 2, 3, 7, 20] {
            let diag = normals(&mut rng, n, 2.0);
            let off = normals(&mut rng, n - 1, 1.0);
            let mut dense = vec![vec![0.0; n]; n];
            for i in 0..n {
                dense[i][i] = diag[i];
                if i + 1 < n {
                    dense[i][i + 1] = off[i];
                    dense[i + 1][i] = off[i];
                }
            }
            let (expected, _) = jacobi_eigen(&dense);
            let got = tridiagonal_eigen(&diag, &off);
            for (a, b) in got.values.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-12, "n={n}: {a} vs {b}");
            }
            // Columns are unit eigenvectors: T v = λ v.
            for (c, lambda) in got.values.iter().enumerate() {
                let col: Vec<f64> = (0..n).map(|r| got.vectors[r][c]).collect();
                let norm: f64 = col.iter().map(|x| x * x).sum::<f64>();
                assert!((norm - 1.0).abs() < 1e-12);
                for r in 0..n {
                    let tv: f64 = (0..n).map(|k| dense[r][k] * col[k]).sum();
                    assert!((tv - lambda * col[r]).abs() < 1e-11);
                }
            }
        }
    }

    #[test]
    fn repeated_eigenvalues_and_zero_couplings() {
        let got = tridiagonal_eigen(&[2.0, 2.0, 5.0], &[0.0, 0.0]);
        assert_eq!(got.values, vec![2.0, 2.0, 5.0]);
    }
}
