//! Hand-written forward and backward passes through a [`ConvNet`] (the 5-layer CNN), without
//! candle's autograd, whose CPU convolution backward is several times slower than the forward: the
//! SGD step and the full-batch gradients of the CNN take their gradient here.
//!
//! Inside, activations are kept channels-last (N, H, W, C). A valid k×k convolution is then one
//! matrix product of the input's patches (N·H_o·W_o, k·k·C_in) (im2col, patch order (row, column,
//! channel)) with the kernel as a (k·k·C_in, C_out) matrix; its weight gradient is patchesᵀ δ, and
//! its input gradient the same patch product on δ padded by k − 1 with the flipped kernel (a "full"
//! correlation), so one patch extraction serves both directions. A 2×2 max pool keeps a 0/1 mask of
//! each window's maximum, folded with ReLU' into one gate per convolution. The dense head after the
//! flatten (PyTorch's (C, H, W) order) runs through [`DenseForward`]. Every tensor is detached.

use candle_core::{Result, Tensor};

use super::dense::DenseForward;
use super::gate::{activate, gate_gradient};
use super::im2col::{conv_input_gradient, patch_weight_gradient, patches, Window};
use super::pass::{head_backward, Forward, TrunkBackward};
use super::product::matmul;
use super::reduce::column_sums;
use super::ConvNet;

/// The retained forward pass of a batch.
pub struct ConvForward {
    /// Each convolution's detached weight, (C_out, C_in, k, k).
    pub weights: Vec<Tensor>,
    /// The patches of each convolution's input, (N·H_o·W_o, k·k·C_in).
    pub patches: Vec<Tensor>,
    /// ∂a/∂z of each convolution's output through its ReLU and, where one follows, its max pool:
    /// 1 where the output passes a gradient on, 0 elsewhere; (N, H_o, W_o, C_out).
    pub gates: Vec<Tensor>,
    /// Whether a 2×2 max pool follows each convolution.
    pub pools: Vec<bool>,
    /// The dense head's forward pass.
    pub head: DenseForward,
    /// (N, H, W, C) of the trunk's output (the head's input before flattening).
    pub features: (usize, usize, usize, usize),
}

/// A weight (C_out, C_in, k, k) as the (k·k·C_in, C_out) matrix that multiplies patches.
pub fn kernel_matrix(weight: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    weight.permute((2, 3, 1, 0))?.reshape((k * k * c_in, c_out))
}

/// `patchesᵀ δ` for patches (R, k·k·C_in) and δ (N, H_o, W_o, C_out) with R = N·H_o·W_o: the
/// gradient of the convolution's weight, in its layout (C_out, C_in, k, k). On the CPU by blocks
/// of rows ([`patch_weight_gradient`]), elsewhere one matrix product.
pub fn kernel_gradient(patches: &Tensor, delta: &Tensor, k: usize) -> Result<Tensor> {
    let (n, ho, wo, c_out) = delta.dims4()?;
    let c_in = patches.dim(1)? / (k * k);
    let delta = delta.reshape((n * ho * wo, c_out))?;
    if patches.device().is_cpu() {
        patch_weight_gradient(patches, &delta)?
            .reshape((c_out, k, k, c_in))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    } else {
        patches
            .t()?
            .matmul(&delta)?
            .reshape((k, k, c_in, c_out))?
            .permute((3, 2, 0, 1))?
            .contiguous()
    }
}

/// ∂/∂x of Σ δ · conv(x, W) for δ (N, H_o, W_o, C_out): (N, H_o + k − 1, W_o + k − 1, C_in),
/// Σ_{a, b} δ[p − a, q − b] W[:, :, a, b]: on the CPU the patch gradients δ Kᵀ summed back onto
/// the image ([`conv_input_gradient`]), elsewhere the patches of δ padded by k − 1 against the
/// kernel flipped in both spatial axes.
pub fn input_gradient(delta: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, k, _) = weight.dims4()?;
    let (n, ho, wo, _) = delta.dims4()?;
    let input_dims = (n, ho + k - 1, wo + k - 1, c_in);
    if delta.device().is_cpu() {
        return conv_input_gradient(
            &delta.reshape((n * ho * wo, c_out))?,
            &kernel_matrix(weight)?,
            input_dims,
            Window::valid(k),
        );
    }
    let flipped = weight
        .flip(&[2, 3])?
        .permute((2, 3, 0, 1))?
        .reshape((k * k * c_out, c_in))?;
    let padded = delta
        .pad_with_zeros(1, k - 1, k - 1)?
        .pad_with_zeros(2, k - 1, k - 1)?;
    patches(&padded, k)?.matmul(&flipped)?.reshape(input_dims)
}

/// The head's input (N, C·H·W) in PyTorch's flatten order from the trunk's output (N, H, W, C).
pub fn flatten_features(a: &Tensor) -> Result<Tensor> {
    a.permute((0, 3, 1, 2))?.flatten_from(1)
}

/// The trunk's output (N, H, W, C) from a tensor over the head's input (N, C·H·W).
pub fn unflatten_features(t: &Tensor, features: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (n, h, w, c) = features;
    t.reshape((n, c, h, w))?.permute((0, 2, 3, 1))
}

