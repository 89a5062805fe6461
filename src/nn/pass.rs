//! What the hand-written passes of every network share ([`super::dense`], [`super::conv`],
//! [`super::residual`]): a retained forward pass that backpropagates ([`Forward`]), the backward
//! pass it gives ([`Backward`]), and both run on the weighted objective Σ_i c_i ℓ_i of a batch
//! ([`Pass`]).

use candle_core::{Result, Tensor};

use super::dense::{output_gradient, DenseBackward, DenseForward, SampleWeights};
use super::loss::{LossKind, Targets};

/// A network's retained forward pass of a batch.
pub trait Forward {
    /// The backward pass it gives.
    type Backward: Backward;
    /// Backpropagates `output_grad` = ∂L/∂f (N, K).
    fn backward(&self, output_grad: Tensor) -> Result<Self::Backward>;
    /// The dense layers at the top of the network (all of it for an MLP).
    fn head(&self) -> &DenseForward;
    /// The outputs f (N, K).
    fn outputs(&self) -> &Tensor {
        &self.head().outputs
    }
}

/// A network's backward pass of a batch.
pub trait Backward {
    /// ∂L/∂θ, one tensor per parameter in the network's order.
    fn gradient(&self) -> &[Tensor];
    /// The same, taken out.
    fn into_gradient(self) -> Vec<Tensor>;
    /// The backward pass through the dense layers at the top.
    fn head(&self) -> &DenseBackward;
}

/// The forward pass of a batch and the backward pass of Σ_i c_i ℓ_i, with the softmax of the
/// outputs for cross-entropy (its output-space Hessian needs it).
pub struct Pass<F: Forward> {
    /// The forward pass.
    pub forward: F,
    /// The backward pass of the weighted objective.
    pub backward: F::Backward,
    /// softmax(f) for cross-entropy, `None` for MSE.
    pub probs: Option<Tensor>,
}

impl<F: Forward> Pass<F> {
    /// Backpropagates the objective with per-sample factors `weights` through `forward`.
    pub fn new(
        forward: F,
        kind: LossKind,
        targets: &Targets,
        weights: &SampleWeights,
    ) -> Result<Self> {
        let (grad, probs) = output_gradient(kind, forward.outputs(), targets)?;
        let backward = forward.backward(weights.apply(&grad)?)?;
        Ok(Self {
            forward,
            backward,
            probs,
        })
    }
}

impl Forward for DenseForward {
    type Backward = DenseBackward;

    fn backward(&self, output_grad: Tensor) -> Result<DenseBackward> {
        self.backward_to(output_grad, false)
    }

    fn head(&self) -> &DenseForward {
        self
    }
}

/// Backpropagates `output_grad` = ∂L/∂f through a network's dense head down to its input, and
/// from there onto the trunk's output by `to_trunk` (the adjoint of the map between them: an
/// unflatten, a pool's adjoint).
pub fn head_backward(
    head: &DenseForward,
    output_grad: Tensor,
    to_trunk: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(DenseBackward, Tensor)> {
    let backward = head.backward_to(output_grad, true)?;
    let upstream = match &backward.input_gradient {
        Some(g) => to_trunk(g)?,
        None => candle_core::bail!("the dense head returned no input gradient"),
    };
    Ok((backward, upstream))
}

/// The backward pass of a network whose convolutions lie under a dense head (the CNN, the
/// ResNets).
pub struct TrunkBackward {
    /// δ = ∂L/∂z of each convolution's activation input (for a ResNet block's second
    /// convolution, after the shortcut is added), channels-last, in the network's order.
    pub deltas: Vec<Tensor>,
    /// The dense head's backward pass (with its input gradient).
    pub head: DenseBackward,
    /// ∂L/∂θ, one tensor per parameter in the network's order (convolutions, then the head).
    pub gradient: Vec<Tensor>,
}

impl Backward for TrunkBackward {
    fn gradient(&self) -> &[Tensor] {
        &self.gradient
    }

    fn into_gradient(self) -> Vec<Tensor> {
        self.gradient
    }

    fn head(&self) -> &DenseBackward {
        &self.head
    }
}

impl Backward for DenseBackward {
    fn gradient(&self) -> &[Tensor] {
        &self.gradient
    }

    fn into_gradient(self) -> Vec<Tensor> {
        self.gradient
    }

    fn head(&self) -> &DenseBackward {
        self
    }
}
