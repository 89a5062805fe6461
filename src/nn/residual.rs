//! Hand-written forward and backward passes through a [`ResidualNet`] (the CIFAR ResNets without
//! BatchNorm), without candle's autograd, whose CPU convolutions (and their double backward) are
//! many times slower than PyTorch's: the SGD step and the curvature products of the ResNets take
//! their derivatives here, on the CPU.
//!
//! As in [`super::conv`], activations are channels-last (N, H, W, C) and a convolution is one
//! matrix product of its input's patches ([`window_patches`], here with padding 1 and stride 1 or
//! 2) with the kernel as a (9·C_in, C_out) matrix. Its weight gradient is patchesᵀ δ; its input
//! gradient sums the patch gradients δ Kᵀ back onto the image ([`conv_input_gradient`], the adjoint
//! of the patches), which serves every stride and padding. The stride-1 convolutions from 16
//! channels to 16 (the first stage) keep no patches: on an AVX-512 CPU in f32 they keep their
//! input zero-padded ([`ConvInput`]) and read it in place for the convolution (the bits of the
//! patch product) and the weight gradient; their input gradient is the "same" convolution of δ
//! with the flipped kernel, read in place likewise. Each convolution is followed by a ReLU (the
//! block's second after the shortcut is added), so each keeps one 0/1 gate. The option-A
//! shortcut and the global average pool are linear maps with exact adjoints ([`shortcut`],
//! [`shortcut_adjoint`], [`average_pool`], [`average_pool_adjoint`]). The linear layer runs through
//! [`DenseForward`]. Every tensor is detached.

use candle_core::{Result, Tensor};

use super::conv::{kernel_gradient, kernel_matrix};
use super::dense::DenseForward;
use super::gate::{activate, gate_gradient};
use super::im2col::{conv_input_gradient, window_patches, Window};
use super::pass::{head_backward, Forward, TrunkBackward};
use super::product::{
    matmul, pad_image, reads_in_place, same_convolution_16, same_weight_gradient_16,
    SAME_CONVOLUTION_WIDTH,
};
use super::{ResidualBlock, ResidualNet};

/// Image dimensions (N, H, W, C).
pub type Dims = (usize, usize, usize, usize);

/// Every convolution of the ResNets: 3×3, padding 1.
fn window(stride: usize) -> Window {
    Window {
        k: 3,
        stride,
        pad: 1,
    }
}

/// The option-A shortcut on channels-last `x` (N, H, W, C): `x[:, ::stride, ::stride]` (⌈H/2⌉ rows
/// for stride 2), then zero channels up to `out_channels`, half of the extra ones before.
pub fn shortcut(x: &Tensor, out_channels: usize, stride: usize) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    if out_channels < c {
        candle_core::bail!("option-A shortcut: cannot shrink {c} channels to {out_channels}");
    }
    let x = match stride {
        1 => x.clone(),
        2 => {
            let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
            x.pad_with_zeros(1, 0, 2 * ho - h)?
                .pad_with_zeros(2, 0, 2 * wo - w)?
                .reshape((n, ho, 2, wo, 2, c))?
                .narrow(4, 0, 1)?
                .narrow(2, 0, 1)?
                .reshape((n, ho, wo, c))?
        }
        s => candle_core::bail!("option-A shortcut: stride {s} is not supported (1 or 2)"),
    };
    let extra = out_channels - c;
    if extra == 0 {
        return Ok(x);
    }
    x.pad_with_zeros(3, extra / 2, extra - extra / 2)
}

/// The adjoint of [`shortcut`]: `g` (N, H_o, W_o, C_out) back onto an input of `input_dims`.
pub fn shortcut_adjoint(g: &Tensor, input_dims: Dims, stride: usize) -> Result<Tensor> {
    let (n, h, w, c) = input_dims;
    let (_, ho, wo, c_out) = g.dims4()?;
    let g = g.narrow(3, (c_out - c) / 2, c)?;
    match stride {
        1 => g.contiguous(),
        2 => g
            .reshape((n, ho, 1, wo, 1, c))?
            .pad_with_zeros(4, 0, 1)?
            .pad_with_zeros(2, 0, 1)?
            .reshape((n, 2 * ho, 2 * wo, c))?
            .narrow(1, 0, h)?
            .narrow(2, 0, w)?
            .contiguous(),
        s => candle_core::bail!("option-A shortcut: stride {s} is not supported (1 or 2)"),
    }
}