/// The convolution `weight` with `bias` on `a` (N, H, W, C_in), then ReLU and, if `pool`, a 2×2
/// max pool: (the input's patches, the activated output, the gate).
fn convolve(
    a: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    pool: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (c_out, _, k, _) = weight.dims4()?;
    let (n, h, w, _) = a.dims4()?;
    let cols = patches(a, k)?;
    let y = matmul(&cols, &kernel_matrix(weight)?)?.reshape((n, h + 1 - k, w + 1 - k, c_out))?;
    let (activated, gate) = activate(&y, bias, pool)?;
    Ok((cols, activated, gate))
}

/// `x` (N, C, H, W) channels-last, detached.
fn channels_last(x: &Tensor) -> Result<Tensor> {
    x.detach().permute((0, 2, 3, 1))?.contiguous()
}

/// The `l`-th convolution's detached (weight, bias).
fn conv_params(net: &ConvNet<'_>, l: usize) -> (Tensor, Tensor) {
    (
        net.convs[2 * l].var.as_tensor().detach(),
        net.convs[2 * l + 1].var.as_tensor().detach(),
    )
}

impl ConvForward {
    /// Runs `x` (N, C, H, W) through the network.
    pub fn run(net: ConvNet<'_>, x: &Tensor) -> Result<Self> {
        let mut a = channels_last(x)?;
        let layers = net.pools.len();
        let mut weights = Vec::with_capacity(layers);
        let mut all_patches = Vec::with_capacity(layers);
        let mut gates = Vec::with_capacity(layers);
        for (l, &pool) in net.pools.iter().enumerate() {
            let (weight, bias) = conv_params(&net, l);
            let (cols, activated, gate) = convolve(&a, &weight, &bias, pool)?;
            a = activated;
            weights.push(weight);
            all_patches.push(cols);
            gates.push(gate);
        }
        let features = a.dims4()?;
        let flat = flatten_features(&a)?;
        Ok(Self {
            weights,
            patches: all_patches,
            gates,
            pools: net.pools.to_vec(),
            head: DenseForward::run(net.head, &flat, false)?,
            features,
        })
    }

    /// The outputs f (N, K) of `x` (N, C, H, W), keeping nothing for a backward pass.
    pub fn outputs(net: ConvNet<'_>, x: &Tensor) -> Result<Tensor> {
        let mut a = channels_last(x)?;
        for (l, &pool) in net.pools.iter().enumerate() {
            let (weight, bias) = conv_params(&net, l);
            a = convolve(&a, &weight, &bias, pool)?.1;
        }
        Ok(DenseForward::run(net.head, &flatten_features(&a)?, false)?.outputs)
    }
}

impl Forward for ConvForward {
    type Backward = TrunkBackward;

    fn head(&self) -> &DenseForward {
        &self.head
    }

    fn backward(&self, output_grad: Tensor) -> Result<TrunkBackward> {
        let (head, mut u) = head_backward(&self.head, output_grad, |g| {
            unflatten_features(g, self.features)
        })?;
        let layers = self.gates.len();
        let mut gradient = vec![None; 2 * layers];
        let mut deltas = vec![None; layers];
        for l in (0..layers).rev() {
            let delta = gate_gradient(&u, &self.gates[l], self.pools[l])?;
            let k = self.weights[l].dim(2)?;
            gradient[2 * l] = Some(kernel_gradient(&self.patches[l], &delta, k)?);
            gradient[2 * l + 1] = Some(column_sums(&delta.flatten_to(2)?)?);
            if l > 0 {
                u = input_gradient(&delta, &self.weights[l])?;
            }
            deltas[l] = Some(delta);
        }
        let mut gradient: Vec<Tensor> = gradient.into_iter().flatten().collect();
        gradient.extend(head.gradient.iter().cloned());
        Ok(TrunkBackward {
            deltas: deltas.into_iter().flatten().collect(),
            head,
            gradient,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::nn::gradcheck::{
        assert_gradient_equals_autograd, assert_weighted_gradient_matches_finite_difference,
        one_hot_targets, random_tensor,
    };
    use crate::nn::loss::{LossKind, Targets};
    use crate::nn::{Model, ModelSpec};

    /// The CNN in f64 on (2, 13, 14) inputs (odd sizes: the pools drop a row or a column), with
    /// random biases, and a batch of 5 samples of 3 classes.
    fn setup(seed: u64) -> (Box<dyn Model>, Tensor, Targets) {
        let model = ModelSpec::Cnn {}
            .build([2, 13, 14], 3, 1.0, seed, DType::F64, &Device::Cpu)
            .unwrap();
        for (i, p) in model.params().iter().enumerate() {
            if p.name.ends_with("bias") {
                let b = random_tensor(p.var.dims(), seed + i as u64, 0.1).unwrap();
                p.var.set(&b).unwrap();
            }
        }
        let x = random_tensor(&[5, 2, 13, 14], seed + 100, 1.0).unwrap();
        (model, x, one_hot_targets(5, 3))
    }

    #[test]
    fn hand_written_gradient_equals_autograd() {
        assert!(setup(0).0.conv_net().is_some());
        assert_gradient_equals_autograd(setup);
    }

    #[test]
    fn weighted_gradient_matches_a_central_finite_difference() {
        let (model, x, targets) = setup(50);
        assert_weighted_gradient_matches_finite_difference(
            model.as_ref(),
            &x,
            &targets,
            LossKind::Mse,
        );
    }
}
