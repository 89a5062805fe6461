//! Hand-written forward and backward passes through a [`DenseStack`] (the MLP), without candle's
//! autograd: the SGD step of an MLP takes its gradient here, and the curvature code builds its
//! forward-over-reverse Hessian products on the same passes.
//!
//! With z_l = a_{l−1} W_l + b_l, a_l = σ(z_l) and the output f = z_L: the forward pass keeps every
//! layer input a_{l−1} and σ'(z_l) (and σ''(z_l) on request); the backward pass takes
//! δ_L = ∂L/∂f and returns δ_l = ∂L/∂z_l, u_l = ∂L/∂a_l and the gradient
//! (∂L/∂W_l = a_{l−1}ᵀ δ_l, ∂L/∂b_l = Σ_i δ_l). Every tensor is detached: no graph is recorded.

use candle_core::{Result, Tensor, D};

use super::loss::{LossKind, Targets};
use super::pass::Pass;
use super::product::matmul;
use super::reduce::column_sums;
use super::DenseStack;

/// The retained forward pass of a batch.
pub struct DenseForward {
    /// Detached weights and biases, `[W₁, b₁, ...]`.
    pub params: Vec<Tensor>,
    /// Input a_{l−1} of each layer (a₀ = the flattened batch).
    pub inputs: Vec<Tensor>,
    /// σ'(z_l) of each hidden layer.
    pub slopes: Vec<Tensor>,
    /// σ''(z_l) of each hidden layer, when asked for and the activation has one.
    pub bends: Vec<Option<Tensor>>,
    /// The outputs f (N, K).
    pub outputs: Tensor,
}

/// The backward pass of a batch.
pub struct DenseBackward {
    /// δ_l = ∂L/∂z_l of each layer.
    pub deltas: Vec<Tensor>,
    /// u_l = ∂L/∂a_l of each hidden layer.
    pub upstream: Vec<Tensor>,
    /// ∂L/∂a₀ (N, in), when asked for.
    pub input_gradient: Option<Tensor>,
    /// ∂L/∂θ, one tensor per parameter, in the stack's order.
    pub gradient: Vec<Tensor>,
}

impl DenseForward {
    /// Runs `x` (N, ...) through the stack; `bends` also keeps σ''(z_l) (second-order passes).
    pub fn run(stack: DenseStack<'_>, x: &Tensor, bends: bool) -> Result<Self> {
        let params: Vec<Tensor> = stack
            .params
            .iter()
            .map(|p| p.var.as_tensor().detach())
            .collect();
        let layers = params.len() / 2;
        let mut inputs = Vec::with_capacity(layers);
        let mut slopes = Vec::with_capacity(layers);
        let mut kept_bends = Vec::with_capacity(layers);
        let mut a = x.detach().flatten_from(1)?;
        for l in 0..layers {
            let z = matmul(&a, &params[2 * l])?.broadcast_add(&params[2 * l + 1])?;
            let next = if l + 1 < layers {
                let (slope, bend) = stack.activation.derivatives(&z)?;
                slopes.push(slope);
                kept_bends.push(if bends { bend } else { None });
                stack.activation.apply(&z)?
            } else {
                z
            };
            inputs.push(std::mem::replace(&mut a, next));
        }
        Ok(Self {
            params,
            inputs,
            slopes,
            bends: kept_bends,
            outputs: a,
        })
    }

    /// Backpropagates `output_grad` = ∂L/∂f (N, K); `to_input` also gives ∂L/∂a₀, the gradient with
    /// respect to the stack's (flattened) input, from which a network whose head is this stack
    /// continues its backward pass.
    pub fn backward_to(&self, output_grad: Tensor, to_input: bool) -> Result<DenseBackward> {
        let (deltas, upstream, input_gradient) = self.backpropagate(output_grad, to_input)?;
        let mut gradient = Vec::with_capacity(2 * deltas.len());
        for (a, delta) in self.inputs.iter().zip(&deltas) {
            gradient.push(matmul(&a.t()?, delta)?);
            gradient.push(column_sums(delta)?);
        }
        Ok(DenseBackward {
            deltas,
            upstream,
            input_gradient,
            gradient,
        })
    }

    /// δ_l = ∂L/∂z_l of every layer from `output_grad` = ∂L/∂f, without the parameter gradient
    /// (whoever needs only the per-sample signals skips its matrix products).
    pub fn deltas(&self, output_grad: Tensor) -> Result<Vec<Tensor>> {
        Ok(self.backpropagate(output_grad, false)?.0)
    }

