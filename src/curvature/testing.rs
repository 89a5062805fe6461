//! Test fixtures for the curvature tests, all in f64 on the CPU: tiny models (linear, tanh MLP,
//! conv net), seeded data, dense Hessians built column by column from HVPs or by central finite
//! differences of gradients, and an independent dense symmetric eigen-solver (cyclic Jacobi).

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::hvp::{HessianOperator, HvpConfig, Objective};
use super::{Batch, ParamVec};
use crate::data::LabelEncoding;
use crate::nn::gradient::param_grads;
use crate::nn::loss::{mean_loss, LossKind, Targets};
use crate::nn::{Model, Param, TorchLayout};

/// Seeded standard-normal values.
pub fn normals(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| scale * rng.sample::<f64, _>(StandardNormal))
        .collect()
}

fn param(name: &str, values: Vec<f64>, shape: &[usize]) -> Param {
    let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    Param {
        name: name.into(),
        var: Var::from_tensor(&t).unwrap(),
        layout: TorchLayout::Same,
    }
}

/// y = x W (no bias), inputs flattened; its MSE Hessian is (2/N) XᵀX ⊗ I_K.
pub struct Linear {
    params: Vec<Param>,
}

impl Linear {
    /// A D → K linear model with seeded weights.
    pub fn new(d: usize, k: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            params: vec![param("w", normals(&mut rng, d * k, 0.5), &[d, k])],
        }
    }
}

impl Model for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.flatten_from(1)?.matmul(self.params[0].var.as_tensor())
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

/// y = tanh(x W1 + b1) W2 + b2.
pub struct TanhMlp {
    params: Vec<Param>,
}

impl TanhMlp {
    /// A D → H → K tanh network with seeded weights and biases.
    pub fn new(d: usize, h: usize, k: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            params: vec![
                param("w1", normals(&mut rng, d * h, 0.8), &[d, h]),
                param("b1", normals(&mut rng, h, 0.3), &[h]),
                param("w2", normals(&mut rng, h * k, 0.8), &[h, k]),
                param("b2", normals(&mut rng, k, 0.3), &[k]),
            ],
        }
    }
}

impl Model for TanhMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let h = x.flatten_from(1)?.matmul(p[0].var.as_tensor())?;
        let h = h.broadcast_add(p[1].var.as_tensor())?.tanh()?;
        h.matmul(p[2].var.as_tensor())?
            .broadcast_add(p[3].var.as_tensor())
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

/// conv 2×2 (C → F channels, with bias) → tanh → flatten → linear to K. Inputs (N, C, 3, 3).
pub struct TinyConv {
    params: Vec<Param>,
}

impl TinyConv {
    /// A tiny conv net with seeded weights.
    pub fn new(c: usize, f: usize, k: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Self {
            params: vec![
                param(
                    "conv.weight",
                    normals(&mut rng, f * c * 4, 0.6),
                    &[f, c, 2, 2],
                ),
                param("conv.bias", normals(&mut rng, f, 0.2), &[f]),
                param("fc.weight", normals(&mut rng, f * 4 * k, 0.5), &[f * 4, k]),
            ],
        }
    }
}

impl Model for TinyConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let y = x.conv2d(p[0].var.as_tensor(), 0, 1, 1, 1)?;
        let f = p[1].var.as_tensor().dims()[0];
        let y = y
            .broadcast_add(&p[1].var.as_tensor().reshape((1, f, 1, 1))?)?
            .tanh()?;
        y.flatten_from(1)?.matmul(p[2].var.as_tensor())
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
}

/// Seeded inputs (n, c, h, w) ~ N(0, 1) and one-hot targets of k classes.
pub fn data(n: usize, shape: [usize; 3], k: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = normals(&mut rng, n * shape.iter().product::<usize>(), 1.0);
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..k as u32)).collect();
    let mut onehot = vec![0f64; n * k];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * k + l as usize] = 1.0;
    }
    let dev = Device::Cpu;
    let targets = Targets {
        values: Tensor::from_vec(onehot, (n, k), &dev).unwrap(),
        labels: Tensor::from_vec(labels, n, &dev).unwrap(),
        encoding: LabelEncoding::OneHot,
    };
    let inputs = Tensor::from_vec(x, (n, shape[0], shape[1], shape[2]), &dev).unwrap();
    Batch::new(inputs, targets).unwrap()
}

