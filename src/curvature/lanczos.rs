//! Top eigenpairs of a symmetric linear operator by the Lanczos method with full
//! reorthogonalisation, on parameter-space vectors that stay on the model's device.
//!
//! Each iteration costs one operator product (an HVP) plus O(j) vector operations for the
//! reorthogonalisation against the j stored Krylov vectors (a second pass where the first cancelled
//! most of the vector, the DGKS test; "twice is enough"). After every
//! iteration the small tridiagonal matrix is diagonalised; Ritz pair i has the residual
//! ‖A y_i − θ_i y_i‖ = β_j |s_{j,i}| (exact in exact arithmetic, and accurate with full
//! reorthogonalisation). The run stops once the top-k Ritz values all have a relative residual
//! below the tolerance. "Largest" means algebraically largest (λmax, not the largest magnitude).
//!
//! A warm start from the previous top eigenvector makes the paper's every-256-steps λmax cheap.
//! On a breakdown (an invariant subspace found before k pairs converged) the run continues from a
//! seeded random vector orthogonal to the Krylov basis.
//! An eigenvalue of exactly zero among the wanted ones has an infinite relative residual unless its
//! residual is exactly zero, so such a run ends at `max_iter` with `converged = false`.

use candle_core::{DType, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::tridiagonal::tridiagonal_eigen;
use super::vector::Probe;
use super::{CandleContext, CurvatureError, ParamVec, Result};

/// Settings of one Lanczos run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LanczosConfig {
    /// Number of top eigenpairs wanted.
    pub top_k: usize,
    /// At most this many operator products (also capped by the dimension).
    pub max_iter: usize,
    /// Stop once every wanted pair has ‖A y − θ y‖ ≤ rel_tol · |θ|.
    pub rel_tol: f64,
    /// Seed of the random start vector and of restart vectors.
    pub seed: u64,
}

impl Default for LanczosConfig {
    /// λmax only, up to 100 products, relative residual 0.005 (the reference code's tolerance).
    fn default() -> Self {
        Self {
            top_k: 1,
            max_iter: 100,
            rel_tol: 0.005,
            seed: 0,
        }
    }
}

/// Where the Krylov space starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// A seeded Gaussian random vector (`LanczosConfig::seed`).
    Random,
    /// A given vector, typically the previous top eigenvector (warm start).
    Warm(&'a ParamVec),
}

/// Result of a Lanczos run.
#[derive(Debug, Clone)]
pub struct Eigenpairs {
    /// The top Ritz values, largest first (at most `top_k`).
    pub values: Vec<f64>,
    /// Their unit Ritz vectors, in the same order.
    pub vectors: Vec<ParamVec>,
    /// Their relative residuals ‖A y − θ y‖ / |θ| (from the Lanczos recurrence).
    pub rel_residuals: Vec<f64>,
    /// Operator products used.
    pub iterations: usize,
    /// Whether every wanted pair met the tolerance (or the whole space was explored).
    pub converged: bool,
}

impl Eigenpairs {
    /// The largest eigenvalue found.
    pub fn lambda_max(&self) -> f64 {
        self.values[0]
    }
}

/// Ritz values/vectors (as coefficients in the Krylov basis) of the current tridiagonal matrix,
/// top `k` first, with their absolute residuals.
struct Ritz {
    values: Vec<f64>,
    coefficients: Vec<Vec<f64>>,
    residuals: Vec<f64>,
}

fn ritz(alpha: &[f64], beta: &[f64], beta_last: f64, k: usize) -> Ritz {
    let eig = tridiagonal_eigen(alpha, beta);
    let m = alpha.len();
    let take = k.min(m);
    let mut out = Ritz {
        values: vec![],
        coefficients: vec![],
        residuals: vec![],
    };
    for c in (m - take..m).rev() {
        out.values.push(eig.values[c]);
        out.coefficients
            .push((0..m).map(|r| eig.vectors[r][c]).collect());
        out.residuals
            .push((beta_last * eig.vectors[m - 1][c]).abs());
    }
    out
}

fn relative(residual: f64, value: f64) -> f64 {
    if value == 0.0 {
        if residual == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        residual / value.abs()
    }
}

