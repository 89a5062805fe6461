//! Hessian- and Gauss–Newton-vector products of a [`DenseStack`] (the MLP) by Pearlmutter's
//! R-operator, forward over reverse, instead of candle's double backward.
//!
//! With z_l = a_{l−1} W_l + b_l, a_l = σ(z_l) and the output f = z_L, one chunk keeps the forward
//! pass (a_{l−1}, σ'(z_l), σ''(z_l)) and the backward pass (δ_l = ∂L/∂z_l and u_l = ∂L/∂a_l) of
//! [`crate::nn::dense`]. A product with a direction V = (V_W, V_b) then propagates tangents forward,
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
use crate::nn::dense::{DenseBackward, DenseForward, SampleWeights};
use crate::nn::loss::{per_sample_loss, LossKind, Targets};
use crate::nn::pass::{Backward, Forward, Pass};
use crate::nn::product::matmul;
use crate::nn::reduce::column_sums;

/// The per-sample factors of a chunk's objective (the mean loss: share / n_c for every sample).
pub(super) fn sample_weights(spec: &ChunkSpec) -> candle_core::Result<SampleWeights> {
    Ok(match &spec.weights {
        None => SampleWeights::Uniform(spec.scale / spec.batch.len() as f64),
        Some(w) => SampleWeights::PerSample(w.affine(spec.scale, 0.0)?.unsqueeze(1)?),
    })
}

/// What the loss's Hessian in output space needs: H_ℓ r = 2r for the paper's MSE, and
/// m (p ⊙ r − p (pᵀr)) for cross-entropy with target mass m = Σ_k y_k.
pub(super) enum OutputCurvature {
    Mse,
    CrossEntropy { probs: Tensor, mass: Tensor },
}

impl OutputCurvature {
    /// The curvature of the loss whose output gradient came with `probs` (the softmax for
    /// cross-entropy, `None` for MSE), for `targets`.
    pub(super) fn new(probs: Option<Tensor>, targets: &Targets) -> candle_core::Result<Self> {
        Ok(match probs {
            None => Self::Mse,
            Some(probs) => Self::CrossEntropy {
                probs,
                mass: targets.values.sum_keepdim(D::Minus1)?,
            },
        })
    }

    pub(super) fn apply(&self, r: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Mse => r.affine(2.0, 0.0),
            // Broadcasting: `r` may hold several tangents (K, N, K_out) of the same rows.
            Self::CrossEntropy { probs, mass } => {
                let pr = r.broadcast_mul(probs)?;
                let mean = pr.sum_keepdim(D::Minus1)?;
                (pr - mean.broadcast_mul(probs)?)?.broadcast_mul(mass)
            }
        }
    }
}

/// The chunk's objective value Σ_i c_i ℓ_i at `outputs`, and the loss's output-space curvature
/// (`probs`: the softmax for cross-entropy).
pub(super) fn objective_and_curvature(
    kind: LossKind,
    outputs: &Tensor,
    spec: &ChunkSpec,
    weights: &SampleWeights,
    probs: Option<Tensor>,
) -> Result<(f64, OutputCurvature)> {
    let targets = &spec.batch.targets;
    let loss = per_sample_loss(kind, outputs, targets)
        .and_then(|l| weights.apply(&l.unsqueeze(1)?))
        .and_then(|t| t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>())
        .ctx("loss")?;
    let curvature = OutputCurvature::new(probs, targets).ctx("loss")?;
    Ok((loss, curvature))
}

/// The retained forward and backward pass of one chunk, with its objective's per-sample factors
/// and output-space curvature: the state every network's products start from.
pub(super) struct Chunk<F: Forward> {
    pub forward: F,
    pub backward: F::Backward,
    weights: SampleWeights,
    curvature: OutputCurvature,
    /// The chunk's objective value.
    pub loss: f64,
}