    /// (δ_l of every layer, u_l of every hidden layer, ∂L/∂a₀ when `to_input`).
    fn backpropagate(
        &self,
        output_grad: Tensor,
        to_input: bool,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, Option<Tensor>)> {
        let layers = self.inputs.len();
        let mut delta = output_grad;
        let mut deltas = Vec::with_capacity(layers);
        let mut upstream = Vec::with_capacity(layers);
        for l in (1..layers).rev() {
            let u = matmul(&delta, &self.params[2 * l].t()?)?;
            let below = (&u * &self.slopes[l - 1])?;
            upstream.push(u);
            deltas.push(std::mem::replace(&mut delta, below));
        }
        let input_gradient = if to_input {
            Some(matmul(&delta, &self.params[0].t()?)?)
        } else {
            None
        };
        deltas.push(delta);
        deltas.reverse();
        upstream.reverse();
        Ok((deltas, upstream, input_gradient))
    }
}

/// ∂ℓ_i/∂f_i of every sample (N, K): 2(f − y) for the paper's MSE, p·Σ_k y_k − y for
/// cross-entropy; with the softmax p for cross-entropy (its output-space Hessian needs it).
pub(crate) fn output_gradient(
    kind: LossKind,
    outputs: &Tensor,
    targets: &Targets,
) -> Result<(Tensor, Option<Tensor>)> {
    match kind {
        LossKind::Mse => Ok(((outputs - &targets.values)?.affine(2.0, 0.0)?, None)),
        LossKind::CrossEntropy => {
            let probs = candle_nn::ops::softmax_last_dim(outputs)?;
            let mass = targets.values.sum_keepdim(D::Minus1)?;
            let grad = (probs.broadcast_mul(&mass)? - &targets.values)?;
            Ok((grad, Some(probs)))
        }
    }
}

/// Per-sample factors c_i of an objective Σ_i c_i ℓ_i.
pub enum SampleWeights {
    /// The same factor for every sample (1/n for the mean loss).
    Uniform(f64),
    /// One factor per sample, shape (N, 1).
    PerSample(Tensor),
}

impl SampleWeights {
    /// Multiplies each row of `t` (N, K) by its sample's factor.
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::Uniform(c) if *c == 1.0 => Ok(t.clone()),
            Self::Uniform(c) => t.affine(*c, 0.0),
            Self::PerSample(w) => t.broadcast_mul(w),
        }
    }
}

/// Σ_i g_i and Σ_i g_i ⊙ g_i over the per-sample gradients g_i = ∇ℓ_i of a batch, without forming
/// any g_i: a dense layer's g_i is the outer product a_{i} δ_iᵀ, so Σ_i g_i ⊙ g_i = (a ⊙ a)ᵀ (δ ⊙ δ)
/// and, for its bias, Σ_i δ_i ⊙ δ_i.
pub fn gradient_moments(
    stack: DenseStack<'_>,
    kind: LossKind,
    inputs: &Tensor,
    targets: &Targets,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let forward = DenseForward::run(stack, inputs, false)?;
    let Pass {
        forward, backward, ..
    } = Pass::new(forward, kind, targets, &SampleWeights::Uniform(1.0))?;
    let mut squares = Vec::with_capacity(backward.gradient.len());
    for (a, delta) in forward.inputs.iter().zip(&backward.deltas) {
        let delta_sq = delta.sqr()?;
        squares.push(matmul(&a.sqr()?.t()?, &delta_sq)?);
        squares.push(column_sums(&delta_sq)?);
    }
    Ok((backward.gradient, squares))
}