/// The Krylov vectors, stored per parameter as the rows of one (capacity × numel) matrix, so that
/// projecting a vector on all j of them costs two matrix products per parameter rather than 2j dot
/// products and axpys (on a GPU each of those is several kernel launches and a device sync).
struct KrylovBasis {
    rows: Vec<Tensor>,
    shapes: Vec<Shape>,
    len: usize,
}

impl KrylovBasis {
    fn new(template: &ParamVec) -> Self {
        Self {
            rows: Vec::new(),
            shapes: template.parts().iter().map(|t| t.shape().clone()).collect(),
            len: 0,
        }
    }

    /// Appends `v` (growing the storage by doubling).
    fn push(&mut self, v: &ParamVec) -> Result<()> {
        let full = self
            .rows
            .first()
            .is_none_or(|r| r.dim(0).ok() == Some(self.len));
        if full {
            let capacity = (2 * self.len).max(8);
            let mut grown = Vec::with_capacity(v.parts().len());
            for (p, t) in v.parts().iter().enumerate() {
                let rows = Tensor::zeros((capacity, t.elem_count()), t.dtype(), t.device())
                    .ctx("Krylov basis")?;
                if self.len > 0 {
                    let old = self.rows[p].narrow(0, 0, self.len).ctx("Krylov basis")?;
                    rows.slice_set(&old, 0, 0).ctx("Krylov basis")?;
                }
                grown.push(rows);
            }
            self.rows = grown;
        }
        for (rows, t) in self.rows.iter().zip(v.parts()) {
            let row = t
                .flatten_all()
                .and_then(|r| r.unsqueeze(0))
                .and_then(|r| r.contiguous())
                .ctx("Krylov basis")?;
            rows.slice_set(&row, 0, self.len).ctx("Krylov basis")?;
        }
        self.len += 1;
        Ok(())
    }

    /// The stored vectors as (len × numel) matrices, one per parameter.
    fn matrices(&self) -> Result<Vec<Tensor>> {
        self.rows
            .iter()
            .map(|r| r.narrow(0, 0, self.len))
            .collect::<candle_core::Result<_>>()
            .ctx("Krylov basis")
    }

    /// Σ_i c_i q_i.
    fn combination(&self, coefficients: &[f64]) -> Result<ParamVec> {
        let mut parts = Vec::with_capacity(self.rows.len());
        for (q, shape) in self.matrices()?.iter().zip(&self.shapes) {
            let part = Tensor::from_slice(coefficients, (1, self.len), q.device())
                .and_then(|c| c.to_dtype(q.dtype()))
                .and_then(|c| c.matmul(q))
                .and_then(|y| y.reshape(shape))
                .ctx("Krylov combination")?;
            parts.push(part);
        }
        Ok(ParamVec::new(parts))
    }

    /// Removes from `w` its components along the basis by classical Gram–Schmidt, with a second
    /// pass only where the first removed most of `w` (‖w₁‖ < ‖w₀‖/√2, the Daniel–Gragg–Kaufman–
    /// Stewart test: only then can rounding in the first pass have left components behind).
    fn orthogonalise(&self, w: ParamVec) -> Result<ParamVec> {
        if self.len == 0 {
            return Ok(w);
        }
        let before = w.norm()?;
        let once = self.project_out(w)?;
        if once.norm()? < before * std::f64::consts::FRAC_1_SQRT_2 {
            self.project_out(once)
        } else {
            Ok(once)
        }
    }

    /// w − Q Qᵀ w for the basis Q: one projection and one combination over the stored vectors.
    fn project_out(&self, w: ParamVec) -> Result<ParamVec> {
        let mut total: Option<Tensor> = None;
        for (q, part) in self.matrices()?.iter().zip(w.parts()) {
            let c = part
                .flatten_all()
                .and_then(|x| x.unsqueeze(1))
                .and_then(|x| q.matmul(&x))
                .and_then(|c| c.squeeze(1))
                .and_then(|c| c.to_dtype(DType::F64))
                .ctx("Krylov projection")?;
            total = Some(match total {
                None => c,
                Some(t) => (t + c).ctx("Krylov projection")?,
            });
        }
        let coefficients = match total {
            Some(t) => t.to_vec1::<f64>().ctx("Krylov projection")?,
            None => return Ok(w),
        };
        w.axpy(-1.0, &self.combination(&coefficients)?)
    }
}

