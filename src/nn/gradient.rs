//! Gradients by the fastest passes a model has: hand-written ones for a dense stack
//! ([`super::dense`]), a conv net ([`super::conv`]) or, on the CPU, a residual net
//! ([`super::residual`]); candle's autograd otherwise. [`backpropagate`] takes any cotangent of the
//! outputs (a per-sample model gradient ∇f_k: a one-hot one), [`loss_and_gradient`] that of a
//! batch objective Σ_i c_i ℓ_i. Also the outputs alone ([`outputs`]), for evaluation.

use candle_core::{DType, Result, Tensor};

use super::conv::ConvForward;
use super::dense::{output_gradient, DenseForward, SampleWeights};
use super::loss::{per_sample_loss, LossKind, Targets};
use super::pass::{Backward, Forward};
use super::residual::ResidualForward;
use super::{Model, Param};

/// What [`backpropagate`] gives.
pub struct Backpropagation {
    /// The outputs f (N, K).
    pub outputs: Tensor,
    /// cᵀ ∂f/∂θ, one detached tensor per parameter in the model's order.
    pub gradient: Vec<Tensor>,
    /// By hand-written passes, the inputs a_l (N, in_l) and the deltas δ_l (N, out_l) of each
    /// layer of the dense head ([`Model::dense_head`]): sample i's gradient of layer l is
    /// a_{l,i} δ_{l,i}ᵀ.
    pub head: Option<(Vec<Tensor>, Vec<Tensor>)>,
}