impl<F: Forward> Chunk<F> {
    /// Runs `forward` on `spec`'s chunk and keeps it with the backward pass of its objective.
    pub fn build(
        forward: impl FnOnce(&Tensor) -> candle_core::Result<F>,
        kind: LossKind,
        spec: &ChunkSpec,
        ctx: &'static str,
    ) -> Result<Self> {
        let weights = sample_weights(spec).ctx(ctx)?;
        let Pass {
            forward,
            backward,
            probs,
        } = forward(&spec.batch.inputs)
            .and_then(|f| Pass::new(f, kind, &spec.batch.targets, &weights))
            .ctx(ctx)?;
        let (loss, curvature) =
            objective_and_curvature(kind, forward.outputs(), spec, &weights, probs)?;
        Ok(Self {
            forward,
            backward,
            weights,
            curvature,
            loss,
        })
    }

    /// The chunk's objective gradient, one tensor per parameter.
    pub fn gradient(&self) -> &[Tensor] {
        self.backward.gradient()
    }

    /// The dense layers at the top of the network, with the objective.
    pub fn head(&self) -> Head<'_> {
        Head {
            forward: self.forward.head(),
            backward: self.backward.head(),
            weights: &self.weights,
            curvature: &self.curvature,
        }
    }
}

/// The products of one chunk's retained passes, whichever network took them.
pub(super) trait ChunkProducts {
    /// vᵀ H v of the chunk's objective (or vᵀ G v), by a forward pass alone.
    fn quadratic_form(&self, v: &ParamVec, gauss_newton: bool) -> Result<f64>;
    /// H v of the chunk's objective, or its Gauss–Newton product Jᵀ H_ℓ J v.
    fn apply(&self, v: &ParamVec, gauss_newton: bool) -> Result<Vec<Tensor>>;
}

impl ChunkProducts for Chunk<DenseForward> {
    /// vᵀ H v of the chunk's objective (or vᵀ G v) by a forward pass alone ([`quadratic_form`]).
    fn quadratic_form(&self, v: &ParamVec, gauss_newton: bool) -> Result<f64> {
        quadratic_form(
            self.head(),
            v.parts(),
            InputTangents::default(),
            gauss_newton,
        )
    }

    /// H v of the chunk's objective, or its Gauss–Newton product Jᵀ H_ℓ J v.
    fn apply(&self, v: &ParamVec, gauss_newton: bool) -> Result<Vec<Tensor>> {
        let ctx = product_context(gauss_newton);
        let (out, _) = self.head().products(v.parts(), None, gauss_newton, ctx)?;
        Ok(out)
    }
}

/// The retained passes of a dense stack with its objective's weights and output curvature.
#[derive(Clone, Copy)]
pub(super) struct Head<'h> {
    pub forward: &'h DenseForward,
    pub backward: &'h DenseBackward,
    pub weights: &'h SampleWeights,
    pub curvature: &'h OutputCurvature,
}

impl Head<'_> {
    /// The head's share of a product along `v` (its weights and biases) with its input moving
    /// along `input_tangent` (None: fixed, as data is): forward tangents, R δ_L = c ⊙ H_ℓ R f,
    /// and [`backward_tangents`]: (H V) per head parameter and, when the input moves, R(∂L/∂a₀).
    pub fn products(
        self,
        v: &[Tensor],
        input_tangent: Option<Tensor>,
        gauss_newton: bool,
        ctx: &'static str,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let (r_pre, r_inputs) = tangents(self.forward, v, input_tangent, ctx)?;
        let r_delta = self
            .curvature
            .apply(&r_pre[r_pre.len() - 1])
            .and_then(|hr| self.weights.apply(&hr))
            .ctx(ctx)?;
        let tangents = Tangents {
            pre: &r_pre,
            inputs: &r_inputs,
        };
        backward_tangents(
            self.forward,
            self.backward,
            v,
            tangents,
            r_delta,
            gauss_newton,
            ctx,
        )
    }

    /// [`Self::products`] for a head whose input moves along `input_tangent`, with R(∂L/∂a₀).
    pub fn products_to_input(
        self,
        v: &[Tensor],
        input_tangent: Tensor,
        gauss_newton: bool,
        ctx: &'static str,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        match self.products(v, Some(input_tangent), gauss_newton, ctx)? {
            (out, Some(r_input)) => Ok((out, r_input)),
            (_, None) => Err(candle_core::Error::Msg(
                "the head's input tangent is missing".into(),
            ))
            .ctx(ctx),
        }
    }
}