/// The mean over the spatial axes of `x` (N, H, W, C): (N, C).
pub fn average_pool(x: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    x.reshape((n, h * w, c))?.mean(1)
}

/// The adjoint of [`average_pool`]: `g` (N, C) spread evenly over an image of `dims`.
pub fn average_pool_adjoint(g: &Tensor, dims: Dims) -> Result<Tensor> {
    let (n, h, w, c) = dims;
    g.affine(1.0 / (h * w) as f64, 0.0)?
        .reshape((n, 1, c))?
        .broadcast_as((n, h * w, c))?
        .reshape(dims)
}

/// One convolution of the network as the passes see it.
pub struct ConvLayer {
    /// The detached weight (C_out, C_in, 3, 3).
    pub weight: Tensor,
    /// Its window (stride 1 or 2, padding 1).
    pub window: Window,
    /// (N, H, W, C_in) of its input.
    pub input_dims: Dims,
    /// What it keeps of its input for its weight gradient.
    pub input: ConvInput,
    /// ReLU' of the pre-activation that follows it (for a block's second convolution, after the
    /// shortcut is added): (N, H_o, W_o, C_out).
    pub gate: Tensor,
}

/// What a convolution keeps of its input, or of a tangent of it, for its weight gradient.
pub enum ConvInput {
    /// The patches (N·H_o·W_o, 9·C_in).
    Patches(Tensor),
    /// The image (N, H, W, 16) of a stride-1 convolution from 16 channels to 16, zero-padded
    /// ([`pad_image`]), read in place by [`same_convolution_16`] and [`same_weight_gradient_16`]
    /// (no patch matrix).
    Padded(Tensor),
}

impl ConvInput {
    /// What a convolution on `window` to `c_out` channels keeps of `x` (N, H, W, C_in): the
    /// image padded where it is read in place (stride 1, 16 channels in and out,
    /// [`reads_in_place`]), otherwise its patches.
    pub fn of(x: &Tensor, window: Window, c_out: usize) -> Result<Self> {
        let width = SAME_CONVOLUTION_WIDTH;
        if window == self::window(1) && x.dim(3)? == width && c_out == width && reads_in_place(x) {
            pad_image(x).map(Self::Padded)
        } else {
            window_patches(x, window).map(Self::Patches)
        }
    }

    /// conv(the input, `kernel` (C_out, C_in, 3, 3)) on the window it was kept for, shaped `out`
    /// (N, H_o, W_o, C_out).
    fn convolve(&self, kernel: &Tensor, out: Dims) -> Result<Tensor> {
        match self {
            Self::Padded(padded) => same_convolution(padded, kernel),
            Self::Patches(patches) => patch_convolution(patches, &kernel_matrix(kernel)?, out),
        }
    }
}

/// `patches` (of an image, on some window) times `kernel`, a kernel matrix (9·C_in, C_out), shaped
/// `out` (N, H_o, W_o, C_out).
fn patch_convolution(patches: &Tensor, kernel: &Tensor, out: Dims) -> Result<Tensor> {
    matmul(patches, kernel)?.reshape(out)
}

/// conv(`x`, `weight`) on `window` for `x` (N, H, W, C_in), (N, H_o, W_o, C_out), no patches
/// kept: read in place from a padded copy of `x` where [`same_convolution_16`] applies,
/// otherwise its patches times the kernel matrix (the same bits).
fn convolution(x: &Tensor, weight: &Tensor, window: Window) -> Result<Tensor> {
    let same = window == self::window(1) && weight.dim(0)? == SAME_CONVOLUTION_WIDTH;
    if same && reads_in_place(x) {
        return same_convolution(&pad_image(x)?, weight);
    }
    let (n, h, w, _) = x.dims4()?;
    let out = (
        n,
        window.output_len(h)?,
        window.output_len(w)?,
        weight.dim(0)?,
    );
    patch_convolution(&window_patches(x, window)?, &kernel_matrix(weight)?, out)
}

