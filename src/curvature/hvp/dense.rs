//! Hand-written first- and second-order passes through a [`DenseStack`] (the MLP): Pearlmutter's
//! R-operator, forward over reverse, instead of candle's double backward.
//!
//! With z_l = a_{l−1} W_l + b_l, a_l = σ(z_l) and the output f = z_L, one chunk keeps the forward
//! pass (a_{l−1}, σ'(z_l), σ''(z_l)) and the backward pass (δ_l = ∂L/∂z_l and u_l = ∂L/∂a_l). A
//! product with a direction V = (V_W, V_b) then propagates tangents forward,
//!
//!   R z_l = R a_{l−1} W_l + a_{l−1} V_{W_l} + V_{b_l},   R a_l = σ'(z_l) ⊙ R z_l,
//!
//! and back, starting from R δ_L = c ⊙ H_ℓ R f (c the per-sample weights of the objective):
//!
//!   (H V)_{W_l} = a_{l−1}ᵀ R δ_l + R a_{l−1}ᵀ δ_l,   (H V)_{b_l} = Σ_i R δ_l,
//!   R u_{l−1} = R δ_l W_lᵀ + δ_l V_{W_l}ᵀ,
//!   R δ_{l−1} = R u_{l−1} ⊙ σ'(z_{l−1}) + u_{l−1} ⊙ σ''(z_{l−1}) ⊙ R z_{l−1}.
//!
//! Dropping every term that carries δ or u (the loss's first derivative) leaves Jᵀ (c ⊙ H_ℓ) J V,
//! the Gauss–Newton product, from the same state. No autograd graph is built: every tensor here
//! is detached, so a product is a fixed list of matrix products and elementwise maps.

use candle_core::{DType, Tensor, D};

use super::{ChunkSpec, Result};
use crate::curvature::{CandleContext, ParamVec};
use crate::nn::loss::{per_sample_loss, LossKind};
use crate::nn::DenseStack;

/// Per-sample factors c_i of the objective Σ_i c_i ℓ_i of one chunk.
enum SampleWeights {
    /// The same factor for every sample (the mean loss: share / n_c).
    Uniform(f64),
    /// One factor per sample, shape (N, 1).
    PerSample(Tensor),
}

impl SampleWeights {
    fn of(spec: &ChunkSpec) -> candle_core::Result<Self> {
        Ok(match &spec.weights {
            None => Self::Uniform(spec.scale / spec.batch.len() as f64),
            Some(w) => Self::PerSample(w.affine(spec.scale, 0.0)?.unsqueeze(1)?),
        })
    }

    /// Multiplies each row of `t` (N, K) by its sample's factor.
    fn apply(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Uniform(c) => t.affine(*c, 0.0),
            Self::PerSample(w) => t.broadcast_mul(w),
        }
    }
}

/// What the loss's Hessian in output space needs: H_ℓ r = 2r for the paper's MSE, and
/// m (p ⊙ r − p (pᵀr)) for cross-entropy with target mass m = Σ_k y_k.
enum OutputCurvature {
    Mse,
    CrossEntropy { probs: Tensor, mass: Tensor },
}

impl OutputCurvature {
    fn apply(&self, r: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Mse => r.affine(2.0, 0.0),
            Self::CrossEntropy { probs, mass } => {
                let pr = (probs * r)?;
                let mean = pr.sum_keepdim(D::Minus1)?;
                (pr - probs.broadcast_mul(&mean)?)?.broadcast_mul(mass)
            }
        }
    }
}

/// The retained forward and backward pass of one chunk through a dense stack.
pub(super) struct DenseChunk {
    /// Detached weights and biases, `[W₁, b₁, ...]`.
    params: Vec<Tensor>,
    /// Input a_{l−1} of each layer (a₀ = the flattened batch).
    inputs: Vec<Tensor>,
    /// σ'(z_l) of each hidden layer.
    slopes: Vec<Tensor>,
    /// σ''(z_l) of each hidden layer, where the activation has one.
    bends: Vec<Option<Tensor>>,
    /// δ_l = ∂L/∂z_l of each layer.
    deltas: Vec<Tensor>,
    /// u_l = ∂L/∂a_l of each hidden layer.
    upstream: Vec<Tensor>,
    weights: SampleWeights,
    curvature: OutputCurvature,
    /// The chunk's objective value.
    pub loss: f64,
    /// The chunk's objective gradient, one tensor per parameter.
    pub gradient: Vec<Tensor>,
}