/// [`backpropagate`] by a model's hand-written passes.
fn by_hand<F: Forward>(
    forward: Result<F>,
    cotangent: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Backpropagation> {
    let forward = forward?;
    let backward = forward.backward(cotangent(forward.outputs())?)?;
    let head = (
        forward.head().inputs.clone(),
        backward.head().deltas.clone(),
    );
    Ok(Backpropagation {
        outputs: forward.outputs().clone(),
        gradient: backward.into_gradient(),
        head: Some(head),
    })
}

/// Backpropagates `cotangent(f)` = c (N, K), held fixed, from the outputs f of a batch: the
/// gradient of Σ_{i,k} c_ik f_ik (the vector–Jacobian product cᵀ ∂f/∂θ), by the hand-written
/// passes of a dense stack, a conv net or (on the CPU) a residual net, by candle's autograd
/// otherwise.
pub fn backpropagate(
    model: &dyn Model,
    inputs: &Tensor,
    cotangent: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Backpropagation> {
    if let Some(stack) = model.dense_stack() {
        return by_hand(DenseForward::run(stack, inputs, false), cotangent);
    }
    if let Some(net) = model.conv_net() {
        return by_hand(ConvForward::run(net, inputs), cotangent);
    }
    if let Some(net) = model.residual_net() {
        return by_hand(ResidualForward::run(net, inputs), cotangent);
    }
    let outputs = model.forward(inputs)?;
    let objective = (&outputs * cotangent(&outputs.detach())?)?.sum_all()?;
    Ok(Backpropagation {
        gradient: param_grads(&objective, model.params(), false)?,
        outputs: outputs.detach(),
        head: None,
    })
}

/// The per-sample losses ℓ_i (N,) of a batch and the gradient of Σ_i c_i ℓ_i, one detached tensor
/// per parameter in the model's order.
pub fn loss_and_gradient(
    model: &dyn Model,
    kind: LossKind,
    inputs: &Tensor,
    targets: &Targets,
    weights: &SampleWeights,
) -> Result<(Tensor, Vec<Tensor>)> {
    let pass = backpropagate(model, inputs, |f| {
        weights.apply(&output_gradient(kind, f, targets)?.0)
    })?;
    Ok((
        per_sample_loss(kind, &pass.outputs, targets)?,
        pass.gradient,
    ))
}

/// ∂(scalar)/∂params by candle's autograd, one tensor per parameter (zeros where the scalar does
/// not depend on it); with `keep_graph` the results keep their graph for a further
/// differentiation, otherwise they are detached.
pub fn param_grads(scalar: &Tensor, params: &[Param], keep_graph: bool) -> Result<Vec<Tensor>> {
    let grads = scalar.backward()?;
    params
        .iter()
        .map(|p| match grads.get(p.var.as_tensor()) {
            Some(g) if keep_graph => Ok(g.clone()),
            Some(g) => Ok(g.detach()),
            None => p.var.as_tensor().zeros_like(),
        })
        .collect()
}

/// The detached outputs f (N, K) of a batch, by the CNN's or (on the CPU) the ResNets'
/// hand-written forward pass, which keeps nothing for a backward pass (on the CPU a half to a
/// fifth of the time of candle's convolutions), `OUTPUT_SLICE` samples at a time for bounded
/// memory over a whole dataset; otherwise by the model's own forward.
pub fn outputs(model: &dyn Model, inputs: &Tensor) -> Result<Tensor> {
    let by_hand: &dyn Fn(&Tensor) -> Result<Tensor> = match (model.conv_net(), model.residual_net())
    {
        (Some(net), _) => &move |x| ConvForward::outputs(net, x),
        (_, Some(net)) => &move |x| ResidualForward::outputs(net, x),
        _ => return Ok(model.forward(inputs)?.detach()),
    };
    let n = inputs.dim(0)?;
    let slices = (0..n)
        .step_by(OUTPUT_SLICE)
        .map(|start| by_hand(&inputs.narrow(0, start, OUTPUT_SLICE.min(n - start))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&slices, 0)
}

/// Samples per slice of [`outputs`] (the CNN's largest patch matrix is then about 0.5 GB in f32
/// on CIFAR-10, a ResNet's 150 MB).
const OUTPUT_SLICE: usize = 256;

/// The mean loss of a mini-batch and its gradient: the SGD step.
pub fn mean_loss_and_gradient(
    model: &dyn Model,
    kind: LossKind,
    inputs: &Tensor,
    targets: &Targets,
) -> Result<(f64, Vec<Tensor>)> {
    let weights = SampleWeights::Uniform(1.0 / inputs.dim(0)? as f64);
    let (losses, gradient) = loss_and_gradient(model, kind, inputs, targets, &weights)?;
    let loss = losses.mean_all()?.to_dtype(DType::F64)?.to_scalar()?;
    Ok((loss, gradient))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::nn::gradcheck::random_tensor;
    use crate::nn::ModelSpec;

    #[test]
    fn outputs_by_hand_equal_the_model_forward_across_slices() {
        // The CNN on odd sizes (its pools drop a row or a column), ResNet-8 with a stride-2 stage
        // on odd sizes; both in f64, over more than one slice.
        for (spec, dims) in [
            (ModelSpec::Cnn {}, [2, 13, 14]),
            (ModelSpec::Resnet { depth: 8 }, [2, 7, 6]),
        ] {
            let model = spec
                .build(dims, 3, 1.0, 7, DType::F64, &Device::Cpu)
                .unwrap();
            assert!(model.conv_net().is_some() || model.residual_net().is_some());
            for (i, p) in model.params().iter().enumerate() {
                if p.name.ends_with("bias") {
                    p.var
                        .set(&random_tensor(p.var.dims(), 20 + i as u64, 0.1).unwrap())
                        .unwrap();
                }
            }
            let n = OUTPUT_SLICE + 44;
            let x = random_tensor(&[n, dims[0], dims[1], dims[2]], 8, 1.0).unwrap();
            let fast = outputs(model.as_ref(), &x).unwrap();
            let reference = model.forward(&x).unwrap();
            assert_eq!(fast.dims(), [n, 3]);
            let diff = (fast - reference).unwrap().abs().unwrap();
            let max = diff.max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(max < 1e-12, "{spec:?}: max difference {max}");
        }
    }
}