/// conv(x, `weight`) on a 3×3 window with stride 1 and padding 1 for the image x (N, H, W, C_in)
/// given zero-padded, (N, H, W, C_out): read in place where [`same_convolution_16`] applies,
/// otherwise the patches of the padded image (the same patches, the same bits).
fn same_convolution(padded: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let kernel = kernel_matrix(weight)?;
    if let Some(y) = same_convolution_16(padded, &kernel)? {
        return Ok(y);
    }
    let (n, hp, wp, _) = padded.dims4()?;
    let out = (n, hp - 2, wp - 2, kernel.dim(1)?);
    patch_convolution(&window_patches(padded, Window::valid(3))?, &kernel, out)
}

/// ReLU(`y` + `add`) and its gate, for a convolution's output `y` (N, H, W, C).
fn rectify(y: Tensor, add: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let z = match add {
        Some(t) => (y + t)?,
        None => y,
    };
    let zero = Tensor::zeros(z.dim(3)?, z.dtype(), z.device())?;
    activate(&z, &zero, false)
}

impl ConvLayer {
    /// The layer's convolution of `x`, plus `add` when given, then ReLU: the layer and its
    /// activation.
    fn run(
        weight: Tensor,
        x: &Tensor,
        stride: usize,
        add: Option<&Tensor>,
    ) -> Result<(Self, Tensor)> {
        let window = window(stride);
        let c_out = weight.dim(0)?;
        let input = ConvInput::of(x, window, c_out)?;
        let input_dims = x.dims4()?;
        let (n, h, w, _) = input_dims;
        let out = (n, window.output_len(h)?, window.output_len(w)?, c_out);
        let (a, gate) = rectify(input.convolve(&weight, out)?, add)?;
        let layer = Self {
            weight,
            window,
            input_dims,
            input,
            gate,
        };
        Ok((layer, a))
    }

    /// conv(`t`, `kernel`) on this layer's window, for a tangent `t` of its input (no patches
    /// kept: read in place where [`same_convolution_16`] applies).
    pub fn apply(&self, t: &Tensor, kernel: &Tensor) -> Result<Tensor> {
        convolution(&t.reshape(self.input_dims)?, kernel, self.window)
    }

    /// What this layer keeps of `t` (its input or a tangent of it) for a weight gradient.
    pub fn keep(&self, t: &Tensor) -> Result<ConvInput> {
        ConvInput::of(
            &t.reshape(self.input_dims)?,
            self.window,
            self.weight.dim(0)?,
        )
    }

    /// conv(`input`, `kernel`) for `input` kept by this layer ([`Self::keep`]) and `kernel`
    /// (C_out, C_in, 3, 3), shaped like the layer's output.
    pub fn convolve(&self, input: &ConvInput, kernel: &Tensor) -> Result<Tensor> {
        input.convolve(kernel, self.gate.dims4()?)
    }

    /// The weight gradient (C_out, C_in, 3, 3) of conv(`input`, W) for its output gradient
    /// `delta` (N, H_o, W_o, C_out), `input` kept by this layer: patchesᵀ δ, or read in place
    /// from the image ([`same_weight_gradient_16`]; its patches where that does not apply).
    pub fn weight_gradient(&self, input: &ConvInput, delta: &Tensor) -> Result<Tensor> {
        let k = self.window.k;
        match input {
            ConvInput::Patches(patches) => kernel_gradient(patches, delta, k),
            ConvInput::Padded(x) => match same_weight_gradient_16(x, &delta.contiguous()?)? {
                Some(g) => g
                    .reshape((k, k, x.dim(3)?, delta.dim(3)?))?
                    .permute((3, 2, 0, 1))?
                    .contiguous(),
                None => kernel_gradient(&window_patches(x, Window::valid(k))?, delta, k),
            },
        }
    }