/// First and second tangents ȧ₀, ä₀ of a dense stack's input (None: zero, as for data).
#[derive(Default)]
pub(super) struct InputTangents {
    pub first: Option<Tensor>,
    pub second: Option<Tensor>,
}

impl InputTangents {
    /// The head's input tangents from the first and second tangents of the trunk's output,
    /// through the linear map `to_head` between them (a flatten, a pool).
    pub fn through(
        first: &Tensor,
        second: Option<Tensor>,
        to_head: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            first: Some(to_head(first)?),
            second: second.map(|t| to_head(&t)).transpose()?,
        })
    }
}

/// vᵀ H v of a stack's objective (or vᵀ G v) by a forward pass alone: along θ + tV the
/// outputs have first and second derivatives ḟ, f̈ ([`tangents`] for ḟ;
/// z̈_l = ä_{l−1} W_l + 2 ȧ_{l−1} V_{W_l}, ä_l = σ' z̈_l + σ'' ż_l², from the input's ȧ₀, ä₀), and
/// vᵀHv = Σ_i c_i (ḟ_iᵀ H_ℓ ḟ_i + ∂ℓ_i/∂f · f̈_i); the Gauss–Newton form keeps the first term.
/// No backward tangents: about half the matrix products of a product and a dot.
pub(super) fn quadratic_form(
    head: Head<'_>,
    v: &[Tensor],
    input: InputTangents,
    gauss_newton: bool,
) -> Result<f64> {
    let ctx = "curvature quadratic form";
    let (z_dot, a_dot) = tangents(head.forward, v, input.first, ctx)?;
    let layers = z_dot.len();
    let f_dot = &z_dot[layers - 1];
    let sum = |t: Tensor| t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>();
    let mut total = head
        .curvature
        .apply(f_dot)
        .and_then(|hf| head.weights.apply(&hf))
        .and_then(|t| sum((t * f_dot)?))
        .ctx(ctx)?;
    if gauss_newton {
        return Ok(total);
    }
    let DenseForward {
        params: w,
        slopes,
        bends,
        ..
    } = head.forward;
    // Second-order tangents z̈_l, and ä of the current layer's input (none while zero).
    let mut a_ddot: Option<Tensor> = input.second;
    for l in 0..layers {
        let mut z_ddot = match &a_dot[l] {
            Some(ad) => Some(
                matmul(ad, &v[2 * l])
                    .and_then(|t| t.affine(2.0, 0.0))
                    .ctx(ctx)?,
            ),
            None => None,
        };
        if let Some(add) = &a_ddot {
            let term = matmul(add, &w[2 * l]).ctx(ctx)?;
            z_ddot = Some(accumulate(z_ddot, term).ctx(ctx)?);
        }
        if l + 1 == layers {
            if let Some(f_ddot) = z_ddot {
                total += sum((&head.backward.deltas[l] * f_ddot).ctx(ctx)?).ctx(ctx)?;
            }
            break;
        }
        let mut next = match &z_ddot {
            Some(t) => Some((t * &slopes[l]).ctx(ctx)?),
            None => None,
        };
        if let Some(bend) = &bends[l] {
            let term = z_dot[l].sqr().and_then(|t| t * bend).ctx(ctx)?;
            next = Some(accumulate(next, term).ctx(ctx)?);
        }
        a_ddot = next;
    }
    Ok(total)
}

/// `sum + term`, or `term` alone while there is no sum yet (a tangent known to be zero).
pub(super) fn accumulate(sum: Option<Tensor>, term: Tensor) -> candle_core::Result<Tensor> {
    match sum {
        Some(s) => s + term,
        None => Ok(term),
    }
}

/// The error context of a product.
pub(super) fn product_context(gauss_newton: bool) -> &'static str {
    if gauss_newton {
        "Gauss-Newton-vector product"
    } else {
        "Hessian-vector product"
    }
}