/// A row-major dense symmetric matrix.
pub type Dense = Vec<Vec<f64>>;

/// Dense Σ_i J_iᵀ H_z,i J_i with J from first-order backward passes of single outputs and H_z in
/// closed form: 2I/N for MSE, (diag p − p pᵀ)/N for cross-entropy.
pub fn dense_gauss_newton(model: &dyn Model, kind: LossKind, batch: &Batch) -> Dense {
    let n = batch.len();
    let z = model.forward(&batch.inputs).unwrap();
    let k = z.dims()[1];
    let probs = candle_nn::ops::softmax(&z, candle_core::D::Minus1)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let d = ParamVec::zeros_for(model.params()).unwrap().dim();
    let mut g = vec![vec![0.0; d]; d];
    for i in 0..n {
        let rows: Vec<Vec<f64>> = (0..k)
            .map(|c| {
                let s = model
                    .forward(&batch.inputs.narrow(0, i, 1).unwrap())
                    .unwrap();
                flat_gradient(model, &s.narrow(1, c, 1).unwrap().sum_all().unwrap())
            })
            .collect();
        for a in 0..k {
            for b in 0..k {
                let hz = match kind {
                    LossKind::Mse => 2.0 * f64::from(a == b),
                    LossKind::CrossEntropy => {
                        probs[i][a] * f64::from(a == b) - probs[i][a] * probs[i][b]
                    }
                } / n as f64;
                for r in 0..d {
                    for c in 0..d {
                        g[r][c] += rows[a][r] * hz * rows[b][c];
                    }
                }
            }
        }
    }
    g
}

/// The dense matrix of a linear operator on parameter space, column by column from unit vectors.
pub fn dense_of(apply: impl Fn(&ParamVec) -> ParamVec, template: &ParamVec) -> Dense {
    let d = template.dim();
    let mut m = vec![vec![0.0; d]; d];
    for j in 0..d {
        let mut e = vec![0.0; d];
        e[j] = 1.0;
        let col = apply(&template.from_f64_like(&e).unwrap())
            .to_f64_vec()
            .unwrap();
        for i in 0..d {
            m[i][j] = col[i];
        }
    }
    m
}

/// The Hessian operator of the mean loss on `batch` with the default settings.
pub fn mean_hessian<'a>(
    model: &'a dyn Model,
    kind: LossKind,
    batch: &'a Batch,
) -> HessianOperator<'a> {
    HessianOperator::new(model, kind, batch, &Objective::Mean, &HvpConfig::default()).unwrap()
}

/// The dense Hessian of the mean loss on `batch`, column by column from HVPs on unit vectors.
pub fn dense_hessian_hvp(model: &dyn Model, kind: LossKind, batch: &Batch) -> Dense {
    let op = mean_hessian(model, kind, batch);
    let template = ParamVec::zeros_for(model.params()).unwrap();
    dense_of(|v| op.apply(v).unwrap(), &template)
}

/// The gradient of the mean loss on `batch` at the model's current parameters (first order only).
pub fn gradient(model: &dyn Model, kind: LossKind, batch: &Batch) -> Vec<f64> {
    let out = model.forward(&batch.inputs).unwrap();
    flat_gradient(model, &mean_loss(kind, &out, &batch.targets).unwrap())
}

/// ∂(scalar)/∂θ as one flat f64 vector in the model's parameter order.
pub fn flat_gradient(model: &dyn Model, scalar: &Tensor) -> Vec<f64> {
    ParamVec::new(param_grads(scalar, model.params(), false).unwrap())
        .to_f64_vec()
        .unwrap()
}