    /// The input gradient Σ_j ∂ᵀ_x(δ_j, W_j) of several (δ (N, H_o, W_o, C_out), weight) pairs on
    /// this layer's window: the δ's side by side against the kernel matrices side by side, one
    /// product ([`conv_input_gradient`]). For a stride-1 convolution from 16 channels that is the
    /// "same" convolution of the δ's with the kernels flipped in both spatial axes, channels in
    /// and out swapped, which [`same_convolution_16`] reads in place where it applies.
    pub fn input_gradient(&self, terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
        if terms.is_empty() {
            candle_core::bail!("input gradient of no terms");
        }
        if self.window == window(1) && self.input_dims.3 == SAME_CONVOLUTION_WIDTH {
            let (deltas, weights): (Vec<&Tensor>, Vec<&Tensor>) = terms.iter().copied().unzip();
            let deltas = Tensor::cat(&deltas, 3)?;
            if reads_in_place(&deltas) {
                let weights = Tensor::cat(&weights, 0)?;
                let flipped = weights
                    .flip(&[2, 3])?
                    .permute((2, 3, 0, 1))?
                    .reshape((9 * weights.dim(0)?, self.input_dims.3))?;
                if let Some(g) = same_convolution_16(&pad_image(&deltas)?, &flipped)? {
                    return Ok(g);
                }
            }
        }
        let rows = self.gate.elem_count() / self.gate.dim(3)?;
        let (deltas, kernels): (Vec<Tensor>, Vec<Tensor>) = terms
            .iter()
            .map(|(delta, weight)| {
                let c_out = delta.dim(3)?;
                Ok((delta.reshape((rows, c_out))?, kernel_matrix(weight)?))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        conv_input_gradient(
            &Tensor::cat(&deltas, 1)?,
            &Tensor::cat(&kernels, 1)?,
            self.input_dims,
            self.window,
        )
    }
}

/// The retained forward pass of a batch.
pub struct ResidualForward {
    /// Every convolution in the network's order: the stem, then both of each block.
    pub convs: Vec<ConvLayer>,
    /// The blocks.
    pub blocks: Vec<ResidualBlock>,
    /// The linear layer's forward pass.
    pub head: DenseForward,
    /// (N, H, W, C) of the last block's output (the pool's input).
    pub features: Dims,
}

impl ResidualForward {
    /// Runs `x` (N, C, H, W) through the network.
    pub fn run(net: ResidualNet<'_>, x: &Tensor) -> Result<Self> {
        let mut convs = Vec::with_capacity(net.convs.len());
        let (head, features) = Self::trunk(net, x, |weight, x, stride, add| {
            let (layer, a) = ConvLayer::run(weight, x, stride, add)?;
            convs.push(layer);
            Ok(a)
        })?;
        Ok(Self {
            convs,
            blocks: net.blocks.to_vec(),
            head,
            features,
        })
    }

    /// The outputs f (N, K) of `x` (N, C, H, W), keeping nothing for a backward pass (the
    /// convolutions keep no patches; see [`ConvLayer::apply`]).
    pub fn outputs(net: ResidualNet<'_>, x: &Tensor) -> Result<Tensor> {
        let (head, _) = Self::trunk(net, x, |weight, x, stride, add| {
            Ok(rectify(convolution(x, &weight, window(stride))?, add)?.0)
        })?;
        Ok(head.outputs)
    }

    /// Runs `x` through the network: `layer(weight, input, stride, add)` runs each convolution,
    /// plus `add`, and its ReLU, in the network's order; then the pool and the head. Returns the
    /// head's pass and the dims of the last block's output.
    fn trunk(
        net: ResidualNet<'_>,
        x: &Tensor,
        mut layer: impl FnMut(Tensor, &Tensor, usize, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<(DenseForward, Dims)> {
        let weights: Vec<Tensor> = net
            .convs
            .iter()
            .map(|p| p.var.as_tensor().detach())
            .collect();
        if weights.len() != 1 + 2 * net.blocks.len() {
            candle_core::bail!(
                "a residual net of {} blocks needs {} convolutions, not {}",
                net.blocks.len(),
                1 + 2 * net.blocks.len(),
                weights.len()
            );
        }
        let x = x.detach().permute((0, 2, 3, 1))?.contiguous()?;
        let mut a = layer(weights[0].clone(), &x, 1, None)?;
        for (b, block) in net.blocks.iter().enumerate() {
            let h = layer(weights[1 + 2 * b].clone(), &a, block.stride, None)?;
            let skip = shortcut(&a, block.out_channels, block.stride)?;
            a = layer(weights[2 + 2 * b].clone(), &h, 1, Some(&skip))?;
        }
        let head = DenseForward::run(net.head, &average_pool(&a)?, false)?;
        Ok((head, a.dims4()?))
    }
}

impl Forward for ResidualForward {
    type Backward = TrunkBackward;

    fn head(&self) -> &DenseForward {
        &self.head
    }

    fn backward(&self, output_grad: Tensor) -> Result<TrunkBackward> {
        let (head, mut u) = head_backward(&self.head, output_grad, |g| {
            average_pool_adjoint(g, self.features)
        })?;
        let convs = &self.convs;
        let mut deltas = vec![None; convs.len()];
        for (b, block) in self.blocks.iter().enumerate().rev() {
            let (first, second) = (&convs[1 + 2 * b], &convs[2 + 2 * b]);
            let out = gate_gradient(&u, &second.gate, false)?;
            let inner = gate_gradient(
                &second.input_gradient(&[(&out, &second.weight)])?,
                &first.gate,
                false,
            )?;
            u = (first.input_gradient(&[(&inner, &first.weight)])?
                + shortcut_adjoint(&out, first.input_dims, block.stride)?)?;
            deltas[1 + 2 * b] = Some(inner);
            deltas[2 + 2 * b] = Some(out);
        }
        deltas[0] = Some(gate_gradient(&u, &convs[0].gate, false)?);
        let deltas: Vec<Tensor> = deltas.into_iter().flatten().collect();
        let mut gradient = convs
            .iter()
            .zip(&deltas)
            .map(|(conv, delta)| conv.weight_gradient(&conv.input, delta))
            .collect::<Result<Vec<_>>>()?;
        gradient.extend(head.gradient.iter().cloned());
        Ok(TrunkBackward {
            deltas,
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
        assert_gradient_equals_autograd, assert_weighted_gradient_matches_finite_difference, bits,
        dot_all, f32_and_f64_resnets, flat, one_hot_targets, random_tensor,
    };
    use crate::nn::gradient::mean_loss_and_gradient;
    use crate::nn::layers::{global_avg_pool, option_a_shortcut};
    use crate::nn::loss::{LossKind, Targets};
    use crate::nn::{Model, ModelSpec};

    /// ResNet-8 in f64 on (2, h, w) inputs, with random linear biases, and a batch of 5 samples of
    /// 3 classes.
    fn setup(seed: u64, h: usize, w: usize) -> (Box<dyn Model>, Tensor, Targets) {
        let model = ModelSpec::Resnet { depth: 8 }
            .build([2, h, w], 3, 1.0, seed, DType::F64, &Device::Cpu)
            .unwrap();
        for (i, p) in model.params().iter().enumerate() {
            if p.name.ends_with("bias") {
                let b = random_tensor(p.var.dims(), seed + i as u64, 0.1).unwrap();
                p.var.set(&b).unwrap();
            }
        }
        let x = random_tensor(&[5, 2, h, w], seed + 100, 1.0).unwrap();
        (model, x, one_hot_targets(5, 3))
    }

    fn to_nhwc(t: &Tensor) -> Tensor {
        t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
    }

    #[test]
    fn shortcut_and_pool_match_the_channels_first_layers_and_their_adjoints() {
        for (h, w, stride) in [(5, 4, 2), (4, 4, 2), (3, 5, 1)] {
            let x = random_tensor(&[2, 3, h, w], 7, 1.0).unwrap();
            let want = to_nhwc(&option_a_shortcut(&x, 6, stride).unwrap());
            let got = shortcut(&to_nhwc(&x), 6, stride).unwrap();
            assert_eq!(flat(&got), flat(&want), "{h}×{w}, stride {stride}");
            // ⟨S x, g⟩ = ⟨x, Sᵀ g⟩.
            let g = random_tensor(got.dims(), 8, 1.0).unwrap();
            let back = shortcut_adjoint(&g, to_nhwc(&x).dims4().unwrap(), stride).unwrap();
            let (lhs, rhs) = (dot_all(&[got], &[g]), dot_all(&[to_nhwc(&x)], &[back]));
            assert!(
                (lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
        }
        let x = random_tensor(&[2, 3, 5, 4], 9, 1.0).unwrap();
        let pooled = average_pool(&to_nhwc(&x)).unwrap();
        let want = flat(&global_avg_pool(&x).unwrap());
        for (a, b) in flat(&pooled).iter().zip(&want) {
            assert!((a - b).abs() < 1e-14);
        }
        let g = random_tensor(&[2, 3], 10, 1.0).unwrap();
        let back = average_pool_adjoint(&g, (2, 5, 4, 3)).unwrap();
        let (lhs, rhs) = (dot_all(&[pooled], &[g]), dot_all(&[to_nhwc(&x)], &[back]));
        assert!((lhs - rhs).abs() < 1e-12, "{lhs} vs {rhs}");
    }

    #[test]
    fn hand_written_gradient_equals_autograd() {
        // 8 → 4 → 2 rows (candle's autograd fails on some odd sizes, see below).
        assert!(setup(0, 8, 8).0.residual_net().is_some());
        assert_gradient_equals_autograd(|seed| setup(seed, 8, 8));
    }

    #[test]
    fn outputs_without_patches_equal_the_retained_pass_bit_for_bit() {
        // f32 on 16 × 17 images: the 16-channel convolutions read their input in place (on an
        // AVX-512 CPU), the others through patches, as the retained pass does throughout.
        let model = ModelSpec::Resnet { depth: 8 }
            .build([3, 16, 17], 4, 1.0, 3, DType::F32, &Device::Cpu)
            .unwrap();
        let x = random_tensor(&[6, 3, 16, 17], 4, 1.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let net = model.residual_net().unwrap();
        let lean = ResidualForward::outputs(net, &x).unwrap();
        let retained = ResidualForward::run(net, &x).unwrap().head.outputs;
        assert_eq!(lean.dims(), [6, 4]);
        assert_eq!(bits(&lean), bits(&retained));
    }

    #[test]
    fn f32_gradient_read_in_place_matches_the_f64_patch_products() {
        // In f32 the 16-channel convolutions keep their input image and take their weight and
        // input gradients from it in place (on an AVX-512 CPU); f64 takes patches throughout.
        let (model32, model64, x32, x64) = f32_and_f64_resnets(70, 5);
        let targets64 = one_hot_targets(5, 3);
        let targets32 = Targets {
            values: targets64.values.to_dtype(DType::F32).unwrap(),
            ..targets64.clone()
        };
        let forward = ResidualForward::run(model32.residual_net().unwrap(), &x32).unwrap();
        let images = forward
            .convs
            .iter()
            .filter(|c| matches!(c.input, ConvInput::Padded(_)))
            .count();
        if crate::nn::product::reads_in_place(&x32) {
            assert_eq!(
                images, 2,
                "ResNet-8's 16-channel block reads its images in place"
            );
        }
        for kind in [LossKind::Mse, LossKind::CrossEntropy] {
            let (_, g32) =
                mean_loss_and_gradient(model32.as_ref(), kind, &x32, &targets32).unwrap();
            let (_, g64) =
                mean_loss_and_gradient(model64.as_ref(), kind, &x64, &targets64).unwrap();
            for ((got, want), p) in g32.iter().zip(&g64).zip(model64.params()) {
                let (got, want) = (flat(got), flat(want));
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
                assert!(
                    err <= 1e-4 * scale,
                    "{kind:?} {}: {err:e} of {scale:e}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn weighted_gradient_on_odd_sizes_matches_a_central_finite_difference() {
        // 7 × 6 inputs: the stride-2 stages keep ⌈H/2⌉ rows (4 × 3, then 2 × 2), where candle's
        // strided conv2d backward returns a wrongly shaped gradient.
        let (model, x, targets) = setup(50, 7, 6);
        for kind in [LossKind::Mse, LossKind::CrossEntropy] {
            assert_weighted_gradient_matches_finite_difference(model.as_ref(), &x, &targets, kind);
        }
    }
}