/// Top-k eigenpairs of the symmetric operator `op`, on vectors laid out like `template`.
pub fn lanczos<F>(
    mut op: F,
    template: &ParamVec,
    start: Start,
    cfg: &LanczosConfig,
) -> Result<Eigenpairs>
where
    F: FnMut(&ParamVec) -> Result<ParamVec>,
{
    if cfg.top_k == 0 {
        return Err(CurvatureError::Config {
            field: "top_k",
            message: "must be at least 1".into(),
        });
    }
    if cfg.max_iter < cfg.top_k {
        return Err(CurvatureError::Config {
            field: "max_iter",
            message: format!("{} is below top_k {}", cfg.max_iter, cfg.top_k),
        });
    }
    if cfg.rel_tol.is_nan() || cfg.rel_tol <= 0.0 {
        return Err(CurvatureError::Config {
            field: "rel_tol",
            message: format!("must be positive, got {}", cfg.rel_tol),
        });
    }
    let dim = template.dim();
    if dim == 0 {
        return Err(CurvatureError::Config {
            field: "template",
            message: "the parameter space is empty".into(),
        });
    }
    let max_iter = cfg.max_iter.min(dim);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let first = match start {
        Start::Random => template.random_like(Probe::Gaussian, &mut rng)?,
        Start::Warm(v) => v.clone(),
    };
    let norm = first.norm()?;
    let first = if norm > 0.0 && norm.is_finite() {
        first.scale(1.0 / norm)?
    } else {
        let r = template.random_like(Probe::Gaussian, &mut rng)?;
        let n = r.norm()?;
        r.scale(1.0 / n)?
    };
    let mut basis = KrylovBasis::new(template);
    basis.push(&first)?;
    let (mut previous, mut current): (Option<ParamVec>, ParamVec) = (None, first);
    let mut alpha: Vec<f64> = Vec::new();
    let mut beta: Vec<f64> = Vec::new();
    let mut converged = false;
    let mut last = None;
    for j in 0..max_iter {
        let q = &current;
        let mut w = op(q)?;
        let a = q.dot(&w)?;
        alpha.push(a);
        w = w.axpy(-a, q)?;
        if j > 0 {
            if let Some(p) = &previous {
                w = w.axpy(-beta[j - 1], p)?;
            }
        }
        w = basis.orthogonalise(w)?;
        let b = w.norm()?;
        let r = ritz(&alpha, &beta, b, cfg.top_k);
        let scale = r
            .values
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        let all_found = r.values.len() >= cfg.top_k || alpha.len() == dim;
        let small = r
            .values
            .iter()
            .zip(&r.residuals)
            .all(|(v, res)| relative(*res, *v) <= cfg.rel_tol);
        last = Some(r);
        if (all_found && small) || alpha.len() == dim {
            converged = true;
            break;
        }
        if j + 1 == max_iter {
            break;
        }
        let next = if b <= 1e-12 * scale {
            // Invariant subspace: continue the basis with a random orthogonal direction.
            beta.push(0.0);
            let r = basis.orthogonalise(template.random_like(Probe::Gaussian, &mut rng)?)?;
            let n = r.norm()?;
            r.scale(1.0 / n)?
        } else {
            beta.push(b);
            w.scale(1.0 / b)?
        };
        basis.push(&next)?;
        previous = Some(std::mem::replace(&mut current, next));
    }
    let r = last.expect("at least one Lanczos iteration ran");
    let mut vectors = Vec::with_capacity(r.values.len());
    for coeffs in &r.coefficients {
        vectors.push(basis.combination(coeffs)?);
    }
    Ok(Eigenpairs {
        rel_residuals: r
            .values
            .iter()
            .zip(&r.residuals)
            .map(|(v, res)| relative(*res, *v))
            .collect(),
        values: r.values,
        vectors,
        iterations: alpha.len(),
        converged,
    })
}

#[cfg(test)]
mod tests;