/// First-order tangents through a dense stack along V = `v` (its weights and biases), with the
/// stack's input moving along `input_tangent` (None: fixed, as data is): ż_l of every layer, and
/// ȧ_{l−1} of every layer input, ż_l = ȧ_{l−1} W_l + a_{l−1} V_{W_l} + V_{b_l}, ȧ_l = σ'(z_l) ż_l.
pub(super) fn tangents(
    forward: &DenseForward,
    v: &[Tensor],
    input_tangent: Option<Tensor>,
    ctx: &'static str,
) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
    let DenseForward {
        params: w,
        inputs,
        slopes,
        ..
    } = forward;
    let layers = w.len() / 2;
    let mut z_dot: Vec<Tensor> = Vec::with_capacity(layers);
    let mut a_dot: Vec<Option<Tensor>> = vec![input_tangent];
    for l in 0..layers {
        let mut rz = matmul(&inputs[l], &v[2 * l])
            .and_then(|t| t.broadcast_add(&v[2 * l + 1]))
            .ctx(ctx)?;
        if let Some(ra) = &a_dot[l] {
            rz = (rz + matmul(ra, &w[2 * l]).ctx(ctx)?).ctx(ctx)?;
        }
        if l + 1 < layers {
            a_dot.push(Some((&rz * &slopes[l]).ctx(ctx)?));
        }
        z_dot.push(rz);
    }
    Ok((z_dot, a_dot))
}

/// The forward tangents of a product: ż_l and ȧ_{l−1} of every layer ([`tangents`]).
#[derive(Clone, Copy)]
pub(super) struct Tangents<'t> {
    pub pre: &'t [Tensor],
    pub inputs: &'t [Option<Tensor>],
}

/// The backward tangents of a dense stack from R δ_L = `r_delta`: (H V) per parameter and, when the
/// stack's input moves (a network whose head this is), R(∂L/∂a₀) = R δ₁ W₁ᵀ + δ₁ V_{W₁}ᵀ. With
/// `gauss_newton` every term carrying δ or u is dropped.
pub(super) fn backward_tangents(
    forward: &DenseForward,
    backward: &DenseBackward,
    v: &[Tensor],
    tangents: Tangents<'_>,
    mut r_delta: Tensor,
    gauss_newton: bool,
    ctx: &'static str,
) -> Result<(Vec<Tensor>, Option<Tensor>)> {
    let DenseForward {
        params: w,
        inputs,
        slopes,
        bends,
        ..
    } = forward;
    let DenseBackward {
        deltas, upstream, ..
    } = backward;
    let layers = w.len() / 2;
    let mut out = vec![None; w.len()];
    // R u_{l−1} = R δ_l W_lᵀ + δ_l V_{W_l}ᵀ.
    let r_upstream = |l: usize, r_delta: &Tensor| -> Result<Tensor> {
        let mut r_up = matmul(r_delta, &w[2 * l].t().ctx(ctx)?).ctx(ctx)?;
        if !gauss_newton {
            let term = matmul(&deltas[l], &v[2 * l].t().ctx(ctx)?).ctx(ctx)?;
            r_up = (r_up + term).ctx(ctx)?;
        }
        Ok(r_up)
    };
    for l in (0..layers).rev() {
        let mut gw = inputs[l].t().and_then(|x| matmul(&x, &r_delta)).ctx(ctx)?;
        if let (false, Some(ra)) = (gauss_newton, &tangents.inputs[l]) {
            let term = ra.t().and_then(|x| matmul(&x, &deltas[l])).ctx(ctx)?;
            gw = (gw + term).ctx(ctx)?;
        }
        out[2 * l] = Some(gw);
        out[2 * l + 1] = Some(column_sums(&r_delta).ctx(ctx)?);
        if l == 0 {
            break;
        }
        let mut next = (r_upstream(l, &r_delta)? * &slopes[l - 1]).ctx(ctx)?;
        if let (false, Some(bend)) = (gauss_newton, &bends[l - 1]) {
            let term = (&upstream[l - 1] * bend)
                .and_then(|t| t * &tangents.pre[l - 1])
                .ctx(ctx)?;
            next = (next + term).ctx(ctx)?;
        }
        r_delta = next;
    }
    let r_input = if tangents.inputs[0].is_some() {
        Some(r_upstream(0, &r_delta)?)
    } else {
        None
    };
    Ok((out.into_iter().flatten().collect(), r_input))
}