/// Sets the model's parameters to the flat vector `theta`.
pub fn set_params(model: &dyn Model, theta: &[f64]) {
    let mut offset = 0;
    for p in model.params() {
        let t = p.var.as_tensor();
        let n = t.elem_count();
        let v = Tensor::from_slice(&theta[offset..offset + n], t.shape(), t.device()).unwrap();
        p.var.set(&v).unwrap();
        offset += n;
    }
}

/// The dense Hessian by central finite differences of gradients (step `h`), symmetrised.
pub fn dense_hessian_fd(model: &dyn Model, kind: LossKind, batch: &Batch, h: f64) -> Dense {
    let theta = ParamVec::from_params(model.params()).to_f64_vec().unwrap();
    let d = theta.len();
    let mut hess = vec![vec![0.0; d]; d];
    for j in 0..d {
        let mut plus = theta.clone();
        plus[j] += h;
        set_params(model, &plus);
        let gp = gradient(model, kind, batch);
        let mut minus = theta.clone();
        minus[j] -= h;
        set_params(model, &minus);
        let gm = gradient(model, kind, batch);
        for i in 0..d {
            hess[i][j] = (gp[i] - gm[i]) / (2.0 * h);
        }
    }
    set_params(model, &theta);
    for i in 0..d {
        for j in 0..i {
            let m = 0.5 * (hess[i][j] + hess[j][i]);
            hess[i][j] = m;
            hess[j][i] = m;
        }
    }
    hess
}

/// Eigenvalues (ascending) and eigenvectors (columns of the returned matrix) of a symmetric
/// matrix by cyclic Jacobi rotations.
pub fn jacobi_eigen(a: &Dense) -> (Vec<f64>, Dense) {
    let n = a.len();
    let mut a = a.clone();
    let mut v: Dense = (0..n)
        .map(|i| (0..n).map(|j| f64::from(i == j)).collect())
        .collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let scale: f64 = a.iter().flatten().map(|x| x * x).sum();
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k][p], v[k][q]);
                    v[k][p] = c * vkp - s * vkq;
                    v[k][q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let values = order.iter().map(|&i| a[i][i]).collect();
    let vectors = (0..n)
        .map(|r| order.iter().map(|&c| v[r][c]).collect())
        .collect();
    (values, vectors)
}

/// Largest eigenvalue of a symmetric matrix (Jacobi).
pub fn dense_lambda_max(a: &Dense) -> f64 {
    *jacobi_eigen(a).0.last().unwrap()
}

/// Matrix product.
pub fn matmul(a: &Dense, b: &Dense) -> Dense {
    let n = a.len();
    let m = b[0].len();
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..b.len()).map(|k| a[i][k] * b[k][j]).sum())
                .collect()
        })
        .collect()
}

/// Matrix-vector product.
pub fn matvec(a: &Dense, x: &[f64]) -> Vec<f64> {
    a.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// Plain dot product.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Largest absolute entry difference relative to the largest absolute entry of `b`.
pub fn rel_max_diff(a: &Dense, b: &Dense) -> f64 {
    let scale = b.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// All subsets of size `b` of `0..n`, in lexicographic order.
pub fn all_subsets(n: usize, b: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, b: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == b {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            rec(i + 1, n, b, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, b, &mut Vec::new(), &mut out);
    out
}

#[test]
fn jacobi_diagonalises_a_known_matrix() {
    // [[2, 1], [1, 2]] has eigenvalues 1 and 3 with eigenvectors (1, −1)/√2 and (1, 1)/√2.
    let (vals, vecs) = jacobi_eigen(&vec![vec![2.0, 1.0], vec![1.0, 2.0]]);
    assert!((vals[0] - 1.0).abs() < 1e-14 && (vals[1] - 3.0).abs() < 1e-14);
    assert!((vecs[0][1].abs() - 0.5f64.sqrt()).abs() < 1e-14);
    assert!((vecs[0][1] - vecs[1][1]).abs() < 1e-14);
    assert_eq!(all_subsets(6, 2).len(), 15);
}