/// The Gram matrix (N, N) of the per-sample gradients of dense layers with inputs a_l (N, in_l)
/// and deltas δ_l (N, out_l), without forming any: sample i's gradient of layer l is the outer
/// product a_{l,i} δ_{l,i}ᵀ and of its bias δ_{l,i}, so ⟨g_i, g_j⟩ = Σ_l (a_{l,i}·a_{l,j} + 1)
/// (δ_{l,i}·δ_{l,j}).
pub fn gradient_gram(inputs: &[Tensor], deltas: &[Tensor]) -> Result<Tensor> {
    let mut gram: Option<Tensor> = None;
    for (a, delta) in inputs.iter().zip(deltas) {
        let with_bias = matmul(a, &a.t()?)?.affine(1.0, 1.0)?;
        let term = (with_bias * matmul(delta, &delta.t()?)?)?;
        gram = Some(match gram {
            None => term,
            Some(g) => (g + term)?,
        });
    }
    gram.ok_or_else(|| candle_core::Error::Msg("no dense layer".into()))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::nn::gradcheck::{directional_difference, dot_all, flat_all, one_hot_targets};
    use crate::nn::gradient::mean_loss_and_gradient;
    use crate::nn::init::Initializer;
    use crate::nn::loss::mean_loss;
    use crate::nn::models::Mlp;
    use crate::nn::{Activation, Model};

    fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal))
            .collect()
    }

    /// A 4 → 5 → 5 → 3 MLP in f64 with random weights and biases, and a batch of 6 samples.
    fn setup(activation: Activation, seed: u64) -> (Mlp, Tensor, Targets) {
        let dev = Device::Cpu;
        let init = Initializer::new(seed, 1.0, DType::F64, &dev);
        let model = Mlp::new(4, 2, 5, 3, activation, init).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for p in model.params() {
            let t = p.var.as_tensor();
            let v = Tensor::from_vec(normals(&mut rng, t.elem_count()), t.shape(), &dev).unwrap();
            p.var.set(&(v * 0.7).unwrap()).unwrap();
        }
        let x = Tensor::from_vec(normals(&mut rng, 6 * 4), (6, 4, 1, 1), &dev).unwrap();
        (model, x, one_hot_targets(6, 3))
    }

    #[test]
    fn hand_written_gradient_equals_autograd_for_every_activation_and_loss() {
        let activations = [
            Activation::Relu,
            Activation::Tanh,
            Activation::Silu,
            Activation::Linear,
        ];
        for (i, activation) in activations.into_iter().enumerate() {
            let (model, x, targets) = setup(activation, 10 + i as u64);
            assert!(model.dense_stack().is_some());
            for kind in [LossKind::Mse, LossKind::CrossEntropy] {
                let (loss, gradient) = mean_loss_and_gradient(&model, kind, &x, &targets).unwrap();
                let reference = mean_loss(kind, &model.forward(&x).unwrap(), &targets).unwrap();
                let grads = reference.backward().unwrap();
                let expected: Vec<Tensor> = model
                    .params()
                    .iter()
                    .map(|p| grads.get(p.var.as_tensor()).unwrap().clone())
                    .collect();
                let what = format!("{activation:?} {kind:?}");
                assert!(
                    (loss - reference.to_scalar::<f64>().unwrap()).abs() < 1e-12,
                    "{what}"
                );
                let (got, want) = (flat_all(&gradient), flat_all(&expected));
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-12 * scale, "{what}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn gradient_moments_equal_sums_over_per_sample_autograd_gradients() {
        for (i, kind) in [LossKind::Mse, LossKind::CrossEntropy]
            .into_iter()
            .enumerate()
        {
            let (model, x, targets) = setup(Activation::Tanh, 30 + i as u64);
            let (sum, sum_sq) =
                gradient_moments(model.dense_stack().unwrap(), kind, &x, &targets).unwrap();
            let mut want_sum = vec![0.0; flat_all(&sum).len()];
            let mut want_sq = want_sum.clone();
            for s in 0..6 {
                let xi = x.narrow(0, s, 1).unwrap();
                let loss = mean_loss(
                    kind,
                    &model.forward(&xi).unwrap(),
                    &targets.narrow(s, 1).unwrap(),
                )
                .unwrap();
                let grads = loss.backward().unwrap();
                let g: Vec<Tensor> = model
                    .params()
                    .iter()
                    .map(|p| grads.get(p.var.as_tensor()).unwrap().clone())
                    .collect();
                for (k, v) in flat_all(&g).into_iter().enumerate() {
                    want_sum[k] += v;
                    want_sq[k] += v * v;
                }
            }
            for (got, want) in [(flat_all(&sum), want_sum), (flat_all(&sum_sq), want_sq)] {
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-12 * scale, "{kind:?}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn hand_written_gradient_matches_a_central_finite_difference() {
        let (model, x, targets) = setup(Activation::Silu, 20);
        let (_, gradient) =
            mean_loss_and_gradient(&model, LossKind::CrossEntropy, &x, &targets).unwrap();
        // Along a random direction d: (L(θ + h d) − L(θ − h d)) / 2h = ∇L · d.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let d: Vec<Tensor> = model
            .params()
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                Tensor::from_vec(normals(&mut rng, t.elem_count()), t.shape(), t.device()).unwrap()
            })
            .collect();
        let fd = directional_difference(model.params(), &d, 1e-5, || {
            mean_loss_and_gradient(&model, LossKind::CrossEntropy, &x, &targets)
                .unwrap()
                .0
        });
        let exact = dot_all(&gradient, &d);
        assert!(
            (fd - exact).abs() < 1e-8 * exact.abs().max(1.0),
            "{fd} vs {exact}"
        );
    }
}