impl DenseChunk {
    /// Runs and keeps the forward and backward pass of `spec`'s chunk.
    pub fn build(stack: DenseStack<'_>, kind: LossKind, spec: &ChunkSpec) -> Result<Self> {
        let ctx = "dense forward and backward pass";
        let params: Vec<Tensor> = stack
            .params
            .iter()
            .map(|p| p.var.as_tensor().detach())
            .collect();
        let layers = params.len() / 2;
        let mut inputs = Vec::with_capacity(layers);
        let mut slopes = Vec::with_capacity(layers);
        let mut bends = Vec::with_capacity(layers);
        let mut a = spec.batch.inputs.detach().flatten_from(1).ctx(ctx)?;
        for l in 0..layers {
            let z = a
                .matmul(&params[2 * l])
                .and_then(|z| z.broadcast_add(&params[2 * l + 1]))
                .ctx(ctx)?;
            let next = if l + 1 < layers {
                let (slope, bend) = stack.activation.derivatives(&z).ctx(ctx)?;
                slopes.push(slope);
                bends.push(bend);
                stack.activation.apply(&z).ctx(ctx)?
            } else {
                z
            };
            inputs.push(std::mem::replace(&mut a, next));
        }
        let outputs = a;
        let targets = &spec.batch.targets;
        let weights = SampleWeights::of(spec).ctx(ctx)?;
        let per_sample = per_sample_loss(kind, &outputs, targets).ctx("loss")?;
        let loss = weights
            .apply(&per_sample.unsqueeze(1).ctx("loss")?)
            .and_then(|t| t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>())
            .ctx("loss")?;
        let (curvature, loss_grad) = match kind {
            LossKind::Mse => (
                OutputCurvature::Mse,
                (&outputs - &targets.values)
                    .and_then(|d| d.affine(2.0, 0.0))
                    .ctx(ctx)?,
            ),
            LossKind::CrossEntropy => {
                let probs = candle_nn::ops::softmax_last_dim(&outputs).ctx(ctx)?;
                let mass = targets.values.sum_keepdim(D::Minus1).ctx(ctx)?;
                let grad = (probs.broadcast_mul(&mass).ctx(ctx)? - &targets.values).ctx(ctx)?;
                (OutputCurvature::CrossEntropy { probs, mass }, grad)
            }
        };
        let mut delta = weights.apply(&loss_grad).ctx(ctx)?;
        let mut gradient = vec![None; params.len()];
        let mut deltas = Vec::with_capacity(layers);
        let mut upstream = Vec::with_capacity(layers);
        for l in (0..layers).rev() {
            gradient[2 * l] = Some(inputs[l].t().and_then(|x| x.matmul(&delta)).ctx(ctx)?);
            gradient[2 * l + 1] = Some(delta.sum(0).ctx(ctx)?);
            if l > 0 {
                let u = delta.matmul(&params[2 * l].t().ctx(ctx)?).ctx(ctx)?;
                let below = (&u * &slopes[l - 1]).ctx(ctx)?;
                upstream.push(u);
                deltas.push(std::mem::replace(&mut delta, below));
            }
        }
        deltas.push(delta);
        deltas.reverse();
        upstream.reverse();
        Ok(Self {
            params,
            inputs,
            slopes,
            bends,
            deltas,
            upstream,
            weights,
            curvature,
            loss,
            gradient: gradient.into_iter().flatten().collect(),
        })
    }

    /// H v of the chunk's objective, or its Gauss–Newton product Jᵀ H_ℓ J v.
    pub fn apply(&self, v: &ParamVec, gauss_newton: bool) -> Result<Vec<Tensor>> {
        let ctx = if gauss_newton {
            "Gauss-Newton-vector product"
        } else {
            "Hessian-vector product"
        };
        let w = &self.params;
        let v = v.parts();
        let layers = w.len() / 2;
        // Forward tangents: R z_l, and R a_{l−1} (none for the input layer).
        let mut r_pre: Vec<Tensor> = Vec::with_capacity(layers);
        let mut r_inputs: Vec<Option<Tensor>> = vec![None];
        for l in 0..layers {
            let mut rz = self.inputs[l]
                .matmul(&v[2 * l])
                .and_then(|t| t.broadcast_add(&v[2 * l + 1]))
                .ctx(ctx)?;
            if let Some(ra) = &r_inputs[l] {
                rz = (rz + ra.matmul(&w[2 * l]).ctx(ctx)?).ctx(ctx)?;
            }
            if l + 1 < layers {
                r_inputs.push(Some((&rz * &self.slopes[l]).ctx(ctx)?));
            }
            r_pre.push(rz);
        }
        let hr = self.curvature.apply(&r_pre[layers - 1]).ctx(ctx)?;
        let mut r_delta = self.weights.apply(&hr).ctx(ctx)?;
        let mut out = vec![None; w.len()];
        for l in (0..layers).rev() {
            let mut gw = self.inputs[l]
                .t()
                .and_then(|x| x.matmul(&r_delta))
                .ctx(ctx)?;
            if let (false, Some(ra)) = (gauss_newton, &r_inputs[l]) {
                let term = ra.t().and_then(|x| x.matmul(&self.deltas[l])).ctx(ctx)?;
                gw = (gw + term).ctx(ctx)?;
            }
            out[2 * l] = Some(gw);
            out[2 * l + 1] = Some(r_delta.sum(0).ctx(ctx)?);
            if l == 0 {
                break;
            }
            let mut r_up = r_delta.matmul(&w[2 * l].t().ctx(ctx)?).ctx(ctx)?;
            if !gauss_newton {
                let term = self.deltas[l].matmul(&v[2 * l].t().ctx(ctx)?).ctx(ctx)?;
                r_up = (r_up + term).ctx(ctx)?;
            }
            let mut next = (r_up * &self.slopes[l - 1]).ctx(ctx)?;
            if let (false, Some(bend)) = (gauss_newton, &self.bends[l - 1]) {
                let term = (&self.upstream[l - 1] * bend)
                    .and_then(|t| t * &r_pre[l - 1])
                    .ctx(ctx)?;
                next = (next + term).ctx(ctx)?;
            }
            r_delta = next;
        }
        Ok(out.into_iter().flatten().collect())
    }
}
